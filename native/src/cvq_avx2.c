/* x86-64 AVX2 kernel of the column-vector VQ (VPTQ) format (AVX2 + FMA enabled
 * for this file only, selected at run time like kern_avx2.c).
 *
 * Per vector row and activation block, the block's indices are decoded into a
 * buffer (b = 8 / 16: one widening load per 8 codes; other widths bit by bit),
 * then the codebook entries (v <= 8 int8 values) are read directly from the
 * codebook, which for the mobile configurations stays in L1:
 *  int8 activations, v <= 4: four columns per step, entries interleaved as int16
 *    pairs (c, c+1) | (c+2, c+3) and multiplied by the matching activation pairs
 *    with one pmaddwd: lanes 0-3 and 4-7 hold partial sums of rows 0..3, added at
 *    the end of the block. v = 5..8: two columns per step, one pmaddwd for rows 0..7.
 *    Integer sums are exact, and the finish (float(isum) * xs * scale + acc) is the
 *    reference's operation sequence lane by lane, so results are bit-identical.
 *  float activations: entries converted to f32, one FMA per column and batch row.
 */
#include "cvq_internal.h"

#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#include <immintrin.h>

/* the v int8 values of a codebook entry in the low bytes, zeros above (never reads past the entry) */
static inline __attribute__((always_inline)) __m128i entry(const int8_t *p, const int v)
{
    uint64_t u = 0;
    memcpy(&u, p, (size_t)v);
    return _mm_cvtsi64_si128((long long)u);
}

/* codes [c0, c0 + cnt) of a row as uint32, clamped to ncent - 1 when ncent is not a power of two */
static inline void decode(const uint8_t *row, int64_t c0, int cnt, int b, unsigned kmax, uint32_t *out)
{
    int i = 0;
    if (b == 8) {
        for (; i + 8 <= cnt; i += 8)
            _mm256_storeu_si256((__m256i *)(void *)(out + i),
                                _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)(row + c0 + i))));
    } else if (b == 16) {
        for (; i + 8 <= cnt; i += 8)
            _mm256_storeu_si256((__m256i *)(void *)(out + i),
                                _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(const void *)(row + 2 * (c0 + i)))));
    }
    vqm_cvq_codes_scalar(row, c0 + i, cnt - i, b, kmax, out + i);
    if (kmax + 1u != (1u << b)) /* the fast widths produced unclamped codes */
        for (int j = 0; j < i; j++) out[j] = out[j] > kmax ? kmax : out[j];
}

/* exact integer sums of one stage over a block, per batch row: lanes t (v <= 4: t and 4 + t) */
static inline __attribute__((always_inline)) void block_isum(const int8_t *cb, const uint32_t *idx, int len,
                                                             const cvq_prep *p, int poff, int64_t nb, const int v,
                                                             __m256i *acc)
{
    for (int64_t bi = 0; bi < nb; bi++) acc[bi] = _mm256_setzero_si256();
    int c = 0;
    if (v <= 4) {
        const __m256i spread = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
        for (; c + 4 <= len; c += 4) {
            __m128i p01 = _mm_unpacklo_epi8(entry(cb + idx[c] * v, v), entry(cb + idx[c + 1] * v, v));
            __m128i p23 = _mm_unpacklo_epi8(entry(cb + idx[c + 2] * v, v), entry(cb + idx[c + 3] * v, v));
            __m256i e = _mm256_cvtepi8_epi16(_mm_unpacklo_epi64(p01, p23));
            for (int64_t bi = 0; bi < nb; bi++) {
                const int32_t *q = p->xp2 + bi * p->npairs + poff + c / 2;
                __m256i qv = _mm256_permutevar8x32_epi32(
                    _mm256_castsi128_si256(_mm_loadl_epi64((const __m128i *)(const void *)q)), spread);
                acc[bi] = _mm256_add_epi32(acc[bi], _mm256_madd_epi16(e, qv));
            }
        }
    }
    for (; c < len; c += 2) { /* pairs; an odd block's last pair meets a zero activation */
        __m128i e1 = c + 1 < len ? entry(cb + idx[c + 1] * v, v) : _mm_setzero_si128();
        __m256i e = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(entry(cb + idx[c] * v, v), e1));
        for (int64_t bi = 0; bi < nb; bi++) {
            __m256i qv = _mm256_set1_epi32(p->xp2[bi * p->npairs + poff + c / 2]);
            acc[bi] = _mm256_add_epi32(acc[bi], _mm256_madd_epi16(e, qv));
        }
    }
    if (v <= 4) /* fold lanes 4..7 (rows 0..3 of the second column pair) onto lanes 0..3 */
        for (int64_t bi = 0; bi < nb; bi++)
            acc[bi] = _mm256_add_epi32(acc[bi], _mm256_permute2x128_si256(acc[bi], acc[bi], 0x81));
}

/* float sums of one stage over a block, per batch row (lanes t) */
static inline __attribute__((always_inline)) void block_fsum(const int8_t *cb, const uint32_t *idx, int len,
                                                             const cvq_prep *p, int64_t c0, int64_t nb, const int v,
                                                             __m256 *acc)
{
    for (int64_t bi = 0; bi < nb; bi++) acc[bi] = _mm256_setzero_ps();
    for (int c = 0; c < len; c++) {
        __m256 e = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(entry(cb + idx[c] * v, v)));
        for (int64_t bi = 0; bi < nb; bi++)
            acc[bi] = _mm256_fmadd_ps(e, _mm256_broadcast_ss(p->xf + bi * p->k + c0 + c), acc[bi]);
    }
}

