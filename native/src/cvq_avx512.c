/* x86-64 AVX-512 kernel of the column-vector VQ (VPTQ) format with int8 activations (F, BW, VL, VBMI, VNNI in
 * this translation unit only: the path's feature set).
 *
 * Why it is not the AVX2 kernel: a column's entry is v bytes at a random place in the codebook, and the AVX2 kernel
 * reads each with a scalar load (its gathers were slower); those loads bound it near a tenth of the streaming
 * bandwidth. Here the codebook lives in registers as v byte tables, one per vector component t, whose entry e is
 * component t of centroid e plus 128 (built once per call, cvq.c). A 256-entry table (b = 8 bits per code) is four
 * registers, looked up for 64 columns by two vpermi2b and a blend on bit 7 of the code; a 16-entry one (b = 4) is one
 * register and one vpermb. So component t of 64 columns' entries is one vector, and vpdpbusd(entry + 128, q)
 * accumulates row t's dot product with the block's activations, four columns a dword; the 128 * sum(q) that the
 * offset adds is taken off per block (cvq.c's qsum). The integer sums are exact, and each block is finished with
 * the reference's float operations in its order, so results equal cvq_ref.c bit for bit. Codes past the block and
 * bytes past the row are never read (masked loads); past the block the activations are zero.
 * v = 4 or 8 (the presets) with main and residual stages of 9..16 or 129..256 centroids run here
 * (vqm_cvq_avx512_fits); other shapes and float activations run the AVX2 kernel. Like kern_avx512.c this file
 * also compiles against SIMDe (VQM_SIMDE), so the bit-exactness tests run it on any x86-64 CPU.
 */
#include "cvq_internal.h"

#if defined(__x86_64__) || defined(_M_X64)
#if defined(VQM_SIMDE)
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
typedef simde__mmask64 __mmask64;
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,avx2,fma"))), \
                             apply_to = function)
#include <immintrin.h>
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,avx2,fma")
#include <immintrin.h>
#endif

#include "cvq_x86.h"

#define CH 64 /* columns per step */

int vqm_cvq_avx512_fits(const vqm_cvq_weight *w)
{
    const int b = vqm_cvq_bits(w->ncent), rb = w->res_ncent ? vqm_cvq_bits(w->res_ncent) : 8;
    return (w->v == 4 || w->v == 8) && (b == 4 || b == 8) && (rb == 4 || rb == 8);
}

/* ---------------------------------------------------------------- tables (built by cvq.c once per call) */
/* tab[(g * v + t) * S + e] = component t of centroid min(e, ncent - 1) of group g, + 128; S = vqm_cvq_tab_stride */
void vqm_cvq_build_tables(const int8_t *cb, int groups, int ncent, int v, uint8_t *tab)
{
    const int b = vqm_cvq_bits(ncent), S = vqm_cvq_tab_stride(ncent), ne = 1 << b;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int g = 0; g < groups; g++) {
        const int8_t *c = cb + (int64_t)g * ncent * v;
        uint8_t *tg = tab + (int64_t)g * v * S;
        if (v == 4 && ncent == 256) { /* the mobile codebooks: 16 centroids a load, transposed by one vpermb */
            const __m512i tr = _mm512_set_epi8(63, 59, 55, 51, 47, 43, 39, 35, 31, 27, 23, 19, 15, 11, 7, 3,
                                               62, 58, 54, 50, 46, 42, 38, 34, 30, 26, 22, 18, 14, 10, 6, 2,
                                               61, 57, 53, 49, 45, 41, 37, 33, 29, 25, 21, 17, 13, 9, 5, 1,
                                               60, 56, 52, 48, 44, 40, 36, 32, 28, 24, 20, 16, 12, 8, 4, 0);
            for (int e = 0; e < 256; e += 16) {
                const __m512i q = _mm512_xor_si512(
                    _mm512_permutexvar_epi8(tr, _mm512_loadu_si512((const void *)(c + 4 * e))), flip);
                _mm_storeu_si128((__m128i *)(void *)(tg + e), _mm512_castsi512_si128(q));
                _mm_storeu_si128((__m128i *)(void *)(tg + 1 * S + e), _mm512_extracti32x4_epi32(q, 1));
                _mm_storeu_si128((__m128i *)(void *)(tg + 2 * S + e), _mm512_extracti32x4_epi32(q, 2));
                _mm_storeu_si128((__m128i *)(void *)(tg + 3 * S + e), _mm512_extracti32x4_epi32(q, 3));
            }
            continue;
        }
        for (int t = 0; t < v; t++)
            for (int e = 0; e < S; e++)
                tg[t * S + e] = e < ne ? (uint8_t)(c[(e < ncent ? e : ncent - 1) * v + t] + 128) : 0;
    }
}

