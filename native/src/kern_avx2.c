/* x86-64 AVX2 kernels (compiled with -mavx2 -mfma -mf16c in this translation
 * unit only; selected at run time when CPUID reports AVX2+FMA+F16C).
 *
 * VQ decode works on chunks of 32 codes:
 *  unpack : b=4 -> codes [even 0..30 | odd 1..31] (low nibbles / high nibbles),
 *           b=6 -> natural order (pshufb spreads 3 bytes to a dword, shifts),
 *           b=8 -> natural order.
 *  lookup : k=16 -> one pshufb per vector dimension (16-byte table per dim),
 *           k=64 -> 4 pshufb + 3 pblendvb per dimension,
 *           k=256 -> vpgatherdd from a 256 x int32 table, compacted to bytes.
 *  The decoded int8 weights come out in a permuted order; the activations are
 *  permuted identically once per call (see vqm_layout), so no interleaving is
 *  needed in the hot loop. 1-D k=4 (b=2) is run as a 2-D k=16 codebook on
 *  nibbles (each nibble = two 2-bit codes).
 *  int8 activations: pmaddubsw(|w|, sign(x, w)) + pmaddwd -> int32 per block;
 *  float activations: int8 -> f32 converts + FMA.
 */
#include "internal.h"
#include <math.h>
#include <stdlib.h>

#if defined(__x86_64__)
/* Target flags are set here, not on the command line, so that every build
 * (Makefile, cffi/setuptools) compiles all sources with the same flags and only
 * this file's functions use AVX2. */
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#include <immintrin.h>


static inline int ord_code(int be, int p) { return be == 4 ? (p < 16 ? 2 * p : 2 * (p - 16) + 1) : p; }

static int avx2_vq_plan(const vqm_vq_weight *w, int flags, vqm_layout *lay)
{
    (void)flags;
    vqm_vcfg c;
    if (!vqm_vq_simd_cfg(w, &c)) return 0;
    lay->chunk_cols = 32 * c.de;
    if (c.be == 8) {
        lay->identity = 1;
        for (int q = 0; q < lay->chunk_cols; q++) lay->perm[q] = (int16_t)q;
    } else {
        lay->identity = 0;
        for (int t = 0; t < c.de; t++)
            for (int p = 0; p < 32; p++) lay->perm[t * 32 + p] = (int16_t)(ord_code(c.be, p) * c.de + t);
    }
    return 1;
}

static size_t tab_size(const vqm_vcfg *c)
{
    if (c->ke == 16) return 32u * (size_t)c->de;
    if (c->ke == 64) return 128u * (size_t)c->de;
    return 1024u;
}

/* Decoding tables for codebook block (rb, cb). */
static void prep_tab(const vqm_vcfg *c, const int8_t *cbk, int d, uint8_t *tab)
{
    if (c->virt) {
        for (int i = 0; i < 16; i++) {
            tab[i] = tab[16 + i] = (uint8_t)cbk[i & 3];
            tab[32 + i] = tab[48 + i] = (uint8_t)cbk[i >> 2];
        }
    } else if (c->ke == 16 && d == 2) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(const void *)cbk); /* 16 x (d0, d1) */
        v = _mm256_shuffle_epi8(v, _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                                    0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
        v = _mm256_permute4x64_epi64(v, 0xd8); /* [d0 0-7, d0 8-15, d1 0-7, d1 8-15] */
        __m256i t0 = _mm256_permute2x128_si256(v, v, 0x00), t1 = _mm256_permute2x128_si256(v, v, 0x11);
        _mm256_store_si256((__m256i *)(void *)tab, t0);
        _mm256_store_si256((__m256i *)(void *)(tab + 32), t1);
    } else if (c->ke == 16) {
        for (int t = 0; t < d; t++)
            for (int i = 0; i < 16; i++) tab[t * 32 + i] = tab[t * 32 + 16 + i] = (uint8_t)cbk[i * d + t];
    } else if (c->ke == 64) {
        for (int t = 0; t < d; t++)
            for (int m = 0; m < 4; m++)
                for (int i = 0; i < 16; i++)
                    tab[(t * 4 + m) * 32 + i] = tab[(t * 4 + m) * 32 + 16 + i] = (uint8_t)cbk[(16 * m + i) * d + t];
    } else {
        int32_t *t32 = (int32_t *)(void *)tab;
        for (int i = 0; i < 256; i++) {
            if (d == 1) t32[i] = cbk[i];
            else if (d == 2) t32[i] = (int32_t)((uint32_t)(uint8_t)cbk[2 * i] | ((uint32_t)(uint8_t)cbk[2 * i + 1] << 8));
            else {
                uint32_t v;
                memcpy(&v, cbk + 4 * i, 4);
                t32[i] = (int32_t)v;
            }
        }
    }
}

static void prep_tab_fast(const vqm_vcfg *c, const int8_t *cbk, int d, uint8_t *tab);

/* ---------------------------------------------------------------- unpack */
static inline __m256i unpack4(const uint8_t *p)
{
    __m128i v = _mm_loadu_si128((const __m128i *)(const void *)p);
    __m256i t = _mm256_inserti128_si256(_mm256_castsi128_si256(v), _mm_srli_epi16(v, 4), 1);
    return _mm256_and_si256(t, _mm256_set1_epi8(0x0f));
}

static inline __m256i unpack6(const uint8_t *p)
{
    __m128i a = _mm_loadu_si128((const __m128i *)(const void *)p);
    __m128i b = _mm_loadu_si128((const __m128i *)(const void *)(p + 8));
    __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(a), b, 1);
    const __m256i spread = _mm256_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1,
                                            4, 5, 6, -1, 7, 8, 9, -1, 10, 11, 12, -1, 13, 14, 15, -1);
    v = _mm256_shuffle_epi8(v, spread);
    __m256i t = _mm256_or_si256(_mm256_and_si256(v, _mm256_set1_epi32(0xfff)),
                                _mm256_slli_epi32(_mm256_and_si256(v, _mm256_set1_epi32(0xfff000)), 4));
    return _mm256_or_si256(_mm256_and_si256(t, _mm256_set1_epi32(0x003f003f)),
                           _mm256_and_si256(_mm256_slli_epi32(t, 2), _mm256_set1_epi32(0x3f003f00)));
}

static inline __m256i unpack8(const uint8_t *p) { return _mm256_loadu_si256((const __m256i *)(const void *)p); }

/* generic (unaligned start / partial chunk): codes in the same order, missing ones = 0 */
static inline __m256i unpack_slow(const uint8_t *row, int64_t cs, int nvalid, int be)
{
    uint8_t tmp[32];
    for (int p = 0; p < 32; p++) {
        int j = ord_code(be, p);
        tmp[p] = j < nvalid ? (uint8_t)vqm_get_code(row, cs + j, be) : 0;
    }
    return _mm256_loadu_si256((const __m256i *)(const void *)tmp);
}

/* ---------------------------------------------------------------- lookup */
static inline __m256i lut64(const uint8_t *t, __m256i c, __m256i m4, __m256i m5)
{
    const __m256i *T = (const __m256i *)(const void *)t;
    __m256i r01 = _mm256_blendv_epi8(_mm256_shuffle_epi8(_mm256_load_si256(T), c),
                                     _mm256_shuffle_epi8(_mm256_load_si256(T + 1), c), m4);
    __m256i r23 = _mm256_blendv_epi8(_mm256_shuffle_epi8(_mm256_load_si256(T + 2), c),
                                     _mm256_shuffle_epi8(_mm256_load_si256(T + 3), c), m4);
    return _mm256_blendv_epi8(r01, r23, m5);
}

static inline void lookup(__m256i c, const uint8_t *tab, const int DE, const int KE, __m256i *W)
{
    if (KE == 16) {
        for (int t = 0; t < DE; t++)
            W[t] = _mm256_shuffle_epi8(_mm256_load_si256((const __m256i *)(const void *)(tab + 32 * t)), c);
    } else if (KE == 64) {
        __m256i m4 = _mm256_slli_epi16(c, 3), m5 = _mm256_slli_epi16(c, 2);
        for (int t = 0; t < DE; t++) W[t] = lut64(tab + 128 * t, c, m4, m5);
    } else {
        const int *t32 = (const int *)(const void *)tab;
        __m128i lo = _mm256_castsi256_si128(c), hi = _mm256_extracti128_si256(c, 1);
        __m256i g0 = _mm256_i32gather_epi32(t32, _mm256_cvtepu8_epi32(lo), 4);
        __m256i g1 = _mm256_i32gather_epi32(t32, _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)), 4);
        __m256i g2 = _mm256_i32gather_epi32(t32, _mm256_cvtepu8_epi32(hi), 4);
        __m256i g3 = _mm256_i32gather_epi32(t32, _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)), 4);
        if (DE == 4) {
            W[0] = g0; W[1] = g1; W[2] = g2; W[3] = g3;
        } else if (DE == 2) {
            const __m256i sh = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1,
                                                0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1);
            __m256i a = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(g0, sh), 0x08);
            __m256i b = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(g1, sh), 0x08);
            __m256i e = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(g2, sh), 0x08);
            __m256i f = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(g3, sh), 0x08);
            W[0] = _mm256_inserti128_si256(a, _mm256_castsi256_si128(b), 1);
            W[1] = _mm256_inserti128_si256(e, _mm256_castsi256_si128(f), 1);
        } else {
            __m256i a = _mm256_packs_epi32(g0, g1), b = _mm256_packs_epi32(g2, g3);
            __m256i v = _mm256_packs_epi16(a, b);
            W[0] = _mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        }
    }
}

