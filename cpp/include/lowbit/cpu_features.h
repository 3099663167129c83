// What the CPU and the operating system support, detected once per Context.
// An instruction set counts only when the CPU reports it (CPUID) AND the OS
// saves its registers (XGETBV); AMX additionally needs Linux to grant the
// tile-data permission (arch_prctl ARCH_REQ_XCOMP_PERM).
#pragma once

#include <string>

namespace lowbit {

struct CpuFeatures {
  std::string arch;  // "x86_64", "aarch64", or "other"
  bool avx2 = false;
  bool fma = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512dq = false;
  bool avx512vnni = false;
  bool avxvnni = false;
  bool amx_tile = false;
  bool amx_int8 = false;
  bool amx_permitted = false;  // Linux granted XTILEDATA to this process
  bool amx_verified = false;   // the AMX kernel passed gemm_kernel_self_test here
  bool neon = false;
  bool neon_dotprod = false;

  bool has_avx512_core() const { return avx512f && avx512bw && avx512vl && avx512dq; }
};

// Detects features; `request_amx` asks Linux for the AMX tile permission.
CpuFeatures detect_cpu_features(bool request_amx);

// The x86 registers detection reads, so the decoding can be tested with made-up CPUs.
struct X86CpuidRegisters {
  unsigned max_leaf = 0;             // CPUID leaf 0 EAX
  unsigned leaf1_ecx = 0;            // CPUID leaf 1 ECX (OSXSAVE, AVX, FMA)
  unsigned long long xcr0 = 0;       // XGETBV(0): register state the OS saves
  unsigned leaf7_max_subleaf = 0;    // CPUID leaf 7 subleaf 0 EAX
  unsigned leaf7_ebx = 0, leaf7_ecx = 0, leaf7_edx = 0;  // leaf 7 subleaf 0
  unsigned leaf7_1_eax = 0;          // leaf 7 subleaf 1 (AVX-VNNI); only read when leaf7_max_subleaf >= 1
  bool os_avx512_enabled_lazily = false;  // macOS: AVX-512 state is off in XCR0 until first use (sysctl says so)
};

// Features from register values; AMX permission is not decided here.
CpuFeatures decode_x86_features(const X86CpuidRegisters& r);

}  // namespace lowbit
