/* FP8 (E4M3) expert matrices on the CPU, read as shipped: built once per machine and loaded by
 * engine/experts/fp8_cpu.py. A matrix is N rows of K bytes, `row_bytes` apart, with one fp32
 * multiplier for the whole matrix (the release's per-expert `*_scale_inv`). Each function
 * handles rows [r0, r1): the caller splits the rows over threads.
 *
 * E4M3 to fp32 by bits, exactly: a normal's 7 exponent-and-mantissa bits go to fp32 bits 20-26
 * with the exponent rebiased from 7 to 127 by an integer add; a subnormal (exponent 0) is its
 * mantissa x 2^-9; the sign bit moves to bit 31; 0x7F and 0xFF are NaN. No arithmetic ever sees
 * an fp32 denormal: Intel cores take a microcode assist (~100 cycles) for each multiply with a
 * denormal operand, which made an earlier decode (bits x 2^120) run at 0.2 GB/s a core on the
 * H200 machine's Xeon. No -ffast-math: the requantisation must equal PyTorch's fp32 arithmetic.
 */
#include "cpu_simd.h"
#include "cpu_pool.h"

#define TWO_TO_MINUS_9 0.001953125f
#define REBIAS (120u << 23) /* E4M3's exponent bias 7 -> fp32's 127, at fp32 bits 20-26 */

int quire_fp8_simd(void) { return QUIRE_SIMD; }

static float e4m3(uint8_t byte) {
    uint32_t magnitude = byte & 0x7F;
    if (magnitude == 0x7F) return __builtin_nanf("");
    float value;
    if (magnitude < 8) {
        value = (float)magnitude * TWO_TO_MINUS_9;
    } else {
        uint32_t bits = (magnitude << 20) + REBIAS;
        memcpy(&value, &bits, sizeof value);
    }
    return (byte & 0x80) ? -value : value;
}

#if QUIRE_SIMD
static inline __m256 e4m3x8(const uint8_t *bytes) {
    const __m256i low7 = _mm256_set1_epi32(0x7F), sign = _mm256_set1_epi32(0x80);
    __m256i wide = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)bytes));
    __m256i magnitude = _mm256_and_si256(wide, low7);
    __m256 normal = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_slli_epi32(magnitude, 20),
                                                         _mm256_set1_epi32((int)REBIAS)));
    __m256 subnormal = _mm256_mul_ps(_mm256_cvtepi32_ps(magnitude), _mm256_set1_ps(TWO_TO_MINUS_9));
    __m256i is_subnormal = _mm256_cmpgt_epi32(_mm256_set1_epi32(8), magnitude);
    __m256 value = _mm256_blendv_ps(normal, subnormal, _mm256_castsi256_ps(is_subnormal));
    value = _mm256_or_ps(value, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(wide, sign), 24)));
    __m256i nan = _mm256_cmpeq_epi32(magnitude, low7); /* all ones: a NaN */
    return _mm256_or_ps(value, _mm256_castsi256_ps(nan));
}

/* Two accumulators per token: each waits on one multiply-add per 16 inputs, not per 8. */
static void row_dots(const uint8_t *w, const float *x, int64_t K, int64_t mt, float *out) {
    __m256 acc0[TILE], acc1[TILE];
    for (int64_t m = 0; m < mt; m++) acc0[m] = acc1[m] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256 w0 = e4m3x8(w + k), w1 = e4m3x8(w + k + 8);
        for (int64_t m = 0; m < mt; m++) {
            acc0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), acc0[m]);
            acc1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), acc1[m]);
        }
    }
    for (; k + 8 <= K; k += 8) {
        __m256 w0 = e4m3x8(w + k);
        for (int64_t m = 0; m < mt; m++)
            acc0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), acc0[m]);
    }
    for (int64_t m = 0; m < mt; m++) {
        out[m] = hsum(_mm256_add_ps(acc0[m], acc1[m]));
        for (int64_t j = k; j < K; j++) out[m] += e4m3(w[j]) * x[m * K + j];  /* K % 8 inputs */
    }
}
#else
static void row_dots(const uint8_t *w, const float *x, int64_t K, int64_t mt, float *out) {
    for (int64_t m = 0; m < mt; m++) {
        float acc = 0.0f;
        for (int64_t k = 0; k < K; k++) acc += e4m3(w[k]) * x[m * K + k];
        out[m] = acc;
    }
}
#endif

/* y [M, N] fp32: y[m, n] = scale * sum_k x[m, k] w[n, k] for rows n in [r0, r1); x [M, K] fp32. */
void quire_fp8_matmul_rows(const uint8_t *w, int64_t row_bytes, int64_t K, float scale,
                           const float *x, int64_t M, float *y, int64_t N, int64_t r0, int64_t r1) {
    float dots[TILE];
    for (int64_t n = r0; n < r1; n++) {
        for (int64_t m0 = 0; m0 < M; m0 += TILE) {
            int64_t mt = M - m0 < TILE ? M - m0 : TILE;
            row_dots(w + n * row_bytes, x + m0 * K, K, mt, dots);
            for (int64_t m = 0; m < mt; m++) y[(m0 + m) * N + n] = dots[m] * scale;
        }
    }
}

/* FP8 rows requantised to int8 with one scale per row, as engine.experts.store.requantize_int8
 * computes them in PyTorch, bit for bit: peak = max |w| (at least 1e-30), code =
 * round-half-even(w * ((1 / peak) * 127)). A row's peak is found on the bytes (E4M3 magnitudes order
 * as their 7-bit patterns). `peaks` gets each row's peak; a row holding a NaN gets zero codes and
 * a NaN peak. */
