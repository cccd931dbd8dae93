/* NVFP4 expert matrices on the CPU: built once per machine and loaded by
 * engine/experts/nvfp4_cpu.py (the layout is documented in engine/experts/nvfp4.py).
 *
 * A matrix is a blob of N rows of `row_bytes`: K/2 code bytes (two E2M1 codes per byte, the low
 * nibble the even column), then K/16 E4M3 scale bytes; `divisors` [N] fp32 divide every scale of
 * their row. Each function handles rows [r0, r1): the caller splits the rows over threads.
 * `e4m3` is the 256 byte values of E4M3 as fp32, built by PyTorch so that no bit decoding here can
 * disagree with it. No -ffast-math: the dequantisation must equal PyTorch's fp32 arithmetic.
 */
#include "cpu_simd.h"
#include "cpu_pool.h"

#if !QUIRE_SIMD
static const float E2M1[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                               -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
#endif

int quire_nvfp4_simd(void) { return QUIRE_SIMD; }

#if QUIRE_SIMD
/* Twice the E2M1 values as int8 (all integers), looked up 16 at a time by a byte shuffle; the
   dequantisation looks up magnitudes and sets the sign bits itself, so that code 8 gives -0.0. */
#define SIGNED_VALUES _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)
#define MAGNITUDES _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, 1, 2, 3, 4, 6, 8, 12)

static inline void group_values(const uint8_t *codes, __m128i lut, __m256 *w_even, __m256 *w_odd) {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    __m128i raw = _mm_loadl_epi64((const __m128i *)codes);
    __m128i lo = _mm_shuffle_epi8(lut, _mm_and_si128(raw, low4));
    __m128i hi = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(raw, 4), low4));
    *w_even = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
    *w_odd = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
}

/* One group's scaled products with a token's 16 inputs (even columns, then odd ones). */
static inline __m256 group_dot(__m256 w_even, __m256 w_odd, const float *xg) {
    __m256 t = _mm256_mul_ps(w_even, _mm256_loadu_ps(xg));
    return _mm256_fmadd_ps(w_odd, _mm256_loadu_ps(xg + 8), t);
}

/* Groups go in pairs, summed before they reach the accumulator: each token's accumulator then
   waits on one addition per two groups, not one multiply-add per group. */
static void row_dots(const uint8_t *codes, const uint8_t *scales, int64_t groups, const float *e4m3,
                     const float *xp, int64_t K, int64_t mt, float *out) {
    __m256 acc[TILE];
    for (int64_t m = 0; m < mt; m++) acc[m] = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 1 < groups; g += 2) {
        __m256 e0, o0, e1, o1;
        group_values(codes + 8 * g, SIGNED_VALUES, &e0, &o0);
        group_values(codes + 8 * g + 8, SIGNED_VALUES, &e1, &o1);
        __m256 s0 = _mm256_set1_ps(e4m3[scales[g]]), s1 = _mm256_set1_ps(e4m3[scales[g + 1]]);
        for (int64_t m = 0; m < mt; m++) {
            const float *xg = xp + m * K + 16 * g;
            __m256 pair = _mm256_mul_ps(group_dot(e0, o0, xg), s0);
            pair = _mm256_fmadd_ps(group_dot(e1, o1, xg + 16), s1, pair);
            acc[m] = _mm256_add_ps(acc[m], pair);
        }
    }
    for (; g < groups; g++) {
        __m256 e0, o0;
        group_values(codes + 8 * g, SIGNED_VALUES, &e0, &o0);
        __m256 s0 = _mm256_set1_ps(e4m3[scales[g]]);
        for (int64_t m = 0; m < mt; m++)
            acc[m] = _mm256_fmadd_ps(group_dot(e0, o0, xp + m * K + 16 * g), s0, acc[m]);
    }
    for (int64_t m = 0; m < mt; m++) out[m] = 0.5f * hsum(acc[m]);
}
#else
static void row_dots(const uint8_t *codes, const uint8_t *scales, int64_t groups, const float *e4m3,
                     const float *xp, int64_t K, int64_t mt, float *out) {
    float acc[TILE] = {0};
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *c = codes + 8 * g;
        float scale = e4m3[scales[g]];
        for (int64_t m = 0; m < mt; m++) {
            const float *xg = xp + m * K + 16 * g;
            float t = 0.0f;
            for (int j = 0; j < 8; j++) t += E2M1[c[j] & 15] * xg[j] + E2M1[c[j] >> 4] * xg[8 + j];
            acc[m] += t * scale;
        }
    }
    for (int64_t m = 0; m < mt; m++) out[m] = acc[m];
}
#endif

/* y [M, N] fp32: y[m, n] = sum_k x[m, k] w[n, k] for rows n in [r0, r1). xp is x [M, K] fp32
 * with each group of 16 inputs reordered as its 8 even columns, then its 8 odd ones: the order
 * of the low, then the high, nibbles of the group's 8 code bytes. */
void quire_nvfp4_matmul_rows(const uint8_t *blob, int64_t row_bytes, int64_t K,
                             const float *divisors, const float *e4m3, const float *xp, int64_t M,
                             float *y, int64_t N, int64_t r0, int64_t r1) {
    float dots[TILE];
    for (int64_t n = r0; n < r1; n++) {
        const uint8_t *codes = blob + n * row_bytes;
        for (int64_t m0 = 0; m0 < M; m0 += TILE) {
            int64_t mt = M - m0 < TILE ? M - m0 : TILE;
            row_dots(codes, codes + K / 2, K / 16, e4m3, xp + m0 * K, K, mt, dots);
            for (int64_t m = 0; m < mt; m++) y[(m0 + m) * N + n] = dots[m] / divisors[n];
        }
    }
}


