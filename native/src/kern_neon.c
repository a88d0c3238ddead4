/* aarch64 NEON kernels. This file is compiled twice: as is (baseline ARMv8-A,
 * int8 products with SMULL/SMLAL2 + SADALP) -> vqm_ops_neon, and from
 * kern_neon_dot.c with VQM_NEON_DOT (SDOT, ARMv8.2-A dotprod) -> vqm_ops_neon_dot.
 *
 * VQ decode works on chunks of 64 codes held as four 16-byte vectors:
 *  unpack : b=4 -> [low nibbles of bytes 0-15 | high nibbles | low of 16-31 | high of 16-31],
 *           b=6 -> one LD3 of 48 bytes, codes [4i | 4i+1 | 4i+2 | 4i+3] (16 each; 8 ALU ops per 64 codes),
 *           b=8 -> natural order.
 *  lookup : one table lookup per dimension: k=16 TBL (vqtbl1q_u8), k=64 vqtbl4q_u8, k=256 vqtbl4q + 3 vqtbx4q.
 *  Decoded weights stay in that permuted order; activations are permuted the
 *  same way once per call. 1-D k=4 runs as 2-D k=16 over nibbles.
 * Batch 1 with int8 activations (decoding) runs 4-row tiles inside one codebook row block: the block's tables
 * are loaded into registers straight from the codebook (LD2/LD4 de-interleave the dimensions), the four rows share
 * the activation loads, keep independent accumulators, and are finished together in one vector (lane = row).
 * VQM_MCA_BEGIN/END mark the code `vqmobile bench cost` models (empty in normal builds).
 */
#if defined(__aarch64__)
#include "internal.h"
#include <math.h>
#include <stdlib.h>

#ifdef VQM_NEON_DOT
#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+dotprod")
#define OPS_NAME vqm_ops_neon_dot
#else
#define OPS_NAME vqm_ops_neon
#endif
#include <arm_neon.h>


/* position p of a 64-code VQ chunk holds code vq_ord(be, p) */
static inline int vq_ord(int be, int p)
{
    const int q = p >> 4, i = p & 15;
    if (be == 4) return 32 * (q >> 1) + 2 * i + (q & 1);
    if (be == 6) return 4 * i + q;
    return p;
}

static int neon_vq_plan(const vqm_vq_weight *w, int flags, vqm_layout *lay)
{
    (void)flags;
    vqm_vcfg c;
    if (!vqm_vq_simd_cfg(w, &c)) return 0;
    lay->chunk_cols = 64 * c.de;
    lay->identity = c.de == 1 && c.be == 8;
    for (int t = 0; t < c.de; t++)
        for (int p = 0; p < 64; p++) lay->perm[t * 64 + p] = (int16_t)(vq_ord(c.be, p) * c.de + t);
    return 1;
}

/* tables: per dimension ke bytes (k=16: 16, k=64: 64, k=256: 256) */
static size_t tab_size(const vqm_vcfg *c) { return (size_t)c->ke * (size_t)c->de; }

/* table t holds component t of every centroid: LD2 / LD4 de-interleave 16 centroids at a time */
static void prep_tab(const vqm_vcfg *c, const int8_t *cbk, int d, uint8_t *tab)
{
    const uint8_t *cb = (const uint8_t *)cbk;
    const int ke = c->ke;
    if (c->virt) {
        for (int i = 0; i < 16; i++) {
            tab[i] = cb[i & 3];
            tab[16 + i] = cb[i >> 2];
        }
        return;
    }
    for (int i = 0; i < ke; i += 16) {
        if (d == 1) {
            vst1q_u8(tab + i, vld1q_u8(cb + i));
        } else if (d == 2) {
            uint8x16x2_t v = vld2q_u8(cb + 2 * i);
            vst1q_u8(tab + i, v.val[0]);
            vst1q_u8(tab + ke + i, v.val[1]);
        } else {
            uint8x16x4_t v = vld4q_u8(cb + 4 * i);
            for (int t = 0; t < 4; t++) vst1q_u8(tab + t * ke + i, v.val[t]);
        }
    }
}

/* ---------------------------------------------------------------- unpack */
/* 64 codes from byte p (8 * BE bytes, all inside the row), in the layout's order */
static inline __attribute__((always_inline)) void unpack64(const uint8_t *p, const int BE, uint8x16_t *c)
{
    if (BE == 4) {
        const uint8x16_t m = vdupq_n_u8(0x0f);
        uint8x16_t a = vld1q_u8(p), b = vld1q_u8(p + 16);
        c[0] = vandq_u8(a, m);
        c[1] = vshrq_n_u8(a, 4);
        c[2] = vandq_u8(b, m);
        c[3] = vshrq_n_u8(b, 4);
    } else if (BE == 6) {
        const uint8x16_t m = vdupq_n_u8(0x3f);
        uint8x16x3_t v = vld3q_u8(p);
        c[0] = vandq_u8(v.val[0], m);
        c[1] = vandq_u8(vsliq_n_u8(vshrq_n_u8(v.val[0], 6), v.val[1], 2), m);
        c[2] = vandq_u8(vsliq_n_u8(vshrq_n_u8(v.val[1], 4), v.val[2], 4), m);
        c[3] = vshrq_n_u8(v.val[2], 2);
    } else {
#pragma GCC unroll 4
        for (int q = 0; q < 4; q++) c[q] = vld1q_u8(p + 16 * q);
    }
}

