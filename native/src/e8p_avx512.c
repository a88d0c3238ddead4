/* x86-64 AVX-512 E8P kernels (F, BW, VL, VBMI, VNNI in this translation unit only; the path's feature set).
 *
 * What AVX-512 changes against e8p_avx2.c: the 256-entry lookup of the abs index needs no gathers. The level words'
 * two bytes (2-bit levels of coordinates 0-3 and 4-7) are two 256-byte tables, each held in four registers and
 * looked up for 64 codes at once by two vpermi2b (entries 0-127, 128-255) and a blend on bit 7 of the index. Per
 * coordinate t: a shift and one vpermb give |A4| for 64 codes, a vptestmb of the sign byte c selects where the
 * activation is negated (masked subtract), and vpdpbusd sums |A4| * (+-x) four codes per dword. Chunks are 64 codes
 * (512 columns = two int8 activation blocks): dwords 0-7 hold block 0, 8-15 block 1, reduced separately. The parity
 * of the sign byte and of the level sum come from nibble tables (vpshufb), sigma * x8 from vpmaddwd.
 * E81B stages (3 bits) gather 8-byte table rows (vpgatherdq) against natural-order activations. Float activations run
 * the AVX2 code (e8p_avx2.c). Like kern_avx512.c it also compiles against SIMDe (VQM_SIMDE), so its bit-exactness
 * tests run on any x86-64 CPU.
 */
#include "quip.h"

#if defined(__x86_64__)
#if defined(VQM_SIMDE)
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
typedef simde__mmask64 __mmask64;
typedef simde__mmask8 __mmask8;
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,avx2,fma"))), \
                             apply_to = function)
#include <immintrin.h>
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,avx2,fma")
#include <immintrin.h>
#endif

#define CH 64 /* codes per chunk */

/* ---------------------------------------------------------------- intrinsics Debian's SIMDe lacks */
static inline __m512i cvt_u8_i16(__m256i a)
{
#if defined(VQM_SIMDE)
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(a))),
                              _mm256_cvtepu8_epi16(_mm256_extracti128_si256(a, 1)), 1);
#else
    return _mm512_cvtepu8_epi16(a);
#endif
}

static inline __m512i madd16(__m512i a, __m512i b)
{
#if defined(VQM_SIMDE)
    return _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_madd_epi16(_mm512_castsi512_si256(a), _mm512_castsi512_si256(b))),
        _mm256_madd_epi16(_mm512_extracti64x4_epi64(a, 1), _mm512_extracti64x4_epi64(b, 1)), 1);
#else
    return _mm512_madd_epi16(a, b);
#endif
}

static inline __m512i gather8x64(const long long *base, __m256i idx)
{
#if defined(VQM_SIMDE)
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_i32gather_epi64(base, _mm256_castsi256_si128(idx), 8)),
                              _mm256_i32gather_epi64(base, _mm256_extracti128_si256(idx, 1), 8), 1);
#else
    return _mm512_i32gather_epi64(idx, base, 8);
#endif
}

static int avx512_plan(const vqm_e8p_weight *w, int flags, int *chunk)
{
    if (!(flags & VQM_ACT_INT8)) return vqm_e8p_avx2.plan(w, flags, chunk);
    *chunk = CH;
    return 1;
}

/* The level bytes as lookup tables: lo[a] = levels of coordinates 0-3, hi[a] = 4-7, 2 bits each. */
typedef struct {
    __m512i lo[4], hi[4];
} lv_tables;

static void load_tables(const vqm_e8p_tab *tab, lv_tables *t)
{
    uint8_t lo[256], hi[256];
    for (int a = 0; a < 256; a++) {
        lo[a] = (uint8_t)(tab->lv[a] & 0xFFu);
        hi[a] = (uint8_t)((tab->lv[a] >> 8) & 0xFFu);
    }
    for (int i = 0; i < 4; i++) {
        t->lo[i] = _mm512_loadu_si512(lo + 64 * i);
        t->hi[i] = _mm512_loadu_si512(hi + 64 * i);
    }
}

