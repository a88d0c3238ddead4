/* x86-64 AVX2 E8P kernels (compiled with avx2/fma in this translation unit only).
 *
 * int8 activations, E8P stages: chunks of 32 codes (256 columns, one activation block). The 32 abs indices fetch
 * their level words (vqm_e8p_tab.lv: 2-bit level L_t per coordinate, |A4| = 4 L + 2) with 4 vpgatherdd; packing
 * keeps the low 16 bits as two byte vectors (coordinates 0-3 / 4-7), so each coordinate's 32 levels are one shift and
 * mask away and one pshufb maps them to |A4|. The parity of the level sum gives A4's negated coordinate 7, a pshufb
 * popcount the sign byte's parity; c = b' ^ (P_a << 7) holds every coordinate's sign. Per coordinate t the
 * activations (prepared in chunk order: position t * 32 + c is column 8 c + t, and negated) are selected by bit t of
 * c (pblendvb on a 16-bit shift of c), multiplied with pmaddubsw(|A4|, +-x) and summed over the 8 coordinates in int16
 * (<= 8 * 2 * 14 * 127 = 28448); the shift sigma adds sum_c sigma_c * x8_c (pmaddwd). E81B stages gather 8-byte table
 * rows (vpgatherqq) and use pmaddubsw(|e|, sign(x, e)) on natural-order activations.
 *
 * Float activations, one code at a time: the A4 row (8 floats) XOR the sign byte's 8 sign masks, one FMA with the
 * code's activations, sigma times the code's activation sum.
 */
#include "quip.h"

#if defined(__x86_64__)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#include <immintrin.h>

static int avx2_plan(const vqm_e8p_weight *w, int flags, int *chunk)
{
    (void)w;
    *chunk = (flags & VQM_ACT_INT8) ? VQM_E8P_CHUNK : 0;
    return 1;
}

static inline int32_t hsum32(__m256i v)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

static inline float hsumf(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One chunk of codes of a stage: pointers to 32 abs / sign (or E81B) bytes, padded when the row ends early. */
static inline void chunk_bytes(const uint8_t *plane, int64_t c0, int64_t nc, uint8_t *pad, const uint8_t **out)
{
    if (c0 + VQM_E8P_CHUNK <= nc) {
        *out = plane + c0;
        return;
    }
    memset(pad, 0, VQM_E8P_CHUNK);
    memcpy(pad, plane + c0, (size_t)(nc - c0));
    *out = pad;
}

/* Decoded E8P chunk: per coordinate |A4| bytes and sign controls (bit 7), sigma as int16 for codes 0-15 / 16-31. */
typedef struct {
    __m256i a[8], s[8], sig_lo, sig_hi;
} e8p_chunk;

static inline void decode_e8p(const vqm_e8p_tab *tab, const uint8_t *ab, const uint8_t *sb, e8p_chunk *d)
{
    const int *lv = (const int *)(const void *)tab->lv;
    const __m256i idx = _mm256_loadu_si256((const __m256i *)(const void *)ab);
    const __m128i i_lo = _mm256_castsi256_si128(idx), i_hi = _mm256_extracti128_si256(idx, 1);
    const __m256i m16 = _mm256_set1_epi32(0xFFFF);
    const __m256i g0 = _mm256_and_si256(_mm256_i32gather_epi32(lv, _mm256_cvtepu8_epi32(i_lo), 4), m16);
    const __m256i g1 = _mm256_and_si256(_mm256_i32gather_epi32(lv, _mm256_cvtepu8_epi32(_mm_srli_si128(i_lo, 8)), 4), m16);
    const __m256i g2 = _mm256_and_si256(_mm256_i32gather_epi32(lv, _mm256_cvtepu8_epi32(i_hi), 4), m16);
    const __m256i g3 = _mm256_and_si256(_mm256_i32gather_epi32(lv, _mm256_cvtepu8_epi32(_mm_srli_si128(i_hi, 8)), 4), m16);
    const __m256i w01 = _mm256_packus_epi32(g0, g1), w23 = _mm256_packus_epi32(g2, g3);
    const __m256i m8 = _mm256_set1_epi16(0xFF);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256i lo = _mm256_permutevar8x32_epi32(
        _mm256_packus_epi16(_mm256_and_si256(w01, m8), _mm256_and_si256(w23, m8)), order);
    const __m256i hi = _mm256_permutevar8x32_epi32(
        _mm256_packus_epi16(_mm256_srli_epi16(w01, 8), _mm256_srli_epi16(w23, 8)), order);
    /* P_a = parity of the level sum = xor of bits 0, 2, 4, 6 of lo and hi */
    __m256i u = _mm256_xor_si256(lo, hi);
    u = _mm256_xor_si256(u, _mm256_srli_epi16(u, 4));
    u = _mm256_xor_si256(u, _mm256_srli_epi16(u, 2));
    const __m256i one8 = _mm256_set1_epi8(1);
    const __m256i pa = _mm256_and_si256(u, one8);
    /* parity of the sign byte (nibble popcounts) */
    const __m256i b = _mm256_loadu_si256((const __m256i *)(const void *)sb);
    const __m256i nib = _mm256_set1_epi8(0x0F);
    const __m256i parlut = _mm256_setr_epi8(0, 1, 1, 0, 1, 0, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0,
                                            0, 1, 1, 0, 1, 0, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0);
    const __m256i par = _mm256_xor_si256(_mm256_shuffle_epi8(parlut, _mm256_and_si256(b, nib)),
                                         _mm256_shuffle_epi8(parlut, _mm256_and_si256(_mm256_srli_epi16(b, 4), nib)));
    const __m256i c = _mm256_xor_si256(_mm256_xor_si256(b, par), _mm256_slli_epi16(pa, 7));
    const __m256i alut = _mm256_setr_epi8(2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                          2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m256i three = _mm256_set1_epi8(3);
#pragma GCC unroll 8
    for (int t = 0; t < 8; t++) {
        const __m256i src = t < 4 ? lo : hi;
        const int sh = 2 * (t & 3);
        d->a[t] = _mm256_shuffle_epi8(alut, _mm256_and_si256(_mm256_srli_epi16(src, sh), three));
        d->s[t] = _mm256_slli_epi16(c, 7 - t);
    }
    /* sigma = 1 - 2 parity, as int16 in natural code order */
    const __m256i ones16 = _mm256_set1_epi16(1);
    const __m256i p_lo = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(par));
    const __m256i p_hi = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(par, 1));
    d->sig_lo = _mm256_sub_epi16(ones16, _mm256_add_epi16(p_lo, p_lo));
    d->sig_hi = _mm256_sub_epi16(ones16, _mm256_add_epi16(p_hi, p_hi));
}