/* a chunk that is partial or does not start on a byte: codes gathered one by one, missing ones 0 (their
 * activations are 0) */
static inline void unpack64_slow(const uint8_t *row, int64_t cs, int nvalid, int be, uint8x16_t *c)
{
    uint8_t tmp[64];
    for (int p = 0; p < 64; p++) {
        int j = vq_ord(be, p);
        tmp[p] = j < nvalid ? (uint8_t)vqm_get_code(row, cs + j, be) : 0;
    }
    for (int q = 0; q < 4; q++) c[q] = vld1q_u8(tmp + 16 * q);
}

/* 32-column int chunks: b=4 -> [low nibbles = even codes | high nibbles = odd codes], b=8 -> natural order */
static inline int int_ord(int bits, int p) { return bits == 4 ? (p < 16 ? 2 * p : 2 * (p - 16) + 1) : p; }

static inline void unpack4(const uint8_t *p, uint8x16_t *c)
{
    uint8x16_t v = vld1q_u8(p);
    c[0] = vandq_u8(v, vdupq_n_u8(0x0f));
    c[1] = vshrq_n_u8(v, 4);
}

static inline void unpack8(const uint8_t *p, uint8x16_t *c)
{
    c[0] = vld1q_u8(p);
    c[1] = vld1q_u8(p + 16);
}

static inline void unpack_slow(const uint8_t *row, int64_t cs, int nvalid, int bits, uint8x16_t *c)
{
    uint8_t tmp[32];
    for (int p = 0; p < 32; p++) {
        int j = int_ord(bits, p);
        tmp[p] = j < nvalid ? (uint8_t)vqm_get_code(row, cs + j, bits) : 0;
    }
    c[0] = vld1q_u8(tmp);
    c[1] = vld1q_u8(tmp + 16);
}

/* ---------------------------------------------------------------- lookup */
static inline int8x16_t lut(const uint8_t *t, uint8x16_t c, const int KE)
{
    if (KE == 16) return vreinterpretq_s8_u8(vqtbl1q_u8(vld1q_u8(t), c));
    if (KE == 64) return vreinterpretq_s8_u8(vqtbl4q_u8(vld1q_u8_x4(t), c));
    uint8x16_t r = vqtbl4q_u8(vld1q_u8_x4(t), c);
    r = vqtbx4q_u8(r, vld1q_u8_x4(t + 64), vsubq_u8(c, vdupq_n_u8(64)));
    r = vqtbx4q_u8(r, vld1q_u8_x4(t + 128), vsubq_u8(c, vdupq_n_u8(128)));
    r = vqtbx4q_u8(r, vld1q_u8_x4(t + 192), vsubq_u8(c, vdupq_n_u8(192)));
    return vreinterpretq_s8_u8(r);
}

/* ---------------------------------------------------------------- dots */
static inline int32x4_t dot_i8(int32x4_t acc, int8x16_t w, int8x16_t x)
{
#ifdef VQM_NEON_DOT
    return vdotq_s32(acc, w, x);
#else
    /* |w| <= 128, |x| <= 127: a pair of products fits int16 */
    int16x8_t p = vmull_s8(vget_low_s8(w), vget_low_s8(x));
    p = vmlal_high_s8(p, w, x);
    return vpadalq_s16(acc, p);
#endif
}

static inline float32x4_t dot_f32(float32x4_t acc, int8x16_t w, const float *x)
{
    int16x8_t lo = vmovl_s8(vget_low_s8(w)), hi = vmovl_high_s8(w);
    acc = vfmaq_f32(acc, vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))), vld1q_f32(x));
    acc = vfmaq_f32(acc, vcvtq_f32_s32(vmovl_high_s16(lo)), vld1q_f32(x + 4));
    acc = vfmaq_f32(acc, vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))), vld1q_f32(x + 8));
    acc = vfmaq_f32(acc, vcvtq_f32_s32(vmovl_high_s16(hi)), vld1q_f32(x + 12));
    return acc;
}

static inline float h2f(uint16_t h)
{
    return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(h))), 0);
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

/* Any batch and activation type, one row at a time: the row's codes decode once per chunk and meet every
 * activation vector. */