static inline __m512i lookup256(const __m512i *t, __m512i idx, __mmask64 top)
{
    const __m512i a = _mm512_permutex2var_epi8(t[0], idx, t[1]);
    const __m512i b = _mm512_permutex2var_epi8(t[2], idx, t[3]);
    return _mm512_mask_blend_epi8(top, a, b);
}

/* bytes -> 0/1 parity of each byte's bits */
static inline __m512i parity8(__m512i v)
{
    const __m512i lut = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 1, 0, 1, 0, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0));
    const __m512i nib = _mm512_set1_epi8(0x0F);
    return _mm512_xor_si512(_mm512_shuffle_epi8(lut, _mm512_and_si512(v, nib)),
                            _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(v, 4), nib)));
}

/* Decoded chunk: per coordinate the level source and shift, the sign byte c, sigma per code as int16 halves. */
typedef struct {
    __m512i lo, hi, c, sig0, sig1;
} e8p_chunk;

static inline void decode(const lv_tables *t, const uint8_t *ab, const uint8_t *sb, e8p_chunk *d)
{
    const __m512i a = _mm512_loadu_si512(ab), b = _mm512_loadu_si512(sb);
    const __mmask64 top = _mm512_movepi8_mask(a);
    d->lo = lookup256(t->lo, a, top);
    d->hi = lookup256(t->hi, a, top);
    const __m512i pa = parity8(_mm512_and_si512(_mm512_xor_si512(d->lo, d->hi), _mm512_set1_epi8(0x55)));
    const __m512i par = parity8(b);
    d->c = _mm512_xor_si512(_mm512_xor_si512(b, par), _mm512_slli_epi16(pa, 7));
    const __m512i one16 = _mm512_set1_epi16(1);
    const __m512i p0 = cvt_u8_i16(_mm512_castsi512_si256(par));
    const __m512i p1 = cvt_u8_i16(_mm512_extracti64x4_epi64(par, 1));
    d->sig0 = _mm512_sub_epi16(one16, _mm512_add_epi16(p0, p0));
    d->sig1 = _mm512_sub_epi16(one16, _mm512_add_epi16(p1, p1));
}

static inline int32_t hsum8(__m256i v)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

/* the two block sums (codes 0-31, 32-63) of w4 * q over one chunk: qp chunk-ordered (t * 64 + c), x8 the codes' sums */
static inline void dot(const e8p_chunk *d, const int8_t *qp, const int16_t *x8, int32_t out[2])
{
    const __m512i alut = _mm512_broadcast_i32x4(_mm_setr_epi8(2, 6, 10, 14, 2, 6, 10, 14, 2, 6, 10, 14, 2, 6, 10, 14));
    const __m512i zero = _mm512_setzero_si512();
    __m512i acc = zero;
#pragma GCC unroll 8
    for (int t = 0; t < 8; t++) {
        const __m512i src = t < 4 ? d->lo : d->hi;
        const __m512i lev = (t & 3) ? _mm512_srli_epi16(src, 2 * (t & 3)) : src;
        const __m512i a = _mm512_shuffle_epi8(alut, _mm512_and_si512(lev, _mm512_set1_epi8(3)));
        const __mmask64 neg = _mm512_test_epi8_mask(d->c, _mm512_set1_epi8((char)(1u << t)));
        const __m512i x = _mm512_loadu_si512(qp + t * CH);
        acc = _mm512_dpbusd_epi32(acc, a, _mm512_mask_sub_epi8(x, neg, zero, x));
    }
    const __m512i s0 = madd16(d->sig0, _mm512_loadu_si512(x8));
    const __m512i s1 = madd16(d->sig1, _mm512_loadu_si512(x8 + 32));
    const __m256i sig0 = _mm256_add_epi32(_mm512_castsi512_si256(s0), _mm512_extracti64x4_epi64(s0, 1));
    const __m256i sig1 = _mm256_add_epi32(_mm512_castsi512_si256(s1), _mm512_extracti64x4_epi64(s1, 1));
    out[0] = hsum8(_mm256_add_epi32(_mm512_castsi512_si256(acc), sig0));
    out[1] = hsum8(_mm256_add_epi32(_mm512_extracti64x4_epi64(acc, 1), sig1));
}