/* ---------------------------------------------------------------- dot helpers */
static inline __m256i dot_i8(__m256i acc, __m256i w, __m256i x)
{
    __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

static inline int32_t hsum_i32(__m256i v)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

static inline float hsum_f32(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* float dot of 32 int8 weights with 32 floats */
static inline __m256 dot_f32(__m256 acc, __m256i w, const float *x)
{
    __m128i lo = _mm256_castsi256_si128(w), hi = _mm256_extracti128_si256(w, 1);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), _mm256_loadu_ps(x), acc);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), _mm256_loadu_ps(x + 8), acc);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), _mm256_loadu_ps(x + 16), acc);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), _mm256_loadu_ps(x + 24), acc);
    return acc;
}

static inline __attribute__((always_inline)) void
dot_f32x2(__m256 *fa, __m256 *fb, __m256i w, const float *x)
{
    __m128i lo = _mm256_castsi256_si128(w), hi = _mm256_extracti128_si256(w, 1);
    __m256 a = *fa, b = *fb;
    a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), _mm256_loadu_ps(x), a);
    b = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), _mm256_loadu_ps(x + 8), b);
    a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), _mm256_loadu_ps(x + 16), a);
    b = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), _mm256_loadu_ps(x + 24), b);
    *fa = a; *fb = b;
}

static inline __m128 hsum4_f32(__m256 a, __m256 b, __m256 c, __m256 d)
{
    __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

/* ---------------------------------------------------------------- VQ rows */
static __thread uint8_t *t_tab;
static __thread size_t t_tabcap;

static uint8_t *tab_scratch(size_t bytes)
{
    if (bytes > t_tabcap) {
        free(t_tab);
        t_tab = aligned_alloc(64, (bytes + 63) & ~(size_t)63);
        t_tabcap = t_tab ? bytes : 0;
    }
    return t_tab;
}

static inline __attribute__((always_inline)) void
vq_rows_impl(const vqm_vq_weight *w, const vqm_xprep *xp, int64_t r0, int64_t r1,
             const float *bias, float *y, const vqm_vcfg *cfg,
             const int BE, const int DE, const int KE, const int NB, const int INT8)
{
    const int64_t n = w->n, k = w->k, d = w->d, R = w->rows_per_block, C = w->cols_per_block;
    const int64_t ncb = vqm_cdiv(k, C);
    const int64_t rowbytes = vqm_vq_row_bytes(w);
    const int nb = NB ? NB : (int)xp->batch;
    const int64_t ccols = 32 * DE;
    const int64_t nchunk = xp->blk_pad / ccols;
    const int64_t ncode_total = vqm_cdiv(k, DE); /* effective codes per row */
    const size_t tsz = tab_size(cfg);
    uint8_t *tabs = tab_scratch(tsz * (size_t)ncb);
    if (!tabs) abort();
    int64_t cur_rb = -1;
    for (int64_t r = r0; r < r1; r++) {
        const int64_t rb = r / R;
        if (rb != cur_rb) {
            for (int64_t cb = 0; cb < ncb; cb++)
                prep_tab_fast(cfg, w->codebook + (rb * ncb + cb) * (int64_t)w->ncent * d, (int)d, tabs + cb * tsz);
            cur_rb = rb;
            vqm_prefetch_codebooks(w, rb, ncb);
        }
        const uint8_t *row = w->indices + r * rowbytes;
        float acc[VQM_BATCH_TILE];
        for (int bi = 0; bi < nb; bi++) acc[bi] = 0.0f;
        if (r + 1 < r1) _mm_prefetch((const char *)(row + rowbytes), _MM_HINT_T0);
        for (int64_t cb = 0; cb < ncb; cb++) {
            const uint8_t *tab = tabs + cb * tsz;
            const float s = _cvtsh_ss(w->scale[rb * ncb + cb]);
            const int64_t c0 = cb * C;
            const int64_t c1 = c0 + C < k ? c0 + C : k;
            const int64_t code0 = c0 / DE, code1 = vqm_cdiv(c1, DE);
            __m256i iacc[VQM_BATCH_TILE];
            __m256 facc[VQM_BATCH_TILE], facc2[VQM_BATCH_TILE];
            for (int bi = 0; bi < nb; bi++) {
                if (INT8) iacc[bi] = _mm256_setzero_si256();
                else facc[bi] = facc2[bi] = _mm256_setzero_ps();
            }
            for (int64_t h = 0; h < nchunk; h++) {
                const int64_t cs = code0 + 32 * h;
                const int64_t nvalid = code1 - cs;
                if (nvalid <= 0) break;
                __m256i c;
                if (nvalid >= 32 && ((cs * BE) & 7) == 0) {
                    const uint8_t *p = row + ((cs * BE) >> 3);
                    _mm_prefetch((const char *)(p + 512), _MM_HINT_T0);
                    c = BE == 4 ? unpack4(p) : BE == 6 ? unpack6(p) : unpack8(p);
                } else {
                    c = unpack_slow(row, cs, nvalid < 32 ? (int)nvalid : 32, BE);
                }
                (void)ncode_total;
                __m256i W[4];
                lookup(c, tab, DE, KE, W);
                for (int bi = 0; bi < nb; bi++) {
                    if (INT8) {
                        const int8_t *xq = xp->xq + bi * xp->stride + cb * xp->blk_pad + h * ccols;
                        for (int t = 0; t < DE; t++)
                            iacc[bi] = dot_i8(iacc[bi], W[t], _mm256_loadu_si256((const __m256i *)(const void *)(xq + 32 * t)));
                    } else {
                        const float *xf = xp->xf + bi * xp->stride + cb * xp->blk_pad + h * ccols;
                        for (int t = 0; t < DE; t++) dot_f32x2(&facc[bi], &facc2[bi], W[t], xf + 32 * t);
                    }
                }
            }
            for (int bi = 0; bi < nb; bi++) {
                if (INT8) {
                    float v = (float)hsum_i32(iacc[bi]) * xp->xs[bi * xp->nblk + cb];
                    v = v * s;
                    acc[bi] = acc[bi] + v;
                } else {
                    acc[bi] = acc[bi] + hsum_f32(_mm256_add_ps(facc[bi], facc2[bi])) * s;
                }
            }
        }
        for (int bi = 0; bi < nb; bi++) y[bi * n + r] = bias ? acc[bi] + bias[r] : acc[bi];
    }
}

static inline __m128i hsum4_i32(__m256i a, __m256i b, __m256i c, __m256i d)
{
    __m256i ab = _mm256_hadd_epi32(a, b), cd = _mm256_hadd_epi32(c, d);
    __m256i s = _mm256_hadd_epi32(ab, cd);
    return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}

/* ---------------------------------------------------------------- VQ, batch 1, int8: 4-row tiles
 * Four rows are decoded together (independent dependency chains, shared
 * activation loads) and their per-block results are finished in one vector
 * (lane = row), in the reference's operation order. Products use
 * pmaddubsw(|x|, sign(w, x)) with |x| precomputed per call; that needs
 * w != -128, so blocks whose codebook contains -128 (not produced by the
 * symmetric max|c|/127 scaling, but possible in a foreign file) use
 * pmaddubsw(|w|, sign(x, w)) instead. */
typedef struct {
    int64_t rb;
    uint8_t *tab;      /* ncb * tsz */
    uint8_t *m128;     /* ncb flags: table contains -128 */
} tslot;

static __thread uint8_t *t_tile;
static __thread size_t t_tilecap;

static int tab_has_m128(const int8_t *cbk, int n)
{
    int i = 0;
    const __m256i m = _mm256_set1_epi8(-128);
    for (; i + 32 <= n; i += 32)
        if (_mm256_movemask_epi8(_mm256_cmpeq_epi8(_mm256_loadu_si256((const __m256i *)(const void *)(cbk + i)), m))) return 1;
    for (; i < n; i++)
        if (cbk[i] == -128) return 1;
    return 0;
}

static inline __m256i unpack4_fast(const uint8_t *p)
{
    __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(const void *)p));
    v = _mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
    return _mm256_and_si256(v, _mm256_set1_epi8(0x0f));
}

static inline __m256i dot_ax(__m256i acc, __m256i w, __m256i x, __m256i xa, const __m256i ones)
{
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(xa, _mm256_sign_epi8(w, x)), ones));
}

static inline __m256i dot_wx(__m256i acc, __m256i w, __m256i x, const __m256i ones)
{
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)), ones));
}


/* full, aligned chunks of one codebook block for a 4-row tile */
static inline __attribute__((always_inline)) void
tile_chunks(const uint8_t *const rows[4], int64_t off0, int64_t nfull, const uint8_t *tab0, const uint8_t *const tab[4],
            const int8_t *xq, const uint8_t *xa, __m256i a[4], const int SAME, const int SAFE,
            const int BE, const int DE, const int KE)
{
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
    for (int64_t h = 0; h < nfull; h++) {
        const int64_t off = off0 + h * 4 * BE;
        __m256i X[4], XA[4];
        for (int t = 0; t < DE; t++) {
            X[t] = _mm256_loadu_si256((const __m256i *)(const void *)(xq + h * 32 * DE + 32 * t));
            if (SAFE) XA[t] = _mm256_loadu_si256((const __m256i *)(const void *)(xa + h * 32 * DE + 32 * t));
        }
#define VQ_TILE_ROW(I, ACC)                                                                                  \
        {                                                                                                    \
            const uint8_t *p = rows[I] + off;                                                                \
            __m256i c = BE == 4 ? unpack4_fast(p) : BE == 6 ? unpack6(p) : unpack8(p);                       \
            __m256i W[4];                                                                                    \
            lookup(c, SAME ? tab0 : tab[I], DE, KE, W);                                                      \
            for (int t = 0; t < DE; t++)                                                                     \
                ACC = SAFE ? dot_ax(ACC, W[t], X[t], XA[t], ones) : dot_wx(ACC, W[t], X[t], ones);           \
        }
        VQ_TILE_ROW(0, a0)
        VQ_TILE_ROW(1, a1)
        VQ_TILE_ROW(2, a2)
        VQ_TILE_ROW(3, a3)
#undef VQ_TILE_ROW
    }
    a[0] = a0; a[1] = a1; a[2] = a2; a[3] = a3;
}

