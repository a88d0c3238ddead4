/* Internal interfaces shared by the dispatcher and the per-ISA kernel files. */
#ifndef VQM_INTERNAL_H
#define VQM_INTERNAL_H

#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include "vqmobile.h"

#define VQM_MAX_CHUNK_COLS 256   /* 64 codes x d=4 (AVX-512) */
#define VQM_BATCH_TILE 8         /* kernels process at most 8 activations at once */

/* Portable vector code (GCC vector extensions) compiled for AVX-512, AVX2 and the baseline on x86 and picked once by
 * the loader (ifunc); arm64's baseline is NEON. Only for code every build computes alike (no path contract). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(VQM_SIMDE)
#define VQM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VQM_CLONES
#endif

/* How a path lays out one "chunk" of an activation block: chunk_cols
 * consecutive columns, permuted so that position q of the prepared buffer holds
 * column perm[q] of the chunk (perm == NULL: identity). Positions whose column
 * lies beyond the block (or beyond k) hold 0. */
typedef struct vqm_layout {
    int chunk_cols;
    int16_t perm[VQM_MAX_CHUNK_COLS];
    int identity;
} vqm_layout;

/* Activations prepared once per call (shared read-only by all threads). */
typedef struct vqm_xprep {
    int64_t batch;        /* <= VQM_BATCH_TILE */
    int64_t k;
    int64_t blk;          /* activation block (columns): C for VQ, group for int */
    int64_t nblk;         /* ceil(k / blk) */
    int64_t blk_pad;      /* blk rounded up to chunk_cols */
    int64_t stride;       /* nblk * blk_pad: per batch row */
    int8_t *xq;           /* [batch][stride]   (int8 mode) */
    float *xs;            /* [batch][nblk]     (int8 mode) */
    int32_t *xsum;        /* [batch][nblk]     (int8 mode) sum of xq over the block */
    uint8_t *xa;          /* [batch][stride]   (int8 mode) |xq| */
    float *xf;            /* [batch][stride]   (float mode) */
} vqm_xprep;

/* A path's kernels. plan() returns 1 if the path handles the configuration (and
 * fills the layout), 0 otherwise (the dispatcher then uses the reference).
 * rows() computes y[b][r] for r in [r0, r1), all b < xp->batch; y has row stride n. */
typedef struct vqm_path_ops {
    int (*vq_plan)(const vqm_vq_weight *w, int flags, vqm_layout *lay);
    void (*vq_rows)(const vqm_vq_weight *w, const vqm_layout *lay, const vqm_xprep *xp,
                    int64_t r0, int64_t r1, const float *bias, float *y, int flags);
    int (*int_plan)(const vqm_int_weight *w, int flags, vqm_layout *lay);
    void (*int_rows)(const vqm_int_weight *w, const vqm_layout *lay, const vqm_xprep *xp,
                     int64_t r0, int64_t r1, const float *bias, float *y, int flags);
    /* vqm_nearest for one problem: m vectors against one codebook (arguments checked by the caller) */
    void (*nearest)(const float *x, const float *w, const float *c, int64_t m, int d, int ncent, int64_t *out);
} vqm_path_ops;

extern const vqm_path_ops vqm_ops_ref;
#if defined(__x86_64__) || defined(_M_X64)
extern const vqm_path_ops vqm_ops_avx2;
extern const vqm_path_ops vqm_ops_avx512;
#endif
#if defined(__aarch64__)
extern const vqm_path_ops vqm_ops_neon;
extern const vqm_path_ops vqm_ops_neon_dot;
#endif

/* Region markers for the static cycle model (`vqmobile bench cost`, vqmobile/bench/cost.py). They expand to nothing
 * in every build. The model compiles the kernels to assembly with -DVQM_MCA, where each pair becomes two comment
 * lines around the instructions it measures, tagged with a name and four compile-time kernel parameters (an asm
 * statement there also keeps the compiler from moving code across it; without VQM_MCA nothing changes). */
#ifdef VQM_MCA
#define VQM_MCA_MARK(what, tag, a, b, c, d) \
    __asm__ volatile("# vqm-mca " what " " tag " %c0 %c1 %c2 %c3" ::"i"(a), "i"(b), "i"(c), "i"(d))
#else
#define VQM_MCA_MARK(what, tag, a, b, c, d) ((void)0)
#endif
#define VQM_MCA_BEGIN(tag, a, b, c, d) VQM_MCA_MARK("begin", tag, a, b, c, d)
#define VQM_MCA_END(tag, a, b, c, d) VQM_MCA_MARK("end", tag, a, b, c, d)

/* ---- helpers -------------------------------------------------------------- */
static inline int64_t vqm_cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* code j (b bits) of a little-endian bitstream; never reads past the byte that
 * holds the code's last bit. */