/* sum over the chunk of w4 * q for one activation row (qp/nq: chunk-ordered q and -q, x8: the codes' q sums) */
static inline int32_t dot_e8p(const e8p_chunk *d, const int8_t *qp, const int8_t *nq, const int16_t *x8)
{
    __m256i s16 = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int t = 0; t < 8; t++) {
        const __m256i x = _mm256_loadu_si256((const __m256i *)(const void *)(qp + t * VQM_E8P_CHUNK));
        const __m256i nx = _mm256_loadu_si256((const __m256i *)(const void *)(nq + t * VQM_E8P_CHUNK));
        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(d->a[t], _mm256_blendv_epi8(x, nx, d->s[t])));
    }
    const __m256i ones16 = _mm256_set1_epi16(1);
    __m256i s32 = _mm256_madd_epi16(s16, ones16);
    s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(d->sig_lo, _mm256_loadu_si256((const __m256i *)(const void *)x8)));
    s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(d->sig_hi,
                                                  _mm256_loadu_si256((const __m256i *)(const void *)(x8 + 16))));
    return hsum32(s32);
}

/* sum over the chunk of e * q for an E81B stage (natural-order activations q, 256 columns) */
static inline int32_t dot_e81(const vqm_e8p_tab *tab, const uint8_t *ib, const int8_t *q)
{
    const long long *rows = (const long long *)(const void *)tab->e81;
    __m256i s16 = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int c = 0; c < VQM_E8P_CHUNK; c += 4) {
        uint32_t i4;
        memcpy(&i4, ib + c, 4);
        const __m128i idx = _mm_cvtepu8_epi32(_mm_cvtsi32_si128((int)i4));
        const __m256i e = _mm256_i32gather_epi64(rows, idx, 8);
        const __m256i x = _mm256_loadu_si256((const __m256i *)(const void *)(q + 8 * c));
        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(_mm256_abs_epi8(e), _mm256_sign_epi8(x, e)));
    }
    return hsum32(_mm256_madd_epi16(s16, _mm256_set1_epi16(1)));
}