static inline __attribute__((always_inline)) void
vq_tile_impl(const vqm_vq_weight *w, const vqm_xprep *xp, int64_t r0, int64_t r1,
             const float *bias, float *y, const vqm_vcfg *cfg, const int BE, const int DE, const int KE)
{
    const int64_t k = w->k, d = w->d, R = w->rows_per_block, C = w->cols_per_block;
    const int64_t ncb = vqm_cdiv(k, C);
    const int64_t rowbytes = vqm_vq_row_bytes(w);
    const int64_t ccols = 32 * DE;
    const int64_t nchunk = xp->blk_pad / ccols;
    const size_t tsz = tab_size(cfg);
    const size_t slotsz = ((tsz * (size_t)ncb + 63) & ~(size_t)63) + (((size_t)ncb + 63) & ~(size_t)63);
    if (4 * slotsz > t_tilecap) {
        free(t_tile);
        t_tile = aligned_alloc(64, 4 * slotsz);
        t_tilecap = t_tile ? 4 * slotsz : 0;
        if (!t_tile) abort();
    }
    tslot slots[4];
    for (int i = 0; i < 4; i++) {
        slots[i].rb = -1;
        slots[i].tab = t_tile + (size_t)i * slotsz;
        slots[i].m128 = slots[i].tab + ((tsz * (size_t)ncb + 63) & ~(size_t)63);
    }
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t pf_blk = ((vqm_cdiv(4 * rowbytes, ncb) + 63) / 64) * 64;
    const int8_t *xq = xp->xq;
    const uint8_t *xa = xp->xa;
    for (int64_t r = r0; r < r1; r += 4) {
        const uint8_t *rows[4];
        const tslot *ts[4];
        int64_t rr[4];
        for (int i = 0; i < 4; i++) {
            rr[i] = r + i < r1 ? r + i : r1 - 1;
            rows[i] = w->indices + rr[i] * rowbytes;
            const int64_t rb = rr[i] / R;
            int found = -1;
            for (int j = 0; j < 4; j++)
                if (slots[j].rb == rb) found = j;
            if (found < 0) { /* take a slot not used by rows 0..i-1 of this tile */
                for (int j = 0; j < 4 && found < 0; j++) {
                    int used = 0;
                    for (int q = 0; q < i; q++) used |= ts[q] == &slots[j];
                    if (!used) found = j;
                }
                tslot *sl = &slots[found];
                sl->rb = rb;
                for (int64_t cb = 0; cb < ncb; cb++) {
                    const int8_t *cbk = w->codebook + (rb * ncb + cb) * (int64_t)w->ncent * d;
                    prep_tab_fast(cfg, cbk, (int)d, sl->tab + cb * tsz);
                    sl->m128[cb] = (uint8_t)tab_has_m128(cbk, w->ncent * (int)d);
                }
            }
            ts[i] = &slots[found];
        }
        const int same = ts[0] == ts[1] && ts[1] == ts[2] && ts[2] == ts[3];
        __m128 acc = _mm_setzero_ps();
        for (int64_t cb = 0; cb < ncb; cb++) {
            const int64_t c0 = cb * C;
            const int64_t c1 = c0 + C < k ? c0 + C : k;
            const int64_t code0 = c0 / DE, code1 = vqm_cdiv(c1, DE);
            const int safe = !(ts[0]->m128[cb] | ts[1]->m128[cb] | ts[2]->m128[cb] | ts[3]->m128[cb]);
            const uint8_t *tab[4] = { ts[0]->tab + cb * tsz, ts[1]->tab + cb * tsz, ts[2]->tab + cb * tsz, ts[3]->tab + cb * tsz };
            __m256i a[4] = { _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256() };
            if (r + 8 < w->n) { /* stream in the tile after next: its 4 rows are contiguous */
                const uint8_t *pf = w->indices + (r + 8) * rowbytes + cb * pf_blk;
                for (int64_t o = 0; o < pf_blk; o += 64) _mm_prefetch((const char *)(pf + o), _MM_HINT_T0);
            }
            const int aligned = ((code0 * BE) & 7) == 0;
            const int64_t nfull = aligned ? (code1 - code0) / 32 : 0;
            const int8_t *xqb = xq + cb * xp->blk_pad;
            const uint8_t *xab = xa + cb * xp->blk_pad;
            const int64_t off0 = (code0 * BE) >> 3;
            if (same && safe) tile_chunks(rows, off0, nfull, tab[0], tab, xqb, xab, a, 1, 1, BE, DE, KE);
            else if (same) tile_chunks(rows, off0, nfull, tab[0], tab, xqb, xab, a, 1, 0, BE, DE, KE);
            else if (safe) tile_chunks(rows, off0, nfull, tab[0], tab, xqb, xab, a, 0, 1, BE, DE, KE);
            else tile_chunks(rows, off0, nfull, tab[0], tab, xqb, xab, a, 0, 0, BE, DE, KE);
            for (int64_t h = nfull; h < nchunk; h++) { /* partial / unaligned chunks */
                const int64_t cs = code0 + 32 * h;
                const int64_t nvalid = code1 - cs;
                if (nvalid <= 0) break;
                const int8_t *xqc = xqb + h * ccols;
                const uint8_t *xac = xab + h * ccols;
                for (int i = 0; i < 4; i++) {
                    __m256i c = unpack_slow(rows[i], cs, nvalid < 32 ? (int)nvalid : 32, BE);
                    __m256i W[4];
                    lookup(c, tab[i], DE, KE, W);
                    for (int t = 0; t < DE; t++) {
                        __m256i X = _mm256_loadu_si256((const __m256i *)(const void *)(xqc + 32 * t));
                        __m256i XA = _mm256_loadu_si256((const __m256i *)(const void *)(xac + 32 * t));
                        a[i] = safe ? dot_ax(a[i], W[t], X, XA, ones) : dot_wx(a[i], W[t], X, ones);
                    }
                }
            }
            __m128i isum = hsum4_i32(a[0], a[1], a[2], a[3]);
            __m128 s;
            if (same) {
                s = _mm_set1_ps(_cvtsh_ss(w->scale[ts[0]->rb * ncb + cb]));
            } else {
                s = _mm_cvtph_ps(_mm_setr_epi16((short)w->scale[ts[0]->rb * ncb + cb], (short)w->scale[ts[1]->rb * ncb + cb],
                                                (short)w->scale[ts[2]->rb * ncb + cb], (short)w->scale[ts[3]->rb * ncb + cb],
                                                0, 0, 0, 0));
            }
            __m128 v = _mm_mul_ps(_mm_cvtepi32_ps(isum), _mm_set1_ps(xp->xs[cb]));
            v = _mm_mul_ps(v, s);
            acc = _mm_add_ps(acc, v);
        }
        float out[4];
        _mm_storeu_ps(out, acc);
        for (int i = 0; i < 4 && r + i < r1; i++) y[r + i] = bias ? out[i] + bias[r + i] : out[i];
    }
}

/* ---------------------------------------------------------------- VQ, batch 1, int8: 4-row tiles, one row block
 * When R % 4 == 0 every tile lies in one codebook row block. The decode tables
 * of all column blocks of a row block are prepared once (SIMD for d=2), the
 * four accumulators stay in registers and the per-block finish is one
 * vector op chain. Same products and operation order as vq_tile_impl. */
static void prep_tab_fast(const vqm_vcfg *c, const int8_t *cbk, int d, uint8_t *tab)
{
    if (c->virt) { /* nibble i = two 2-bit codes: dim 0 = cbk[i & 3], dim 1 = cbk[i >> 2] */
        int32_t v4;
        memcpy(&v4, cbk, 4);
        const __m256i v = _mm256_set1_epi32(v4);
        _mm256_store_si256((__m256i *)(void *)tab,
                           _mm256_shuffle_epi8(v, _mm256_setr_epi8(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3,
                                                                   0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3)));
        _mm256_store_si256((__m256i *)(void *)(tab + 32),
                           _mm256_shuffle_epi8(v, _mm256_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3,
                                                                   0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)));
        return;
    }
    if (!c->virt && d == 2 && (c->ke == 16 || c->ke == 64)) {
        const __m256i deint = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                               0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
        const int nq = c->ke / 16;
        for (int m = 0; m < nq; m++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(const void *)(cbk + 32 * m)); /* 16 x (d0, d1) */
            v = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, deint), 0xd8);
            _mm256_store_si256((__m256i *)(void *)(tab + 32 * m), _mm256_permute2x128_si256(v, v, 0x00));
            _mm256_store_si256((__m256i *)(void *)(tab + 32 * (nq + m)), _mm256_permute2x128_si256(v, v, 0x11));
        }
        return;
    }
    prep_tab(c, cbk, d, tab);
}

