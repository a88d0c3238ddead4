/* x86-64 AVX2 kernel of the column-vector VQ (VPTQ) format (AVX2 + FMA enabled
 * for this file only, selected at run time like kern_avx2.c).
 *
 * Per vector row and activation block, the block's indices are decoded into a
 * buffer (b = 8 / 16: one widening load per 8 codes; other widths bit by bit),
 * then the codebook entries (v <= 8 int8 values) are read directly from the
 * codebook, which for the mobile configurations stays in L1:
 *  int8 activations, v = 4: eight columns' entries (scalar loads + inserts; the
 *    AVX2 gathers measured three times slower), transposed per
 *    four columns with one pshufb, then pmaddubsw(|w|, sign(x, w)) + pmaddwd:
 *    lanes 0-3 and 4-7 hold partial sums of rows 0..3 (added at the end of the
 *    block). v = 8: four columns per step, entries interleaved as int16
 *    column pairs and multiplied by activation pairs with pmaddwd; other v: two
 *    or four columns per step the same way.
 *    Integer sums are exact, and the finish (float(isum) * xs * scale + acc) is the
 *    reference's operation sequence lane by lane, so results are bit-identical.
 *  float activations: entries converted to f32 and FMA'd (v = 4: eight columns
 *    per step, two columns per vector).
 * Batch 1 (decode) is compiled apart so that the accumulators stay in registers.
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
#include "cvq_x86.h"

/* the v int8 values of a codebook entry in the low bytes, zeros above (never reads past the entry) */
static inline __attribute__((always_inline)) __m128i entry(const int8_t *p, const int v)
{
    uint64_t u = 0;
    memcpy(&u, p, (size_t)v);
    return _mm_cvtsi64_si128((long long)u);
}

