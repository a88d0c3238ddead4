/* AVX2 Hadamard transform: the reference's butterflies and H_m sums with 8 columns per vector (bit-identical: the
 * same additions and subtractions of the same operands, no FMA). p < 8 runs the reference. */
#include "quip.h"

#if defined(__x86_64__)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#include <immintrin.h>

/* Stages h = 1, 2, 4 inside one vector: lane j pairs with lane j ^ h; the lower lane keeps a + b, the upper a - b. */
static inline __m256 fwht8(__m256 v)
{
    __m256 s = _mm256_permute_ps(v, 0xB1);
    v = _mm256_blend_ps(_mm256_add_ps(v, s), _mm256_sub_ps(s, v), 0xAA);
    s = _mm256_permute_ps(v, 0x4E);
    v = _mm256_blend_ps(_mm256_add_ps(v, s), _mm256_sub_ps(s, v), 0xCC);
    s = _mm256_permute2f128_ps(v, v, 1);
    return _mm256_blend_ps(_mm256_add_ps(v, s), _mm256_sub_ps(s, v), 0xF0);
}

static void fwht(float *v, int p)
{
    for (int j = 0; j < p; j += 8) _mm256_storeu_ps(v + j, fwht8(_mm256_loadu_ps(v + j)));
    for (int h = 8; h < p; h *= 2)
        for (int i = 0; i < p; i += 2 * h)
            for (int j = i; j < i + h; j += 8) {
                const __m256 a = _mm256_loadu_ps(v + j), b = _mm256_loadu_ps(v + j + h);
                _mm256_storeu_ps(v + j, _mm256_add_ps(a, b));
                _mm256_storeu_ps(v + j + h, _mm256_sub_ps(a, b));
            }
}

static int avx2_rows(float *v, int64_t batch, int m, int p, const int8_t *had, int transpose, float scale, float *tmp)
{
    if (p < 8) return 0;
    const int64_t n = (int64_t)m * p;
    const __m256 sc = _mm256_set1_ps(scale);
    for (int64_t b = 0; b < batch; b++) {
        float *row = v + b * n;
        for (int i = 0; i < m; i++) fwht(row + (int64_t)i * p, p);
        if (m > 1) {
            memcpy(tmp, row, sizeof(float) * (size_t)n);
            for (int i = 0; i < m; i++)
                for (int j = 0; j < p; j += 8) {
                    __m256 acc = _mm256_setzero_ps();
                    for (int l = 0; l < m; l++) {
                        const int8_t h = transpose ? had[l * m + i] : had[i * m + l];
                        const __m256 x = _mm256_loadu_ps(tmp + (int64_t)l * p + j);
                        acc = h > 0 ? _mm256_add_ps(acc, x) : _mm256_sub_ps(acc, x);
                    }
                    _mm256_storeu_ps(row + (int64_t)i * p + j, _mm256_mul_ps(acc, sc));
                }
        } else {
            for (int64_t j = 0; j < n; j += 8) _mm256_storeu_ps(row + j, _mm256_mul_ps(_mm256_loadu_ps(row + j), sc));
        }
    }
    return 1;
}

const vqm_had_ops vqm_had_avx2 = { avx2_rows };

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