/* float activations: sum over the codes [j0, j1) of one stage of w * x */
static float fdot(const vqm_e8p_tab *tab, const uint8_t *p0, const uint8_t *p1, int e81, int64_t j0, int64_t j1,
                  const float *xf, const float *f8)
{
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    float sig = 0.0f;
    int64_t j = j0;
    if (e81) {
        for (; j + 1 < j1; j += 2) {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(tab->fe81[p0[j]]), _mm256_loadu_ps(xf + 8 * j), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(tab->fe81[p0[j + 1]]), _mm256_loadu_ps(xf + 8 * j + 8), a1);
        }
        for (; j < j1; j++) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(tab->fe81[p0[j]]), _mm256_loadu_ps(xf + 8 * j), a0);
        return hsumf(_mm256_add_ps(a0, a1));
    }
    for (; j + 1 < j1; j += 2) {
        const __m256 w0 = _mm256_xor_ps(_mm256_loadu_ps(tab->fabs4[p0[j]]),
                                        _mm256_loadu_ps((const float *)(const void *)tab->fsgn[p1[j]]));
        const __m256 w1 = _mm256_xor_ps(_mm256_loadu_ps(tab->fabs4[p0[j + 1]]),
                                        _mm256_loadu_ps((const float *)(const void *)tab->fsgn[p1[j + 1]]));
        a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xf + 8 * j), a0);
        a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xf + 8 * j + 8), a1);
        sig += tab->fsigma[p1[j]] * f8[j] + tab->fsigma[p1[j + 1]] * f8[j + 1];
    }
    for (; j < j1; j++) {
        const __m256 w0 = _mm256_xor_ps(_mm256_loadu_ps(tab->fabs4[p0[j]]),
                                        _mm256_loadu_ps((const float *)(const void *)tab->fsgn[p1[j]]));
        a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xf + 8 * j), a0);
        sig += tab->fsigma[p1[j]] * f8[j];
    }
    return hsumf(_mm256_add_ps(a0, a1)) + sig;
}

/* Batch 1, int8 activations: chunks [ch0, nchunk) of row r added to acc (the partial last chunk). */
static float chunks(const vqm_e8p_weight *w, const vqm_e8p_tab *tab, const vqm_e8p_xprep *xp, int64_t r, int64_t ch0,
                    float acc)
{
    const int64_t nc = xp->ncodes;
    const int nstage = w->bits == 2 ? 1 : 2;
    uint8_t pad[2][VQM_E8P_CHUNK];
    e8p_chunk d;
    for (int64_t ch = ch0; ch < xp->nchunk; ch++) {
        const int64_t c0 = ch * VQM_E8P_CHUNK;
        for (int s = 0; s < nstage; s++) {
            const int e81 = s == 1 && w->bits == 3;
            const uint8_t *ab, *sb;
            chunk_bytes(vqm_e8p_plane(w, nc, r, 2 * s), c0, nc, pad[0], &ab);
            int32_t isum;
            if (e81) {
                isum = dot_e81(tab, ab, xp->q + ch * 256);
            } else {
                chunk_bytes(vqm_e8p_plane(w, nc, r, 2 * s + 1), c0, nc, pad[1], &sb);
                decode_e8p(tab, ab, sb, &d);
                isum = dot_e8p(&d, xp->qp + ch * 256, xp->nq + ch * 256, xp->x8 + c0);
            }
            float v = (float)isum * xp->xs[ch];
            v = v * w->scales[s];
            acc = acc + v;
        }
    }
    return acc;
}

/* Batch 1, int8 activations, the full chunks of one row: straight-line chunk bodies (BITS a compile-time constant),
 * the reference's finish per chunk. Returns the accumulator. */
static inline __attribute__((always_inline)) float
row_b1(const vqm_e8p_weight *w, const vqm_e8p_tab *tab, const vqm_e8p_xprep *xp, int64_t r, int64_t nfull,
       const int BITS)
{
    const int64_t nc = xp->ncodes;
    const uint8_t *a0 = vqm_e8p_plane(w, nc, r, 0), *b0 = vqm_e8p_plane(w, nc, r, 1);
    const uint8_t *a1 = BITS > 2 ? vqm_e8p_plane(w, nc, r, 2) : NULL, *b1 = BITS == 4 ? vqm_e8p_plane(w, nc, r, 3) : NULL;
    const float s0 = w->scales[0], s1 = BITS > 2 ? w->scales[1] : 0.0f;
    float acc = 0.0f;
    e8p_chunk d;
    for (int64_t ch = 0; ch < nfull; ch++) {
        VQM_MCA_BEGIN("avx2.e8p.loop", BITS, 0, 0, 0);
        const int64_t c0 = ch * VQM_E8P_CHUNK;
        const int8_t *qp = xp->qp + ch * 256, *nq = xp->nq + ch * 256;
        decode_e8p(tab, a0 + c0, b0 + c0, &d);
        const int32_t i0 = dot_e8p(&d, qp, nq, xp->x8 + c0);
        int32_t i1 = 0;
        if (BITS == 4) {
            decode_e8p(tab, a1 + c0, b1 + c0, &d);
            i1 = dot_e8p(&d, qp, nq, xp->x8 + c0);
        } else if (BITS == 3) {
            i1 = dot_e81(tab, a1 + c0, xp->q + ch * 256);
        }
        const float xs = xp->xs[ch];
        float v = (float)i0 * xs;
        v = v * s0;
        acc = acc + v;
        if (BITS > 2) {
            v = (float)i1 * xs;
            v = v * s1;
            acc = acc + v;
        }
        VQM_MCA_END("avx2.e8p.loop", BITS, 0, 0, 0);
    }
    return acc;
}