/* b=6, 32 codes from 24 bytes, natural order, values 0..63 */
static inline __m256i unpack6_fast(const uint8_t *p)
{
    __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(const void *)p)),
                                        _mm_loadu_si128((const __m128i *)(const void *)(p + 8)), 1);
    const __m256i spread = _mm256_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1,
                                            4, 5, 6, -1, 7, 8, 9, -1, 10, 11, 12, -1, 13, 14, 15, -1);
    v = _mm256_shuffle_epi8(v, spread);                     /* c0 | c1<<6 | c2<<12 | c3<<18 */
    __m256i t = _mm256_blend_epi16(v, _mm256_slli_epi32(v, 4), 0xaa); /* words: c0|c1<<6, c2|c3<<6 (+junk 12..15 in word 0) */
    __m256i s2 = _mm256_slli_epi16(t, 2);                   /* c1 at bits 8..13 */
    return _mm256_or_si256(_mm256_and_si256(t, _mm256_set1_epi16(0x003f)), _mm256_and_si256(s2, _mm256_set1_epi16(0x3f00)));
}

static inline __attribute__((always_inline)) void
lookup_fast(__m256i c, const uint8_t *tab, const int DE, const int KE, __m256i *W)
{
    if (KE == 64) {
        /* blendv on bit 4, then on bit 5 */
        __m256i m4 = _mm256_slli_epi16(c, 3), m5 = _mm256_slli_epi16(c, 2);
        __asm__("" : "+x"(m4), "+x"(m5)); /* keep the shifts as blend masks (gcc would add vpcmpgtb) */
        for (int t = 0; t < DE; t++) {
            const __m256i *T = (const __m256i *)(const void *)(tab + 128 * t);
            __m256i lo = _mm256_blendv_epi8(_mm256_shuffle_epi8(_mm256_load_si256(T), c),
                                            _mm256_shuffle_epi8(_mm256_load_si256(T + 1), c), m4);
            __m256i hi = _mm256_blendv_epi8(_mm256_shuffle_epi8(_mm256_load_si256(T + 2), c),
                                            _mm256_shuffle_epi8(_mm256_load_si256(T + 3), c), m4);
            W[t] = _mm256_blendv_epi8(lo, hi, m5);
        }
    } else {
        lookup(c, tab, DE, KE, W);
    }
}

static inline __attribute__((always_inline)) void
same_chunks(const uint8_t *p0, const uint8_t *p1, const uint8_t *p2, const uint8_t *p3, int64_t nfull,
            const uint8_t *tab, const int8_t *xq, const uint8_t *xa,
            __m256i *A0, __m256i *A1, __m256i *A2, __m256i *A3, const int SAFE, const int BE, const int DE, const int KE)
{
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i a0 = *A0, a1 = *A1, a2 = *A2, a3 = *A3;
    for (int64_t h = 0; h < nfull; h++) {
        VQM_MCA_BEGIN("avx2.vq_same.loop", SAFE, BE, DE, KE);
        const int64_t off = h * 4 * BE;
        const int8_t *xh = xq + h * 32 * DE;
        const uint8_t *xah = xa + h * 32 * DE;
#define SAME_ROW(P, ACC)                                                                                     \
        {                                                                                                    \
            const uint8_t *p = (P) + off;                                                                    \
            __m256i c = BE == 4 ? unpack4_fast(p) : BE == 6 ? unpack6_fast(p) : unpack8(p);                 \
            __m256i W[4];                                                                                    \
            lookup_fast(c, tab, DE, KE, W);                                                                  \
            for (int t = 0; t < DE; t++) {                                                                   \
                __m256i X = _mm256_loadu_si256((const __m256i *)(const void *)(xh + 32 * t));                \
                if (SAFE) {                                                                                  \
                    __m256i XA = _mm256_loadu_si256((const __m256i *)(const void *)(xah + 32 * t));          \
                    ACC = dot_ax(ACC, W[t], X, XA, ones);                                                    \
                } else {                                                                                     \
                    ACC = dot_wx(ACC, W[t], X, ones);                                                        \
                }                                                                                            \
            }                                                                                                \
        }
        SAME_ROW(p0, a0)
        SAME_ROW(p1, a1)
        SAME_ROW(p2, a2)
        SAME_ROW(p3, a3)
#undef SAME_ROW
        VQM_MCA_END("avx2.vq_same.loop", SAFE, BE, DE, KE);
    }
    *A0 = a0; *A1 = a1; *A2 = a2; *A3 = a3;
}

static inline __attribute__((always_inline)) void
vq_same_impl(const vqm_vq_weight *w, const vqm_xprep *xp, int64_t r0, int64_t r1,
             const float *bias, float *y, const vqm_vcfg *cfg, const int BE, const int DE, const int KE)
{
    const int64_t k = w->k, d = w->d, R = w->rows_per_block, C = w->cols_per_block;
    const int64_t ncb = vqm_cdiv(k, C);
    const int64_t rowbytes = vqm_vq_row_bytes(w);
    const int64_t ccols = 32 * DE;
    const int64_t nchunk = xp->blk_pad / ccols;
    const size_t tsz = tab_size(cfg);
    const size_t tbytes = (tsz * (size_t)ncb + 63) & ~(size_t)63;
    uint8_t *tabs = tab_scratch(tbytes + (size_t)ncb);
    if (!tabs) abort();
    uint8_t *unsafe = tabs + tbytes;
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t pf_blk = ((vqm_cdiv(4 * rowbytes, ncb) + 63) / 64) * 64;
    int64_t cur_rb = -1;
    for (int64_t r = r0; r < r1; r += 4) {
        const int64_t rb = r / R;
        if (rb != cur_rb) {
            for (int64_t cb = 0; cb < ncb; cb++) {
                const int8_t *cbk = w->codebook + (rb * ncb + cb) * (int64_t)w->ncent * d;
                prep_tab_fast(cfg, cbk, (int)d, tabs + cb * tsz);
                unsafe[cb] = (uint8_t)tab_has_m128(cbk, w->ncent * (int)d);
            }
            cur_rb = rb;
            vqm_prefetch_codebooks(w, rb, ncb);
        }
        const uint8_t *rows[4];
        for (int i = 0; i < 4; i++) rows[i] = w->indices + (r + i < r1 ? r + i : r1 - 1) * rowbytes;
        __m128 acc = _mm_setzero_ps();
        for (int64_t cb = 0; cb < ncb; cb++) {
            const int64_t c0 = cb * C;
            const int64_t c1 = c0 + C < k ? c0 + C : k;
            const int64_t code0 = c0 / DE, code1 = vqm_cdiv(c1, DE);
            const uint8_t *tab = tabs + cb * tsz;
            const int safe = !unsafe[cb];
            __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
            if (r + 8 < w->n) { /* stream in the tile after next: its 4 rows are contiguous */
                const uint8_t *pf = w->indices + (r + 8) * rowbytes + cb * pf_blk;
                for (int64_t o = 0; o < pf_blk; o += 64) _mm_prefetch((const char *)(pf + o), _MM_HINT_T0);
            }
            const int aligned = ((code0 * BE) & 7) == 0;
            const int64_t nfull = aligned ? (code1 - code0) / 32 : 0;
            const int8_t *xqb = xp->xq + cb * xp->blk_pad;
            const uint8_t *xab = xp->xa + cb * xp->blk_pad;
            const int64_t off0 = (code0 * BE) >> 3;
            if (safe)
                same_chunks(rows[0] + off0, rows[1] + off0, rows[2] + off0, rows[3] + off0, nfull, tab, xqb, xab,
                            &a0, &a1, &a2, &a3, 1, BE, DE, KE);
            else
                same_chunks(rows[0] + off0, rows[1] + off0, rows[2] + off0, rows[3] + off0, nfull, tab, xqb, xab,
                            &a0, &a1, &a2, &a3, 0, BE, DE, KE);
            if (nfull < nchunk && code0 + 32 * nfull < code1) { /* partial / unaligned chunks */
                __m256i at[4] = { a0, a1, a2, a3 };
                for (int64_t h = nfull; h < nchunk; h++) {
                    const int64_t cs = code0 + 32 * h;
                    const int64_t nvalid = code1 - cs;
                    if (nvalid <= 0) break;
                    const int8_t *xqc = xqb + h * ccols;
                    const uint8_t *xac = xab + h * ccols;
                    for (int i = 0; i < 4; i++) {
                        __m256i c = unpack_slow(rows[i], cs, nvalid < 32 ? (int)nvalid : 32, BE);
                        __m256i W[4];
                        lookup(c, tab, DE, KE, W);
                        for (int t = 0; t < DE; t++) {
                            __m256i X = _mm256_loadu_si256((const __m256i *)(const void *)(xqc + 32 * t));
                            __m256i XA = _mm256_loadu_si256((const __m256i *)(const void *)(xac + 32 * t));
                            at[i] = safe ? dot_ax(at[i], W[t], X, XA, ones) : dot_wx(at[i], W[t], X, ones);
                        }
                    }
                }
                a0 = at[0]; a1 = at[1]; a2 = at[2]; a3 = at[3];
            }
            VQM_MCA_BEGIN("avx2.vq_same.finish", BE, DE, KE, 0);
            __m128i isum = hsum4_i32(a0, a1, a2, a3);
            __m128 v = _mm_mul_ps(_mm_cvtepi32_ps(isum), _mm_set1_ps(xp->xs[cb]));
            v = _mm_mul_ps(v, _mm_set1_ps(_cvtsh_ss(w->scale[rb * ncb + cb])));
            acc = _mm_add_ps(acc, v);
            VQM_MCA_END("avx2.vq_same.finish", BE, DE, KE, 0);
        }
        float out[4];
        _mm_storeu_ps(out, acc);
        for (int i = 0; i < 4 && r + i < r1; i++) y[r + i] = bias ? out[i] + bias[r + i] : out[i];
    }
}

