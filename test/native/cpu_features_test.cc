// CPU feature decoding from made-up register values: what each bit grants, and
// what the OS must also enable, without needing those CPUs.
#include "harness.h"
#include "lowbit/cpu_features.h"

using lowbit::CpuFeatures;
using lowbit::X86CpuidRegisters;

namespace {

constexpr unsigned kOsxsaveAvxFma = (1u << 27) | (1u << 28) | (1u << 12);
constexpr unsigned long long kXcr0Avx = 0x7;               // x87, XMM, YMM
constexpr unsigned long long kXcr0Avx512 = 0x7 | 0xE0;     // + opmask, ZMM_Hi256, Hi16_ZMM
constexpr unsigned long long kXcr0Amx = kXcr0Avx512 | 0x60000;
constexpr unsigned kAvx2 = 1u << 5;
constexpr unsigned kAvx512Core = (1u << 16) | (1u << 17) | (1u << 30) | (1u << 31);
constexpr unsigned kAvx512Vnni = 1u << 11;  // leaf 7 ECX
constexpr unsigned kAmxTileInt8 = (1u << 24) | (1u << 25);  // leaf 7 EDX
constexpr unsigned kAvxVnni = 1u << 4;  // leaf 7 subleaf 1 EAX

// A Sapphire-Rapids-like CPU whose OS enables everything.
X86CpuidRegisters full_cpu() {
  X86CpuidRegisters r;
  r.max_leaf = 0x20;
  r.leaf1_ecx = kOsxsaveAvxFma;
  r.xcr0 = kXcr0Amx;
  r.leaf7_max_subleaf = 1;
  r.leaf7_ebx = kAvx2 | kAvx512Core;
  r.leaf7_ecx = kAvx512Vnni;
  r.leaf7_edx = kAmxTileInt8;
  r.leaf7_1_eax = kAvxVnni;
  return r;
}

std::string expect(bool got, bool want, const char* what) {
  if (got == want) return "";
  return std::string(what) + (want ? " should be detected" : " should not be detected");
}

}  // namespace

void register_cpu_features_tests() {
  harness::add("cpu features: every x86 feature decoded when the CPU reports it and the OS saves its state", [] {
    CpuFeatures f = lowbit::decode_x86_features(full_cpu());
    std::string why = expect(f.avx2 && f.fma, true, "AVX2/FMA");
    if (why.empty()) why = expect(f.has_avx512_core() && f.avx512vnni, true, "AVX-512 VNNI");
    if (why.empty()) why = expect(f.avxvnni, true, "AVX-VNNI");
    if (why.empty()) why = expect(f.amx_tile && f.amx_int8, true, "AMX int8");
    if (why.empty()) why = expect(f.amx_permitted, false, "AMX permission (asked separately)");
    return why;
  });

  harness::add("cpu features: leaf 7 subleaf 1 ignored when subleaf 0 says it does not exist", [] {
    X86CpuidRegisters r = full_cpu();
    r.leaf7_max_subleaf = 0;  // older CPUs: subleaf 1's registers are whatever the CPU returns
    CpuFeatures f = lowbit::decode_x86_features(r);
    std::string why = expect(f.avxvnni, false, "AVX-VNNI");
    if (why.empty()) why = expect(f.avx2 && f.avx512vnni, true, "AVX2 and AVX-512 VNNI (subleaf 0)");
    return why;
  });

  harness::add("cpu features: AVX-512 and AMX need the OS to save their state (XCR0)", [] {
    X86CpuidRegisters r = full_cpu();
    r.xcr0 = kXcr0Avx;
    CpuFeatures f = lowbit::decode_x86_features(r);
    std::string why = expect(f.avx512f || f.avx512vnni, false, "AVX-512 without ZMM state");
    if (why.empty()) why = expect(f.amx_int8, false, "AMX without tile state");
    if (why.empty()) why = expect(f.avx2 && f.avxvnni, true, "AVX2 and AVX-VNNI (YMM state is saved)");
    return why;
  });

  harness::add("cpu features: macOS's lazily enabled AVX-512 counts (XCR0 shows it off until first use)", [] {
    X86CpuidRegisters r = full_cpu();
    r.xcr0 = kXcr0Avx;
    r.os_avx512_enabled_lazily = true;
    CpuFeatures f = lowbit::decode_x86_features(r);
    std::string why = expect(f.has_avx512_core() && f.avx512vnni, true, "AVX-512 VNNI");
    if (why.empty()) why = expect(f.amx_int8, false, "AMX (not part of the lazy promise)");
    return why;
  });

  harness::add("cpu features: nothing without OSXSAVE, without YMM state, or with CPUID leaf 7 missing", [] {
    X86CpuidRegisters r = full_cpu();
    r.leaf1_ecx &= ~(1u << 27);
    if (lowbit::decode_x86_features(r).avx2) return std::string("AVX2 decoded without OSXSAVE");
    r = full_cpu();
    r.xcr0 = 0x3;  // x87 and XMM only
    CpuFeatures f = lowbit::decode_x86_features(r);
    if (f.avx2 || f.avxvnni || f.avx512f) return std::string("AVX features decoded without YMM state");
    r = full_cpu();
    r.max_leaf = 6;
    f = lowbit::decode_x86_features(r);
    if (f.avx2 || f.avxvnni || f.fma) return std::string("leaf 7 features decoded with max leaf 6");
    return std::string();
  });
}
