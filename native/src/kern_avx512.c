/* x86-64 AVX-512 kernels (F, BW, VL, VBMI, VNNI; this translation unit only, selected at run time when CPUID and
 * XGETBV report them).
 *
 * What AVX-512 changes against AVX2: a 64-entry byte table is one register and one `vpermb` looks up 64 codes
 * (AVX2: 4 pshufb + 3 blends for 32), 6-bit codes unpack with one `vpermb` + one `vpmultishiftqb`, and VNNI's
 * `vpdpbusd` multiplies unsigned by signed bytes and sums four products into a dword in one instruction.
 *
 * VQ decode works on chunks of 64 codes:
 *  unpack : b=4 -> [bytes | bytes >> 4] (even codes 0..62, then odd 1..63; bits above the code are ignored by the
 *           lookup: 16-entry tables are repeated to 64 entries), b=6 -> vpermb spreads 6 bytes into each qword,
 *           vpmultishiftqb cuts 8 codes out of it (natural order), b=8 -> one load.
 *  lookup : k=16 and k=64 -> one vpermb per vector dimension, k=256 -> two vpermi2b (entries 0..127, 128..255) and
 *           a blend on bit 7 per dimension.
 *  The activations are permuted once per call into the order the lookup produces (vqm_layout).
 * int8 activations: the tables hold c + 128 (an unsigned byte) so `vpdpbusd(w + 128, x)` sums exactly, and
 *  sum(c * x) = that - 128 * sum(x) per block (sum(x) is prepared with the activations): the integer block sums are
 *  the reference's exactly, whatever the codebook holds (-128 included), and the float finish repeats the
 *  reference's operations in its order, so results are bit-identical to ref.c.
 * Float activations: codes decode to signed bytes, convert to float and FMA (float tolerance, not bit-exact).
 *
 * The same source compiles against SIMDe (a portable implementation of these intrinsics) into a test-only library
 * (`make simde`, VQM_SIMDE defined): every bit-exactness test then also runs this path on CPUs without AVX-512. The
 * few intrinsics the Debian SIMDe lacks are spelled with AVX2 halves there (the *_compat helpers below).
 */
#include "internal.h"
#include <math.h>
#include <stdlib.h>

#if defined(__x86_64__)
#if defined(VQM_SIMDE)
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <simde/x86/f16c.h>
#include <simde/x86/fma.h>
/* names Debian's SIMDe defines without their native aliases */
#define _mm512_shuffle_i64x2 simde_mm512_shuffle_i64x2
typedef simde__mmask16 __mmask16;
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,avx2,fma,f16c"))), \
                             apply_to = function)
#include <immintrin.h>
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,avx2,fma,f16c")
#include <immintrin.h>
#endif

/* ---------------------------------------------------------------- intrinsics Debian's SIMDe lacks */
static inline __m512i cvt_i8_i32(__m128i a) /* 16 signed bytes -> 16 dwords */
{
#if defined(VQM_SIMDE)
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_cvtepi8_epi32(a)),
                              _mm256_cvtepi8_epi32(_mm_srli_si128(a, 8)), 1);
#else
    return _mm512_cvtepi8_epi32(a);
#endif
}

static inline __m512 cvt_i32_ps(__m512i a)
{
#if defined(VQM_SIMDE)
    return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_cvtepi32_ps(_mm512_castsi512_si256(a))),
                              _mm256_cvtepi32_ps(_mm512_extracti64x4_epi64(a, 1)), 1);
#else
    return _mm512_cvtepi32_ps(a);
#endif
}

static inline __m512i cvt_u8_i32(__m128i a) /* 16 unsigned bytes -> 16 dwords */
{
    return _mm512_add_epi32(cvt_i8_i32(_mm_xor_si128(a, _mm_set1_epi8((char)0x80))), _mm512_set1_epi32(128));
}

static inline __m512 cvt_ph_ps(__m256i h) /* 16 fp16 -> 16 floats (exact) */
{
#if defined(VQM_SIMDE)
    return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_cvtph_ps(_mm256_castsi256_si128(h))),
                              _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)), 1);
#else
    return _mm512_cvtph_ps(h);
#endif
}

static inline float half_to_float(uint16_t h)
{
    return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)));
}

/* the first n (< 64) bytes at p, the rest zero, reading nothing past p + n */
static inline __m512i load_partial(const uint8_t *p, int n)
{
#if defined(VQM_SIMDE)
    uint8_t tmp[64] = { 0 };
    memcpy(tmp, p, (size_t)n);
    return _mm512_loadu_si512((const void *)tmp);
#else
    return _mm512_maskz_loadu_epi8((1ull << n) - 1, p); /* masked-off bytes are never read (n < 64) */
#endif
}

static inline __m256i ld256(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline __m512i ld512(const void *p) { return _mm512_loadu_si512(p); }

/* ---------------------------------------------------------------- reductions */
static inline __m256i fold512_i32(__m512i v) { return _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1)); }
static inline __m256 fold512_ps(__m512 v)
{
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

/* [sum a, sum b, sum c, sum d] of four 8-dword vectors */
static inline __m128i hsum4_i32(__m256i a, __m256i b, __m256i c, __m256i d)
{
    __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
    return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}

/* [row 0, row 1, row 2, row 3] sums of each 128-bit lane of a0..a3: lane j of the result sums lane j of each */
static inline __m512i transpose4_sum(__m512i a0, __m512i a1, __m512i a2, __m512i a3)
{
    __m512i t01 = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
    __m512i t23 = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
    return _mm512_add_epi32(_mm512_unpacklo_epi64(t01, t23), _mm512_unpackhi_epi64(t01, t23));
}

static inline __m128 hsum4_ps(__m256 a, __m256 b, __m256 c, __m256 d)
{
    __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

static inline int32_t hsum_i32(__m512i v)
{
    __m256i s8 = fold512_i32(v);
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

static inline float hsum_ps(__m512 v)
{
    __m256 s8 = fold512_ps(v);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m128 fp16x4(uint16_t a, uint16_t b, uint16_t c, uint16_t d)
{
    return _mm_cvtph_ps(_mm_setr_epi16((short)a, (short)b, (short)c, (short)d, 0, 0, 0, 0));
}

/* ---------------------------------------------------------------- VQ: layout and tables */
/* position p of a 64-code chunk holds code ord_code(p) */
static inline int ord_code(int be, int p) { return be == 4 ? (p < 32 ? 2 * p : 2 * (p - 32) + 1) : p; }

static int avx512_vq_plan(const vqm_vq_weight *w, int flags, vqm_layout *lay)
{
    (void)flags;
    vqm_vcfg c;
    if (!vqm_vq_simd_cfg(w, &c)) return 0;
    lay->chunk_cols = 64 * c.de;
    lay->identity = c.de == 1 && c.be != 4;
    for (int t = 0; t < c.de; t++)
        for (int p = 0; p < 64; p++) lay->perm[t * 64 + p] = (int16_t)(ord_code(c.be, p) * c.de + t);
    return 1;
}

/* Per dimension one 64-byte table (k <= 64; k = 16 repeated four times) or four (k = 256). */
static size_t tab_size(const vqm_vcfg *c) { return (size_t)64 * (size_t)c->de * (c->ke == 256 ? 4u : 1u); }

static const uint8_t iota[64] = {
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29,
    30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57,
    58, 59, 60, 61, 62, 63 };

/* The two tables of a 1-D k = 4 codebook read as 2-D k = 16 (virt: a nibble is two 2-bit codes, the low one first) */
static inline __attribute__((always_inline)) void virt_tabs(const int8_t *cbk, uint8_t flip, __m512i T[2])
{
    const __m512i io = ld512(iota), fl = _mm512_set1_epi8((char)flip), m3 = _mm512_set1_epi8(3);
    int32_t v4;
    memcpy(&v4, cbk, 4);
    const __m512i v = _mm512_set1_epi32(v4);
    T[0] = _mm512_xor_si512(_mm512_permutexvar_epi8(_mm512_and_si512(io, m3), v), fl);
    T[1] = _mm512_xor_si512(_mm512_permutexvar_epi8(_mm512_and_si512(_mm512_srli_epi16(io, 2), m3), v), fl);
}

/* The de tables of a 16-entry codebook (ke == 16, virt included) in registers, straight from its 16 * de bytes (4
 * when virt): an 8-row tile builds them per block instead of loading them from the table cache, which at R = 4 or 8
 * would be filled for a single tile. Entry e of dimension t is component t of centroid e % 16. */
static inline __attribute__((always_inline)) void tab16_regs(const vqm_vcfg *c, const int8_t *cbk, uint8_t flip,
                                                            __m512i T[4])
{
    if (c->virt) {
        virt_tabs(cbk, flip, T);
        return;
    }
    const __m512i io = ld512(iota), fl = _mm512_set1_epi8((char)flip);
    const int d = c->de, sh = d == 1 ? 0 : d == 2 ? 1 : 2;
    const __m512i v = d == 4 ? ld512(cbk) : load_partial((const uint8_t *)cbk, 16 * d); /* no byte past it */
    for (int t = 0; t < d; t++) {
        __m512i idx = _mm512_add_epi8(_mm512_slli_epi16(_mm512_and_si512(io, _mm512_set1_epi8(15)), sh),
                                      _mm512_set1_epi8((char)t));
        T[t] = _mm512_xor_si512(_mm512_permutexvar_epi8(idx, v), fl);
    }
}

/* Tables of one codebook block, built with byte permutes (a block's tables are rebuilt every R rows: with
 * R = 1..8 a scalar build costs more than the rows). Entry e of dimension t is component t of centroid e % k;
 * flip = 0x80 stores c + 128 (int8 activations: vpdpbusd's unsigned operand), 0 stores c as a signed byte. */
static void prep_tab(const vqm_vcfg *c, const int8_t *cbk, uint8_t flip, uint8_t *tab)
{
    if (c->virt) { /* stored straight from the helper: through tab16_regs this fill ran 20 % slower at R = 1 */
        __m512i T[2];
        virt_tabs(cbk, flip, T);
        _mm512_storeu_si512(tab, T[0]);
        _mm512_storeu_si512(tab + 64, T[1]);
        return;
    }
    if (c->ke == 16) {
        __m512i T[4];
        tab16_regs(c, cbk, flip, T);
        for (int t = 0; t < c->de; t++) _mm512_storeu_si512(tab + 64 * t, T[t]);
        return;
    }
    const __m512i io = ld512(iota), fl = _mm512_set1_epi8((char)flip);
    const int d = c->de, sh = d == 1 ? 0 : d == 2 ? 1 : 2;
    /* k = 64 or 256: each run of 64 entries reads a window of 64 * d codebook bytes */
    const int per = c->ke, runs = c->ke / 64;
    for (int q = 0; q < runs; q++) {
        const int8_t *win = cbk + 64 * q * d;
        for (int t = 0; t < d; t++) {
            const __m512i idx = _mm512_add_epi8(_mm512_slli_epi16(io, sh), _mm512_set1_epi8((char)t)); /* 64 i + t */
            __m512i v;
            if (d == 1) {
                v = ld512(win);
            } else if (d == 2) {
                v = _mm512_permutex2var_epi8(ld512(win), idx, ld512(win + 64));
            } else {
                __m512i lo = _mm512_permutex2var_epi8(ld512(win), idx, ld512(win + 64));
                __m512i hi = _mm512_permutex2var_epi8(ld512(win + 128), idx, ld512(win + 192));
                v = _mm512_mask_blend_epi8(_mm512_movepi8_mask(idx), lo, hi);
            }
            _mm512_storeu_si512(tab + per * t + 64 * q, _mm512_xor_si512(v, fl));
        }
    }
}

/* 6-bit codes: vpermb spreads the 6 bytes of 8 codes into each qword (k6_spread), vpmultishiftqb cuts the codes out
 * of it (k6_shifts) */
static const uint8_t k6_spread[64] = {
    0, 1, 2, 3, 4, 5, 5, 5, 6, 7, 8, 9, 10, 11, 11, 11, 12, 13, 14, 15, 16, 17, 17, 17,
    18, 19, 20, 21, 22, 23, 23, 23, 24, 25, 26, 27, 28, 29, 29, 29, 30, 31, 32, 33, 34, 35, 35, 35,
    36, 37, 38, 39, 40, 41, 41, 41, 42, 43, 44, 45, 46, 47, 47, 47 };
static const uint8_t k6_shifts[64] = {
    0, 6, 12, 18, 24, 30, 36, 42, 0, 6, 12, 18, 24, 30, 36, 42, 0, 6, 12, 18, 24, 30, 36, 42,
    0, 6, 12, 18, 24, 30, 36, 42, 0, 6, 12, 18, 24, 30, 36, 42, 0, 6, 12, 18, 24, 30, 36, 42,
    0, 6, 12, 18, 24, 30, 36, 42, 0, 6, 12, 18, 24, 30, 36, 42 };

/* 64 codes of a chunk starting at byte p (BE * 8 bytes, all inside the row) */
static inline __attribute__((always_inline)) __m512i unpack64(const uint8_t *p, const int BE)
{
    if (BE == 4) {
        __m256i v = ld256(p);
        return _mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1);
    }
    if (BE == 6) {
        __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(ld256(p)),
                                       _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(const void *)(p + 32))), 1);
        v = _mm512_permutexvar_epi8(ld512(k6_spread), v);
        return _mm512_multishift_epi64_epi8(ld512(k6_shifts), v);
    }
    return ld512(p);
}