/* ---------------------------------------------------------------- VQ, batch 1, float activations: 4-row tiles
 * Same tiling as vq_same_impl; every row keeps two float accumulators (eight
 * independent FMA chains per tile). Per block the four block sums are reduced
 * together and scaled in one vector (float tolerance, not bit-exact). */
static inline __attribute__((always_inline)) void
vq_same_f32(const vqm_vq_weight *w, const vqm_xprep *xp, int64_t r0, int64_t r1,
            const float *bias, float *y, const vqm_vcfg *cfg, const int BE, const int DE, const int KE)
{
    const int64_t k = w->k, d = w->d, R = w->rows_per_block, C = w->cols_per_block;
    const int64_t ncb = vqm_cdiv(k, C);
    const int64_t rowbytes = vqm_vq_row_bytes(w);
    const int64_t ccols = 32 * DE;
    const int64_t nchunk = xp->blk_pad / ccols;
    const size_t tsz = tab_size(cfg);
    const size_t tbytes = (tsz * (size_t)ncb + 63) & ~(size_t)63;
    uint8_t *tabs = tab_scratch(tbytes);
    if (!tabs) abort();
    const int64_t pf_blk = ((vqm_cdiv(4 * rowbytes, ncb) + 63) / 64) * 64;
    int64_t cur_rb = -1;
    for (int64_t r = r0; r < r1; r += 4) {
        const int64_t rb = r / R;
        if (rb != cur_rb) {
            for (int64_t cb = 0; cb < ncb; cb++)
                prep_tab_fast(cfg, w->codebook + (rb * ncb + cb) * (int64_t)w->ncent * d, (int)d, tabs + cb * tsz);
            cur_rb = rb;
            vqm_prefetch_codebooks(w, rb, ncb);
        }
        const uint8_t *rows[4];
        for (int i = 0; i < 4; i++) rows[i] = w->indices + (r + i < r1 ? r + i : r1 - 1) * rowbytes;
        __m128 acc = _mm_setzero_ps();
        for (int64_t cb = 0; cb < ncb; cb++) {
            const int64_t c0 = cb * C;
            const int64_t c1 = c0 + C < k ? c0 + C : k;
            const int64_t code0 = c0 / DE, code1 = vqm_cdiv(c1, DE);
            const uint8_t *tab = tabs + cb * tsz;
            __m256 fa0 = _mm256_setzero_ps(), fa1 = fa0, fa2 = fa0, fa3 = fa0, fb0 = fa0, fb1 = fa0, fb2 = fa0, fb3 = fa0;
            if (r + 8 < w->n) {
                const uint8_t *pf = w->indices + (r + 8) * rowbytes + cb * pf_blk;
                for (int64_t o = 0; o < pf_blk; o += 64) _mm_prefetch((const char *)(pf + o), _MM_HINT_T0);
            }
            const int aligned = ((code0 * BE) & 7) == 0;
            const int64_t off0 = (code0 * BE) >> 3;
            const float *xfb = xp->xf + cb * xp->blk_pad;
            for (int64_t h = 0; h < nchunk; h++) {
                const int64_t cs = code0 + 32 * h;
                const int64_t nvalid = code1 - cs;
                if (nvalid <= 0) break;
                const float *xh = xfb + h * ccols;
                const int fast = aligned && nvalid >= 32;
                const int64_t off = off0 + h * 4 * BE;
#define F32_ROW(I, FA, FB)                                                                                   \
                {                                                                                            \
                    __m256i c;                                                                               \
                    if (fast) {                                                                              \
                        const uint8_t *p = rows[I] + off;                                                    \
                        c = BE == 4 ? unpack4_fast(p) : BE == 6 ? unpack6_fast(p) : unpack8(p);              \
                    } else {                                                                                 \
                        c = unpack_slow(rows[I], cs, nvalid < 32 ? (int)nvalid : 32, BE);                    \
                    }                                                                                        \
                    __m256i W[4];                                                                            \
                    lookup_fast(c, tab, DE, KE, W);                                                          \
                    for (int t = 0; t < DE; t++) dot_f32x2(&FA, &FB, W[t], xh + 32 * t);                     \
                }
                F32_ROW(0, fa0, fb0)
                F32_ROW(1, fa1, fb1)
                F32_ROW(2, fa2, fb2)
                F32_ROW(3, fa3, fb3)
#undef F32_ROW
            }
            __m128 bs = hsum4_f32(_mm256_add_ps(fa0, fb0), _mm256_add_ps(fa1, fb1), _mm256_add_ps(fa2, fb2),
                                  _mm256_add_ps(fa3, fb3));
            acc = _mm_add_ps(acc, _mm_mul_ps(bs, _mm_set1_ps(_cvtsh_ss(w->scale[rb * ncb + cb]))));
        }
        float out[4];
        _mm_storeu_ps(out, acc);
        for (int i = 0; i < 4 && r + i < r1; i++) y[r + i] = bias ? out[i] + bias[r + i] : out[i];
    }
}

#define VQ_INST(BE, DE, KE)                                                                         \
    static void vq_##BE##_##DE##_##KE(const vqm_vq_weight *w, const vqm_xprep *xp, int64_t r0,     \
                                      int64_t r1, const float *bias, float *y, const vqm_vcfg *cfg,    \
                                      int int8)                                                     \
    {                                                                                               \
        if (int8) {                                                                                 \
            if (xp->batch == 1 && !cfg->virt && w->rows_per_block % 4 == 0 && r0 % 4 == 0)                      \
                vq_same_impl(w, xp, r0, r1, bias, y, cfg, BE, DE, KE);                              \
            else if (xp->batch == 1) vq_tile_impl(w, xp, r0, r1, bias, y, cfg, BE, DE, KE);         \
            else vq_rows_impl(w, xp, r0, r1, bias, y, cfg, BE, DE, KE, 0, 1);                       \
        } else {                                                                                    \
            if (xp->batch == 1 && !cfg->virt && w->rows_per_block % 4 == 0 && r0 % 4 == 0)         \
                vq_same_f32(w, xp, r0, r1, bias, y, cfg, BE, DE, KE);                               \
            else if (xp->batch == 1) vq_rows_impl(w, xp, r0, r1, bias, y, cfg, BE, DE, KE, 1, 0);   \
            else vq_rows_impl(w, xp, r0, r1, bias, y, cfg, BE, DE, KE, 0, 0);                       \
        }                                                                                           \
    }
VQM_VQ_SHAPES(VQ_INST)

VQM_VQ_ROWS_FN(avx2_vq_rows)

/* ---------------------------------------------------------------- int4, int8
 * 8-bit codes keep the column order. With int8 activations their products use
 * w8 = q - 128 = q ^ 0x80 (an int8) and pmaddubsw(|w8|, sign(x, w8)): |w8| <= 128
 * and |x| <= 127 bound a pair by 32512; the other order, pmaddubsw(|x|, sign(w8, x)),
 * would turn w8 = -128 (q = 0) into -128 where x < 0. Asymmetric zeros are
 * exact too: isum = sum(w8 * x) - (z - 128) * sum(x). */
static int avx2_int_plan(const vqm_int_weight *w, int flags, vqm_layout *lay)
{
    (void)flags;
    if (w->bits != 4 && w->bits != 8) return 0;
    lay->chunk_cols = 32;
    lay->identity = w->bits == 8;
    for (int p = 0; p < 32; p++) lay->perm[p] = (int16_t)ord_code(w->bits, p);
    return 1;
}

/* 32 codes from column cs (nvalid of them in the group), in the layout's order. 8-bit rows load whole
 * chunks while they lie inside the row: the codes past the group meet zero activations. */
static inline __attribute__((always_inline)) __m256i
int_codes(const uint8_t *row, int64_t cs, int64_t nvalid, int64_t k, const int BITS)
{
    if (BITS == 8 && cs + 32 <= k) return unpack8(row + cs);
    if (BITS == 4 && nvalid >= 32 && (cs & 1) == 0) return unpack4(row + (cs >> 1));
    return unpack_slow(row, cs, nvalid < 32 ? (int)nvalid : 32, BITS);
}

/* stream in group g's share of the 4-row tile after next (its rows are contiguous) and its scales.
 * always_inline: gcc deems a function that only prefetches free of side effects and drops its calls. */
static inline __attribute__((always_inline)) void
int_prefetch(const vqm_int_weight *w, int64_t r, int64_t g, int64_t ng, int64_t rowbytes, int64_t pf_grp)
{
    if (r + 8 >= w->n) return;
    const uint8_t *pf = w->codes + (r + 8) * rowbytes + g * pf_grp;
    for (int64_t o = 0; o < pf_grp; o += 64) _mm_prefetch((const char *)(pf + o), _MM_HINT_T0);
    if ((g & 31) == 0)
        for (int i = 0; i < 4 && r + 8 + i < w->n; i++)
            _mm_prefetch((const char *)(w->scales + (r + 8 + i) * ng + g), _MM_HINT_T0);
}