static inline __attribute__((always_inline)) void
vq_rows_impl(const vqm_vq_weight *w, const vqm_xprep *xp, int64_t r0, int64_t r1,
             const float *bias, float *y, const vqm_vcfg *cfg,
             const int BE, const int DE, const int KE, const int NB, const int INT8)
{
    const int64_t n = w->n, k = w->k, d = w->d, R = w->rows_per_block, C = w->cols_per_block;
    const int64_t ncb = vqm_cdiv(k, C);
    const int64_t rowbytes = vqm_vq_row_bytes(w);
    const int nb = NB ? NB : (int)xp->batch;
    const int64_t ccols = 64 * DE;
    const int64_t nchunk = xp->blk_pad / ccols;
    const size_t tsz = tab_size(cfg);
    uint8_t *tabs = tab_scratch(tsz * (size_t)ncb);
    if (!tabs) abort();
    int64_t cur_rb = -1;
    for (int64_t r = r0; r < r1; r++) {
        const int64_t rb = r / R;
        if (rb != cur_rb) {
            for (int64_t cb = 0; cb < ncb; cb++)
                prep_tab(cfg, w->codebook + (rb * ncb + cb) * (int64_t)w->ncent * d, (int)d, tabs + cb * tsz);
            cur_rb = rb;
            vqm_prefetch_codebooks(w, rb, ncb);
        }
        const uint8_t *row = w->indices + r * rowbytes;
        float acc[VQM_BATCH_TILE];
        for (int bi = 0; bi < nb; bi++) acc[bi] = 0.0f;
        for (int64_t cb = 0; cb < ncb; cb++) {
            const uint8_t *tab = tabs + cb * tsz;
            const float s = h2f(w->scale[rb * ncb + cb]);
            const int64_t c0 = cb * C;
            const int64_t c1 = c0 + C < k ? c0 + C : k;
            const int64_t code0 = c0 / DE, code1 = vqm_cdiv(c1, DE);
            int32x4_t iacc[VQM_BATCH_TILE];
            float32x4_t facc[VQM_BATCH_TILE];
            for (int bi = 0; bi < nb; bi++) {
                if (INT8) iacc[bi] = vdupq_n_s32(0);
                else facc[bi] = vdupq_n_f32(0.0f);
            }
            for (int64_t h = 0; h < nchunk; h++) {
                VQM_MCA_BEGIN("neon.vq_rows.loop", BE, DE, NB, INT8);
                const int64_t cs = code0 + 64 * h;
                const int64_t nvalid = code1 - cs;
                if (nvalid <= 0) break;
                uint8x16_t c[4];
                if (nvalid >= 64 && ((cs * BE) & 7) == 0) {
                    const uint8_t *p = row + ((cs * BE) >> 3);
                    __builtin_prefetch(p + 384);
                    unpack64(p, BE, c);
                } else {
                    unpack64_slow(row, cs, nvalid < 64 ? (int)nvalid : 64, BE, c);
                }
                for (int t = 0; t < DE; t++)
                    for (int q = 0; q < 4; q++) {
                        const int8x16_t wv = lut(tab + t * KE, c[q], KE);
                        const int64_t off = cb * xp->blk_pad + h * ccols + 64 * t + 16 * q;
                        for (int bi = 0; bi < nb; bi++) {
                            if (INT8) iacc[bi] = dot_i8(iacc[bi], wv, vld1q_s8(xp->xq + bi * xp->stride + off));
                            else facc[bi] = dot_f32(facc[bi], wv, xp->xf + bi * xp->stride + off);
                        }
                    }
                VQM_MCA_END("neon.vq_rows.loop", BE, DE, NB, INT8);
            }
            VQM_MCA_BEGIN("neon.vq_rows.finish", BE, DE, NB, INT8);
            for (int bi = 0; bi < nb; bi++) {
                if (INT8) {
                    float v = (float)vaddvq_s32(iacc[bi]) * xp->xs[bi * xp->nblk + cb];
                    v = v * s;
                    acc[bi] = acc[bi] + v;
                } else {
                    acc[bi] = acc[bi] + vaddvq_f32(facc[bi]) * s;
                }
            }
            VQM_MCA_END("neon.vq_rows.finish", BE, DE, NB, INT8);
        }
        for (int bi = 0; bi < nb; bi++) y[bi * n + r] = bias ? acc[bi] + bias[r] : acc[bi];
    }
}

/* ---------------------------------------------------------------- VQ, batch 1, int8: 4-row tiles
 * Used when every tile lies inside one codebook row block (R % 4 == 0, tiles start on a multiple of 4) and k <= 64
 * (k = 256 tables do not fit the registers: one row at a time reloads them for each lookup with fewer copies). */
typedef struct {
    uint8x16x4_t v[4]; /* per dimension: k=16 in v[t].val[0], k=64 in all four registers */
} vq_regtab;

/* k = 16: the tables of a block straight from the codebook (LD2 / LD4 de-interleave the dimensions) */
static inline __attribute__((always_inline)) void load_regtab(const int8_t *cbk, const int DE, vq_regtab *T)
{
    const uint8_t *cb = (const uint8_t *)cbk;
    if (DE == 1) {
        T->v[0].val[0] = vld1q_u8(cb);
    } else if (DE == 2) {
        uint8x16x2_t v = vld2q_u8(cb);
        T->v[0].val[0] = v.val[0];
        T->v[1].val[0] = v.val[1];
    } else {
        uint8x16x4_t v = vld4q_u8(cb);
#pragma GCC unroll 4
        for (int t = 0; t < 4; t++) T->v[t].val[0] = v.val[t];
    }
}

/* the weights of dimension t for the codes c: tables in registers (k <= 64) or in memory (k = 256) */
static inline __attribute__((always_inline)) int8x16_t
tile_lut(const vq_regtab *T, const uint8_t *tab, int t, uint8x16_t c, const int KE)
{
    if (KE == 16) return vreinterpretq_s8_u8(vqtbl1q_u8(T->v[t].val[0], c));
    if (KE == 64) return vreinterpretq_s8_u8(vqtbl4q_u8(T->v[t], c));
    return lut(tab + t * KE, c, KE);
}