/* 4-bit codes: the chunk's 32 bytes in both halves, the upper half's bytes cut 4 bits higher (their high nibbles) */
static const uint8_t k4_shifts[64] = {
    0, 8, 16, 24, 32, 40, 48, 56, 0, 8, 16, 24, 32, 40, 48, 56, 0, 8, 16, 24, 32, 40, 48, 56,
    0, 8, 16, 24, 32, 40, 48, 56, 4, 12, 20, 28, 36, 44, 52, 60, 4, 12, 20, 28, 36, 44, 52, 60,
    4, 12, 20, 28, 36, 44, 52, 60, 4, 12, 20, 28, 36, 44, 52, 60 };

/* unpack64 for the 8-row tile. 6-bit codes: one 64-byte load (the chunk's 48 bytes and 16 beyond it, which the
 * caller guarantees lie inside the matrix) that the spreading vpermb takes as its memory operand. 4-bit codes: a
 * broadcast load and one vpmultishiftqb instead of a shift and an insert (the tile is bound by its vector ops; bits
 * above a code's nibble differ from unpack64's, and 16-entry tables, repeated every 16 bytes, ignore them). */
static inline __attribute__((always_inline)) __m512i unpack64_wide(const uint8_t *p, const int BE)
{
    if (BE == 4) return _mm512_multishift_epi64_epi8(ld512(k4_shifts), _mm512_broadcast_i64x4(ld256(p)));
    if (BE != 6) return unpack64(p, BE);
    return _mm512_multishift_epi64_epi8(ld512(k6_shifts), _mm512_permutexvar_epi8(ld512(k6_spread), ld512(p)));
}

/* the last chunk of a block, starting on a byte but with only nvalid < 64 codes: a zero-filled copy of its bytes
 * (all inside the row) unpacks like a full chunk; codes past nvalid meet zero activations */
static inline __attribute__((always_inline)) __m512i unpack64_tail(const uint8_t *p, int nvalid, const int BE)
{
    uint8_t tmp[64];
    _mm512_storeu_si512((void *)tmp, load_partial(p, (nvalid * BE + 7) / 8));
    return unpack64(tmp, BE);
}

/* chunk whose codes do not start on a byte: codes in the chunk's order,
 * missing ones 0 (their activations are 0) */
static inline __m512i unpack_slow(const uint8_t *row, int64_t cs, int nvalid, int be)
{
    uint8_t tmp[64];
    for (int p = 0; p < 64; p++) {
        int j = ord_code(be, p);
        tmp[p] = j < nvalid ? (uint8_t)vqm_get_code(row, cs + j, be) : 0;
    }
    return ld512(tmp);
}

/* the decoded weights of dimension t for 64 codes */
static inline __attribute__((always_inline)) __m512i lookup(__m512i codes, const uint8_t *tab, int t, const int KE)
{
    if (KE != 256) return _mm512_permutexvar_epi8(codes, ld512(tab + 64 * t));
    const uint8_t *T = tab + 256 * t;
    __m512i lo = _mm512_permutex2var_epi8(ld512(T), codes, ld512(T + 64));
    __m512i hi = _mm512_permutex2var_epi8(ld512(T + 128), codes, ld512(T + 192));
    return _mm512_mask_blend_epi8(_mm512_movepi8_mask(codes), lo, hi);
}

/* float dot of 64 signed byte weights with 64 floats, into two accumulators */
static inline __attribute__((always_inline)) void dot_f32(__m512 *fa, __m512 *fb, __m512i w, const float *x)
{
    __m512 a = *fa, b = *fb;
    a = _mm512_fmadd_ps(cvt_i32_ps(cvt_i8_i32(_mm512_castsi512_si128(w))), _mm512_loadu_ps(x), a);
    b = _mm512_fmadd_ps(cvt_i32_ps(cvt_i8_i32(_mm512_extracti32x4_epi32(w, 1))), _mm512_loadu_ps(x + 16), b);
    a = _mm512_fmadd_ps(cvt_i32_ps(cvt_i8_i32(_mm512_extracti32x4_epi32(w, 2))), _mm512_loadu_ps(x + 32), a);
    b = _mm512_fmadd_ps(cvt_i32_ps(cvt_i8_i32(_mm512_extracti32x4_epi32(w, 3))), _mm512_loadu_ps(x + 48), b);
    *fa = a; *fb = b;
}

/* Tables of every column block of a row block, for up to four row blocks at a time (slot = rb % 4: the rows of a
 * 4-row tile span at most four consecutive row blocks, so they never evict each other). */
typedef struct {
    int64_t rb[4];
    uint8_t *base;
    size_t slot_bytes;
} tab_cache;

static __thread uint8_t *t_tabs;
static __thread size_t t_tabs_cap;

static void tab_cache_init(tab_cache *tc, size_t tsz, int64_t ncb)
{
    tc->slot_bytes = (tsz * (size_t)ncb + 63) & ~(size_t)63;
    if (4 * tc->slot_bytes > t_tabs_cap) {
        free(t_tabs);
        t_tabs = aligned_alloc(64, 4 * tc->slot_bytes);
        t_tabs_cap = t_tabs ? 4 * tc->slot_bytes : 0;
        if (!t_tabs) abort();
    }
    tc->base = t_tabs;
    for (int i = 0; i < 4; i++) tc->rb[i] = -1;
}

static __attribute__((noinline)) const uint8_t *tab_cache_fill(tab_cache *tc, const vqm_vq_weight *w,
                                                                 const vqm_vcfg *c, int64_t rb, int64_t ncb, size_t tsz,
                                                                 uint8_t flip)
{
    uint8_t *slot = tc->base + (size_t)(rb & 3) * tc->slot_bytes;
    for (int64_t cb = 0; cb < ncb; cb++)
        prep_tab(c, w->codebook + (rb * ncb + cb) * (int64_t)w->ncent * w->d, flip, slot + cb * tsz);
    tc->rb[rb & 3] = rb;
    vqm_prefetch_codebooks(w, rb, ncb);
    return slot;
}

