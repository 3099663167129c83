// The AVX-VNNI kernel's code with the EVEX (AVX-512VL VNNI) vpdpbusd, for
// testing that code on machines that have AVX-512 VNNI but not AVX-VNNI.
#define LOWBIT_DPBUSD_YMM(acc, a, b) _mm256_dpbusd_epi32(acc, a, b)
#define LOWBIT_KERNEL_NAME "avxvnni-as-evex"
#define LOWBIT_KERNEL_GETTER gemm_kernel_avxvnni_as_evex
#include "gemm_u8s8s32_6x16c4_vnni_ymm.inc"