static inline __attribute__((always_inline)) int32_t ld4(const int8_t *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* the 4-byte entries of 8 columns (v = 4) or the 8-byte entries of 4 columns (v = 8), one load each: on the CPUs
 * measured, vpgatherdd / vpgatherdq took three times as long as these loads and inserts */
static inline __attribute__((always_inline)) __m256i load8x4(const int8_t *cb, const uint32_t *ix)
{
    __m128i lo = _mm_cvtsi32_si128(ld4(cb + ix[0] * 4)), hi = _mm_cvtsi32_si128(ld4(cb + ix[4] * 4));
    lo = _mm_insert_epi32(lo, ld4(cb + ix[1] * 4), 1);
    hi = _mm_insert_epi32(hi, ld4(cb + ix[5] * 4), 1);
    lo = _mm_insert_epi32(lo, ld4(cb + ix[2] * 4), 2);
    hi = _mm_insert_epi32(hi, ld4(cb + ix[6] * 4), 2);
    lo = _mm_insert_epi32(lo, ld4(cb + ix[3] * 4), 3);
    hi = _mm_insert_epi32(hi, ld4(cb + ix[7] * 4), 3);
    return _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
}

static inline __attribute__((always_inline)) int64_t ld8(const int8_t *p)
{
    int64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline __attribute__((always_inline)) __m256i load4x8(const int8_t *cb, const uint32_t *ix)
{
    __m128i lo = _mm_insert_epi64(_mm_cvtsi64_si128(ld8(cb + ix[0] * 8)), ld8(cb + ix[1] * 8), 1);
    __m128i hi = _mm_insert_epi64(_mm_cvtsi64_si128(ld8(cb + ix[2] * 8)), ld8(cb + ix[3] * 8), 1);
    return _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
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

/* batch rows of this call: NB = 1 is the decode case, compiled apart so its accumulators stay in registers */
#define NBATCH (NB ? NB : nb)

/* exact integer sums of one stage over a block, per batch row: lanes t (v <= 4: lanes t and 4 + t, folded at the
 * end). v = 4 and v = 8 read 8 resp. 4 columns' entries at once (load8x4 / load4x8) and rearrange them with one
 * pshufb. */
static inline __attribute__((always_inline)) void block_isum(const int8_t *cb, const uint32_t *idx, int len,
                                                             const cvq_prep *p, int blk, int64_t nb, const int v,
                                                             const int NB, __m256i *acc)
{
    const int poff = p->poff[blk], poff_blk = blk;
    for (int64_t bi = 0; bi < NBATCH; bi++) acc[bi] = _mm256_setzero_si256();
    int c = 0;
    const __m256i lo4 = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    if (v == 4) {
        /* within each 128-bit lane, 4 columns' entries transposed to [c0t0 c1t0 c2t0 c3t0 | c0t1 ...]; then
         * pmaddubsw(|w|, sign(x, w)) sums column pairs exactly (|w| <= 128, |x| <= 127: at most 32512 per int16
         * lane, also for w = -128) and pmaddwd by ones adds the two pairs: lanes t0..t3 of columns 0..3 | 4..7 */
        const __m256i shuf = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                              0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        const __m256i ones = _mm256_set1_epi16(1);
        const int qoff = p->qoff[poff_blk];
        for (; c + 8 <= len; c += 8) {
            __m256i g = load8x4(cb, idx + c);
            g = _mm256_shuffle_epi8(g, shuf);
            const __m256i a = _mm256_abs_epi8(g);
            for (int64_t bi = 0; bi < NBATCH; bi++) {
                const __m256i x = _mm256_loadu_si256(
                    (const __m256i *)(const void *)(p->xquad + 16 * (bi * p->nquads + qoff + c / 4)));
                const __m256i s16 = _mm256_maddubs_epi16(a, _mm256_sign_epi8(x, g));
                acc[bi] = _mm256_add_epi32(acc[bi], _mm256_madd_epi16(s16, ones));
            }
        }
    } else if (v == 8) {
        const __m256i shuf = _mm256_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15,
                                              0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
        for (; c + 4 <= len; c += 4) {
            __m256i g = load4x8(cb, idx + c);
            g = _mm256_shuffle_epi8(g, shuf);
            const __m256i e0 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(g));       /* pair (0,1), rows 0..7 */
            const __m256i e1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(g, 1));  /* pair (2,3) */
            for (int64_t bi = 0; bi < NBATCH; bi++) {
                const int32_t *q = p->xp2 + bi * p->npairs + poff + c / 2;
                acc[bi] = _mm256_add_epi32(acc[bi], _mm256_madd_epi16(e0, _mm256_set1_epi32(q[0])));
                acc[bi] = _mm256_add_epi32(acc[bi], _mm256_madd_epi16(e1, _mm256_set1_epi32(q[1])));
            }
        }
    }
    if (v <= 4) {
        for (; c + 4 <= len; c += 4) {
            __m128i p01 = _mm_unpacklo_epi8(entry(cb + idx[c] * v, v), entry(cb + idx[c + 1] * v, v));
            __m128i p23 = _mm_unpacklo_epi8(entry(cb + idx[c + 2] * v, v), entry(cb + idx[c + 3] * v, v));
            __m256i e = _mm256_cvtepi8_epi16(_mm_unpacklo_epi64(p01, p23));
            for (int64_t bi = 0; bi < NBATCH; bi++) {
                const int32_t *q = p->xp2 + bi * p->npairs + poff + c / 2;
                __m256i qv = _mm256_permutevar8x32_epi32(
                    _mm256_castsi128_si256(_mm_loadl_epi64((const __m128i *)(const void *)q)), lo4);
                acc[bi] = _mm256_add_epi32(acc[bi], _mm256_madd_epi16(e, qv));
            }
        }
    }
    for (; c < len; c += 2) { /* pairs; an odd block's last pair meets a zero activation */
        __m128i e1 = c + 1 < len ? entry(cb + idx[c + 1] * v, v) : _mm_setzero_si128();
        __m256i e = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(entry(cb + idx[c] * v, v), e1));
        for (int64_t bi = 0; bi < NBATCH; bi++) {
            __m256i qv = _mm256_set1_epi32(p->xp2[bi * p->npairs + poff + c / 2]);
            acc[bi] = _mm256_add_epi32(acc[bi], _mm256_madd_epi16(e, qv));
        }
    }
    if (v <= 4) /* fold lanes 4..7 (rows 0..3 of the second column pair) onto lanes 0..3 */
        for (int64_t bi = 0; bi < NBATCH; bi++)
            acc[bi] = _mm256_add_epi32(acc[bi], _mm256_permute2x128_si256(acc[bi], acc[bi], 0x81));
}

/* float sums of one stage over a block, per batch row (lanes t). v = 4: 8 columns' entries per step, two columns
 * per vector (lanes 0..3 and 4..7, folded at the end). */