static inline const uint8_t *tab_cache_get(tab_cache *tc, const vqm_vq_weight *w, const vqm_vcfg *c, int64_t rb,
                                           int64_t ncb, size_t tsz, uint8_t flip)
{
    if (tc->rb[rb & 3] == rb) return tc->base + (size_t)(rb & 3) * tc->slot_bytes;
    return tab_cache_fill(tc, w, c, rb, ncb, tsz, flip);
}

/* ---------------------------------------------------------------- VQ, batch 1: 4-row tiles
 * Four rows decode together (independent chains, shared activation loads); per codebook block their integer (or
 * float) sums are reduced together and finished in one 4-lane vector (lane = row) in the reference's order. The
 * chunks whose codes all exist run in a loop with the rows unrolled and nothing else in it (SAME: the four rows
 * share one codebook block, whose tables stay in registers); the block's last, partial chunk runs after it. */
enum { READ_EXACT, READ_TAIL, READ_WIDE }; /* how a chunk's codes are read: its bytes, a partial chunk, 64 bytes */

typedef struct {
    __m512i a[4];      /* int8: dword sums per row */
    __m512 fa[4], fb[4];
} tile_acc;

static inline __attribute__((always_inline)) void
tile_chunk_row(const uint8_t *p, const uint8_t *tab, const __m512i *T, const __m512i *X, const float *xf,
               __m512i *a, __m512 *fa, __m512 *fb, const int SAME, const int BE, const int DE, const int KE,
               const int INT8, const int READ, int nvalid)
{
    __m512i c = READ == READ_TAIL ? unpack64_tail(p, nvalid, BE) : READ == READ_WIDE ? unpack64_wide(p, BE)
                                                                                     : unpack64(p, BE);
    for (int t = 0; t < DE; t++) {
        __m512i W = SAME && KE != 256 ? _mm512_permutexvar_epi8(c, T[t]) : lookup(c, tab, t, KE);
        if (INT8) *a = _mm512_dpbusd_epi32(*a, W, X[t]);
        else dot_f32(fa, fb, W, xf + 64 * t);
    }
}

static inline __attribute__((always_inline)) void
tile_chunks(const uint8_t *const rows[4], int64_t off0, int64_t h0, int64_t h1, int nvalid_last,
            const uint8_t *const tab[4], const int8_t *xq, const float *xf, tile_acc *acc,
            const int SAME, const int BE, const int DE, const int KE, const int INT8, const int READ)
{
    __m512i T[4];
    if (SAME && KE != 256)
        for (int t = 0; t < DE; t++) T[t] = ld512(tab[0] + 64 * t);
    __m512i a0 = acc->a[0], a1 = acc->a[1], a2 = acc->a[2], a3 = acc->a[3];
    __m512 fa0 = acc->fa[0], fa1 = acc->fa[1], fa2 = acc->fa[2], fa3 = acc->fa[3];
    __m512 fb0 = acc->fb[0], fb1 = acc->fb[1], fb2 = acc->fb[2], fb3 = acc->fb[3];
    for (int64_t h = h0; h < h1; h++) {
        VQM_MCA_BEGIN("avx512.vq_tile.loop", BE, DE, KE, SAME + 2 * INT8 + 4 * READ);
        const int64_t off = off0 + h * 8 * BE;
        __m512i X[4];
        if (INT8)
            for (int t = 0; t < DE; t++) X[t] = ld512(xq + h * 64 * DE + 64 * t);
        const float *xh = INT8 ? NULL : xf + h * 64 * DE;
        tile_chunk_row(rows[0] + off, tab[0], T, X, xh, &a0, &fa0, &fb0, SAME, BE, DE, KE, INT8, READ, nvalid_last);
        tile_chunk_row(rows[1] + off, tab[1], T, X, xh, &a1, &fa1, &fb1, SAME, BE, DE, KE, INT8, READ, nvalid_last);
        tile_chunk_row(rows[2] + off, tab[2], T, X, xh, &a2, &fa2, &fb2, SAME, BE, DE, KE, INT8, READ, nvalid_last);
        tile_chunk_row(rows[3] + off, tab[3], T, X, xh, &a3, &fa3, &fb3, SAME, BE, DE, KE, INT8, READ, nvalid_last);
        VQM_MCA_END("avx512.vq_tile.loop", BE, DE, KE, SAME + 2 * INT8 + 4 * READ);
    }
    acc->a[0] = a0; acc->a[1] = a1; acc->a[2] = a2; acc->a[3] = a3;
    acc->fa[0] = fa0; acc->fa[1] = fa1; acc->fa[2] = fa2; acc->fa[3] = fa3;
    acc->fb[0] = fb0; acc->fb[1] = fb1; acc->fb[2] = fb2; acc->fb[3] = fb3;
}

/* Eight rows whose halves (rows 0-3, 4-7) each lie in one codebook row block, int8 activations, every block
 * starting on a byte, and 64 bytes readable from any chunk of the tile (rows below it in the matrix): the common tile
 * of the mobile formats (R % 4 == 0) with half the per-row bookkeeping of vq_tile4 (per block: activation loads,
 * prefetch, the finish) and no partial-chunk path (a block's last chunk reads whole: its codes past the block meet
 * zero activations, the block being zero-padded to whole chunks). 16-entry codebooks become table registers right
 * here (tab16_regs); larger ones come from the table cache (tabs_lo, tabs_hi: the halves' row blocks). SPLIT: the
 * halves lie in different row blocks (else one set of table registers serves all eight rows, and the loop holds no
 * second set). The sums and the float finish are vq_tile4's: results are ref.c's. */
static inline __attribute__((always_inline)) void
vq_tile8(const vqm_vq_weight *w, const vqm_xprep *xp, int64_t r, const float *bias, float *y, const vqm_vcfg *cfg,
         const uint8_t *tabs_lo, const uint8_t *tabs_hi, size_t tsz, int64_t rowbytes, int64_t pf_bytes, const int BE,
         const int DE, const int KE, const int SPLIT)
{
    const int64_t k = w->k, C = w->cols_per_block, ncb = vqm_cdiv(k, C);
    const uint8_t *row0 = w->indices + r * rowbytes;
    const int64_t rb_lo = r / w->rows_per_block, rb_hi = (r + 4) / w->rows_per_block;
    const int64_t cbk_bytes = (int64_t)w->ncent * w->d;
    __m256 acc = _mm256_setzero_ps(); /* lane = row */
    for (int64_t cb = 0; cb < ncb; cb++) {
        const int64_t c0 = cb * C, c1 = c0 + C < k ? c0 + C : k;
        const int64_t code0 = c0 / DE, nch = vqm_cdiv(vqm_cdiv(c1, DE) - code0, 64);
        const uint8_t *base = row0 + ((code0 * BE) >> 3);
        const uint8_t *tab_lo = KE == 16 ? NULL : tabs_lo + cb * tsz;
        const uint8_t *tab_hi = KE == 16 ? NULL : SPLIT ? tabs_hi + cb * tsz : tab_lo;
        const int8_t *xq = xp->xq + cb * xp->blk_pad;
        { /* stream in the tile after next, a block's share of it at a time: its 8 rows are contiguous */
            const uint8_t *pf = row0 + 16 * rowbytes + cb * pf_bytes;
            for (int64_t o = 0; o < pf_bytes; o += 64) _mm_prefetch((const char *)(pf + o), _MM_HINT_T0);
            /* and its codebooks, which tab16_regs reads as it goes (no table fill reads them ahead) */
            if (KE == 16 && r + 20 < w->n) {
                const int64_t rn = (r + 16) / w->rows_per_block, rm = (r + 20) / w->rows_per_block;
                _mm_prefetch((const char *)(w->codebook + (rn * ncb + cb) * cbk_bytes), _MM_HINT_T0);
                if (rm != rn) _mm_prefetch((const char *)(w->codebook + (rm * ncb + cb) * cbk_bytes), _MM_HINT_T0);
            }
        }
        __m512i Tl[4], Th[4], a[8];
        if (KE == 16) {
            tab16_regs(cfg, w->codebook + (rb_lo * ncb + cb) * cbk_bytes, 0x80, Tl);
            if (SPLIT) tab16_regs(cfg, w->codebook + (rb_hi * ncb + cb) * cbk_bytes, 0x80, Th);
        } else if (KE == 64) {
            for (int t = 0; t < DE; t++) Tl[t] = ld512(tab_lo + 64 * t);
            if (SPLIT)
                for (int t = 0; t < DE; t++) Th[t] = ld512(tab_hi + 64 * t);
        }
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) a[i] = _mm512_setzero_si512();
        for (int64_t h = 0; h < nch; h++) {
            VQM_MCA_BEGIN("avx512.vq_tile8.loop", BE, DE, KE, SPLIT);
            __m512i X[4];
            for (int t = 0; t < DE; t++) X[t] = ld512(xq + h * 64 * DE + 64 * t);
            const uint8_t *p = base + h * 8 * BE;
#pragma GCC unroll 8
            for (int i = 0; i < 8; i++) {
                const __m512i c = unpack64_wide(p + i * rowbytes, BE);
                for (int t = 0; t < DE; t++)
                    a[i] = _mm512_dpbusd_epi32(a[i],
                                               KE != 256 ? _mm512_permutexvar_epi8(c, SPLIT && i >= 4 ? Th[t] : Tl[t])
                                                         : lookup(c, i < 4 ? tab_lo : tab_hi, t, KE),
                                               X[t]);
            }
            VQM_MCA_END("avx512.vq_tile8.loop", BE, DE, KE, SPLIT);
        }
        VQM_MCA_BEGIN("avx512.vq_tile8.finish", BE, DE, KE, SPLIT);
        __m512i u = transpose4_sum(a[0], a[1], a[2], a[3]), v = transpose4_sum(a[4], a[5], a[6], a[7]);
        /* lanes j of u and v: [rows 0-3] and [rows 4-7] of 128-bit lane j; fold the four lanes of each */
        __m512i uv = _mm512_add_epi32(_mm512_shuffle_i64x2(u, v, 0x44), _mm512_shuffle_i64x2(u, v, 0xee));
        uv = _mm512_add_epi32(uv, _mm512_shuffle_i64x2(uv, uv, 0xb1)); /* lanes 0 and 2: rows 0-3 and 4-7 */
        __m256i isum = _mm512_castsi512_si256(_mm512_shuffle_i64x2(uv, uv, 0x08));
        isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(128 * xp->xsum[cb]));
        __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(xp->xs[cb]));
        f = _mm256_mul_ps(f, _mm256_set_m128(_mm_set1_ps(half_to_float(w->scale[rb_hi * ncb + cb])),
                                             _mm_set1_ps(half_to_float(w->scale[rb_lo * ncb + cb]))));
        acc = _mm256_add_ps(acc, f);
        VQM_MCA_END("avx512.vq_tile8.finish", BE, DE, KE, SPLIT);
    }
    if (bias) acc = _mm256_add_ps(acc, _mm256_loadu_ps(bias + r));
    _mm256_storeu_ps(y + r, acc);
}