static void avx2_rows(const vqm_e8p_weight *w, const vqm_e8p_tab *tab, const vqm_e8p_xprep *xp, int64_t r0,
                      int64_t r1, const float *bias, float *y, int flags)
{
    if (xp->batch == 1 && (flags & VQM_ACT_INT8)) {
        /* full chunks straight-line, then the partial one (if any) through the general loop below */
        const int64_t nfull = xp->ncodes / VQM_E8P_CHUNK;
        for (int64_t r = r0; r < r1; r++) {
            float acc = w->bits == 2 ? row_b1(w, tab, xp, r, nfull, 2)
                      : w->bits == 3 ? row_b1(w, tab, xp, r, nfull, 3) : row_b1(w, tab, xp, r, nfull, 4);
            if (nfull < xp->nchunk) acc = chunks(w, tab, xp, r, nfull, acc);
            y[r] = bias ? acc + bias[r] : acc;
        }
        return;
    }
    const int64_t nc = xp->ncodes, ncp = xp->nchunk * VQM_E8P_CHUNK, nb = xp->batch;
    const int nstage = w->bits == 2 ? 1 : 2;
    const int int8 = (flags & VQM_ACT_INT8) != 0;
    uint8_t pad[3][VQM_E8P_CHUNK];
    e8p_chunk d;
    memset(&d, 0, sizeof d); /* decoded before use; the compiler cannot see it through the stage switch */
    for (int64_t r = r0; r < r1; r++) {
        float acc[VQM_BATCH_TILE] = { 0 };
        for (int64_t ch = 0; ch < xp->nchunk; ch++) {
            const int64_t c0 = ch * VQM_E8P_CHUNK;
            for (int s = 0; s < nstage; s++) {
                const int e81 = s == 1 && w->bits == 3;
                const uint8_t *p0 = vqm_e8p_plane(w, nc, r, 2 * s);
                const uint8_t *p1 = e81 ? NULL : vqm_e8p_plane(w, nc, r, 2 * s + 1);
                const float scale = w->scales[s];
                if (int8) {
                    const uint8_t *ab, *sb = NULL;
                    chunk_bytes(p0, c0, nc, pad[0], &ab);
                    if (!e81) {
                        chunk_bytes(p1, c0, nc, pad[1], &sb);
                        decode_e8p(tab, ab, sb, &d);
                    }
                    for (int64_t bi = 0; bi < nb; bi++) {
                        const int32_t isum = e81 ? dot_e81(tab, ab, xp->q + bi * xp->kpad + ch * 256)
                                                 : dot_e8p(&d, xp->qp + bi * xp->kpad + ch * 256,
                                                           xp->nq + bi * xp->kpad + ch * 256, xp->x8 + bi * ncp + c0);
                        float v = (float)isum * xp->xs[bi * xp->nblk + ch];
                        v = v * scale;
                        acc[bi] = acc[bi] + v;
                    }
                } else {
                    const int64_t c1 = c0 + VQM_E8P_CHUNK < nc ? c0 + VQM_E8P_CHUNK : nc;
                    for (int64_t bi = 0; bi < nb; bi++) {
                        const float f = fdot(tab, p0, p1, e81, c0, c1, xp->xf + bi * xp->kpad, xp->f8 + bi * ncp);
                        acc[bi] = acc[bi] + f * scale;
                    }
                }
            }
        }
        for (int64_t bi = 0; bi < nb; bi++) y[bi * w->n + r] = bias ? acc[bi] + bias[r] : acc[bi];
    }
}

const vqm_e8p_ops vqm_e8p_avx2 = { avx2_plan, avx2_rows };

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