static inline __attribute__((always_inline)) int32x4_t
tile_row(int32x4_t a, const uint8x16_t *c, const vq_regtab *T, const uint8_t *tab, const int8x16_t *X,
         const int DE, const int KE)
{
#pragma GCC unroll 4
    for (int t = 0; t < DE; t++)
#pragma GCC unroll 4
        for (int q = 0; q < 4; q++) a = dot_i8(a, tile_lut(T, tab, t, c[q], KE), X[4 * t + q]);
    return a;
}

/* the full chunks of one codebook block for NR (2 or 4) rows of a tile */
static inline __attribute__((always_inline)) void
tile_pass(const uint8_t *const *rows, int64_t off0, int64_t nfull, const int8_t *xq, const vq_regtab *T,
          const uint8_t *tab, int32x4_t *acc, const int NR, const int BE, const int DE, const int KE)
{
    int32x4_t a0 = acc[0], a1 = acc[1], a2 = NR == 4 ? acc[2] : a0, a3 = NR == 4 ? acc[3] : a0;
    for (int64_t h = 0; h < nfull; h++) {
        VQM_MCA_BEGIN("neon.vq_tile.loop", BE, DE, KE, NR);
        const int64_t off = off0 + h * 8 * BE;
        int8x16_t X[16];
#pragma GCC unroll 16
        for (int q = 0; q < 4 * DE; q++) X[q] = vld1q_s8(xq + h * 64 * DE + 16 * q);
        uint8x16_t c[4];
        unpack64(rows[0] + off, BE, c);
        a0 = tile_row(a0, c, T, tab, X, DE, KE);
        unpack64(rows[1] + off, BE, c);
        a1 = tile_row(a1, c, T, tab, X, DE, KE);
        if (NR == 4) {
            unpack64(rows[2] + off, BE, c);
            a2 = tile_row(a2, c, T, tab, X, DE, KE);
            unpack64(rows[3] + off, BE, c);
            a3 = tile_row(a3, c, T, tab, X, DE, KE);
        }
        VQM_MCA_END("neon.vq_tile.loop", BE, DE, KE, NR);
    }
    acc[0] = a0;
    acc[1] = a1;
    if (NR == 4) {
        acc[2] = a2;
        acc[3] = a3;
    }
}