static inline __attribute__((always_inline)) void
vq_tile4(const vqm_vq_weight *w, const vqm_xprep *xp, int64_t r0, int64_t r1, const float *bias, float *y,
         const vqm_vcfg *cfg, const int BE, const int DE, const int KE, const int INT8)
{
    const int64_t k = w->k, R = w->rows_per_block, C = w->cols_per_block;
    const int64_t ncb = vqm_cdiv(k, C);
    const int64_t rowbytes = vqm_vq_row_bytes(w);
    const int64_t ccols = 64 * DE;
    const int64_t nchunk = xp->blk_pad / ccols;
    const size_t tsz = tab_size(cfg);
    const int64_t pf_blk = ((vqm_cdiv(4 * rowbytes, ncb) + 63) / 64) * 64;
    tab_cache tc;
    tab_cache_init(&tc, tsz, ncb);
    /* 8-row tiles where vq_tile8's conditions hold: blocks start on a byte, rows r..r+3 and r+4..r+7 each share a
     * row block, and the 64 bytes from a chunk of row r + 7 stay inside the matrix */
    const int tile8 = INT8 && (C / DE * BE) % 8 == 0 && C % DE == 0;
    const int64_t pf8 = ((vqm_cdiv(8 * rowbytes, ncb) + 63) / 64) * 64;
    for (int64_t r = r0; r < r1; r += 4) {
        if (tile8 && r + 8 <= r1 && r / R == (r + 3) / R && (r + 4) / R == (r + 7) / R &&
            (w->n - r - 8) * rowbytes >= 64) {
            const uint8_t *lo = KE == 16 ? NULL : tab_cache_get(&tc, w, cfg, r / R, ncb, tsz, 0x80);
            if (r / R == (r + 7) / R) {
                vq_tile8(w, xp, r, bias, y, cfg, lo, lo, tsz, rowbytes, pf8, BE, DE, KE, 0);
            } else {
                const uint8_t *hi = KE == 16 ? NULL : tab_cache_get(&tc, w, cfg, (r + 4) / R, ncb, tsz, 0x80);
                vq_tile8(w, xp, r, bias, y, cfg, lo, hi, tsz, rowbytes, pf8, BE, DE, KE, 1);
            }
            r += 4;
            continue;
        }
        const uint8_t *rows[4], *tabs[4];
        int64_t rb[4];
        for (int i = 0; i < 4; i++) {
            int64_t rr = r + i < r1 ? r + i : r1 - 1;
            rows[i] = w->indices + rr * rowbytes;
            rb[i] = rr / R;
        }
        const int same = rb[0] == rb[3];
        /* 6-bit chunks read 64 bytes when the 16 past a chunk of the tile's last row are still in the matrix */
        const int wide = BE == 6 && (w->n - r - 4) * rowbytes >= 16;
        for (int i = 0; i < 4; i++)
            tabs[i] = same && i ? tabs[0] : tab_cache_get(&tc, w, cfg, rb[i], ncb, tsz, INT8 ? 0x80 : 0);
        __m128 acc = _mm_setzero_ps();
        __m512 racc[4] = { _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps() };
        for (int64_t cb = 0; cb < ncb; cb++) {
            const int64_t c0 = cb * C, c1 = c0 + C < k ? c0 + C : k;
            const int64_t code0 = c0 / DE, code1 = vqm_cdiv(c1, DE);
            const int aligned = ((code0 * BE) & 7) == 0;
            const int64_t off0 = (code0 * BE) >> 3;
            const int64_t nfull = aligned ? (code1 - code0) / 64 : 0;
            const uint8_t *tab[4] = { tabs[0] + cb * tsz, tabs[1] + cb * tsz, tabs[2] + cb * tsz, tabs[3] + cb * tsz };
            const int8_t *xq = INT8 ? xp->xq + cb * xp->blk_pad : NULL;
            const float *xf = INT8 ? NULL : xp->xf + cb * xp->blk_pad;
            if (r + 8 < w->n) { /* stream in the tile after next: its 4 rows are contiguous */
                const uint8_t *pf = w->indices + (r + 8) * rowbytes + cb * pf_blk;
                for (int64_t o = 0; o < pf_blk; o += 64) _mm_prefetch((const char *)(pf + o), _MM_HINT_T0);
            }
            tile_acc ta;
            for (int i = 0; i < 4; i++) {
                ta.a[i] = _mm512_setzero_si512();
                ta.fa[i] = ta.fb[i] = _mm512_setzero_ps();
            }
            if (same && wide) tile_chunks(rows, off0, 0, nfull, 64, tab, xq, xf, &ta, 1, BE, DE, KE, INT8, READ_WIDE);
            else if (same) tile_chunks(rows, off0, 0, nfull, 64, tab, xq, xf, &ta, 1, BE, DE, KE, INT8, READ_EXACT);
            else tile_chunks(rows, off0, 0, nfull, 64, tab, xq, xf, &ta, 0, BE, DE, KE, INT8, READ_EXACT);
            const int64_t rest = code1 - (code0 + 64 * nfull);
            if (rest > 0 && aligned) { /* the block's last chunk, partial */
                tile_chunks(rows, off0, nfull, nfull + 1, (int)rest, tab, xq, xf, &ta, 0, BE, DE, KE, INT8, READ_TAIL);
            } else if (rest > 0) { /* codes that do not start on a byte: gathered one by one */
                for (int64_t h = 0; h < nchunk; h++) {
                    const int64_t cs = code0 + 64 * h, nvalid = code1 - cs;
                    if (nvalid <= 0) break;
                    for (int i = 0; i < 4; i++) {
                        __m512i c = unpack_slow(rows[i], cs, nvalid < 64 ? (int)nvalid : 64, BE);
                        for (int t = 0; t < DE; t++) {
                            __m512i W = lookup(c, tab[i], t, KE);
                            if (INT8) ta.a[i] = _mm512_dpbusd_epi32(ta.a[i], W, ld512(xq + h * ccols + 64 * t));
                            else dot_f32(&ta.fa[i], &ta.fb[i], W, xf + h * ccols + 64 * t);
                        }
                    }
                }
            }
            if (INT8) {
                __m128 s = same ? _mm_set1_ps(half_to_float(w->scale[rb[0] * ncb + cb]))
                                : fp16x4(w->scale[rb[0] * ncb + cb], w->scale[rb[1] * ncb + cb],
                                         w->scale[rb[2] * ncb + cb], w->scale[rb[3] * ncb + cb]);
                VQM_MCA_BEGIN("avx512.vq_tile.finish", BE, DE, KE, 1);
                __m128i isum = hsum4_i32(fold512_i32(ta.a[0]), fold512_i32(ta.a[1]), fold512_i32(ta.a[2]),
                                         fold512_i32(ta.a[3]));
                isum = _mm_sub_epi32(isum, _mm_set1_epi32(128 * xp->xsum[cb]));
                __m128 v = _mm_mul_ps(_mm_cvtepi32_ps(isum), _mm_set1_ps(xp->xs[cb]));
                v = _mm_mul_ps(v, s);
                acc = _mm_add_ps(acc, v);
                VQM_MCA_END("avx512.vq_tile.finish", BE, DE, KE, 1);
            } else { /* the block's sums stay vectors: scaled into the rows' accumulators, reduced once per row */
                for (int i = 0; i < 4; i++)
                    racc[i] = _mm512_fmadd_ps(_mm512_add_ps(ta.fa[i], ta.fb[i]),
                                              _mm512_set1_ps(half_to_float(w->scale[rb[i] * ncb + cb])), racc[i]);
            }
        }
        if (!INT8) acc = hsum4_ps(fold512_ps(racc[0]), fold512_ps(racc[1]), fold512_ps(racc[2]), fold512_ps(racc[3]));
        float out[4];
        _mm_storeu_ps(out, acc);
        for (int i = 0; i < 4 && r + i < r1; i++) y[r + i] = bias ? out[i] + bias[r + i] : out[i];
    }
}

/* ---------------------------------------------------------------- VQ, batch > 1: one row at a time
 * The row's codes decode once per chunk and meet every activation vector of the batch. NB: the batch as a
 * compile-time constant (8, the prefill tile: the accumulators stay in registers) or 0 (any batch, in arrays).
 * int8: the batch's block sums are reduced together and finished as two 4-lane vectors in the reference's order;
 * float: the block sums fold into per-vector accumulators with one FMA by the scale, reduced once per row. */