/* E81B stage: sum of e * q over codes [c0, c0 + 32) (natural-order activations) */
static inline int32_t dot_e81(const vqm_e8p_tab *tab, const uint8_t *ib, const int8_t *q)
{
    const long long *rows = (const long long *)(const void *)tab->e81;
    __m512i acc = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int c = 0; c < 32; c += 8) {
        uint64_t i8;
        memcpy(&i8, ib + c, 8);
        const __m256i idx = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)i8));
        const __m512i e = gather8x64(rows, idx);
        const __m512i x = _mm512_loadu_si512(q + 8 * c);
        const __mmask64 neg = _mm512_movepi8_mask(e);
        acc = _mm512_dpbusd_epi32(acc, _mm512_abs_epi8(e), _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x));
    }
    return hsum8(_mm256_add_epi32(_mm512_castsi512_si256(acc), _mm512_extracti64x4_epi64(acc, 1)));
}

static inline const uint8_t *chunk_bytes(const uint8_t *plane, int64_t c0, int64_t nc, uint8_t *pad)
{
    if (c0 + CH <= nc) return plane + c0;
    memset(pad, 0, CH);
    memcpy(pad, plane + c0, (size_t)(nc - c0));
    return pad;
}

/* Batch 1: the full chunks of row r (both activation blocks present) as straight-line bodies, BITS a compile-time
 * constant, the reference's finish per block. */
static inline __attribute__((always_inline)) float
row_b1(const vqm_e8p_weight *w, const vqm_e8p_tab *tab, const lv_tables *t, const vqm_e8p_xprep *xp, int64_t r,
       int64_t nfull, const int BITS)
{
    const int64_t nc = xp->ncodes;
    const uint8_t *a0 = vqm_e8p_plane(w, nc, r, 0), *b0 = vqm_e8p_plane(w, nc, r, 1);
    const uint8_t *a1 = BITS > 2 ? vqm_e8p_plane(w, nc, r, 2) : NULL, *b1 = BITS == 4 ? vqm_e8p_plane(w, nc, r, 3) : NULL;
    const float s0 = w->scales[0], s1 = BITS > 2 ? w->scales[1] : 0.0f;
    float acc = 0.0f;
    e8p_chunk d;
    for (int64_t ch = 0; ch < nfull; ch++) {
        VQM_MCA_BEGIN("avx512.e8p.loop", BITS, 0, 0, 0);
        const int64_t c0 = ch * CH;
        const int8_t *qp = xp->qp + ch * 8 * CH;
        int32_t i0[2], i1[2] = { 0, 0 };
        decode(t, a0 + c0, b0 + c0, &d);
        dot(&d, qp, xp->x8 + c0, i0);
        if (BITS == 4) {
            decode(t, a1 + c0, b1 + c0, &d);
            dot(&d, qp, xp->x8 + c0, i1);
        } else if (BITS == 3) {
            i1[0] = dot_e81(tab, a1 + c0, xp->q + ch * 8 * CH);
            i1[1] = dot_e81(tab, a1 + c0 + 32, xp->q + ch * 8 * CH + 256);
        }
        for (int h = 0; h < 2; h++) {
            const float xs = xp->xs[2 * ch + h];
            float v = (float)i0[h] * xs;
            v = v * s0;
            acc = acc + v;
            if (BITS > 2) {
                v = (float)i1[h] * xs;
                v = v * s1;
                acc = acc + v;
            }
        }
        VQM_MCA_END("avx512.e8p.loop", BITS, 0, 0, 0);
    }
    return acc;
}

static void rows_general(const vqm_e8p_weight *w, const vqm_e8p_tab *tab, const lv_tables *t, const vqm_e8p_xprep *xp,
                         int64_t r0, int64_t r1, int64_t ch0, const float *bias, float *y, const float *acc0);