static inline __m256i ld2x128(const void *lo, const void *hi)
{
    return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)lo)),
                                   _mm_loadu_si128((const __m128i *)hi), 1);
}

/* float contribution v = ((float)isum * xs) * s of group g for 4 rows (32-code chunks, any group).
 * b=4: pmaddubsw(q, x), then - z * sum(x); b=8: q ^ 0x80 products (see avx2_int_plan). */
static inline __attribute__((always_inline)) __m128
int_group4(const vqm_int_weight *w, const vqm_xprep *xp, const uint8_t *const rows[4], const int64_t rr[4],
           int64_t g, int64_t bi, const int BITS)
{
    const int64_t k = w->k, G = w->group, ng = vqm_cdiv(k, G), nchunk = xp->blk_pad / 32;
    const int64_t c0 = g * G, c1 = c0 + G < k ? c0 + G : k;
    const __m256i ones = _mm256_set1_epi16(1), m80 = _mm256_set1_epi8((char)0x80);
    const int8_t *xqb = xp->xq + bi * xp->stride;
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t h = 0; h < nchunk; h++) {
        const int64_t cs = c0 + 32 * h, nvalid = c1 - cs;
        if (nvalid <= 0) break;
        __m256i x = _mm256_loadu_si256((const __m256i *)(const void *)(xqb + g * xp->blk_pad + 32 * h));
#define GROUP4_ROW(I, A)                                                                                     \
        {                                                                                                    \
            __m256i q = int_codes(rows[I], cs, nvalid, k, BITS);                                             \
            A = BITS == 8 ? dot_wx(A, _mm256_xor_si256(q, m80), x, ones)                                     \
                          : _mm256_add_epi32(A, _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), ones));        \
        }
        GROUP4_ROW(0, a0) GROUP4_ROW(1, a1) GROUP4_ROW(2, a2) GROUP4_ROW(3, a3)
#undef GROUP4_ROW
    }
    __m128i isum = hsum4_i32(a0, a1, a2, a3);
    if (BITS != 8 || w->zeros) { /* symmetric 8-bit: z = 128, nothing to subtract */
        __m128i z;
        if (w->zeros)
            z = _mm_setr_epi32(w->zeros[rr[0] * ng + g], w->zeros[rr[1] * ng + g], w->zeros[rr[2] * ng + g], w->zeros[rr[3] * ng + g]);
        else
            z = _mm_set1_epi32(1 << (BITS - 1));
        if (BITS == 8) z = _mm_sub_epi32(z, _mm_set1_epi32(128));
        isum = _mm_sub_epi32(isum, _mm_mullo_epi32(z, _mm_set1_epi32(xp->xsum[bi * xp->nblk + g])));
    }
    __m128 s = _mm_cvtph_ps(_mm_setr_epi16((short)w->scales[rr[0] * ng + g], (short)w->scales[rr[1] * ng + g],
                                           (short)w->scales[rr[2] * ng + g], (short)w->scales[rr[3] * ng + g], 0, 0, 0, 0));
    __m128 v = _mm_mul_ps(_mm_cvtepi32_ps(isum), _mm_set1_ps(xp->xs[bi * xp->nblk + g]));
    return _mm_mul_ps(v, s);
}

/* G = 32, int8 activations: 8-row tiles. One 32-byte load per row covers groups g and g+1 (low nibbles:
 * even codes, high nibbles: odd codes; int16 sums exact as q <= 15); a vphaddw tree + pmaddwd gives the
 * exact int32 group sums of 8 rows x 2 groups, finished as two 8-lane vectors (lane = row) in the
 * reference's operation order. Scales are transposed once per 8 groups. */
static void int4_g32_i8(const vqm_int_weight *w, const vqm_xprep *xp, int64_t r0, int64_t r1,
                        const float *bias, float *y)
{
    const int64_t n = w->n, k = w->k;
    const int64_t ng = vqm_cdiv(k, 32), ngfull = k / 32;
    const int64_t rowbytes = vqm_int_row_bytes(w);
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i m0f = _mm256_set1_epi8(0x0f);
    const int64_t pf_grp = ((vqm_cdiv(8 * rowbytes, ng) + 63) / 64) * 64;
    for (int64_t r = r0; r < r1; r += 8) {
        int64_t rr[8];
        const uint8_t *rows[8];
        for (int i = 0; i < 8; i++) {
            rr[i] = r + i < r1 ? r + i : r1 - 1;
            rows[i] = w->codes + rr[i] * rowbytes;
        }
        for (int64_t bi = 0; bi < xp->batch; bi++) {
            __m256 acc = _mm256_setzero_ps();
            const int8_t *xqb = xp->xq + bi * xp->stride;
            const float *xsb = xp->xs + bi * xp->nblk;
            const int32_t *xsumb = xp->xsum + bi * xp->nblk;
            __m128i sA[4], sB[4];
            int64_t g = 0;
            for (; g + 1 < ngfull; g += 2) {
                VQM_MCA_BEGIN("avx2.int4_g32.loop", 0, 0, 0, 0);
                if (bi == 0 && r + 16 < n) {
                    const uint8_t *pf = w->codes + (r + 16) * rowbytes + g * pf_grp;
                    for (int64_t o = 0; o < 2 * pf_grp; o += 64) _mm_prefetch((const char *)(pf + o), _MM_HINT_T0);
                    if ((g & 31) == 0)
                        for (int i = 0; i < 8 && r + 16 + i < n; i++)
                            _mm_prefetch((const char *)(w->scales + (r + 16 + i) * ng + g), _MM_HINT_T0);
                }
                __m128i shA, shB; /* fp16 scales [rows 0-3 | 4-7][g, g+1] */
                if ((g & 7) == 0 && g + 8 <= ng) { /* transpose 8 rows x 8 groups */
                    for (int half = 0; half < 2; half++) {
                        const int64_t *q = rr + 4 * half;
                        __m128i s0 = _mm_loadu_si128((const __m128i *)(const void *)(w->scales + q[0] * ng + g));
                        __m128i s1 = _mm_loadu_si128((const __m128i *)(const void *)(w->scales + q[1] * ng + g));
                        __m128i s2 = _mm_loadu_si128((const __m128i *)(const void *)(w->scales + q[2] * ng + g));
                        __m128i s3 = _mm_loadu_si128((const __m128i *)(const void *)(w->scales + q[3] * ng + g));
                        __m128i u0 = _mm_unpacklo_epi16(s0, s1), u1 = _mm_unpackhi_epi16(s0, s1);
                        __m128i u2 = _mm_unpacklo_epi16(s2, s3), u3 = _mm_unpackhi_epi16(s2, s3);
                        __m128i *dst = half ? sB : sA;
                        dst[0] = _mm_unpacklo_epi32(u0, u2); dst[1] = _mm_unpackhi_epi32(u0, u2);
                        dst[2] = _mm_unpacklo_epi32(u1, u3); dst[3] = _mm_unpackhi_epi32(u1, u3);
                    }
                }
                if (g + 8 <= ng || (g & ~(int64_t)7) + 8 <= ng) {
                    shA = sA[(g & 7) >> 1];
                    shB = sB[(g & 7) >> 1];
                } else {
                    uint16_t t[16];
                    for (int i = 0; i < 4; i++) {
                        t[i] = w->scales[rr[i] * ng + g]; t[4 + i] = w->scales[rr[i] * ng + g + 1];
                        t[8 + i] = w->scales[rr[4 + i] * ng + g]; t[12 + i] = w->scales[rr[4 + i] * ng + g + 1];
                    }
                    shA = _mm_loadu_si128((const __m128i *)(const void *)t);
                    shB = _mm_loadu_si128((const __m128i *)(const void *)(t + 8));
                }
                const int8_t *xg = xqb + g * 32;
                const __m256i xlo = ld2x128(xg, xg + 32), xhi = ld2x128(xg + 16, xg + 48);
                __m256i p[8];
                for (int i = 0; i < 8; i++) {
                    __m256i v = _mm256_loadu_si256((const __m256i *)(const void *)(rows[i] + 16 * g));
                    __m256i lo = _mm256_and_si256(v, m0f), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m0f);
                    p[i] = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo), _mm256_maddubs_epi16(hi, xhi));
                }
                __m256i hA = _mm256_hadd_epi16(_mm256_hadd_epi16(p[0], p[1]), _mm256_hadd_epi16(p[2], p[3]));
                __m256i hB = _mm256_hadd_epi16(_mm256_hadd_epi16(p[4], p[5]), _mm256_hadd_epi16(p[6], p[7]));
                __m256i iA = _mm256_madd_epi16(hA, ones), iB = _mm256_madd_epi16(hB, ones); /* [r0-3 | r4-7 of] g, g+1 */
                __m256i i0 = _mm256_permute2x128_si256(iA, iB, 0x20), i1 = _mm256_permute2x128_si256(iA, iB, 0x31);
                if (w->zeros) {
                    __m256i z0 = _mm256_setr_epi32(w->zeros[rr[0] * ng + g], w->zeros[rr[1] * ng + g], w->zeros[rr[2] * ng + g],
                                                   w->zeros[rr[3] * ng + g], w->zeros[rr[4] * ng + g], w->zeros[rr[5] * ng + g],
                                                   w->zeros[rr[6] * ng + g], w->zeros[rr[7] * ng + g]);
                    __m256i z1 = _mm256_setr_epi32(w->zeros[rr[0] * ng + g + 1], w->zeros[rr[1] * ng + g + 1], w->zeros[rr[2] * ng + g + 1],
                                                   w->zeros[rr[3] * ng + g + 1], w->zeros[rr[4] * ng + g + 1], w->zeros[rr[5] * ng + g + 1],
                                                   w->zeros[rr[6] * ng + g + 1], w->zeros[rr[7] * ng + g + 1]);
                    i0 = _mm256_sub_epi32(i0, _mm256_mullo_epi32(z0, _mm256_set1_epi32(xsumb[g])));
                    i1 = _mm256_sub_epi32(i1, _mm256_mullo_epi32(z1, _mm256_set1_epi32(xsumb[g + 1])));
                } else {
                    i0 = _mm256_sub_epi32(i0, _mm256_set1_epi32(xsumb[g] * 8));
                    i1 = _mm256_sub_epi32(i1, _mm256_set1_epi32(xsumb[g + 1] * 8));
                }
                __m256 s0 = _mm256_cvtph_ps(_mm_unpacklo_epi64(shA, shB)), s1 = _mm256_cvtph_ps(_mm_unpackhi_epi64(shA, shB));
                __m256 v0 = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(i0), _mm256_set1_ps(xsb[g])), s0);
                acc = _mm256_add_ps(acc, v0);
                __m256 v1 = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(i1), _mm256_set1_ps(xsb[g + 1])), s1);
                acc = _mm256_add_ps(acc, v1);
                VQM_MCA_END("avx2.int4_g32.loop", 0, 0, 0, 0);
            }
            for (; g < ng; g++) {
                __m128 va = int_group4(w, xp, rows, rr, g, bi, 4), vb = int_group4(w, xp, rows + 4, rr + 4, g, bi, 4);
                acc = _mm256_add_ps(acc, _mm256_setr_m128(va, vb));
            }
            float out[8];
            _mm256_storeu_ps(out, acc);
            for (int i = 0; i < 8 && r + i < r1; i++) y[bi * n + r + i] = bias ? out[i] + bias[r + i] : out[i];
        }
    }
}