static inline __attribute__((always_inline)) void
vq_rows(const vqm_vq_weight *w, const vqm_xprep *xp, int64_t r0, int64_t r1, const float *bias, float *y,
        const vqm_vcfg *cfg, const int BE, const int DE, const int KE, const int INT8, const int NB)
{
    const int64_t n = w->n, k = w->k, R = w->rows_per_block, C = w->cols_per_block;
    const int64_t ncb = vqm_cdiv(k, C);
    const int64_t rowbytes = vqm_vq_row_bytes(w);
    const int64_t ccols = 64 * DE;
    const int64_t nchunk = xp->blk_pad / ccols;
    const int nb = NB ? NB : (int)xp->batch;
    const size_t tsz = tab_size(cfg);
    tab_cache tc;
    tab_cache_init(&tc, tsz, ncb);
    for (int64_t r = r0; r < r1; r++) {
        const int64_t rb = r / R;
        const uint8_t *tabs = tab_cache_get(&tc, w, cfg, rb, ncb, tsz, INT8 ? 0x80 : 0);
        const uint8_t *row = w->indices + r * rowbytes;
        __m128 acc[2] = { _mm_setzero_ps(), _mm_setzero_ps() };
        __m512 racc[VQM_BATCH_TILE];
#pragma GCC unroll 8
        for (int bi = 0; bi < VQM_BATCH_TILE; bi++) racc[bi] = _mm512_setzero_ps();
        if (r + 1 < r1) _mm_prefetch((const char *)(row + rowbytes), _MM_HINT_T0);
        for (int64_t cb = 0; cb < ncb; cb++) {
            const int64_t c0 = cb * C, c1 = c0 + C < k ? c0 + C : k;
            const int64_t code0 = c0 / DE, code1 = vqm_cdiv(c1, DE);
            const int aligned = ((code0 * BE) & 7) == 0;
            const int64_t off0 = (code0 * BE) >> 3;
            const uint8_t *tab = tabs + cb * tsz;
            __m512i a[VQM_BATCH_TILE];
            __m512 fa[VQM_BATCH_TILE];
#pragma GCC unroll 8
            for (int bi = 0; bi < VQM_BATCH_TILE; bi++) { /* all of them: the compiler then sees every one set */
                a[bi] = _mm512_setzero_si512();
                fa[bi] = _mm512_setzero_ps();
            }
            for (int64_t h = 0; h < nchunk; h++) {
                const int64_t cs = code0 + 64 * h, nvalid = code1 - cs;
                if (nvalid <= 0) break;
                const uint8_t *p = row + off0 + h * 8 * BE;
                __m512i c = !aligned ? unpack_slow(row, cs, nvalid < 64 ? (int)nvalid : 64, BE)
                            : nvalid >= 64 ? unpack64(p, BE) : unpack64_tail(p, (int)nvalid, BE);
#pragma GCC unroll 4
                for (int t = 0; t < DE; t++) {
                    __m512i W = lookup(c, tab, t, KE);
                    __m512 f[4];
                    if (!INT8) {
                        f[0] = cvt_i32_ps(cvt_i8_i32(_mm512_castsi512_si128(W)));
                        f[1] = cvt_i32_ps(cvt_i8_i32(_mm512_extracti32x4_epi32(W, 1)));
                        f[2] = cvt_i32_ps(cvt_i8_i32(_mm512_extracti32x4_epi32(W, 2)));
                        f[3] = cvt_i32_ps(cvt_i8_i32(_mm512_extracti32x4_epi32(W, 3)));
                    }
#pragma GCC unroll 8
                    for (int bi = 0; bi < nb; bi++) {
                        const int64_t off = bi * xp->stride + cb * xp->blk_pad + h * ccols + 64 * t;
                        if (INT8) {
                            a[bi] = _mm512_dpbusd_epi32(a[bi], W, ld512(xp->xq + off));
                        } else {
                            const float *x = xp->xf + off;
                            __m512 v = fa[bi];
                            v = _mm512_fmadd_ps(f[0], _mm512_loadu_ps(x), v);
                            v = _mm512_fmadd_ps(f[1], _mm512_loadu_ps(x + 16), v);
                            v = _mm512_fmadd_ps(f[2], _mm512_loadu_ps(x + 32), v);
                            fa[bi] = _mm512_fmadd_ps(f[3], _mm512_loadu_ps(x + 48), v);
                        }
                    }
                }
            }
            const float s = half_to_float(w->scale[rb * ncb + cb]);
            if (INT8) {
#pragma GCC unroll 2
                for (int q = 0; q * 4 < nb; q++) { /* batch vectors 4q .. 4q + 3 in one 4-lane finish */
                    int32_t xs_i[4];
                    float xs_f[4];
                    __m256i h4[4];
#pragma GCC unroll 4
                    for (int j = 0; j < 4; j++) {
                        const int bi = 4 * q + j < nb ? 4 * q + j : nb - 1;
                        h4[j] = fold512_i32(a[bi]);
                        xs_i[j] = 128 * xp->xsum[bi * xp->nblk + cb];
                        xs_f[j] = xp->xs[bi * xp->nblk + cb];
                    }
                    __m128i isum = _mm_sub_epi32(hsum4_i32(h4[0], h4[1], h4[2], h4[3]),
                                                 _mm_loadu_si128((const __m128i *)(const void *)xs_i));
                    __m128 v = _mm_mul_ps(_mm_cvtepi32_ps(isum), _mm_loadu_ps(xs_f));
                    v = _mm_mul_ps(v, _mm_set1_ps(s));
                    acc[q] = _mm_add_ps(acc[q], v);
                }
            } else {
#pragma GCC unroll 8
                for (int bi = 0; bi < nb; bi++) racc[bi] = _mm512_fmadd_ps(fa[bi], _mm512_set1_ps(s), racc[bi]);
            }
        }
        float out[VQM_BATCH_TILE];
        if (INT8) {
            _mm_storeu_ps(out, acc[0]);
            _mm_storeu_ps(out + 4, acc[1]);
        } else {
            for (int bi = 0; bi < nb; bi++) out[bi] = hsum_ps(racc[bi]);
        }
        for (int bi = 0; bi < nb; bi++) y[bi * n + r] = bias ? out[bi] + bias[r] : out[bi];
    }
}

#define VQ_INST(BE, DE, KE)                                                                                     \
    static void vq_##BE##_##DE##_##KE(const vqm_vq_weight *w, const vqm_xprep *xp, int64_t r0, int64_t r1,     \
                                      const float *bias, float *y, const vqm_vcfg *cfg, int int8)              \
    {                                                                                                           \
        if (xp->batch == 1) {                                                                                   \
            if (int8) vq_tile4(w, xp, r0, r1, bias, y, cfg, BE, DE, KE, 1);                                     \
            else vq_tile4(w, xp, r0, r1, bias, y, cfg, BE, DE, KE, 0);                                          \
        } else if (xp->batch == VQM_BATCH_TILE) {                                                               \
            if (int8) vq_rows(w, xp, r0, r1, bias, y, cfg, BE, DE, KE, 1, VQM_BATCH_TILE);                      \
            else vq_rows(w, xp, r0, r1, bias, y, cfg, BE, DE, KE, 0, VQM_BATCH_TILE);                           \
        } else {                                                                                                \
            if (int8) vq_rows(w, xp, r0, r1, bias, y, cfg, BE, DE, KE, 1, 0);                                   \
            else vq_rows(w, xp, r0, r1, bias, y, cfg, BE, DE, KE, 0, 0);                                        \
        }                                                                                                       \
    }
VQM_VQ_SHAPES(VQ_INST)

VQM_VQ_ROWS_FN(avx512_vq_rows)

/* ---------------------------------------------------------------- int4 and int8 weights
 * The activation layout is AVX2's (chunks of 32 columns; 4-bit: even columns then odd ones, as the nibbles
 * split), so one zmm covers 64 consecutive columns: 8-bit codes are one load in column order; 4-bit codes are 32
 * bytes whose low and high nibbles, put in the order [low 0-15 | high 0-15 | low 16-31 | high 16-31], meet the
 * activations of the two 32-column chunks. vpdpbusd(q, x) sums q * x exactly; the zero point comes off per group
 * as z * sum(x). With groups of 32 a vector holds two groups: dwords 0-7 and 8-15. */
static int avx512_int_plan(const vqm_int_weight *w, int flags, vqm_layout *lay)
{
    (void)flags;
    if (w->bits != 4 && w->bits != 8) return 0;
    if (w->group % 32) return 0; /* a group must be whole 32-column chunks for the 64-column vectors */
    lay->chunk_cols = 32;
    lay->identity = w->bits == 8;
    for (int p = 0; p < 32; p++) lay->perm[p] = (int16_t)(w->bits == 4 ? (p < 16 ? 2 * p : 2 * (p - 16) + 1) : p);
    return 1;
}

/* the weights (q as unsigned bytes) of the 64 columns from column c (all inside the row) */
static inline __attribute__((always_inline)) __m512i int_codes64(const uint8_t *row, int64_t c, const int BITS)
{
    if (BITS == 8) return ld512(row + c);
    __m256i v = ld256(row + (c >> 1));
    const __m256i m = _mm256_set1_epi8(0x0f);
    __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, m)),
                                   _mm256_and_si256(_mm256_srli_epi16(v, 4), m), 1);
    return _mm512_shuffle_i64x2(z, z, 0xd8); /* [lo 0-15, hi 0-15, lo 16-31, hi 16-31] */
}

/* 64 columns from c whose last ones lie past the row's end: the existing codes (a masked load of the row's last
 * bytes, so nothing past the row is read), the rest 0 (their activations are 0 too) */
static inline __attribute__((always_inline)) __m512i int_codes64_tail(const uint8_t *row, int64_t c, int64_t k,
                                                                      const int BITS)
{
    if (BITS == 8) return load_partial(row + c, (int)(k - c));
    uint8_t tmp[32];
    _mm256_storeu_si256((__m256i *)(void *)tmp, _mm512_castsi512_si256(load_partial(row + (c >> 1), (int)((k - c + 1) >> 1))));
    return int_codes64(tmp, 0, BITS);
}