/* ---------------------------------------------------------------- loads */
static inline __m512i load_partial(const void *p, int n) /* n < 64 bytes; none past them is read */
{
#if defined(VQM_SIMDE)
    uint8_t tmp[64] = { 0 };
    memcpy(tmp, p, (size_t)n);
    return _mm512_loadu_si512((const void *)tmp);
#else
    return _mm512_maskz_loadu_epi8((1ull << n) - 1, p);
#endif
}

static inline __m512i load_n(const void *p, int n) { return n == CH ? _mm512_loadu_si512(p) : load_partial(p, n); }

/* codes [first, first + n) of a b-bit row (b = 4 or 8, n <= 64) as bytes; the bytes above n hold codes of later
 * columns or zeros, which meet zero activations */
static inline __m512i codes64(const uint8_t *row, int64_t first, int n, const int b)
{
    if (b == 8) return load_n(row + first, n);
    static const uint8_t half[2][64] __attribute__((aligned(64))) = {
        { 0,  0,  1,  1,  2,  2,  3,  3,  4,  4,  5,  5,  6,  6,  7,  7,  8,  8,  9,  9,  10, 10,
          11, 11, 12, 12, 13, 13, 14, 14, 15, 15, 16, 16, 17, 17, 18, 18, 19, 19, 20, 20, 21, 21,
          22, 22, 23, 23, 24, 24, 25, 25, 26, 26, 27, 27, 28, 28, 29, 29, 30, 30, 31, 31 },
        { 0,  1,  1,  2,  2,  3,  3,  4,  4,  5,  5,  6,  6,  7,  7,  8,  8,  9,  9,  10, 10, 11,
          11, 12, 12, 13, 13, 14, 14, 15, 15, 16, 16, 17, 17, 18, 18, 19, 19, 20, 20, 21, 21, 22,
          22, 23, 23, 24, 24, 25, 25, 26, 26, 27, 27, 28, 28, 29, 29, 30, 30, 31, 31, 32 },
    };
    /* code c is nibble c of the row (low nibble first): byte (s + i) / 2 of the loaded bytes for code first + i,
     * its high nibble where s + i is odd (s: first is odd) */
    const int s = (int)(first & 1);
    const int64_t p0 = first >> 1;
    const __m512i raw = load_partial(row + p0, (int)(((first + n - 1) >> 1) - p0 + 1));
    const __m512i d = _mm512_permutexvar_epi8(_mm512_load_si512((const void *)half[s]), raw);
    const __m512i m = _mm512_set1_epi8(15);
    return _mm512_mask_blend_epi8(s ? 0x5555555555555555ull : 0xAAAAAAAAAAAAAAAAull, _mm512_and_si512(d, m),
                                  _mm512_and_si512(_mm512_srli_epi16(d, 4), m));
}

/* entries + 128 of component t for 64 codes from its table T (b = 8: four registers, b = 4: one) */
static inline __m512i look(const __m512i *T, __m512i idx, __mmask64 top, const int b)
{
    if (b == 4) return _mm512_permutexvar_epi8(idx, T[0]);
    return _mm512_mask_blend_epi8(top, _mm512_permutex2var_epi8(T[0], idx, T[1]),
                                  _mm512_permutex2var_epi8(T[2], idx, T[3]));
}