static inline __attribute__((always_inline)) void
vq_tile4(const vqm_vq_weight *w, const vqm_xprep *xp, int64_t r0, int64_t r1, const float *bias, float *y,
         const vqm_vcfg *cfg, const int BE, const int DE, const int KE)
{
    const int64_t k = w->k, d = w->d, R = w->rows_per_block, C = w->cols_per_block;
    const int64_t ncb = vqm_cdiv(k, C);
    const int64_t rowbytes = vqm_vq_row_bytes(w);
    const int64_t ccols = 64 * DE;
    const int64_t nchunk = xp->blk_pad / ccols;
    const size_t tsz = tab_size(cfg);
    uint8_t *tabs = NULL;
    if (KE != 16 && !(tabs = tab_scratch(tsz * (size_t)ncb))) abort();
    const int64_t pf_blk = ((vqm_cdiv(4 * rowbytes, ncb) + 63) / 64) * 64;
    int64_t cur_rb = -1;
    for (int64_t r = r0; r < r1; r += 4) {
        const int64_t rb = r / R;
        if (KE != 16 && rb != cur_rb) {
            for (int64_t cb = 0; cb < ncb; cb++)
                prep_tab(cfg, w->codebook + (rb * ncb + cb) * (int64_t)w->ncent * d, (int)d, tabs + cb * tsz);
            cur_rb = rb;
            vqm_prefetch_codebooks(w, rb, ncb);
        }
        const uint8_t *rows[4];
        for (int i = 0; i < 4; i++) rows[i] = w->indices + (r + i < r1 ? r + i : r1 - 1) * rowbytes;
        float32x4_t acc = vdupq_n_f32(0.0f);
        for (int64_t cb = 0; cb < ncb; cb++) {
            const int64_t c0 = cb * C, c1 = c0 + C < k ? c0 + C : k;
            const int64_t code0 = c0 / DE, code1 = vqm_cdiv(c1, DE);
            const int aligned = ((code0 * BE) & 7) == 0;
            const int64_t nfull = aligned ? (code1 - code0) / 64 : 0;
            const int64_t off0 = (code0 * BE) >> 3;
            const int8_t *xq = xp->xq + cb * xp->blk_pad;
            const uint8_t *tab = KE != 16 ? tabs + cb * tsz : NULL;
            if (r + 8 < w->n) { /* stream in the tile after next: its 4 rows are contiguous */
                const uint8_t *pf = w->indices + (r + 8) * rowbytes + cb * pf_blk;
                for (int64_t o = 0; o < pf_blk; o += 64) __builtin_prefetch(pf + o);
            }
            vq_regtab T;
            VQM_MCA_BEGIN("neon.vq_tile.tables", BE, DE, KE, 0);
            if (KE == 16) load_regtab(w->codebook + (rb * ncb + cb) * (int64_t)w->ncent * d, DE, &T);
            else if (KE == 64)
                for (int t = 0; t < DE; t++) T.v[t] = vld1q_u8_x4(tab + 64 * t); /* LD1 of 4 consecutive registers */
            int32x4_t a0 = vdupq_n_s32(0), a1 = a0, a2 = a0, a3 = a0;
            VQM_MCA_END("neon.vq_tile.tables", BE, DE, KE, 0);
            int32x4_t a[4] = { a0, a1, a2, a3 };
            if (KE == 64) { /* four registers per dimension: two rows at a time keep everything in registers */
                tile_pass(rows, off0, nfull, xq, &T, tab, a, 2, BE, DE, KE);
                tile_pass(rows + 2, off0, nfull, xq, &T, tab, a + 2, 2, BE, DE, KE);
            } else {
                tile_pass(rows, off0, nfull, xq, &T, tab, a, 4, BE, DE, KE);
            }
            a0 = a[0]; a1 = a[1]; a2 = a[2]; a3 = a[3];
            for (int64_t h = nfull; h < nchunk; h++) { /* a partial chunk, or codes that do not start on a byte */
                const int64_t cs = code0 + 64 * h, nvalid = code1 - cs;
                if (nvalid <= 0) break;
                int8x16_t X[16];
                for (int q = 0; q < 4 * DE; q++) X[q] = vld1q_s8(xq + h * ccols + 16 * q);
                uint8x16_t c[4];
                const int nv = nvalid < 64 ? (int)nvalid : 64;
                unpack64_slow(rows[0], cs, nv, BE, c);
                a0 = tile_row(a0, c, &T, tab, X, DE, KE);
                unpack64_slow(rows[1], cs, nv, BE, c);
                a1 = tile_row(a1, c, &T, tab, X, DE, KE);
                unpack64_slow(rows[2], cs, nv, BE, c);
                a2 = tile_row(a2, c, &T, tab, X, DE, KE);
                unpack64_slow(rows[3], cs, nv, BE, c);
                a3 = tile_row(a3, c, &T, tab, X, DE, KE);
            }
            VQM_MCA_BEGIN("neon.vq_tile.finish", BE, DE, KE, 0);
            /* lane i = row i; then the reference's operations in its order */
            const int32x4_t isum = vpaddq_s32(vpaddq_s32(a0, a1), vpaddq_s32(a2, a3));
            float32x4_t v = vmulq_n_f32(vcvtq_f32_s32(isum), xp->xs[cb]);
            v = vmulq_n_f32(v, h2f(w->scale[rb * ncb + cb]));
            acc = vaddq_f32(acc, v);
            VQM_MCA_END("neon.vq_tile.finish", BE, DE, KE, 0);
        }
        float out[4];
        vst1q_f32(out, acc);
        for (int i = 0; i < 4 && r + i < r1; i++) y[r + i] = bias ? out[i] + bias[r + i] : out[i];
    }
}

#define VQ_INST(BE, DE, KE)                                                                         \
    static void vq_##BE##_##DE##_##KE(const vqm_vq_weight *w, const vqm_xprep *xp, int64_t r0,     \
                                      int64_t r1, const float *bias, float *y, const vqm_vcfg *cfg,    \
                                      int int8)                                                     \
    {                                                                                               \
        if (int8) {                                                                                 \
            if (KE != 256 && xp->batch == 1 && !cfg->virt && w->rows_per_block % 4 == 0 && r0 % 4 == 0) \
                vq_tile4(w, xp, r0, r1, bias, y, cfg, BE, DE, KE);                                  \
            else if (xp->batch == 1) vq_rows_impl(w, xp, r0, r1, bias, y, cfg, BE, DE, KE, 1, 1);   \
            else vq_rows_impl(w, xp, r0, r1, bias, y, cfg, BE, DE, KE, 0, 1);                       \
        } else {                                                                                    \
            if (xp->batch == 1) vq_rows_impl(w, xp, r0, r1, bias, y, cfg, BE, DE, KE, 1, 0);        \
            else vq_rows_impl(w, xp, r0, r1, bias, y, cfg, BE, DE, KE, 0, 0);                       \
        }                                                                                           \
    }
VQM_VQ_SHAPES(VQ_INST)

VQM_VQ_ROWS_FN(neon_vq_rows)

/* ---------------------------------------------------------------- int4, int8
 * 8-bit codes keep the column order. With int8 activations their products use
 * w8 = q - 128 = q ^ 0x80 (an int8: SDOT, or SMULL pairs |w8 * x| <= 2 * 128 * 127
 * that fit int16), and isum = sum(w8 * x) - (z - 128) * sum(x), exact for any zero. */
static int neon_int_plan(const vqm_int_weight *w, int flags, vqm_layout *lay)
{
    (void)flags;
    if (w->bits != 4 && w->bits != 8) return 0;
    lay->chunk_cols = 32;
    lay->identity = w->bits == 8;
    for (int p = 0; p < 32; p++) lay->perm[p] = (int16_t)int_ord(w->bits, p);
    return 1;
}

/* 32 codes from column cs (nvalid of them in the group), in the layout's order. 8-bit rows load whole
 * chunks while they lie inside the row: the codes past the group meet zero activations. */