#if QUIRE_SIMD
/* 16 values in column order (even and odd columns interleaved back), as fp32 or bf16. */
static void store_group(__m256 even, __m256 odd, void *out, int64_t at, int bf16) {
    __m256 lo = _mm256_unpacklo_ps(even, odd), hi = _mm256_unpackhi_ps(even, odd);
    __m256 first = _mm256_permute2f128_ps(lo, hi, 0x20), second = _mm256_permute2f128_ps(lo, hi, 0x31);
    if (!bf16) {
        _mm256_storeu_ps((float *)out + at, first);
        _mm256_storeu_ps((float *)out + at + 8, second);
        return;
    }
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16x8(first), bf16x8(second)), 0xD8);
    _mm256_storeu_si256((__m256i *)((uint16_t *)out + at), packed);
}
#endif

/* out [N, K] rows [r0, r1): e2m1 x (e4m3 / divisor) formed in fp32 exactly as
 * engine.experts.nvfp4.dequantize forms it, then kept in fp32 (bf16 == 0) or rounded once to
 * bf16 (bf16 != 0), so the result equals PyTorch's bit for bit (NaN payloads and signs aside). */
void quire_nvfp4_dequantize_rows(const uint8_t *blob, int64_t row_bytes, int64_t K,
                                 const float *divisors, const float *e4m3, void *out, int bf16,
                                 int64_t r0, int64_t r1) {
    for (int64_t n = r0; n < r1; n++) {
        const uint8_t *codes = blob + n * row_bytes, *scales = codes + K / 2;
        for (int64_t g = 0; g < K / 16; g++) {
            float step = e4m3[scales[g]] / divisors[n];
#if QUIRE_SIMD
            /* Twice the magnitude times one half is the magnitude exactly; times the step, then
               the code's sign flipped in, is PyTorch's one signed product bit for bit. */
            const __m256 half = _mm256_set1_ps(0.5f), steps = _mm256_set1_ps(step);
            const __m256i sign_bit = _mm256_set1_epi32((int)0x80000000u);
            __m256i wide = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + 8 * g)));
            __m256 sign_even = _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(wide, 28), sign_bit));
            __m256 sign_odd = _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(wide, 24), sign_bit));
            __m256 even, odd;
            group_values(codes + 8 * g, MAGNITUDES, &even, &odd);
            even = _mm256_xor_ps(_mm256_mul_ps(_mm256_mul_ps(even, half), steps), sign_even);
            odd = _mm256_xor_ps(_mm256_mul_ps(_mm256_mul_ps(odd, half), steps), sign_odd);
            store_group(even, odd, out, n * K + 16 * g, bf16);
#else
            float row[16];
            for (int j = 0; j < 8; j++) {
                uint8_t c = codes[8 * g + j];
                row[2 * j] = E2M1[c & 15] * step;
                row[2 * j + 1] = E2M1[c >> 4] * step;
            }
            if (bf16) {
                uint16_t *dst = (uint16_t *)out + n * K + 16 * g;
                for (int j = 0; j < 16; j++) dst[j] = to_bf16(row[j]);
            } else {
                memcpy((float *)out + n * K + 16 * g, row, sizeof row);
            }
#endif
        }
    }
}

/* Whole matrices: rows [0, N) in spans of `step` on up to `threads` threads (cpu_pool.h), one
 * call from Python per matrix. */
struct nvfp4_matmul_args {
    const uint8_t *blob; int64_t row_bytes, K; const float *divisors, *e4m3, *xp; int64_t M;
    float *y; int64_t N;
};
struct nvfp4_dequantize_args {
    const uint8_t *blob; int64_t row_bytes, K; const float *divisors, *e4m3; void *out; int bf16;
};

static void nvfp4_matmul_span(const void *args, int64_t r0, int64_t r1) {
    const struct nvfp4_matmul_args *a = args;
    quire_nvfp4_matmul_rows(a->blob, a->row_bytes, a->K, a->divisors, a->e4m3, a->xp, a->M, a->y,
                            a->N, r0, r1);
}

static void nvfp4_dequantize_span(const void *args, int64_t r0, int64_t r1) {
    const struct nvfp4_dequantize_args *a = args;
    quire_nvfp4_dequantize_rows(a->blob, a->row_bytes, a->K, a->divisors, a->e4m3, a->out, a->bf16,
                                r0, r1);
}

void quire_nvfp4_matmul(const uint8_t *blob, int64_t row_bytes, int64_t K, const float *divisors,
                        const float *e4m3, const float *xp, int64_t M, float *y, int64_t N,
                        int threads, int64_t step) {
    struct nvfp4_matmul_args a = {blob, row_bytes, K, divisors, e4m3, xp, M, y, N};
    pool_run(threads, N, step, nvfp4_matmul_span, &a);
}

void quire_nvfp4_dequantize(const uint8_t *blob, int64_t row_bytes, int64_t K,
                            const float *divisors, const float *e4m3, void *out, int bf16,
                            int64_t N, int threads, int64_t step) {
    struct nvfp4_dequantize_args a = {blob, row_bytes, K, divisors, e4m3, out, bf16};
    pool_run(threads, N, step, nvfp4_dequantize_span, &a);
}