static void avx512_rows(const vqm_e8p_weight *w, const vqm_e8p_tab *tab, const vqm_e8p_xprep *xp, int64_t r0,
                        int64_t r1, const float *bias, float *y, int flags)
{
    if (!(flags & VQM_ACT_INT8)) {
        vqm_e8p_avx2.rows(w, tab, xp, r0, r1, bias, y, flags);
        return;
    }
    lv_tables t;
    load_tables(tab, &t);
    if (xp->batch == 1) {
        const int64_t nfull = xp->k / (8 * CH); /* chunks whose columns all exist: both blocks whole */
        for (int64_t r = r0; r < r1; r++) {
            const float acc = w->bits == 2 ? row_b1(w, tab, &t, xp, r, nfull, 2)
                            : w->bits == 3 ? row_b1(w, tab, &t, xp, r, nfull, 3) : row_b1(w, tab, &t, xp, r, nfull, 4);
            rows_general(w, tab, &t, xp, r, r + 1, nfull, bias, y, &acc);
        }
        return;
    }
    rows_general(w, tab, &t, xp, r0, r1, 0, bias, y, NULL);
}

/* Any batch: chunks [ch0, nchunk) of rows [r0, r1), starting from acc0 (batch 1) or 0. */
static void rows_general(const vqm_e8p_weight *w, const vqm_e8p_tab *tab, const lv_tables *tl, const vqm_e8p_xprep *xp,
                         int64_t r0, int64_t r1, int64_t ch0, const float *bias, float *y, const float *acc0)
{
    const int64_t nc = xp->ncodes, ncp = xp->nchunk * CH, nb = xp->batch;
    const int nstage = w->bits == 2 ? 1 : 2;
    uint8_t pad[2][CH];
    e8p_chunk d;
    for (int64_t r = r0; r < r1; r++) {
        float acc[VQM_BATCH_TILE] = { 0 };
        if (acc0) acc[0] = *acc0;
        for (int64_t ch = ch0; ch < xp->nchunk; ch++) {
            const int64_t c0 = ch * CH;
            int32_t isum[2][2][VQM_BATCH_TILE]; /* [stage][block][row] */
            for (int s = 0; s < nstage; s++) {
                const int e81 = s == 1 && w->bits == 3;
                const uint8_t *ab = chunk_bytes(vqm_e8p_plane(w, nc, r, 2 * s), c0, nc, pad[0]);
                if (e81) {
                    for (int64_t bi = 0; bi < nb; bi++)
                        for (int h = 0; h < 2; h++)
                            isum[s][h][bi] = dot_e81(tab, ab + 32 * h, xp->q + bi * xp->kpad + ch * 8 * CH + 256 * h);
                    continue;
                }
                decode(tl, ab, chunk_bytes(vqm_e8p_plane(w, nc, r, 2 * s + 1), c0, nc, pad[1]), &d);
                for (int64_t bi = 0; bi < nb; bi++) {
                    int32_t two[2];
                    dot(&d, xp->qp + bi * xp->kpad + ch * 8 * CH, xp->x8 + bi * ncp + c0, two);
                    isum[s][0][bi] = two[0];
                    isum[s][1][bi] = two[1];
                }
            }
            /* the reference's order: block by block, stages in order inside a block */
            for (int h = 0; h < 2; h++) {
                const int64_t g = 2 * ch + h;
                if (g >= xp->nblk) break;
                for (int s = 0; s < nstage; s++)
                    for (int64_t bi = 0; bi < nb; bi++) {
                        float v = (float)isum[s][h][bi] * xp->xs[bi * xp->nblk + g];
                        v = v * w->scales[s];
                        acc[bi] = acc[bi] + v;
                    }
            }
        }
        for (int64_t bi = 0; bi < nb; bi++) y[bi * w->n + r] = bias ? acc[bi] + bias[r] : acc[bi];
    }
}

const vqm_e8p_ops vqm_e8p_avx512 = { avx512_plan, avx512_rows };

#if defined(VQM_SIMDE)
#elif defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
