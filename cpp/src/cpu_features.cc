#include "lowbit/cpu_features.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
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

}  // namespace

CpuFeatures detect_cpu_features(bool request_amx) {
  CpuFeatures f;
  f.arch = "x86_64";
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27);
  const bool avx = c & (1u << 28);
  const bool fma = c & (1u << 12);
  if (!osxsave || !avx) return f;
  const uint64_t xcr0 = read_xcr0();
  const bool os_avx = (xcr0 & 0x6) == 0x6;             // XMM and YMM state
  const bool os_avx512 = os_avx && (xcr0 & 0xE0) == 0xE0;  // opmask, ZMM_Hi256, Hi16_ZMM
  const bool os_amx = (xcr0 & 0x60000) == 0x60000;     // XTILECFG, XTILEDATA
  if (!os_avx) return f;
  unsigned max_leaf = __get_cpuid_max(0, nullptr);
  if (max_leaf < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  f.fma = fma;
  f.avx2 = b & (1u << 5);
  if (os_avx512) {
    f.avx512f = b & (1u << 16);
    f.avx512dq = b & (1u << 17);
    f.avx512bw = b & (1u << 30);
    f.avx512vl = b & (1u << 31);
    f.avx512vnni = f.avx512f && (c & (1u << 11));
  }
  const bool cpu_amx_tile = d & (1u << 24);
  const bool cpu_amx_int8 = d & (1u << 25);
  __cpuid_count(7, 1, a, b, c, d);
  f.avxvnni = f.avx2 && (a & (1u << 4));
  if (os_amx) {
    f.amx_tile = cpu_amx_tile;
    f.amx_int8 = cpu_amx_tile && cpu_amx_int8;
    if (f.amx_int8 && request_amx) f.amx_permitted = request_amx_permission();
  }
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

}  // namespace lowbit