/* int32 sum of q * x over group g of one row and one activation vector, chunks of 64 columns */
static inline __attribute__((always_inline)) __m512i
int_group_acc(const vqm_int_weight *w, const vqm_xprep *xp, const uint8_t *row, int64_t g, int64_t bi, const int BITS)
{
    const int64_t k = w->k, G = w->group;
    const int64_t c0 = g * G, c1 = c0 + G < k ? c0 + G : k;
    const int8_t *xg = xp->xq + bi * xp->stride + g * xp->blk_pad;
    __m512i a = _mm512_setzero_si512();
    for (int64_t c = c0; c < c1; c += 64) {
        __m512i q = c + 64 <= k ? int_codes64(row, c, BITS) : int_codes64_tail(row, c, k, BITS);
        /* the group's activations end 32 columns into this vector when G % 64 == 32: the rest are the next group's */
        const int8_t *xc = xg + (c - c0);
        __m512i x = xp->blk_pad - (c - c0) >= 64 ? ld512(xc) : _mm512_inserti64x4(_mm512_setzero_si512(), ld256(xc), 0);
        a = _mm512_dpbusd_epi32(a, q, x);
    }
    return a;
}

/* v = ((float)(isum - z * sum(x)) * xs) * s for one group of 4 rows, lane = row */
static inline __m128 int_finish4(const vqm_int_weight *w, const vqm_xprep *xp, const int64_t rr[4], int64_t g,
                                 int64_t bi, __m128i isum, const int BITS)
{
    const int64_t ng = vqm_cdiv(w->k, w->group);
    __m128i z;
    if (w->zeros)
        z = _mm_setr_epi32(w->zeros[rr[0] * ng + g], w->zeros[rr[1] * ng + g], w->zeros[rr[2] * ng + g],
                           w->zeros[rr[3] * ng + g]);
    else
        z = _mm_set1_epi32(1 << (BITS - 1));
    isum = _mm_sub_epi32(isum, _mm_mullo_epi32(z, _mm_set1_epi32(xp->xsum[bi * xp->nblk + g])));
    __m128 s = fp16x4(w->scales[rr[0] * ng + g], w->scales[rr[1] * ng + g], w->scales[rr[2] * ng + g],
                      w->scales[rr[3] * ng + g]);
    __m128 v = _mm_mul_ps(_mm_cvtepi32_ps(isum), _mm_set1_ps(xp->xs[bi * xp->nblk + g]));
    return _mm_mul_ps(v, s);
}

/* int_finish4 for groups g..g+3 at once: u holds [rows 0-3] of group g + j in lane j; the four groups' values are
 * added to acc in group order, as the reference adds them */
static inline __m128 int_finish_g4(const vqm_int_weight *w, const vqm_xprep *xp, const int64_t rr[4], int64_t g,
                                   int64_t bi, __m512i u, __m128 acc, const int BITS)
{
    const int64_t ng = vqm_cdiv(w->k, w->group);
    const __m512i lane = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const __m512i xsum = _mm512_permutexvar_epi32(lane, _mm512_castsi128_si512(
        _mm_loadu_si128((const __m128i *)(const void *)(xp->xsum + bi * xp->nblk + g))));
    const __m512 xs = _mm512_permutexvar_ps(lane, _mm512_castps128_ps512(_mm_loadu_ps(xp->xs + bi * xp->nblk + g)));
    if (w->zeros) {
        uint32_t zr[4];
        for (int i = 0; i < 4; i++) memcpy(&zr[i], w->zeros + rr[i] * ng + g, 4);
        /* [row][group] bytes -> [group][row] */
        __m128i zt = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(const void *)zr),
                                      _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
        u = _mm512_sub_epi32(u, _mm512_mullo_epi32(cvt_u8_i32(zt), xsum));
    } else {
        u = _mm512_sub_epi32(u, _mm512_slli_epi32(xsum, BITS - 1));
    }
    uint64_t sr[4];
    for (int i = 0; i < 4; i++) memcpy(&sr[i], w->scales + rr[i] * ng + g, 8);
    const __m256i sidx = _mm256_setr_epi16(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m512 sc = cvt_ph_ps(_mm256_permutexvar_epi16(sidx, _mm256_loadu_si256((const __m256i *)(const void *)sr)));
    __m512 v = _mm512_mul_ps(cvt_i32_ps(u), xs);
    v = _mm512_mul_ps(v, sc);
    acc = _mm_add_ps(acc, _mm512_castps512_ps128(v));
    acc = _mm_add_ps(acc, _mm512_extractf32x4_ps(v, 1));
    acc = _mm_add_ps(acc, _mm512_extractf32x4_ps(v, 2));
    return _mm_add_ps(acc, _mm512_extractf32x4_ps(v, 3));
}

/* q * x summed over 128 columns of one row, one 128-bit lane per 32-column chunk (chunk j in lane j). xe/xo: the
 * chunks' activations as the codes meet them (4-bit: even columns, odd columns; 8-bit: columns 0-63, 64-127). */
static inline __attribute__((always_inline)) __m512i int_step(const uint8_t *row, int64_t c, __m512i xe, __m512i xo,
                                                              __m512i acc, const int BITS)
{
    if (BITS == 4) {
        const __m512i m = _mm512_set1_epi8(0x0f);
        __m512i v = ld512(row + (c >> 1));
        acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(v, m), xe);
        return _mm512_dpbusd_epi32(acc, _mm512_and_si512(_mm512_srli_epi16(v, 4), m), xo);
    }
    __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ld512(row + c), xe);
    __m512i q = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ld512(row + c + 64), xo);
    /* lanes of p are columns 0-15, 16-31, 32-47, 48-63: pairs make the chunks */
    return _mm512_add_epi32(acc, _mm512_add_epi32(_mm512_shuffle_i64x2(p, q, 0x88), _mm512_shuffle_i64x2(p, q, 0xdd)));
}

/* int_step over the 64 columns from c only (chunks 0 and 1 in lanes 0 and 1, lanes 2 and 3 zero): a row's last
 * columns when k % 128 == 64, as in SmolLM2's 576-wide rows, without reading past the row or the activations */
static inline __attribute__((always_inline)) __m512i int_step_half(const uint8_t *row, int64_t c, __m512i xa,
                                                                   const int BITS)
{
    const __m512i z = _mm512_setzero_si512();
    if (BITS == 4) {
        const __m512i m = _mm512_set1_epi8(0x0f);
        const __m512i v = _mm512_inserti64x4(z, ld256(row + (c >> 1)), 0);
        const __m512i acc = _mm512_dpbusd_epi32(z, _mm512_and_si512(v, m), _mm512_shuffle_i64x2(xa, z, 0x88));
        return _mm512_dpbusd_epi32(acc, _mm512_and_si512(_mm512_srli_epi16(v, 4), m), _mm512_shuffle_i64x2(xa, z, 0xdd));
    }
    const __m512i p = _mm512_dpbusd_epi32(z, ld512(row + c), xa);
    return _mm512_add_epi32(_mm512_shuffle_i64x2(p, z, 0x88), _mm512_shuffle_i64x2(p, z, 0xdd));
}

/* int8 activations: 4-row tiles, one activation vector at a time (the tile's rows stay in L1 for the next one),
 * 128 columns per step: a 64-byte load of 4-bit codes (two for 8-bit) per row, whose nibbles meet the activations
 * regrouped once per step for the four rows. Each step leaves one lane per 32-column chunk and row; one transpose
 * turns four rows' lanes into [row 0..3] per chunk, which finish per group (G = 32: four groups a step, 64: two;
 * G a multiple of 128: the rows' lanes add up over the group's steps first). With G = 32 or 64 a last 64 columns
 * (k % 128 >= 64: SmolLM2's 576) take a half step; groups still not covered take the per-group loop. */