static inline unsigned vqm_get_code(const uint8_t *row, int64_t j, int b)
{
    int64_t bit = j * b;
    int64_t byte = bit >> 3;
    int sh = (int)(bit & 7);
    unsigned v = row[byte] >> sh;
    if (sh + b > 8) v |= (unsigned)row[byte + 1] << (8 - sh);
    return v & ((1u << b) - 1u);
}

float vqm_fp16_to_float_ref(uint16_t h);

/* Called as a VQ kernel fills the tables of row block rb: asks for the codebooks and scales of the next two row
 * blocks. They come from DRAM with the codes, but no stream the hardware prefetcher follows reaches them, so every
 * table fill stalled on its loads (AVX-512, SmolLM2 decode: 4.5 % of a token's time in perf; with one block ahead
 * 2.7 %, as 32 rows of codes stream in faster than DRAM answers under load). A hint: no effect on results, and
 * the second block is already on its way after the first call. */
static inline void vqm_prefetch_codebooks(const vqm_vq_weight *w, int64_t rb, int64_t ncb)
{
    const int64_t bytes = ncb * w->ncent * w->d;
    for (int64_t nb = rb + 1; nb <= rb + 2 && nb * w->rows_per_block < w->n; nb++) {
        const int8_t *next = w->codebook + nb * bytes;
        for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(next + o);
        __builtin_prefetch(w->scale + nb * ncb);
    }
}

/* The VQ configurations the SIMD paths decode, as they decode them: be bits per code, de components per code and
 * ke table entries. 1-D k=4 (2-bit codes) runs as a 2-D k=16 codebook over nibbles (virt: each nibble is two codes,
 * so C must be even). Returns 0 for configurations that run the reference. */
typedef struct {
    int be, de, ke, virt;
} vqm_vcfg;

static inline int vqm_vq_simd_cfg(const vqm_vq_weight *w, vqm_vcfg *c)
{
    int b = vqm_vq_index_bits(w->ncent);
    if (w->d == 1 && w->ncent == 4) {
        if (w->cols_per_block % 2) return 0;
        c->be = 4; c->de = 2; c->ke = 16; c->virt = 1;
        return 1;
    }
    if ((w->ncent != 16 && w->ncent != 64 && w->ncent != 256) || (1 << b) != w->ncent) return 0;
    if (w->d != 1 && w->d != 2 && w->d != 4) return 0;
    c->be = b; c->de = w->d; c->ke = w->ncent; c->virt = 0;
    return 1;
}

/* Every (be, de, ke) vqm_vq_simd_cfg can return: each SIMD path instantiates its VQ kernel, vq_<be>_<de>_<ke>(w, xp,
 * r0, r1, bias, y, cfg, int8), for each with X(be, de, ke), and VQM_VQ_ROWS_FN(name) then defines its
 * vqm_path_ops.vq_rows, which picks the instance. */
#define VQM_VQ_SHAPES(X) \
    X(4, 1, 16) X(4, 2, 16) X(4, 4, 16) X(6, 1, 64) X(6, 2, 64) X(6, 4, 64) X(8, 1, 256) X(8, 2, 256) X(8, 4, 256)
#define VQM_VQ_CASE_(BE, DE, KE) \
    if (c.be == BE && c.de == DE) { vq_##BE##_##DE##_##KE(w, xp, r0, r1, bias, y, &c, i8); return; }
#define VQM_VQ_ROWS_FN(name)                                                                                    \
    static void name(const vqm_vq_weight *w, const vqm_layout *lay, const vqm_xprep *xp, int64_t r0, int64_t r1, \
                     const float *bias, float *y, int flags)                                                   \
    {                                                                                                          \
        (void)lay;                                                                                             \
        vqm_vcfg c;                                                                                            \
        if (!vqm_vq_simd_cfg(w, &c)) abort();                                                                  \
        const int i8 = (flags & VQM_ACT_INT8) != 0;                                                            \
        VQM_VQ_SHAPES(VQM_VQ_CASE_)                                                                            \
        abort();                                                                                               \
    }

/* vqm_nearest's SIMD paths take `lanes` vectors at a time, component-major: xs[t * lanes + l] = x[l][t]. Lanes past
 * `cnt` get x = 0 and weight 0 (their results are dropped). */
static inline void vqm_nearest_lanes(const float *x, const float *w, int cnt, int lanes, int d, float *xs, float *ws)
{
    for (int l = 0; l < lanes; l++)
        for (int t = 0; t < d; t++) {
            xs[t * lanes + l] = l < cnt ? x[(int64_t)l * d + t] : 0.0f;
            ws[t * lanes + l] = l < cnt ? w[(int64_t)l * d + t] : 0.0f;
        }
}

/* thread pool: runs fn(ctx, i) for i in [0, ntasks) using up to nthreads
 * threads (the caller included). */
void vqm_pool_run(int nthreads, int ntasks, void (*fn)(void *ctx, int i), void *ctx);
int vqm_online_cpus(void);

#endif