static inline __attribute__((always_inline)) void
int_codes(const uint8_t *row, int64_t cs, int64_t nvalid, int64_t k, const int BITS, uint8x16_t *c)
{
    if (BITS == 8 && cs + 32 <= k) unpack8(row + cs, c);
    else if (BITS == 4 && nvalid >= 32 && (cs & 1) == 0) unpack4(row + (cs >> 1), c);
    else unpack_slow(row, cs, nvalid < 32 ? (int)nvalid : 32, BITS, c);
}

static inline __attribute__((always_inline)) void
int_rows_i8(const vqm_int_weight *w, const vqm_xprep *xp, int64_t r0, int64_t r1, const float *bias, float *y,
            const int BITS)
{
    const int64_t n = w->n, k = w->k, G = w->group;
    const int64_t ng = vqm_cdiv(k, G);
    const int64_t rowbytes = vqm_int_row_bytes(w);
    const int64_t nchunk = xp->blk_pad / 32;
    for (int64_t r = r0; r < r1; r += 4) {
        int64_t rr[4];
        const uint8_t *rows[4];
        for (int i = 0; i < 4; i++) {
            rr[i] = r + i < r1 ? r + i : r1 - 1;
            rows[i] = w->codes + rr[i] * rowbytes;
        }
        for (int64_t bi = 0; bi < xp->batch; bi++) {
            float32x4_t acc = vdupq_n_f32(0.0f);
            const int8_t *xqb = xp->xq + bi * xp->stride;
            for (int64_t g = 0; g < ng; g++) {
                const int64_t c0 = g * G;
                const int64_t c1 = c0 + G < k ? c0 + G : k;
                int32x4_t a[4] = { vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0) };
                for (int64_t h = 0; h < nchunk; h++) {
                    const int64_t cs = c0 + 32 * h, nvalid = c1 - cs;
                    if (nvalid <= 0) break;
                    const int8_t *xq = xqb + g * xp->blk_pad + 32 * h;
                    int8x16_t x0 = vld1q_s8(xq), x1 = vld1q_s8(xq + 16);
                    for (int i = 0; i < 4; i++) {
                        uint8x16_t c[2];
                        int_codes(rows[i], cs, nvalid, k, BITS, c);
                        __builtin_prefetch(rows[i] + ((cs * BITS) >> 3) + 384);
                        if (BITS == 8) {
                            c[0] = veorq_u8(c[0], vdupq_n_u8(0x80));
                            c[1] = veorq_u8(c[1], vdupq_n_u8(0x80));
                        }
                        a[i] = dot_i8(dot_i8(a[i], vreinterpretq_s8_u8(c[0]), x0), vreinterpretq_s8_u8(c[1]), x1);
                    }
                }
                int32x4_t isum = vpaddq_s32(vpaddq_s32(a[0], a[1]), vpaddq_s32(a[2], a[3]));
                if (BITS != 8 || w->zeros) { /* symmetric 8-bit: z = 128, nothing to subtract */
                    int32x4_t z;
                    if (w->zeros) {
                        int32_t zz[4] = { w->zeros[rr[0] * ng + g], w->zeros[rr[1] * ng + g],
                                          w->zeros[rr[2] * ng + g], w->zeros[rr[3] * ng + g] };
                        z = vld1q_s32(zz);
                    } else {
                        z = vdupq_n_s32(1 << (BITS - 1));
                    }
                    if (BITS == 8) z = vsubq_s32(z, vdupq_n_s32(128));
                    isum = vsubq_s32(isum, vmulq_n_s32(z, xp->xsum[bi * xp->nblk + g]));
                }
                uint16_t hs[4] = { w->scales[rr[0] * ng + g], w->scales[rr[1] * ng + g],
                                   w->scales[rr[2] * ng + g], w->scales[rr[3] * ng + g] };
                float32x4_t s = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(hs)));
                float32x4_t v = vmulq_n_f32(vcvtq_f32_s32(isum), xp->xs[bi * xp->nblk + g]);
                v = vmulq_f32(v, s);
                acc = vaddq_f32(acc, v);
            }
            float out[4];
            vst1q_f32(out, acc);
            for (int i = 0; i < 4 && r + i < r1; i++) y[bi * n + r + i] = bias ? out[i] + bias[r + i] : out[i];
        }
    }
}

/* G = 32 with every group whole (k % 32 == 0), int8 activations: 4-row tiles whose group body is straight-line
 * code (one activation load for the four rows, per row one code load and two dots, then the tile's group sums
 * finished together, lane = row). */