static inline __attribute__((always_inline)) void
int_rows_i8(const vqm_int_weight *w, const vqm_xprep *xp, int64_t r0, int64_t r1, const float *bias, float *y,
            const int BITS, const int GK /* 32, 64, 128 (any multiple of 128), 0: no whole steps */)
{
    const int64_t n = w->n, k = w->k, G = w->group;
    const int64_t ng = vqm_cdiv(k, G);
    const int64_t rowbytes = vqm_int_row_bytes(w);
    const int64_t nsteps = k / 128;
    const int64_t pf_step = ((vqm_cdiv(4 * rowbytes, nsteps > 0 ? nsteps : 1) + 63) / 64) * 64;
    /* groups the 128-column steps cover whole */
    const int64_t gsteps = GK == 0 ? 0 : GK <= 64 ? nsteps * (128 / G)
                                    : (nsteps * 128) / G + ((nsteps * 128) % G && nsteps * 128 == k);
    for (int64_t r = r0; r < r1; r += 4) {
        int64_t rr[4];
        const uint8_t *rows[4];
        for (int i = 0; i < 4; i++) {
            rr[i] = r + i < r1 ? r + i : r1 - 1;
            rows[i] = w->codes + rr[i] * rowbytes;
        }
        for (int64_t bi = 0; bi < xp->batch; bi++) {
            __m128 acc = _mm_setzero_ps();
            const int8_t *xb = xp->xq + bi * xp->stride;
            int64_t g = 0, s = 0;
            __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
            while (g < gsteps) {
                VQM_MCA_BEGIN("avx512.int_tile.loop", BITS, GK, 0, 0);
                const int64_t c = 128 * s;
                if (bi == 0 && r + 8 < n) {
                    const uint8_t *pf = w->codes + (r + 8) * rowbytes + s * pf_step;
                    for (int64_t o = 0; o < pf_step; o += 64) _mm_prefetch((const char *)(pf + o), _MM_HINT_T0);
                }
                const __m512i xa = ld512(xb + c), xc = ld512(xb + c + 64);
                const __m512i xe = BITS == 4 ? _mm512_shuffle_i64x2(xa, xc, 0x88) : xa;
                const __m512i xo = BITS == 4 ? _mm512_shuffle_i64x2(xa, xc, 0xdd) : xc;
                if (GK == 128) { /* the group's steps add up first */
                    a0 = int_step(rows[0], c, xe, xo, a0, BITS);
                    a1 = int_step(rows[1], c, xe, xo, a1, BITS);
                    a2 = int_step(rows[2], c, xe, xo, a2, BITS);
                    a3 = int_step(rows[3], c, xe, xo, a3, BITS);
                    s++;
                    if (128 * s < (g + 1) * G && 128 * s < k) {
                        VQM_MCA_END("avx512.int_tile.loop", BITS, GK, 0, 0);
                        continue;
                    }
                    __m512i u = transpose4_sum(a0, a1, a2, a3);
                    u = _mm512_add_epi32(u, _mm512_shuffle_i64x2(u, u, 0x4e));
                    u = _mm512_add_epi32(u, _mm512_shuffle_i64x2(u, u, 0xb1));
                    acc = _mm_add_ps(acc, int_finish4(w, xp, rr, g, bi, _mm512_castsi512_si128(u), BITS));
                    a0 = a1 = a2 = a3 = _mm512_setzero_si512();
                    g++;
                } else {
                    const __m512i z = _mm512_setzero_si512();
                    __m512i u = transpose4_sum(int_step(rows[0], c, xe, xo, z, BITS), int_step(rows[1], c, xe, xo, z, BITS),
                                               int_step(rows[2], c, xe, xo, z, BITS), int_step(rows[3], c, xe, xo, z, BITS));
                    if (GK == 32) {
                        acc = int_finish_g4(w, xp, rr, g, bi, u, acc, BITS);
                        g += 4;
                    } else {
                        u = _mm512_add_epi32(u, _mm512_shuffle_i64x2(u, u, 0xb1));
                        acc = _mm_add_ps(acc, int_finish4(w, xp, rr, g, bi, _mm512_castsi512_si128(u), BITS));
                        acc = _mm_add_ps(acc, int_finish4(w, xp, rr, g + 1, bi, _mm512_extracti32x4_epi32(u, 2), BITS));
                        g += 2;
                    }
                    s++;
                }
                VQM_MCA_END("avx512.int_tile.loop", BITS, GK, 0, 0);
            }
            if ((GK == 32 || GK == 64) && g < ng && 128 * s + 64 <= k) { /* a last half step: its 64 columns */
                const int64_t c = 128 * s;
                const __m512i xa = ld512(xb + c);
                __m512i u = transpose4_sum(int_step_half(rows[0], c, xa, BITS), int_step_half(rows[1], c, xa, BITS),
                                           int_step_half(rows[2], c, xa, BITS), int_step_half(rows[3], c, xa, BITS));
                if (GK == 32) {
                    acc = _mm_add_ps(acc, int_finish4(w, xp, rr, g, bi, _mm512_castsi512_si128(u), BITS));
                    acc = _mm_add_ps(acc, int_finish4(w, xp, rr, g + 1, bi, _mm512_extracti32x4_epi32(u, 1), BITS));
                    g += 2;
                } else {
                    u = _mm512_add_epi32(u, _mm512_shuffle_i64x2(u, u, 0xb1));
                    acc = _mm_add_ps(acc, int_finish4(w, xp, rr, g, bi, _mm512_castsi512_si128(u), BITS));
                    g += 1;
                }
            }
            for (; g < ng; g++) { /* groups past the last whole step */
                __m512i a[4];
                for (int i = 0; i < 4; i++) a[i] = int_group_acc(w, xp, rows[i], g, bi, BITS);
                __m128i isum = hsum4_i32(fold512_i32(a[0]), fold512_i32(a[1]), fold512_i32(a[2]), fold512_i32(a[3]));
                acc = _mm_add_ps(acc, int_finish4(w, xp, rr, g, bi, isum, BITS));
            }
            float out[4];
            _mm_storeu_ps(out, acc);
            for (int i = 0; i < 4 && r + i < r1; i++) y[bi * n + r + i] = bias ? out[i] + bias[r + i] : out[i];
        }
    }
}

/* float activations, batch 1: 4-row tiles, for codes whose q - z fits a signed byte (4-bit, symmetric 8-bit). Per
 * row and group the products accumulate in a float vector that folds into the row's vector accumulator with one FMA
 * by the group scale; each row reduces once at the end (float tolerance). With G = 32 one 64-column load serves
 * two groups. */
static inline __attribute__((always_inline)) __m512i int_signed64(__m512i q, __m512i z, const int BITS)
{
    return BITS == 8 ? _mm512_xor_si512(q, _mm512_set1_epi8((char)0x80)) : _mm512_sub_epi8(q, z);
}

static inline __attribute__((always_inline)) void f32_quarters(__m512i wq, __m512 f[4])
{
    f[0] = cvt_i32_ps(cvt_i8_i32(_mm512_castsi512_si128(wq)));
    f[1] = cvt_i32_ps(cvt_i8_i32(_mm512_extracti32x4_epi32(wq, 1)));
    f[2] = cvt_i32_ps(cvt_i8_i32(_mm512_extracti32x4_epi32(wq, 2)));
    f[3] = cvt_i32_ps(cvt_i8_i32(_mm512_extracti32x4_epi32(wq, 3)));
}

static inline __attribute__((always_inline)) void
int_tile_f32(const vqm_int_weight *w, const vqm_xprep *xp, int64_t r0, int64_t r1, const float *bias, float *y,
             const int BITS)
{
    const int64_t k = w->k, G = w->group;
    const int64_t ng = vqm_cdiv(k, G);
    const int64_t rowbytes = vqm_int_row_bytes(w);
    const int64_t pf_grp = ((vqm_cdiv(4 * rowbytes, ng) + 63) / 64) * 64;
    const float *xf = xp->xf;
    for (int64_t r = r0; r < r1; r += 4) {
        int64_t rr[4];
        const uint8_t *rows[4];
        for (int i = 0; i < 4; i++) {
            rr[i] = r + i < r1 ? r + i : r1 - 1;
            rows[i] = w->codes + rr[i] * rowbytes;
        }
        __m512 ra[4] = { _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps() };
        int64_t g = 0;
        if (G == 32)
            for (; (g + 2) * 32 <= k; g += 2) { /* groups g and g + 1: quarters 0-1 and 2-3 */
                if (r + 8 < w->n) {
                    const uint8_t *pf = w->codes + (r + 8) * rowbytes + g * pf_grp;
                    for (int64_t o = 0; o < 2 * pf_grp; o += 64) _mm_prefetch((const char *)(pf + o), _MM_HINT_T0);
                }
                const float *xg = xf + g * 32;
                const __m512 x0 = _mm512_loadu_ps(xg), x1 = _mm512_loadu_ps(xg + 16);
                const __m512 x2 = _mm512_loadu_ps(xg + 32), x3 = _mm512_loadu_ps(xg + 48);
                for (int i = 0; i < 4; i++) {
                    __m512i z = _mm512_set1_epi8((char)(1 << (BITS - 1)));
                    __m512i q = int_codes64(rows[i], g * 32, BITS);
                    if (w->zeros) /* 4-bit: the two groups' zero points, each over its 32 columns */
                        z = _mm512_mask_blend_epi8(0xffffffff00000000ull, _mm512_set1_epi8((char)w->zeros[rr[i] * ng + g]),
                                                   _mm512_set1_epi8((char)w->zeros[rr[i] * ng + g + 1]));
                    __m512 f[4];
                    f32_quarters(int_signed64(q, z, BITS), f);
                    __m512 pa = _mm512_fmadd_ps(f[1], x1, _mm512_mul_ps(f[0], x0));
                    __m512 pb = _mm512_fmadd_ps(f[3], x3, _mm512_mul_ps(f[2], x2));
                    ra[i] = _mm512_fmadd_ps(pa, _mm512_set1_ps(half_to_float(w->scales[rr[i] * ng + g])), ra[i]);
                    ra[i] = _mm512_fmadd_ps(pb, _mm512_set1_ps(half_to_float(w->scales[rr[i] * ng + g + 1])), ra[i]);
                }
            }
        for (; g < ng; g++) {
            const int64_t c0 = g * G, c1 = c0 + G < k ? c0 + G : k;
            if (r + 8 < w->n) {
                const uint8_t *pf = w->codes + (r + 8) * rowbytes + g * pf_grp;
                for (int64_t o = 0; o < pf_grp; o += 64) _mm_prefetch((const char *)(pf + o), _MM_HINT_T0);
            }
            __m512 pg[4] = { _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps() };
            for (int64_t c = c0; c < c1; c += 64) {
                /* the group's activations end 32 columns into this vector when G % 64 == 32 */
                const int nx = xp->blk_pad - (c - c0) >= 64 ? 4 : 2;
                const float *xc = xf + g * xp->blk_pad + (c - c0);
                __m512 x[4];
                for (int j = 0; j < 4; j++) x[j] = j < nx ? _mm512_loadu_ps(xc + 16 * j) : _mm512_setzero_ps();
                for (int i = 0; i < 4; i++) {
                    __m512i q = c + 64 <= k ? int_codes64(rows[i], c, BITS) : int_codes64_tail(rows[i], c, k, BITS);
                    const int zi = w->zeros ? w->zeros[rr[i] * ng + g] : 1 << (BITS - 1);
                    __m512 f[4];
                    f32_quarters(int_signed64(q, _mm512_set1_epi8((char)zi), BITS), f);
                    pg[i] = _mm512_fmadd_ps(f[0], x[0], pg[i]);
                    pg[i] = _mm512_fmadd_ps(f[1], x[1], pg[i]);
                    pg[i] = _mm512_fmadd_ps(f[2], x[2], pg[i]);
                    pg[i] = _mm512_fmadd_ps(f[3], x[3], pg[i]);
                }
            }
            for (int i = 0; i < 4; i++)
                ra[i] = _mm512_fmadd_ps(pg[i], _mm512_set1_ps(half_to_float(w->scales[rr[i] * ng + g])), ra[i]);
        }
        float out[4];
        _mm_storeu_ps(out, hsum4_ps(fold512_ps(ra[0]), fold512_ps(ra[1]), fold512_ps(ra[2]), fold512_ps(ra[3])));
        for (int i = 0; i < 4 && r + i < r1; i++) y[r + i] = bias ? out[i] + bias[r + i] : out[i];
    }
}

