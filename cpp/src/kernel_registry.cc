// Picks a quantization path: "was it built" AND "does this CPU/OS support it".
#include "lowbit/quantize_kernels.h"

namespace lowbit {

#if !LOWBIT_BUILT_AVX2
const QuantizeKernels* quantize_kernels_avx2() { return nullptr; }
#endif
#if !LOWBIT_BUILT_AVX512
const QuantizeKernels* quantize_kernels_avx512() { return nullptr; }
#endif

namespace {

struct Candidate {
  const QuantizeKernels* kernels;
  bool supported;
};

std::vector<Candidate> candidates_best_first(const CpuFeatures& cpu) {
  return {
      {quantize_kernels_avx512(), cpu.has_avx512_core()},
      {quantize_kernels_avx2(), cpu.avx2},
      {quantize_kernels_scalar(), true},
  };
}

}  // namespace

std::vector<std::string> available_quantize_kernels(const CpuFeatures& cpu) {
  std::vector<std::string> names;
  for (const auto& c : candidates_best_first(cpu))
    if (c.kernels && c.supported) names.emplace_back(c.kernels->name);
  return names;
}

const QuantizeKernels* find_quantize_kernels(const std::string& name, const CpuFeatures& cpu) {
  for (const auto& c : candidates_best_first(cpu)) {
    if (!c.kernels || !c.supported) continue;
    if (name.empty() || name == c.kernels->name) return c.kernels;
  }
  return nullptr;
}

}  // namespace lowbit