static inline __attribute__((always_inline)) void
int_g32_i8(const vqm_int_weight *w, const vqm_xprep *xp, int64_t r0, int64_t r1, const float *bias, float *y,
           const int BITS, const int ASYM)
{
    const int64_t n = w->n, ng = w->k / 32;
    const int64_t rowbytes = vqm_int_row_bytes(w);
    for (int64_t r = r0; r < r1; r += 4) {
        const uint8_t *rows[4], *zp[4];
        const uint16_t *sp[4];
        for (int i = 0; i < 4; i++) {
            const int64_t rr = r + i < r1 ? r + i : r1 - 1;
            rows[i] = w->codes + rr * rowbytes;
            sp[i] = w->scales + rr * ng;
            zp[i] = ASYM ? w->zeros + rr * ng : NULL;
        }
        for (int64_t bi = 0; bi < xp->batch; bi++) {
            const int8_t *xq = xp->xq + bi * xp->stride;
            const float *xs = xp->xs + bi * xp->nblk;
            const int32_t *xsum = xp->xsum + bi * xp->nblk;
            float32x4_t acc = vdupq_n_f32(0.0f);
            for (int64_t g = 0; g < ng; g++) {
                VQM_MCA_BEGIN("neon.int_g32.loop", BITS, ASYM, 0, 0);
                const int8x16_t x0 = vld1q_s8(xq + 32 * g), x1 = vld1q_s8(xq + 32 * g + 16);
                int32x4_t a[4];
                for (int i = 0; i < 4; i++) {
                    const uint8_t *p = rows[i] + g * 4 * BITS;
                    __builtin_prefetch(p + 384);
                    uint8x16_t c[2];
                    if (BITS == 4) {
                        unpack4(p, c);
                    } else {
                        unpack8(p, c);
                        c[0] = veorq_u8(c[0], vdupq_n_u8(0x80));
                        c[1] = veorq_u8(c[1], vdupq_n_u8(0x80));
                    }
                    a[i] = dot_i8(dot_i8(vdupq_n_s32(0), vreinterpretq_s8_u8(c[0]), x0), vreinterpretq_s8_u8(c[1]), x1);
                }
                int32x4_t isum = vpaddq_s32(vpaddq_s32(a[0], a[1]), vpaddq_s32(a[2], a[3]));
                if (ASYM) {
                    int32x4_t z = vdupq_n_s32(0);
                    z = vsetq_lane_s32(zp[0][g], z, 0);
                    z = vsetq_lane_s32(zp[1][g], z, 1);
                    z = vsetq_lane_s32(zp[2][g], z, 2);
                    z = vsetq_lane_s32(zp[3][g], z, 3);
                    if (BITS == 8) z = vsubq_s32(z, vdupq_n_s32(128));
                    isum = vmlsq_n_s32(isum, z, xsum[g]);
                } else if (BITS == 4) {
                    isum = vsubq_s32(isum, vdupq_n_s32(8 * xsum[g]));
                }
                uint16x4_t hs = vld1_dup_u16(sp[0] + g);
                hs = vld1_lane_u16(sp[1] + g, hs, 1);
                hs = vld1_lane_u16(sp[2] + g, hs, 2);
                hs = vld1_lane_u16(sp[3] + g, hs, 3);
                float32x4_t v = vmulq_n_f32(vcvtq_f32_s32(isum), xs[g]);
                v = vmulq_f32(v, vcvt_f32_f16(vreinterpret_f16_u16(hs)));
                acc = vaddq_f32(acc, v);
                VQM_MCA_END("neon.int_g32.loop", BITS, ASYM, 0, 0);
            }
            float out[4];
            vst1q_f32(out, acc);
            for (int i = 0; i < 4 && r + i < r1; i++) y[bi * n + r + i] = bias ? out[i] + bias[r + i] : out[i];
        }
    }
}

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
            const int zz = w->zeros ? w->zeros[r * ng + g] : 1 << (BITS - 1);
            const float s = h2f(w->scales[r * ng + g]);
            float32x4_t facc[VQM_BATCH_TILE];
            for (int bi = 0; bi < nb; bi++) facc[bi] = vdupq_n_f32(0.0f);
            for (int64_t h = 0; h < nchunk; h++) {
                const int64_t cs = c0 + 32 * h, nvalid = c1 - cs;
                if (nvalid <= 0) break;
                uint8x16_t c[2];
                int_codes(row, cs, nvalid, k, BITS, c);
                for (int half = 0; half < 2; half++) {
                    /* q - z in int16 (|q - z| <= 255) */
                    int16x8_t lo = vsubq_s16(vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(c[half]))), vdupq_n_s16((int16_t)zz));
                    int16x8_t hi = vsubq_s16(vreinterpretq_s16_u16(vmovl_high_u8(c[half])), vdupq_n_s16((int16_t)zz));
                    float32x4_t f0 = vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))), f1 = vcvtq_f32_s32(vmovl_high_s16(lo));
                    float32x4_t f2 = vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))), f3 = vcvtq_f32_s32(vmovl_high_s16(hi));
                    for (int bi = 0; bi < nb; bi++) {
                        const float *xf = xp->xf + bi * xp->stride + g * xp->blk_pad + 32 * h + 16 * half;
                        float32x4_t a = facc[bi];
                        a = vfmaq_f32(a, f0, vld1q_f32(xf));
                        a = vfmaq_f32(a, f1, vld1q_f32(xf + 4));
                        a = vfmaq_f32(a, f2, vld1q_f32(xf + 8));
                        a = vfmaq_f32(a, f3, vld1q_f32(xf + 12));
                        facc[bi] = a;
                    }
                }
            }
            for (int bi = 0; bi < nb; bi++) acc[bi] = acc[bi] + vaddvq_f32(facc[bi]) * s;
        }
        for (int bi = 0; bi < nb; bi++) y[bi * n + r] = bias ? acc[bi] + bias[r] : acc[bi];
    }
}