/* float activations: one row at a time, every activation vector; q - z converted to float and FMA'd */
static inline __attribute__((always_inline)) void
int_rows_f32(const vqm_int_weight *w, const vqm_xprep *xp, int64_t r0, int64_t r1, const float *bias, float *y,
             const int BITS)
{
    const int64_t n = w->n, k = w->k, G = w->group;
    const int64_t ng = vqm_cdiv(k, G);
    const int64_t rowbytes = vqm_int_row_bytes(w);
    const int nb = (int)xp->batch;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = w->codes + r * rowbytes;
        float acc[VQM_BATCH_TILE];
        for (int bi = 0; bi < nb; bi++) acc[bi] = 0.0f;
        for (int64_t g = 0; g < ng; g++) {
            const int64_t c0 = g * G, c1 = c0 + G < k ? c0 + G : k;
            const int z = w->zeros ? w->zeros[r * ng + g] : 1 << (BITS - 1);
            const float s = half_to_float(w->scales[r * ng + g]);
            __m512 fa[VQM_BATCH_TILE], fb[VQM_BATCH_TILE];
            for (int bi = 0; bi < nb; bi++) fa[bi] = fb[bi] = _mm512_setzero_ps();
            for (int64_t c = c0; c < c1; c += 64) {
                __m512i q = c + 64 <= k ? int_codes64(row, c, BITS) : int_codes64_tail(row, c, k, BITS);
                /* q - z in [-255, 255] does not fit a byte: (q ^ 0x80) is q - 128 as a signed byte, widened to
                 * dwords, minus (z - 128) */
                q = _mm512_xor_si512(q, _mm512_set1_epi8((char)0x80));
                const __m512i zz = _mm512_set1_epi32(z - 128);
                __m512 f[4];
                f[0] = cvt_i32_ps(_mm512_sub_epi32(cvt_i8_i32(_mm512_castsi512_si128(q)), zz));
                f[1] = cvt_i32_ps(_mm512_sub_epi32(cvt_i8_i32(_mm512_extracti32x4_epi32(q, 1)), zz));
                f[2] = cvt_i32_ps(_mm512_sub_epi32(cvt_i8_i32(_mm512_extracti32x4_epi32(q, 2)), zz));
                f[3] = cvt_i32_ps(_mm512_sub_epi32(cvt_i8_i32(_mm512_extracti32x4_epi32(q, 3)), zz));
                /* the group's activations end 32 columns into this vector when G % 64 == 32 */
                const int nx = xp->blk_pad - (c - c0) >= 64 ? 4 : 2;
                for (int bi = 0; bi < nb; bi++) {
                    const float *xf = xp->xf + bi * xp->stride + g * xp->blk_pad + (c - c0);
                    __m512 a = fa[bi], b = fb[bi];
                    a = _mm512_fmadd_ps(f[0], _mm512_loadu_ps(xf), a);
                    b = _mm512_fmadd_ps(f[1], _mm512_loadu_ps(xf + 16), b);
                    if (nx == 4) {
                        a = _mm512_fmadd_ps(f[2], _mm512_loadu_ps(xf + 32), a);
                        b = _mm512_fmadd_ps(f[3], _mm512_loadu_ps(xf + 48), b);
                    }
                    fa[bi] = a; fb[bi] = b;
                }
            }
            for (int bi = 0; bi < nb; bi++) acc[bi] = acc[bi] + hsum_ps(_mm512_add_ps(fa[bi], fb[bi])) * s;
        }
        for (int bi = 0; bi < nb; bi++) y[bi * n + r] = bias ? acc[bi] + bias[r] : acc[bi];
    }
}

static void avx512_int_rows(const vqm_int_weight *w, const vqm_layout *lay, const vqm_xprep *xp, int64_t r0,
                            int64_t r1, const float *bias, float *y, int flags)
{
    (void)lay;
    if (flags & VQM_ACT_INT8) {
        const int gk = w->group == 32 ? 32 : w->group == 64 ? 64 : w->group % 128 == 0 ? 128 : 0;
#define I8(BITS, GK) if (w->bits == BITS && gk == GK) { int_rows_i8(w, xp, r0, r1, bias, y, BITS, GK); return; }
        I8(8, 32) I8(8, 64) I8(8, 128) I8(8, 0) I8(4, 32) I8(4, 64) I8(4, 128) I8(4, 0)
#undef I8
    } else if (xp->batch == 1 && (w->bits == 4 || !w->zeros)) {
        if (w->bits == 8) int_tile_f32(w, xp, r0, r1, bias, y, 8);
        else int_tile_f32(w, xp, r0, r1, bias, y, 4);
    } else {
        if (w->bits == 8) int_rows_f32(w, xp, r0, r1, bias, y, 8);
        else int_rows_f32(w, xp, r0, r1, bias, y, 4);
    }
}

/* ---------------------------------------------------------------- codebook search
 * AVX2's scheme with 16 lanes per register, two registers (32 vectors) at a time: separate multiplies and adds
 * (no FMA) keep every distance bit-identical to the reference; a strict per-lane compare in centroid order keeps
 * its first-minimum rule. */
static inline __attribute__((always_inline)) void nearest32(const float *xs, const float *ws, const float *c, int d,
                                                            int ncent, int32_t *out)
{
    __m512 x0[VQM_NEAREST_MAX_D], x1[VQM_NEAREST_MAX_D], w0[VQM_NEAREST_MAX_D], w1[VQM_NEAREST_MAX_D];
#pragma GCC unroll 8
    for (int t = 0; t < d; t++) {
        x0[t] = _mm512_loadu_ps(xs + t * 32); x1[t] = _mm512_loadu_ps(xs + t * 32 + 16);
        w0[t] = _mm512_loadu_ps(ws + t * 32); w1[t] = _mm512_loadu_ps(ws + t * 32 + 16);
    }
    __m512 b0 = _mm512_set1_ps(INFINITY), b1 = b0;
    __m512i i0 = _mm512_setzero_si512(), i1 = i0;
    for (int j = 0; j < ncent; j++) {
        __m512 s0 = _mm512_setzero_ps(), s1 = s0;
#pragma GCC unroll 8
        for (int t = 0; t < d; t++) {
            __m512 cj = _mm512_set1_ps(c[(int64_t)j * d + t]);
            __m512 e0 = _mm512_sub_ps(x0[t], cj), e1 = _mm512_sub_ps(x1[t], cj);
            s0 = _mm512_add_ps(s0, _mm512_mul_ps(w0[t], _mm512_mul_ps(e0, e0)));
            s1 = _mm512_add_ps(s1, _mm512_mul_ps(w1[t], _mm512_mul_ps(e1, e1)));
        }
        const __m512i jv = _mm512_set1_epi32(j);
        __mmask16 lt0 = _mm512_cmp_ps_mask(s0, b0, _CMP_LT_OQ), lt1 = _mm512_cmp_ps_mask(s1, b1, _CMP_LT_OQ);
        b0 = _mm512_mask_blend_ps(lt0, b0, s0); i0 = _mm512_mask_blend_epi32(lt0, i0, jv);
        b1 = _mm512_mask_blend_ps(lt1, b1, s1); i1 = _mm512_mask_blend_epi32(lt1, i1, jv);
    }
    _mm512_storeu_si512((void *)out, i0);
    _mm512_storeu_si512((void *)(out + 16), i1);
}

static void avx512_nearest(const float *x, const float *w, const float *c, int64_t m, int d, int ncent, int64_t *out)
{
    float xs[VQM_NEAREST_MAX_D * 32], ws[VQM_NEAREST_MAX_D * 32]; /* [t][lane] */
    int32_t idx[32];
    for (int64_t i0 = 0; i0 < m; i0 += 32) {
        int cnt = m - i0 < 32 ? (int)(m - i0) : 32;
        vqm_nearest_lanes(x + i0 * d, w + i0 * d, cnt, 32, d, xs, ws);
        switch (d) {
        case 1: nearest32(xs, ws, c, 1, ncent, idx); break;
        case 2: nearest32(xs, ws, c, 2, ncent, idx); break;
        case 3: nearest32(xs, ws, c, 3, ncent, idx); break;
        case 4: nearest32(xs, ws, c, 4, ncent, idx); break;
        case 5: nearest32(xs, ws, c, 5, ncent, idx); break;
        case 6: nearest32(xs, ws, c, 6, ncent, idx); break;
        case 7: nearest32(xs, ws, c, 7, ncent, idx); break;
        default: nearest32(xs, ws, c, 8, ncent, idx); break; /* d <= 8 is checked by the caller */
        }
        for (int l = 0; l < cnt; l++) out[i0 + l] = idx[l];
    }
}

const vqm_path_ops vqm_ops_avx512 = { avx512_vq_plan, avx512_vq_rows, avx512_int_plan, avx512_int_rows,
                                      avx512_nearest };

#if defined(VQM_SIMDE)
#elif defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif /* __x86_64__ */