/* int8 activations (int4 with G != 32, int8 with any G): 4 rows at a time, one activation vector (bi)
 * at a time (the tile's rows stay in L1 for the next one). int4, G % 64 == 0: codes are loaded 64 at a
 * time (32 bytes): low nibbles = even codes of two 32-code chunks, high nibbles = odd codes, the
 * activations of the two chunks paired the same way; q <= 15 and |x| <= 127 bound every pmaddubsw lane
 * by 3810, so up to 8 such results are summed exactly in int16 before one pmaddwd. Other groups and
 * 8-bit codes: 32-code chunks (int_group4). */
static inline __attribute__((always_inline)) void
int_rows_i8(const vqm_int_weight *w, const vqm_xprep *xp, int64_t r0, int64_t r1, const float *bias, float *y,
            const int BITS)
{
    const int64_t n = w->n, k = w->k, G = w->group;
    const int64_t ng = vqm_cdiv(k, G);
    const int64_t ngfull = k / G;
    const int64_t rowbytes = vqm_int_row_bytes(w);
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i m0f = _mm256_set1_epi8(0x0f);
    const int64_t pf_grp = ((vqm_cdiv(4 * rowbytes, ng) + 63) / 64) * 64;
    const int wide = BITS == 4 && G % 64 == 0;
    for (int64_t r = r0; r < r1; r += 4) {
        int64_t rr[4];
        const uint8_t *rows[4];
        for (int i = 0; i < 4; i++) {
            rr[i] = r + i < r1 ? r + i : r1 - 1;
            rows[i] = w->codes + rr[i] * rowbytes;
        }
        for (int64_t bi = 0; bi < xp->batch; bi++) {
            __m128 acc = _mm_setzero_ps();
            const int8_t *xqb = xp->xq + bi * xp->stride;
            const float *xsb = xp->xs + bi * xp->nblk;
            const int32_t *xsumb = xp->xsum + bi * xp->nblk;
            int64_t g = 0;
            if (wide) {
                for (; g < ngfull; g++) {
                    if (bi == 0) int_prefetch(w, r, g, ng, rowbytes, pf_grp);
                    const int8_t *xg = xqb + g * xp->blk_pad;
                    const int64_t cbyte = (g * G) >> 1;
                    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
                    __m256i p0 = a0, p1 = a0, p2 = a0, p3 = a0;
                    const int64_t nl = G / 64;
                    for (int64_t h = 0; h < nl; h++) {
                        const int8_t *xh = xg + 64 * h;
                        const __m256i xlo = ld2x128(xh, xh + 32), xhi = ld2x128(xh + 16, xh + 48);
#define I4ROW(I, P)                                                                                          \
                        {                                                                                    \
                            __m256i v = _mm256_loadu_si256((const __m256i *)(const void *)(rows[I] + cbyte + 32 * h)); \
                            __m256i lo = _mm256_and_si256(v, m0f), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m0f); \
                            P = _mm256_add_epi16(P, _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo), _mm256_maddubs_epi16(hi, xhi))); \
                        }
                        I4ROW(0, p0) I4ROW(1, p1) I4ROW(2, p2) I4ROW(3, p3)
#undef I4ROW
                        if ((h & 3) == 3 || h + 1 == nl) {
                            a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(p0, ones));
                            a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(p1, ones));
                            a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(p2, ones));
                            a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(p3, ones));
                            p0 = p1 = p2 = p3 = _mm256_setzero_si256();
                        }
                    }
                    __m128i isum = hsum4_i32(a0, a1, a2, a3);
                    __m128i z;
                    if (w->zeros)
                        z = _mm_setr_epi32(w->zeros[rr[0] * ng + g], w->zeros[rr[1] * ng + g],
                                           w->zeros[rr[2] * ng + g], w->zeros[rr[3] * ng + g]);
                    else
                        z = _mm_set1_epi32(8);
                    isum = _mm_sub_epi32(isum, _mm_mullo_epi32(z, _mm_set1_epi32(xsumb[g])));
                    __m128 s = _mm_cvtph_ps(_mm_setr_epi16((short)w->scales[rr[0] * ng + g], (short)w->scales[rr[1] * ng + g],
                                                           (short)w->scales[rr[2] * ng + g], (short)w->scales[rr[3] * ng + g],
                                                           0, 0, 0, 0));
                    __m128 v = _mm_mul_ps(_mm_cvtepi32_ps(isum), _mm_set1_ps(xsb[g]));
                    v = _mm_mul_ps(v, s);
                    acc = _mm_add_ps(acc, v);
                }
            }
            for (; g < ng; g++) { /* other groups */
                VQM_MCA_BEGIN("avx2.int_rows.loop", BITS, 0, 0, 0);
                if (bi == 0) int_prefetch(w, r, g, ng, rowbytes, pf_grp);
                acc = _mm_add_ps(acc, int_group4(w, xp, rows, rr, g, bi, BITS));
                VQM_MCA_END("avx2.int_rows.loop", BITS, 0, 0, 0);
            }
            float out[4];
            _mm_storeu_ps(out, acc);
            for (int i = 0; i < 4 && r + i < r1; i++) y[bi * n + r + i] = bias ? out[i] + bias[r + i] : out[i];
        }
    }
}

/* float activations, batch 1: 4-row tiles. Per row and group the products are
 * accumulated in two float vectors (q - zero subtracted in int8 before the
 * conversion, so not for asymmetric 8-bit codes), and the group result is folded
 * into a per-row vector accumulator with one FMA by the group scale; rows are
 * reduced once at the end (float tolerance). */
static inline __attribute__((always_inline)) void
int_tile_f32(const vqm_int_weight *w, const vqm_xprep *xp, int64_t r0, int64_t r1, const float *bias, float *y,
             const int BITS)
{
    const int64_t k = w->k, G = w->group;
    const int64_t ng = vqm_cdiv(k, G);
    const int64_t rowbytes = vqm_int_row_bytes(w);
    const int64_t nchunk = xp->blk_pad / 32;
    const int64_t pf_grp = ((vqm_cdiv(4 * rowbytes, ng) + 63) / 64) * 64;
    for (int64_t r = r0; r < r1; r += 4) {
        int64_t rr[4];
        const uint8_t *rows[4];
        for (int i = 0; i < 4; i++) {
            rr[i] = r + i < r1 ? r + i : r1 - 1;
            rows[i] = w->codes + rr[i] * rowbytes;
        }
        __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
        for (int64_t g = 0; g < ng; g++) {
            const int64_t c0 = g * G;
            const int64_t c1 = c0 + G < k ? c0 + G : k;
            int_prefetch(w, r, g, ng, rowbytes, pf_grp);
            __m256i z0, z1, z2, z3;
            if (w->zeros) {
                z0 = _mm256_set1_epi8((char)w->zeros[rr[0] * ng + g]); z1 = _mm256_set1_epi8((char)w->zeros[rr[1] * ng + g]);
                z2 = _mm256_set1_epi8((char)w->zeros[rr[2] * ng + g]); z3 = _mm256_set1_epi8((char)w->zeros[rr[3] * ng + g]);
            } else {
                z0 = z1 = z2 = z3 = _mm256_set1_epi8((char)(1 << (BITS - 1)));
            }
            __m256 fa0 = _mm256_setzero_ps(), fa1 = fa0, fa2 = fa0, fa3 = fa0, fb0 = fa0, fb1 = fa0, fb2 = fa0, fb3 = fa0;
            const float *xg = xp->xf + g * xp->blk_pad;
            for (int64_t h = 0; h < nchunk; h++) {
                const int64_t cs = c0 + 32 * h, nvalid = c1 - cs;
                if (nvalid <= 0) break;
                const float *xh = xg + 32 * h;
                dot_f32x2(&fa0, &fb0, _mm256_sub_epi8(int_codes(rows[0], cs, nvalid, k, BITS), z0), xh);
                dot_f32x2(&fa1, &fb1, _mm256_sub_epi8(int_codes(rows[1], cs, nvalid, k, BITS), z1), xh);
                dot_f32x2(&fa2, &fb2, _mm256_sub_epi8(int_codes(rows[2], cs, nvalid, k, BITS), z2), xh);
                dot_f32x2(&fa3, &fb3, _mm256_sub_epi8(int_codes(rows[3], cs, nvalid, k, BITS), z3), xh);
            }
            acc0 = _mm256_fmadd_ps(_mm256_add_ps(fa0, fb0), _mm256_set1_ps(_cvtsh_ss(w->scales[rr[0] * ng + g])), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_add_ps(fa1, fb1), _mm256_set1_ps(_cvtsh_ss(w->scales[rr[1] * ng + g])), acc1);
            acc2 = _mm256_fmadd_ps(_mm256_add_ps(fa2, fb2), _mm256_set1_ps(_cvtsh_ss(w->scales[rr[2] * ng + g])), acc2);
            acc3 = _mm256_fmadd_ps(_mm256_add_ps(fa3, fb3), _mm256_set1_ps(_cvtsh_ss(w->scales[rr[3] * ng + g])), acc3);
        }
        float out[4];
        _mm_storeu_ps(out, hsum4_f32(acc0, acc1, acc2, acc3));
        for (int i = 0; i < 4 && r + i < r1; i++) y[r + i] = bias ? out[i] + bias[r + i] : out[i];
    }
}

