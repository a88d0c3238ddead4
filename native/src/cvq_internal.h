/* Internal interfaces of the column-vector VQ (VPTQ) kernels: the activations
 * prepared once per call (cvq.c) and the per-path row kernels (cvq_ref.c,
 * cvq_avx2.c, cvq_neon.c). The format and the semantics are in vqmobile.h and
 * native/README.md. */
#ifndef VQM_CVQ_INTERNAL_H
#define VQM_CVQ_INTERNAL_H

#include "internal.h"

/* Activations prepared once per call for at most VQM_BATCH_TILE rows of x,
 * shared read-only by all threads. Activation block b covers stored columns
 * [c0[b], c0[b+1]) of codebook group grp[b]. */
typedef struct cvq_prep {
    int64_t batch, k;
    int nblk;
    const int32_t *c0;       /* [nblk + 1] */
    const int32_t *grp;      /* [nblk] */
    const int32_t *poff;     /* [nblk + 1] first column pair of each block in xp2 */
    int64_t npairs;          /* pairs per batch row */
    const float *xf;         /* [batch][k] x'[c] = x[perm[c]] * col_scale[c] (float mode) */
    const int8_t *xq;        /* [batch][k] x' quantized per block (int8 mode) */
    const int32_t *xp2;      /* [batch][npairs] (int8 mode) block-relative column pairs (q[c], q[c+1]) as two
                              * int16 in one int32, low half first; an odd block's last pair has 0 on top */
    const int32_t *qoff;     /* [nblk + 1] first column quad of each block in xquad */
    int64_t nquads;          /* quads per batch row */
    const int8_t *xquad;     /* [batch][nquads][16] (int8 mode) block-relative column quads (q[c..c+3]) repeated
                              * four times; columns past the block are 0 */
    const float *xs;         /* [batch][nblk] block scales (int8 mode) */
    const float *gscale;     /* [G] codebook scales, decoded */
    const float *rscale;     /* [G] residual codebook scales, or NULL */
    const int32_t *qsum;     /* [batch][nblk] sum of each block's q (int8 mode, AVX-512 kernel), else NULL */
    const uint8_t *tab;      /* [G][v][stride] codebook tables (AVX-512 kernel, vqm_cvq_build_tables), else NULL */
    const uint8_t *rtab;     /* the residual codebooks' tables, or NULL */
} cvq_prep;

/* y[bi * n + r] for the rows r of vector rows [j0, j1), bi < p->batch. */
typedef void (*cvq_rows_fn)(const vqm_cvq_weight *w, const cvq_prep *p, int64_t j0, int64_t j1,
                            const float *bias, float *y, int flags);

void vqm_cvq_rows_ref(const vqm_cvq_weight *w, const cvq_prep *p, int64_t j0, int64_t j1, const float *bias,
                      float *y, int flags);
#if defined(__x86_64__) || defined(_M_X64)
void vqm_cvq_rows_avx2(const vqm_cvq_weight *w, const cvq_prep *p, int64_t j0, int64_t j1, const float *bias,
                       float *y, int flags);
/* int8 activations, codebooks of b = 4 or 8 bits per code (vqm_cvq_avx512_fits), tables built by
 * vqm_cvq_build_tables */
void vqm_cvq_rows_avx512(const vqm_cvq_weight *w, const cvq_prep *p, int64_t j0, int64_t j1, const float *bias,
                         float *y, int flags);
int vqm_cvq_avx512_fits(const vqm_cvq_weight *w);
void vqm_cvq_build_tables(const int8_t *cb, int groups, int ncent, int v, uint8_t *tab);
#endif
#if defined(__aarch64__)
void vqm_cvq_rows_neon(const vqm_cvq_weight *w, const cvq_prep *p, int64_t j0, int64_t j1, const float *bias,
                       float *y, int flags);
#endif

/* b-bit code c (b <= 16) of a little-endian bitstream; reads only the bytes that hold its bits. */
static inline unsigned vqm_cvq_code(const uint8_t *row, int64_t c, int b)
{
    int64_t bit = c * b;
    const uint8_t *p = row + (bit >> 3);
    int sh = (int)(bit & 7);
    unsigned v = (unsigned)p[0] >> sh;
    if (sh + b > 8) v |= (unsigned)p[1] << (8 - sh);
    if (sh + b > 16) v |= (unsigned)p[2] << (16 - sh);
    return v & ((1u << b) - 1u);
}

/* codes [c0, c0 + cnt) of a row, clamped to kmax (only reachable for unvalidated data) */
static inline void vqm_cvq_codes_scalar(const uint8_t *row, int64_t c0, int cnt, int b, unsigned kmax, uint32_t *out)
{
    for (int i = 0; i < cnt; i++) {
        unsigned v = vqm_cvq_code(row, c0 + i, b);
        out[i] = v > kmax ? kmax : v;
    }
}

/* ceil(log2(ncent)), at least 1 */
static inline int vqm_cvq_bits(int ncent)
{
    int b = 1;
    while ((1 << b) < ncent) b++;
    return b;
}

/* bytes per component table of the AVX-512 kernel: 256 entries (b = 8) or one 64-byte register (b = 4) */
static inline int vqm_cvq_tab_stride(int ncent) { return vqm_cvq_bits(ncent) == 8 ? 256 : 64; }

#endif