static inline __attribute__((always_inline)) void rows_v(const vqm_cvq_weight *w, const cvq_prep *p, int64_t j0,
                                                         int64_t j1, const float *bias, float *y, int flags,
                                                         const int v)
{
    const int res = w->res_ncent > 0;
    const int b = vqm_cvq_bits(w->ncent), rb = res ? vqm_cvq_bits(w->res_ncent) : 0;
    const unsigned kmax = (unsigned)w->ncent - 1u, rkmax = res ? (unsigned)w->res_ncent - 1u : 0u;
    const int64_t n = w->n, k = w->k, nb = p->batch;
    const int64_t rowbytes = vqm_cdiv(k * b, 8), rrowbytes = vqm_cdiv(k * rb, 8);
    const int int8 = (flags & VQM_ACT_INT8) != 0;
    uint32_t idx[VQM_CVQ_ACT_BLOCK], ridx[VQM_CVQ_ACT_BLOCK];
    __m256i is[VQM_BATCH_TILE], ir[VQM_BATCH_TILE];
    __m256 fs[VQM_BATCH_TILE], fr[VQM_BATCH_TILE], acc[VQM_BATCH_TILE];
    for (int64_t j = j0; j < j1; j++) {
        const uint8_t *row = w->indices + j * rowbytes;
        const uint8_t *rrow = res ? w->res_indices + j * rrowbytes : NULL;
        for (int64_t bi = 0; bi < nb; bi++) acc[bi] = _mm256_setzero_ps();
        for (int blk = 0; blk < p->nblk; blk++) {
            const int64_t c0 = p->c0[blk];
            const int len = (int)(p->c0[blk + 1] - c0), g = p->grp[blk];
            const int8_t *cb = w->codebook + (int64_t)g * w->ncent * v;
            decode(row, c0, len, b, kmax, idx);
            if (res) decode(rrow, c0, len, rb, rkmax, ridx);
            const __m256 gs = _mm256_set1_ps(p->gscale[g]);
            if (int8) {
                block_isum(cb, idx, len, p, p->poff[blk], nb, v, is);
                if (res) block_isum(w->res_codebook + (int64_t)g * w->res_ncent * v, ridx, len, p, p->poff[blk], nb,
                                    v, ir);
                for (int64_t bi = 0; bi < nb; bi++) {
                    const __m256 xs = _mm256_set1_ps(p->xs[bi * p->nblk + blk]);
                    __m256 a = _mm256_mul_ps(_mm256_cvtepi32_ps(is[bi]), xs);
                    acc[bi] = _mm256_add_ps(acc[bi], _mm256_mul_ps(a, gs));
                    if (res) {
                        a = _mm256_mul_ps(_mm256_cvtepi32_ps(ir[bi]), xs);
                        acc[bi] = _mm256_add_ps(acc[bi], _mm256_mul_ps(a, _mm256_set1_ps(p->rscale[g])));
                    }
                }
            } else {
                block_fsum(cb, idx, len, p, c0, nb, v, fs);
                if (res) block_fsum(w->res_codebook + (int64_t)g * w->res_ncent * v, ridx, len, p, c0, nb, v, fr);
                for (int64_t bi = 0; bi < nb; bi++) {
                    acc[bi] = _mm256_add_ps(acc[bi], _mm256_mul_ps(fs[bi], gs));
                    if (res) acc[bi] = _mm256_add_ps(acc[bi], _mm256_mul_ps(fr[bi], _mm256_set1_ps(p->rscale[g])));
                }
            }
        }
        const int64_t r0 = j * v;
        const int nvalid = n - r0 < v ? (int)(n - r0) : v;
        for (int64_t bi = 0; bi < nb; bi++) {
            float out[8];
            _mm256_storeu_ps(out, acc[bi]);
            for (int t = 0; t < nvalid; t++) y[bi * n + r0 + t] = bias ? out[t] + bias[r0 + t] : out[t];
        }
    }
}

void vqm_cvq_rows_avx2(const vqm_cvq_weight *w, const cvq_prep *p, int64_t j0, int64_t j1, const float *bias,
                       float *y, int flags)
{
    switch (w->v) { /* a constant v lets the compiler turn every entry read into plain loads */
    case 1: rows_v(w, p, j0, j1, bias, y, flags, 1); break;
    case 2: rows_v(w, p, j0, j1, bias, y, flags, 2); break;
    case 3: rows_v(w, p, j0, j1, bias, y, flags, 3); break;
    case 4: rows_v(w, p, j0, j1, bias, y, flags, 4); break;
    case 5: rows_v(w, p, j0, j1, bias, y, flags, 5); break;
    case 6: rows_v(w, p, j0, j1, bias, y, flags, 6); break;
    case 7: rows_v(w, p, j0, j1, bias, y, flags, 7); break;
    default: rows_v(w, p, j0, j1, bias, y, flags, 8); break; /* v <= 8 is checked by the caller */
    }
}

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif /* __x86_64__ */