static inline __attribute__((always_inline)) void block_fsum(const int8_t *cb, const uint32_t *idx, int len,
                                                             const cvq_prep *p, int64_t c0, int64_t nb, const int v,
                                                             const int NB, __m256 *acc)
{
    for (int64_t bi = 0; bi < NBATCH; bi++) acc[bi] = _mm256_setzero_ps();
    int c = 0;
    if (v == 4) {
        const __m256i s0 = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), s1 = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);
        const __m256i s2 = _mm256_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5), s3 = _mm256_setr_epi32(6, 6, 6, 6, 7, 7, 7, 7);
        for (; c + 8 <= len; c += 8) {
            __m256i g = load8x4(cb, idx + c);
            const __m128i lo = _mm256_castsi256_si128(g), hi = _mm256_extracti128_si256(g, 1);
            const __m256 e0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
            const __m256 e1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(lo, lo)));
            const __m256 e2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
            const __m256 e3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(hi, hi)));
            for (int64_t bi = 0; bi < NBATCH; bi++) {
                const __m256 x = _mm256_loadu_ps(p->xf + bi * p->k + c0 + c);
                __m256 a = _mm256_mul_ps(e0, _mm256_permutevar8x32_ps(x, s0));
                __m256 b = _mm256_mul_ps(e1, _mm256_permutevar8x32_ps(x, s1));
                a = _mm256_fmadd_ps(e2, _mm256_permutevar8x32_ps(x, s2), a);
                b = _mm256_fmadd_ps(e3, _mm256_permutevar8x32_ps(x, s3), b);
                acc[bi] = _mm256_add_ps(acc[bi], _mm256_add_ps(a, b));
            }
        }
        for (int64_t bi = 0; bi < NBATCH; bi++) /* fold the odd columns' lanes 4..7 onto lanes 0..3 */
            acc[bi] = _mm256_add_ps(acc[bi], _mm256_permute2f128_ps(acc[bi], acc[bi], 0x81));
    }
    for (; c < len; c++) {
        __m256 e = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(entry(cb + idx[c] * v, v)));
        for (int64_t bi = 0; bi < NBATCH; bi++)
            acc[bi] = _mm256_fmadd_ps(e, _mm256_broadcast_ss(p->xf + bi * p->k + c0 + c), acc[bi]);
    }
}

static inline __attribute__((always_inline)) void rows_v(const vqm_cvq_weight *w, const cvq_prep *p, int64_t j0,
                                                         int64_t j1, const float *bias, float *y, int flags,
                                                         const int v, const int NB)
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
        for (int64_t bi = 0; bi < NBATCH; bi++) acc[bi] = _mm256_setzero_ps();
        for (int blk = 0; blk < p->nblk; blk++) {
            const int64_t c0 = p->c0[blk];
            const int len = (int)(p->c0[blk + 1] - c0), g = p->grp[blk];
            const int8_t *cb = w->codebook + (int64_t)g * w->ncent * v;
            decode(row, c0, len, b, kmax, idx);
            if (res) decode(rrow, c0, len, rb, rkmax, ridx);
            const __m256 gs = _mm256_set1_ps(p->gscale[g]);
            if (int8) {
                block_isum(cb, idx, len, p, blk, nb, v, NB, is);
                if (res) block_isum(w->res_codebook + (int64_t)g * w->res_ncent * v, ridx, len, p, blk, nb, v, NB, ir);
                cvq_finish_int8(p, blk, g, NBATCH, is, res ? ir : NULL, acc);
            } else {
                block_fsum(cb, idx, len, p, c0, nb, v, NB, fs);
                if (res) block_fsum(w->res_codebook + (int64_t)g * w->res_ncent * v, ridx, len, p, c0, nb, v, NB, fr);
                for (int64_t bi = 0; bi < NBATCH; bi++) {
                    acc[bi] = _mm256_add_ps(acc[bi], _mm256_mul_ps(fs[bi], gs));
                    if (res) acc[bi] = _mm256_add_ps(acc[bi], _mm256_mul_ps(fr[bi], _mm256_set1_ps(p->rscale[g])));
                }
            }
        }
        cvq_store_rows(acc, NBATCH, n, j * v, v, bias, y);
    }
}

#define ROWS_V(V) (p->batch == 1 ? rows_v(w, p, j0, j1, bias, y, flags, V, 1) : rows_v(w, p, j0, j1, bias, y, flags, V, 0))

void vqm_cvq_rows_avx2(const vqm_cvq_weight *w, const cvq_prep *p, int64_t j0, int64_t j1, const float *bias,
                       float *y, int flags)
{
    switch (w->v) { /* a constant v lets the compiler turn every entry read into plain loads */
    case 1: ROWS_V(1); break;
    case 2: ROWS_V(2); break;
    case 3: ROWS_V(3); break;
    case 4: ROWS_V(4); break;
    case 5: ROWS_V(5); break;
    case 6: ROWS_V(6); break;
    case 7: ROWS_V(7); break;
    default: ROWS_V(8); break; /* v <= 8 is checked by the caller */
    }
}

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif /* __x86_64__ */
