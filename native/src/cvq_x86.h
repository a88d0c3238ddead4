/* What the AVX2 and AVX-512 column-vector VQ kernels share: the int8 block finish, in the reference's float
 * operations and order, and the store of a vector row's outputs. Included by cvq_avx2.c and cvq_avx512.c after
 * their target pragmas (lanes t = 0..7 of a __m256 are the v <= 8 rows of one vector row). */
#ifndef VQM_CVQ_X86_H
#define VQM_CVQ_X86_H

/* acc += ((float)isum * xs) * scale, main stage then residual (ir NULL without one), per batch row */
static inline __attribute__((always_inline)) void cvq_finish_int8(const cvq_prep *p, int blk, int g, int64_t nb,
                                                                  const __m256i *is, const __m256i *ir, __m256 *acc)
{
    const __m256 gs = _mm256_set1_ps(p->gscale[g]);
    for (int64_t bi = 0; bi < nb; bi++) {
        const __m256 xs = _mm256_set1_ps(p->xs[bi * p->nblk + blk]);
        __m256 a = _mm256_mul_ps(_mm256_cvtepi32_ps(is[bi]), xs);
        acc[bi] = _mm256_add_ps(acc[bi], _mm256_mul_ps(a, gs));
        if (ir) {
            a = _mm256_mul_ps(_mm256_cvtepi32_ps(ir[bi]), xs);
            acc[bi] = _mm256_add_ps(acc[bi], _mm256_mul_ps(a, _mm256_set1_ps(p->rscale[g])));
        }
    }
}

/* y[bi * n + r0 + t] = acc[bi] lane t (+ bias) for the rows of vector row r0 / v that exist */
static inline __attribute__((always_inline)) void cvq_store_rows(const __m256 *acc, int64_t nb, int64_t n, int64_t r0,
                                                                 int v, const float *bias, float *y)
{
    const int nvalid = n - r0 < v ? (int)(n - r0) : v;
    for (int64_t bi = 0; bi < nb; bi++) {
        float out[8];
        _mm256_storeu_ps(out, acc[bi]);
        for (int t = 0; t < nvalid; t++) y[bi * n + r0 + t] = bias ? out[t] + bias[r0 + t] : out[t];
    }
}

#endif