/* [sum a0, sum a1, sum a2, sum a3] of four vectors of 16 int32 */
static inline __m128i hsum4(__m512i a0, __m512i a1, __m512i a2, __m512i a3)
{
    const __m512i s01 = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
    const __m512i s23 = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
    const __m512i s = _mm512_add_epi32(_mm512_unpacklo_epi64(s01, s23), _mm512_unpackhi_epi64(s01, s23));
    const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/* batch rows of this call: NB = 1 is the decode case, compiled apart so its accumulators stay in registers */
#define NBATCH (NB ? NB : nb)

#define UNROLL _Pragma("GCC unroll 8") /* loops over v and the table registers: their arrays must become registers */

/* one stage over one block of one vector row: per batch row, lane t of the result is the exact sum over the block
 * of (component t of the column's centroid) * q, the offset already taken off */
static inline __attribute__((always_inline)) void stage_block(const uint8_t *tab, const uint8_t *row, int64_t c0,
                                                              int len, const cvq_prep *p, int blk, int64_t nb,
                                                              const int V, const int b, const int NB, __m256i *isum)
{
    const int S = b == 8 ? 256 : 64, NT = b == 8 ? 4 : 1;
    __m512i T[8][4], acc[NB ? NB : VQM_BATCH_TILE][8];
    UNROLL for (int t = 0; t < V; t++)
        UNROLL for (int u = 0; u < NT; u++) T[t][u] = _mm512_load_si512((const void *)(tab + t * S + 64 * u));
    for (int64_t bi = 0; bi < NBATCH; bi++)
        UNROLL for (int t = 0; t < 8; t++) acc[bi][t] = _mm512_setzero_si512();
    /* steps end on multiples of 64 columns, where the codes (b = 8: a byte each; b = 4: 32 bytes) and the
     * activations start a cache line or its half: a group may start anywhere (after the outlier columns), and
     * 64-byte loads across cache lines made a whole matrix half as fast again */
    for (int i = 0, n; i < len; i += n) {
        const int64_t c = c0 + i;
        n = (int)((c | (CH - 1)) + 1 - c);
        if (n > len - i) n = len - i;
        const __m512i idx = codes64(row, c, n, b);
        const __mmask64 top = _mm512_movepi8_mask(idx);
        __m512i e[8];
        UNROLL for (int t = 0; t < V; t++) e[t] = look(T[t], idx, top, b);
        for (int64_t bi = 0; bi < NBATCH; bi++) {
            const __m512i q = load_n(p->xq + bi * p->k + c, n);
            UNROLL for (int t = 0; t < V; t++) acc[bi][t] = _mm512_dpbusd_epi32(acc[bi][t], e[t], q);
        }
    }
    for (int64_t bi = 0; bi < NBATCH; bi++) {
        const __m128i lo = hsum4(acc[bi][0], acc[bi][1], acc[bi][2], acc[bi][3]);
        const __m128i hi = V > 4 ? hsum4(acc[bi][4], acc[bi][5], acc[bi][6], acc[bi][7]) : _mm_setzero_si128();
        isum[bi] = _mm256_sub_epi32(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1),
                                    _mm256_set1_epi32(128 * p->qsum[bi * p->nblk + blk]));
    }
}

static inline __attribute__((always_inline)) void rows_v(const vqm_cvq_weight *w, const cvq_prep *p, int64_t j0,
                                                         int64_t j1, const float *bias, float *y, const int V,
                                                         const int NB)
{
    const int res = w->res_ncent > 0;
    const int b = vqm_cvq_bits(w->ncent), rb = res ? vqm_cvq_bits(w->res_ncent) : 0;
    const int S = vqm_cvq_tab_stride(w->ncent), RS = res ? vqm_cvq_tab_stride(w->res_ncent) : 0;
    const int64_t n = w->n, k = w->k, nb = p->batch;
    const int64_t rowbytes = vqm_cdiv(k * b, 8), rrowbytes = vqm_cdiv(k * rb, 8);
    __m256i is[VQM_BATCH_TILE], ir[VQM_BATCH_TILE];
    __m256 acc[VQM_BATCH_TILE];
    for (int64_t j = j0; j < j1; j++) {
        const uint8_t *row = w->indices + j * rowbytes;
        const uint8_t *rrow = res ? w->res_indices + j * rrowbytes : NULL;
        for (int64_t bi = 0; bi < NBATCH; bi++) acc[bi] = _mm256_setzero_ps();
        for (int blk = 0; blk < p->nblk; blk++) {
            const int64_t c0 = p->c0[blk];
            const int len = (int)(p->c0[blk + 1] - c0), g = p->grp[blk];
            if (b == 8) stage_block(p->tab + (int64_t)g * V * S, row, c0, len, p, blk, nb, V, 8, NB, is);
            else stage_block(p->tab + (int64_t)g * V * S, row, c0, len, p, blk, nb, V, 4, NB, is);
            if (res && rb == 8) stage_block(p->rtab + (int64_t)g * V * RS, rrow, c0, len, p, blk, nb, V, 8, NB, ir);
            else if (res) stage_block(p->rtab + (int64_t)g * V * RS, rrow, c0, len, p, blk, nb, V, 4, NB, ir);
            cvq_finish_int8(p, blk, g, NBATCH, is, res ? ir : NULL, acc);
        }
        cvq_store_rows(acc, NBATCH, n, j * V, V, bias, y);
    }
}

#define ROWS_V(V) (p->batch == 1 ? rows_v(w, p, j0, j1, bias, y, V, 1) : rows_v(w, p, j0, j1, bias, y, V, 0))

void vqm_cvq_rows_avx512(const vqm_cvq_weight *w, const cvq_prep *p, int64_t j0, int64_t j1, const float *bias,
                         float *y, int flags)
{
    (void)flags; /* int8 activations: cvq.c sends float ones to the AVX2 kernel */
    if (w->v == 4) ROWS_V(4); /* a constant v keeps the tables and accumulators in registers */
    else ROWS_V(8);           /* the presets' v; others run the AVX2 kernel (vqm_cvq_avx512_fits) */
}

#if defined(VQM_SIMDE)
#elif defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif /* __x86_64__ */