static void neon_int_rows(const vqm_int_weight *w, const vqm_layout *lay, const vqm_xprep *xp,
                          int64_t r0, int64_t r1, const float *bias, float *y, int flags)
{
    (void)lay;
    if ((flags & VQM_ACT_INT8) && w->group == 32 && w->k % 32 == 0) {
        if (w->bits == 8 && w->zeros) int_g32_i8(w, xp, r0, r1, bias, y, 8, 1);
        else if (w->bits == 8) int_g32_i8(w, xp, r0, r1, bias, y, 8, 0);
        else if (w->zeros) int_g32_i8(w, xp, r0, r1, bias, y, 4, 1);
        else int_g32_i8(w, xp, r0, r1, bias, y, 4, 0);
        return;
    }
    if (w->bits == 8) {
        if (flags & VQM_ACT_INT8) int_rows_i8(w, xp, r0, r1, bias, y, 8);
        else int_rows_f32(w, xp, r0, r1, bias, y, 8);
    } else {
        if (flags & VQM_ACT_INT8) int_rows_i8(w, xp, r0, r1, bias, y, 4);
        else int_rows_f32(w, xp, r0, r1, bias, y, 4);
    }
}

/* Lanes are vectors, 8 at a time (two registers, two independent compare/select chains); the loop runs over the
 * centroids in order. Separate multiplies and adds (no FMA) keep every distance bit-identical to the reference, and
 * a strict per-lane compare in centroid order keeps its first-minimum rule. d is a compile-time constant in every
 * case so that the component loop unrolls. */
static inline __attribute__((always_inline)) void nearest8(const float *xs, const float *ws, const float *c, int d,
                                                           int ncent, uint32_t *out)
{
    float32x4_t x0[VQM_NEAREST_MAX_D], x1[VQM_NEAREST_MAX_D], w0[VQM_NEAREST_MAX_D], w1[VQM_NEAREST_MAX_D];
#pragma GCC unroll 8
    for (int t = 0; t < d; t++) {
        x0[t] = vld1q_f32(xs + t * 8); x1[t] = vld1q_f32(xs + t * 8 + 4);
        w0[t] = vld1q_f32(ws + t * 8); w1[t] = vld1q_f32(ws + t * 8 + 4);
    }
    float32x4_t b0 = vdupq_n_f32(INFINITY), b1 = b0;
    uint32x4_t i0 = vdupq_n_u32(0), i1 = i0;
    for (int j = 0; j < ncent; j++) {
        float32x4_t s0 = vdupq_n_f32(0.0f), s1 = s0;
#pragma GCC unroll 8
        for (int t = 0; t < d; t++) {
            float32x4_t cj = vld1q_dup_f32(c + (int64_t)j * d + t);
            float32x4_t e0 = vsubq_f32(x0[t], cj), e1 = vsubq_f32(x1[t], cj);
            s0 = vaddq_f32(s0, vmulq_f32(w0[t], vmulq_f32(e0, e0)));
            s1 = vaddq_f32(s1, vmulq_f32(w1[t], vmulq_f32(e1, e1)));
        }
        uint32x4_t jv = vdupq_n_u32((uint32_t)j);
        uint32x4_t lt0 = vcltq_f32(s0, b0), lt1 = vcltq_f32(s1, b1);
        b0 = vbslq_f32(lt0, s0, b0); i0 = vbslq_u32(lt0, jv, i0);
        b1 = vbslq_f32(lt1, s1, b1); i1 = vbslq_u32(lt1, jv, i1);
    }
    vst1q_u32(out, i0);
    vst1q_u32(out + 4, i1);
}

static void neon_nearest(const float *x, const float *w, const float *c, int64_t m, int d, int ncent, int64_t *out)
{
    float xs[VQM_NEAREST_MAX_D * 8], ws[VQM_NEAREST_MAX_D * 8]; /* [t][lane] */
    uint32_t idx[8];
    for (int64_t i0 = 0; i0 < m; i0 += 8) {
        int cnt = m - i0 < 8 ? (int)(m - i0) : 8;
        vqm_nearest_lanes(x + i0 * d, w + i0 * d, cnt, 8, d, xs, ws);
        switch (d) {
        case 1: nearest8(xs, ws, c, 1, ncent, idx); break;
        case 2: nearest8(xs, ws, c, 2, ncent, idx); break;
        case 3: nearest8(xs, ws, c, 3, ncent, idx); break;
        case 4: nearest8(xs, ws, c, 4, ncent, idx); break;
        case 5: nearest8(xs, ws, c, 5, ncent, idx); break;
        case 6: nearest8(xs, ws, c, 6, ncent, idx); break;
        case 7: nearest8(xs, ws, c, 7, ncent, idx); break;
        default: nearest8(xs, ws, c, 8, ncent, idx); break; /* d <= 8 is checked by the caller */
        }
        for (int l = 0; l < cnt; l++) out[i0 + l] = idx[l];
    }
}

const vqm_path_ops OPS_NAME = { neon_vq_plan, neon_vq_rows, neon_int_plan, neon_int_rows, neon_nearest };

#ifdef VQM_NEON_DOT
#pragma GCC pop_options
#endif
#endif /* __aarch64__ */
