/* AVX-512 Hadamard transform: the reference's butterflies and H_m sums with 16 columns per vector (bit-identical:
 * the same additions and subtractions of the same operands). p < 16 runs the AVX2 version. Like kern_avx512.c it
 * also compiles against SIMDe (VQM_SIMDE) so that its bit-exactness test runs on any x86-64 CPU. */
#include "quip.h"

#if defined(__x86_64__)
#if defined(VQM_SIMDE)
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
typedef simde__mmask16 __mmask16;
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))), apply_to = function)
#include <immintrin.h>
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")
#include <immintrin.h>
#endif

/* Stages h = 1, 2, 4, 8 inside one vector: lane j pairs with lane j ^ h; the lower lane keeps a + b, the upper
 * a - b (mask bits set on the upper lanes). */
static inline __m512 fwht16(__m512 v)
{
    static const int perm[4][16] = {
        { 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14 },
        { 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13 },
        { 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11 },
        { 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7 },
    };
    static const __mmask16 upper[4] = { 0xAAAA, 0xCCCC, 0xF0F0, 0xFF00 };
    for (int s = 0; s < 4; s++) {
        const __m512 sw = _mm512_permutexvar_ps(_mm512_loadu_si512(perm[s]), v);
        v = _mm512_mask_blend_ps(upper[s], _mm512_add_ps(v, sw), _mm512_sub_ps(sw, v));
    }
    return v;
}

static void fwht(float *v, int p)
{
    for (int j = 0; j < p; j += 16) _mm512_storeu_ps(v + j, fwht16(_mm512_loadu_ps(v + j)));
    for (int h = 16; h < p; h *= 2)
        for (int i = 0; i < p; i += 2 * h)
            for (int j = i; j < i + h; j += 16) {
                const __m512 a = _mm512_loadu_ps(v + j), b = _mm512_loadu_ps(v + j + h);
                _mm512_storeu_ps(v + j, _mm512_add_ps(a, b));
                _mm512_storeu_ps(v + j + h, _mm512_sub_ps(a, b));
            }
}

static int avx512_rows(float *v, int64_t batch, int m, int p, const int8_t *had, int transpose, float scale,
                       float *tmp)
{
    if (p < 16) return vqm_had_avx2.rows(v, batch, m, p, had, transpose, scale, tmp);
    const int64_t n = (int64_t)m * p;
    const __m512 sc = _mm512_set1_ps(scale);
    for (int64_t b = 0; b < batch; b++) {
        float *row = v + b * n;
        for (int i = 0; i < m; i++) fwht(row + (int64_t)i * p, p);
        if (m > 1) {
            memcpy(tmp, row, sizeof(float) * (size_t)n);
            for (int i = 0; i < m; i++)
                for (int j = 0; j < p; j += 16) {
                    __m512 acc = _mm512_setzero_ps();
                    for (int l = 0; l < m; l++) {
                        const int8_t h = transpose ? had[l * m + i] : had[i * m + l];
                        const __m512 x = _mm512_loadu_ps(tmp + (int64_t)l * p + j);
                        acc = h > 0 ? _mm512_add_ps(acc, x) : _mm512_sub_ps(acc, x);
                    }
                    _mm512_storeu_ps(row + (int64_t)i * p + j, _mm512_mul_ps(acc, sc));
                }
        } else {
            for (int64_t j = 0; j < n; j += 16) _mm512_storeu_ps(row + j, _mm512_mul_ps(_mm512_loadu_ps(row + j), sc));
        }
    }
    return 1;
}

const vqm_had_ops vqm_had_avx512 = { avx512_rows };

#if defined(VQM_SIMDE)
#elif defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