void quire_fp8_requantize_int8_rows(const uint8_t *w, int64_t row_bytes, int64_t K, int8_t *out,
                                    int64_t out_row, float *peaks, int64_t r0, int64_t r1) {
    for (int64_t n = r0; n < r1; n++) {
        const uint8_t *row = w + n * row_bytes;
        int8_t *codes = out + n * out_row;
        uint8_t top = 0;
        for (int64_t k = 0; k < K; k++) {
            uint8_t magnitude = row[k] & 0x7F;
            top = magnitude > top ? magnitude : top;
        }
        if (top == 0x7F) {
            memset(codes, 0, (size_t)K);
            peaks[n] = __builtin_nanf("");
            continue;
        }
        float peak = e4m3(top);
        if (peak < 1e-30f) peak = 1e-30f;
        peaks[n] = peak;
        float factor = (1.0f / peak) * 127.0f; /* PyTorch's 127.0 / peak: a reciprocal, then a product */
        int64_t k = 0;
#if QUIRE_SIMD
        const __m256 factors = _mm256_set1_ps(factor);
        for (; k + 8 <= K; k += 8) {
            __m256 v = _mm256_mul_ps(e4m3x8(row + k), factors);
            __m256i q = _mm256_cvtps_epi32(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
            _mm_storel_epi64((__m128i *)(codes + k), _mm_packs_epi16(q16, q16));
        }
#endif
        for (; k < K; k++) codes[k] = (int8_t)__builtin_nearbyintf(e4m3(row[k]) * factor);
    }
}

/* out [N, K] rows [r0, r1): e4m3(w) * scale in fp32, kept (bf16 == 0) or rounded once to bf16
 * (bf16 != 0): bit for bit PyTorch's (w.to(float32) * scale).to(dtype), NaN payloads aside. */
void quire_fp8_dequantize_rows(const uint8_t *w, int64_t row_bytes, int64_t K, float scale,
                               void *out, int bf16, int64_t r0, int64_t r1) {
    for (int64_t n = r0; n < r1; n++) {
        const uint8_t *row = w + n * row_bytes;
        float *out32 = (float *)out + n * K;
        uint16_t *out16 = (uint16_t *)out + n * K;
        int64_t k = 0;
#if QUIRE_SIMD
        const __m256 scales = _mm256_set1_ps(scale);
        for (; k + 8 <= K; k += 8) {
            __m256 v = _mm256_mul_ps(e4m3x8(row + k), scales);
            if (!bf16) {
                _mm256_storeu_ps(out32 + k, v);
                continue;
            }
            __m256i u = bf16x8(v);
            _mm_storeu_si128((__m128i *)(out16 + k),
                             _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1)));
        }
#endif
        for (; k < K; k++) {
            float v = e4m3(row[k]) * scale;
            if (bf16) out16[k] = to_bf16(v); else out32[k] = v;
        }
    }
}


/* Whole matrices: rows [0, N) in spans of `step` on up to `threads` threads (cpu_pool.h), one
 * call from Python per matrix. */
struct fp8_matmul_args {
    const uint8_t *w; int64_t row_bytes, K; float scale; const float *x; int64_t M; float *y; int64_t N;
};
struct fp8_requantize_args {
    const uint8_t *w; int64_t row_bytes, K; int8_t *out; int64_t out_row; float *peaks;
};
struct fp8_dequantize_args { const uint8_t *w; int64_t row_bytes, K; float scale; void *out; int bf16; };

static void fp8_matmul_span(const void *args, int64_t r0, int64_t r1) {
    const struct fp8_matmul_args *a = args;
    quire_fp8_matmul_rows(a->w, a->row_bytes, a->K, a->scale, a->x, a->M, a->y, a->N, r0, r1);
}

static void fp8_requantize_span(const void *args, int64_t r0, int64_t r1) {
    const struct fp8_requantize_args *a = args;
    quire_fp8_requantize_int8_rows(a->w, a->row_bytes, a->K, a->out, a->out_row, a->peaks, r0, r1);
}

static void fp8_dequantize_span(const void *args, int64_t r0, int64_t r1) {
    const struct fp8_dequantize_args *a = args;
    quire_fp8_dequantize_rows(a->w, a->row_bytes, a->K, a->scale, a->out, a->bf16, r0, r1);
}

void quire_fp8_matmul(const uint8_t *w, int64_t row_bytes, int64_t K, float scale, const float *x,
                      int64_t M, float *y, int64_t N, int threads, int64_t step) {
    struct fp8_matmul_args a = {w, row_bytes, K, scale, x, M, y, N};
    pool_run(threads, N, step, fp8_matmul_span, &a);
}

void quire_fp8_requantize_int8(const uint8_t *w, int64_t row_bytes, int64_t K, int8_t *out,
                               int64_t out_row, float *peaks, int64_t N, int threads, int64_t step) {
    struct fp8_requantize_args a = {w, row_bytes, K, out, out_row, peaks};
    pool_run(threads, N, step, fp8_requantize_span, &a);
}

void quire_fp8_dequantize(const uint8_t *w, int64_t row_bytes, int64_t K, float scale, void *out,
                          int bf16, int64_t N, int threads, int64_t step) {
    struct fp8_dequantize_args a = {w, row_bytes, K, scale, out, bf16};
    pool_run(threads, N, step, fp8_dequantize_span, &a);
}