/* float activations: one row at a time, all activation vectors; q - zero in int32 */
static inline __attribute__((always_inline)) void
int_rows_f32(const vqm_int_weight *w, const vqm_xprep *xp, int64_t r0, int64_t r1, const float *bias, float *y,
             const int BITS)
{
    const int64_t n = w->n, k = w->k, G = w->group;
    const int64_t ng = vqm_cdiv(k, G);
    const int64_t rowbytes = vqm_int_row_bytes(w);
    const int64_t nchunk = xp->blk_pad / 32;
    const int nb = (int)xp->batch;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = w->codes + r * rowbytes;
        float acc[VQM_BATCH_TILE];
        for (int bi = 0; bi < nb; bi++) acc[bi] = 0.0f;
        for (int64_t g = 0; g < ng; g++) {
            const int64_t c0 = g * G;
            const int64_t c1 = c0 + G < k ? c0 + G : k;
            const int z = w->zeros ? w->zeros[r * ng + g] : 1 << (BITS - 1);
            const float s = _cvtsh_ss(w->scales[r * ng + g]);
            __m256 facc[VQM_BATCH_TILE];
            for (int bi = 0; bi < nb; bi++) facc[bi] = _mm256_setzero_ps();
            for (int64_t h = 0; h < nchunk; h++) {
                const int64_t cs = c0 + 32 * h, nvalid = c1 - cs;
                if (nvalid <= 0) break;
                __m256i q = int_codes(row, cs, nvalid, k, BITS);
                __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
                __m256i zz = _mm256_set1_epi32(z);
                __m256 f0 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(lo), zz));
                __m256 f1 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)), zz));
                __m256 f2 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(hi), zz));
                __m256 f3 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)), zz));
                for (int bi = 0; bi < nb; bi++) {
                    const float *xf = xp->xf + bi * xp->stride + g * xp->blk_pad + 32 * h;
                    __m256 a = facc[bi];
                    a = _mm256_fmadd_ps(f0, _mm256_loadu_ps(xf), a);
                    a = _mm256_fmadd_ps(f1, _mm256_loadu_ps(xf + 8), a);
                    a = _mm256_fmadd_ps(f2, _mm256_loadu_ps(xf + 16), a);
                    a = _mm256_fmadd_ps(f3, _mm256_loadu_ps(xf + 24), a);
                    facc[bi] = a;
                }
            }
            for (int bi = 0; bi < nb; bi++) acc[bi] = acc[bi] + hsum_f32(facc[bi]) * s;
        }
        for (int bi = 0; bi < nb; bi++) y[bi * n + r] = bias ? acc[bi] + bias[r] : acc[bi];
    }
}

static void avx2_int_rows(const vqm_int_weight *w, const vqm_layout *lay, const vqm_xprep *xp,
                          int64_t r0, int64_t r1, const float *bias, float *y, int flags)
{
    (void)lay;
    if (w->bits == 8) {
        if (flags & VQM_ACT_INT8) int_rows_i8(w, xp, r0, r1, bias, y, 8);
        else if (xp->batch == 1 && !w->zeros) int_tile_f32(w, xp, r0, r1, bias, y, 8);
        else int_rows_f32(w, xp, r0, r1, bias, y, 8);
    } else {
        if ((flags & VQM_ACT_INT8) && w->group == 32) int4_g32_i8(w, xp, r0, r1, bias, y);
        else if (flags & VQM_ACT_INT8) int_rows_i8(w, xp, r0, r1, bias, y, 4);
        else if (xp->batch == 1) int_tile_f32(w, xp, r0, r1, bias, y, 4);
        else int_rows_f32(w, xp, r0, r1, bias, y, 4);
    }
}

/* Lanes are vectors, 16 at a time (two registers, so two independent compare/blend chains); the loop runs over
 * the centroids in order. Separate multiplies and adds (no FMA) keep every distance bit-identical to the reference,
 * and a strict per-lane compare in centroid order keeps its first-minimum rule. d is a compile-time constant in the
 * common cases so that the component loop unrolls. */
static inline __attribute__((always_inline)) void nearest16(const float *xs, const float *ws, const float *c, int d,
                                                            int ncent, int32_t *out)
{
    __m256 x0[VQM_NEAREST_MAX_D], x1[VQM_NEAREST_MAX_D], w0[VQM_NEAREST_MAX_D], w1[VQM_NEAREST_MAX_D];
#pragma GCC unroll 8
    for (int t = 0; t < d; t++) {
        x0[t] = _mm256_loadu_ps(xs + t * 16); x1[t] = _mm256_loadu_ps(xs + t * 16 + 8);
        w0[t] = _mm256_loadu_ps(ws + t * 16); w1[t] = _mm256_loadu_ps(ws + t * 16 + 8);
    }
    __m256 b0 = _mm256_set1_ps(INFINITY), b1 = b0, i0 = _mm256_setzero_ps(), i1 = i0;
    for (int j = 0; j < ncent; j++) {
        __m256 s0 = _mm256_setzero_ps(), s1 = s0;
#pragma GCC unroll 8
        for (int t = 0; t < d; t++) {
            __m256 cj = _mm256_broadcast_ss(c + (int64_t)j * d + t);
            __m256 e0 = _mm256_sub_ps(x0[t], cj), e1 = _mm256_sub_ps(x1[t], cj);
            s0 = _mm256_add_ps(s0, _mm256_mul_ps(w0[t], _mm256_mul_ps(e0, e0)));
            s1 = _mm256_add_ps(s1, _mm256_mul_ps(w1[t], _mm256_mul_ps(e1, e1)));
        }
        __m256 jv = _mm256_castsi256_ps(_mm256_set1_epi32(j));
        __m256 lt0 = _mm256_cmp_ps(s0, b0, _CMP_LT_OQ), lt1 = _mm256_cmp_ps(s1, b1, _CMP_LT_OQ);
        b0 = _mm256_blendv_ps(b0, s0, lt0); i0 = _mm256_blendv_ps(i0, jv, lt0);
        b1 = _mm256_blendv_ps(b1, s1, lt1); i1 = _mm256_blendv_ps(i1, jv, lt1);
    }
    _mm256_storeu_si256((__m256i *)(void *)out, _mm256_castps_si256(i0));
    _mm256_storeu_si256((__m256i *)(void *)(out + 8), _mm256_castps_si256(i1));
}

static void avx2_nearest(const float *x, const float *w, const float *c, int64_t m, int d, int ncent, int64_t *out)
{
    float xs[VQM_NEAREST_MAX_D * 16], ws[VQM_NEAREST_MAX_D * 16]; /* [t][lane] */
    int32_t idx[16];
    for (int64_t i0 = 0; i0 < m; i0 += 16) {
        int cnt = m - i0 < 16 ? (int)(m - i0) : 16;
        vqm_nearest_lanes(x + i0 * d, w + i0 * d, cnt, 16, d, xs, ws);
        switch (d) {
        case 1: nearest16(xs, ws, c, 1, ncent, idx); break;
        case 2: nearest16(xs, ws, c, 2, ncent, idx); break;
        case 3: nearest16(xs, ws, c, 3, ncent, idx); break;
        case 4: nearest16(xs, ws, c, 4, ncent, idx); break;
        case 5: nearest16(xs, ws, c, 5, ncent, idx); break;
        case 6: nearest16(xs, ws, c, 6, ncent, idx); break;
        case 7: nearest16(xs, ws, c, 7, ncent, idx); break;
        default: nearest16(xs, ws, c, 8, ncent, idx); break; /* d <= 8 is checked by the caller */
        }
        for (int l = 0; l < cnt; l++) out[i0 + l] = idx[l];
    }
}

const vqm_path_ops vqm_ops_avx2 = { avx2_vq_plan, avx2_vq_rows, avx2_int_plan, avx2_int_rows, avx2_nearest };

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif /* __x86_64__ */
