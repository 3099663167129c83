#include "lowbit/cpu_features.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#if defined(__APPLE__)
#include <sys/sysctl.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#elif defined(__aarch64__)
#if defined(__linux__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif
#endif

namespace lowbit {

#if defined(__x86_64__) || defined(_M_X64)
namespace {

uint64_t read_xcr0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}

bool request_amx_permission() {
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

bool macos_enables_avx512_lazily() {
#if defined(__APPLE__)
  // macOS turns AVX-512 state on in XCR0 only at a thread's first AVX-512 instruction;
  // the kernel reports support through sysctl instead.
  int value = 0;
  size_t size = sizeof(value);
  return sysctlbyname("hw.optional.avx512f", &value, &size, nullptr, 0) == 0 && value != 0;
#else
  return false;
#endif
}

}  // namespace

CpuFeatures detect_cpu_features(bool request_amx) {
  X86CpuidRegisters r;
  unsigned a, b, c, d;
  r.max_leaf = __get_cpuid_max(0, nullptr);
  if (r.max_leaf >= 1) {
    __cpuid(1, a, b, c, d);
    r.leaf1_ecx = c;
    if (c & (1u << 27)) r.xcr0 = read_xcr0();  // XGETBV faults without OSXSAVE
  }
  if (r.max_leaf >= 7) {
    __cpuid_count(7, 0, a, b, c, d);
    r.leaf7_max_subleaf = a;
    r.leaf7_ebx = b;
    r.leaf7_ecx = c;
    r.leaf7_edx = d;
    if (r.leaf7_max_subleaf >= 1) {
      __cpuid_count(7, 1, a, b, c, d);
      r.leaf7_1_eax = a;
    }
  }
  r.os_avx512_enabled_lazily = macos_enables_avx512_lazily();
  CpuFeatures f = decode_x86_features(r);
  if (f.amx_int8 && request_amx) f.amx_permitted = request_amx_permission();
  return f;
}

#elif defined(__aarch64__)

CpuFeatures detect_cpu_features(bool) {
  CpuFeatures f;
  f.arch = "aarch64";
  f.neon = true;  // mandatory in AArch64
#if defined(__linux__) && defined(HWCAP_ASIMDDP)
  f.neon_dotprod = (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__APPLE__) && defined(__ARM_FEATURE_DOTPROD)
  // Every Apple-silicon Mac has it (the compiler's default target, apple-m1 or later, says so); no getauxval there.
  f.neon_dotprod = true;
#endif
  return f;
}

#else

CpuFeatures detect_cpu_features(bool) {
  CpuFeatures f;
  f.arch = "other";
  return f;
}

#endif

CpuFeatures decode_x86_features(const X86CpuidRegisters& r) {
  CpuFeatures f;
  f.arch = "x86_64";
  if (r.max_leaf < 1) return f;
  const bool osxsave = r.leaf1_ecx & (1u << 27);
  const bool avx = r.leaf1_ecx & (1u << 28);
  const bool fma = r.leaf1_ecx & (1u << 12);
  if (!osxsave || !avx) return f;
  const bool os_avx = (r.xcr0 & 0x6) == 0x6;  // XMM and YMM state
  // opmask, ZMM_Hi256, Hi16_ZMM state (or macOS's promise to enable it on first use)
  const bool os_avx512 = os_avx && ((r.xcr0 & 0xE0) == 0xE0 || r.os_avx512_enabled_lazily);
  const bool os_amx = (r.xcr0 & 0x60000) == 0x60000;  // XTILECFG, XTILEDATA
  if (!os_avx || r.max_leaf < 7) return f;
  f.fma = fma;
  f.avx2 = r.leaf7_ebx & (1u << 5);
  if (os_avx512) {
    f.avx512f = r.leaf7_ebx & (1u << 16);
    f.avx512dq = r.leaf7_ebx & (1u << 17);
    f.avx512bw = r.leaf7_ebx & (1u << 30);
    f.avx512vl = r.leaf7_ebx & (1u << 31);
    f.avx512vnni = f.avx512f && (r.leaf7_ecx & (1u << 11));
  }
  // Subleaf 1 exists only when subleaf 0 says so; otherwise its registers mean nothing.
  f.avxvnni = f.avx2 && r.leaf7_max_subleaf >= 1 && (r.leaf7_1_eax & (1u << 4));
  if (os_amx) {
    f.amx_tile = r.leaf7_edx & (1u << 24);
    f.amx_int8 = f.amx_tile && (r.leaf7_edx & (1u << 25));
  }
  return f;
}

}  // namespace lowbit
