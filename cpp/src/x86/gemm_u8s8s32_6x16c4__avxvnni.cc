// AVX-VNNI (VEX-encoded vpdpbusd) GEMM kernel; the code is in the .inc file.
#define LOWBIT_DPBUSD_YMM(acc, a, b) _mm256_dpbusd_avx_epi32(acc, a, b)
#define LOWBIT_KERNEL_NAME "avxvnni"
#define LOWBIT_KERNEL_GETTER gemm_kernel_avxvnni
#include "gemm_u8s8s32_6x16c4_vnni_ymm.inc"
