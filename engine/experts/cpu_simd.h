/* What the C expert kernels (nvfp4_cpu.c, fp8_cpu.c) share: the AVX2 switch, the token tile,
 * a horizontal sum, and PyTorch's fp32 -> bf16 rounding in scalar and 8-lane forms.
 * engine/native_build.py hashes this file into every kernel's cache key. */
#ifndef QUIRE_CPU_SIMD_H
#define QUIRE_CPU_SIMD_H

#include <stdint.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__) && !defined(QUIRE_PORTABLE)
#include <immintrin.h>
#define QUIRE_SIMD 1
#else
#define QUIRE_SIMD 0
#endif

#define TILE 8 /* tokens per pass over a row: eight accumulators stay in registers */

/* Round to nearest even, NaN to 0xFFFF: PyTorch's vectorised fp32 -> bf16 conversion. */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0xffffu;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#if QUIRE_SIMD
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* to_bf16 of 8 lanes, each result in the low 16 bits of its 32-bit lane (NaN first: rounding
   a NaN's bits could carry it into another value). */
static inline __m256i bf16x8(__m256 v) {
    const __m256i one = _mm256_set1_epi32(1), half = _mm256_set1_epi32(0x7fff);
    __m256i u = _mm256_castps_si256(v);
    u = _mm256_add_epi32(u, _mm256_add_epi32(half, _mm256_and_si256(_mm256_srli_epi32(u, 16), one)));
    u = _mm256_srli_epi32(u, 16);
    __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    return _mm256_blendv_epi8(u, _mm256_set1_epi32(0xffff), _mm256_castps_si256(nan));
}
#endif

#endif
