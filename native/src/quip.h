/* Internal interfaces of the QuIP# kernel families (hadamard*.c, e8p*.c): the
 * decode tables, the prepared activations and each path's kernels. */
#ifndef VQM_QUIP_H
#define VQM_QUIP_H

#include "internal.h"

#define VQM_E8P_CHUNK 32 /* codes per SIMD chunk: 256 columns = one int8 activation block */

/* Decode tables, built once (vqm_e8p_init). */
typedef struct {
    int8_t abs4[256][8];   /* A4: 4 |v|, coordinate 7 negated when sum |v| is odd */
    int8_t e81[256][8];    /* 2x the E81B points */
    uint32_t lv[256];      /* SIMD form of A4: level L_t (|A4| = 4 L + 2) in bits 2t..2t+1, bit 16: A4[7] < 0 */
    float fabs4[256][8];   /* A4 as floats */
    uint32_t fsgn[256][8]; /* sign byte -> float sign-bit masks of sgn(b', t) */
    float fsigma[256];     /* sign byte -> sigma */
    float fe81[256][8];    /* E81B x2 as floats */
} vqm_e8p_tab;
const vqm_e8p_tab *vqm_e8p_init(void);

/* Activations prepared once per call for up to VQM_BATCH_TILE rows, in
 * chunks of `chunk` codes (the path's choice, 32 or 64; 32 when it wants
 * natural order only). Per row:
 *  int8 mode: q [kpad] natural column order; qp [kpad] and nq [kpad] (= -qp)
 *             in chunk order (when the path asks for it: within each chunk,
 *             position t * chunk + c holds column 8 c + t); xs [nblk];
 *             x8 [nchunk * chunk] int16: the sum of each code's 8 quantized activations.
 *  float mode: xf [kpad] natural order; f8 [nchunk * chunk]: each code's sum of x.
 * kpad = nchunk * chunk * 8; columns >= k (and codes past the row) are 0. */
typedef struct {
    int64_t batch, k, ncodes, nchunk, chunk, kpad, nblk;
    int8_t *q, *qp, *nq;
    int16_t *x8;
    float *xs, *xf, *f8;
} vqm_e8p_xprep;

/* A path's E8P kernels. */
typedef struct {
    /* 1 if the path runs this weight (else the reference does); *chunk = the codes per chunk of the chunk-ordered
     * activations it reads (qp, nq), 0 if it reads natural order only */
    int (*plan)(const vqm_e8p_weight *w, int flags, int *chunk);
    void (*rows)(const vqm_e8p_weight *w, const vqm_e8p_tab *tab, const vqm_e8p_xprep *xp, int64_t r0, int64_t r1,
                 const float *bias, float *y, int flags);
} vqm_e8p_ops;

/* A path's Hadamard kernel: rows of n = m p floats in place (input signs already applied): the butterflies, the H_m
 * mix (H_m^T with transpose), the scale. tmp holds n floats. Returns 0 if the path does not handle this (m, p); the
 * reference then runs. */
typedef struct {
    int (*rows)(float *v, int64_t batch, int m, int p, const int8_t *had, int transpose, float scale, float *tmp);
} vqm_had_ops;

extern const vqm_e8p_ops vqm_e8p_ref;
extern const vqm_had_ops vqm_had_ref;
#if defined(__x86_64__) || defined(_M_X64)
extern const vqm_e8p_ops vqm_e8p_avx2;
extern const vqm_e8p_ops vqm_e8p_avx512;
extern const vqm_had_ops vqm_had_avx2;
extern const vqm_had_ops vqm_had_avx512;
#endif
#if defined(__aarch64__)
extern const vqm_e8p_ops vqm_e8p_neon;
extern const vqm_e8p_ops vqm_e8p_neon_dot;
extern const vqm_had_ops vqm_had_neon;
#endif

/* The plane of stage s (0 or 1) of row r: bits planes of ncodes bytes each. */
static inline const uint8_t *vqm_e8p_plane(const vqm_e8p_weight *w, int64_t ncodes, int64_t r, int plane)
{
    return w->codes + (r * w->bits + plane) * ncodes;
}

static inline int vqm_parity8(unsigned b)
{
    b ^= b >> 4;
    b ^= b >> 2;
    b ^= b >> 1;
    return (int)(b & 1u);
}

#endif
