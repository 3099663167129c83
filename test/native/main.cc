// Native test binary: kernels and drivers against their references.
// Usage: lowbit_native_tests [name-filter]
#include "harness.h"

void register_quantize_tests();
void register_gemm_tests();
void register_int4_tests();
void register_thread_pool_tests();
void register_sgemm_tests();
void register_train_ops_tests();
void register_linalg_tests();
void register_cpu_features_tests();

int main(int argc, char** argv) {
  register_quantize_tests();
  register_gemm_tests();
  register_int4_tests();
  register_thread_pool_tests();
  register_sgemm_tests();
  register_train_ops_tests();
  register_linalg_tests();
  register_cpu_features_tests();
  return harness::run_all(argc > 1 ? argv[1] : "");
}
