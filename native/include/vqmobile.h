/*
 * vqmobile native kernels: y = W x + b for vector-quantized (GPTVQ) and
 * group-wise integer weights, batch 1..N (optimised for <= 8).
 *
 * Formats are documented in native/README.md. All arrays are C-contiguous;
 * scales are IEEE fp16 stored as uint16_t bits.
 *
 * Thread safety: the linear functions may be called concurrently from
 * several threads only when threads == 1 (they then run on the caller).
 * Calls that use the internal pool serialise on it.
 */
#ifndef VQMOBILE_H
#define VQMOBILE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- error codes ------------------------------------------------------ */
#define VQM_OK 0
#define VQM_EINVAL -1     /* bad argument (null pointer, bad shape, unsupported parameter) */
#define VQM_EINDEX -2     /* an index is >= k (validation only) */
#define VQM_ENOMEM -3     /* allocation failed */
#define VQM_EPATH -4      /* requested path not available on this CPU */

/* ---- implementation paths --------------------------------------------- */
#define VQM_PATH_AUTO -1
#define VQM_PATH_REF 0        /* portable C reference */
#define VQM_PATH_AVX2 1       /* x86-64 AVX2 + FMA + F16C */
#define VQM_PATH_AVX512 2     /* x86-64 AVX-512 F/BW/VL/VBMI/VNNI (+ the AVX2 set) */
#define VQM_PATH_NEON 3       /* aarch64 NEON without dotprod */
#define VQM_PATH_NEON_DOT 4   /* aarch64 NEON with SDOT (ARMv8.2 dotprod) */
#define VQM_NPATHS 5

/* flags for the linear functions */
#define VQM_ACT_INT8 1        /* quantize activations to int8 per block, integer dot products */

/* Vector-quantized weight, W is n x k.
 *  d: vector dimension, ncent: number of centroids (2..256),
 *  bits = ceil(log2(ncent)) bits per index,
 *  indices : uint8 [n, ceil(ceil(k/d) * bits / 8)]   little-endian bitstream per row
 *  codebook: int8  [ceil(n/rows_per_block), ceil(k/cols_per_block), ncent, d]
 *  scale   : fp16  [ceil(n/rows_per_block), ceil(k/cols_per_block)]
 *  W[r, j*d+t] = codebook[r/R, (j*d)/C, idx[r, j], t] * scale[r/R, (j*d)/C]
 */
typedef struct vqm_vq_weight {
    int32_t n, k;
    int32_t d, ncent;
    int32_t rows_per_block, cols_per_block;
    const uint8_t *indices;
    const int8_t *codebook;
    const uint16_t *scale;
} vqm_vq_weight;

/* Group-wise integer weight, W is n x k.
 *  codes : uint8 [n, ceil(k * bits / 8)]  little-endian bitstream per row
 *  scales: fp16  [n, ceil(k / group)]
 *  zeros : uint8 [n, ceil(k / group)] or NULL (symmetric: zero = 2^(bits-1))
 *  W[r, c] = (q[r, c] - zero[r, c/group]) * scale[r, c/group]
 */
typedef struct vqm_int_weight {
    int32_t n, k;
    int32_t bits, group;
    const uint8_t *codes;
    const uint16_t *scales;
    const uint8_t *zeros;
} vqm_int_weight;

/* Bits per index for ncent centroids (ceil(log2(ncent))), or -1 if invalid. */
int vqm_vq_index_bits(int ncent);
/* Bytes per row of the indices / codes arrays. */
int64_t vqm_vq_row_bytes(const vqm_vq_weight *w);
int64_t vqm_int_row_bytes(const vqm_int_weight *w);

/* Validation (run once when a checkpoint is loaded): parameters and, for the VQ
 * format, that every index is < ncent. Returns VQM_OK, VQM_EINVAL or VQM_EINDEX;
 * on VQM_EINDEX *bad_row / *bad_pos (if non-null) receive the first offending
 * row and vector position. */
int vqm_vq_validate(const vqm_vq_weight *w, int64_t *bad_row, int64_t *bad_pos);
int vqm_int_validate(const vqm_int_weight *w);

/* y[b, :] = W x[b, :] + bias, for b in [0, batch).
 *  x: float32 [batch, k], y: float32 [batch, n], bias: float32 [n] or NULL.
 *  flags: 0 (float activations) or VQM_ACT_INT8.
 *  threads: <= 0 uses the global setting (vqm_set_num_threads), 1 runs on the caller.
 * Checks parameters (cheap) but not index values: validate once beforehand. */
int vqm_vq_linear(const vqm_vq_weight *w, const float *x, int64_t batch,
                  const float *bias, float *y, int flags, int threads);
int vqm_int_linear(const vqm_int_weight *w, const float *x, int64_t batch,
                   const float *bias, float *y, int flags, int threads);

/* Same, forcing an implementation path (VQM_PATH_*; AUTO = current selection).
 * Returns VQM_EPATH if that path is not available on this CPU. A path that has
 * no specialised kernel for a configuration falls back to the reference. */
int vqm_vq_linear_path(int path, const vqm_vq_weight *w, const float *x, int64_t batch,
                       const float *bias, float *y, int flags, int threads);
int vqm_int_linear_path(int path, const vqm_int_weight *w, const float *x, int64_t batch,
                        const float *bias, float *y, int flags, int threads);

/* Whether the path's SIMD kernel handles this configuration (else reference). */
int vqm_vq_path_has_kernel(int path, const vqm_vq_weight *w);
int vqm_int_path_has_kernel(int path, const vqm_int_weight *w);

/* ---- codebook search (GPTVQ's assignment step, used when quantizing) ------ */
/* For each of nb independent problems p and each of its m vectors i:
 *   out[p, i] = argmin_j  sum_{t=0..d-1} w[p, i, t] * (x[p, i, t] - c[p, j, t])^2
 * the terms added in order of t starting from 0.0f, the lowest j among equal
 * minima, and 0 when no distance is below +inf (e.g. NaN input).
 *  x, w: float32 [nb, m, d];  c: float32 [nb, ncent, d];  out: int64 [nb, m].
 *  d in 1..8, ncent in 1..65536 (VPTQ's codebooks reach 2^16); threads as for
 *  the linear functions.
 * Every path computes each distance with the reference's float operations in
 * the reference's order, so all paths return identical indices. */
int vqm_nearest(const float *x, const float *w, const float *c, int64_t nb, int64_t m,
                int d, int ncent, int64_t *out, int threads);
int vqm_nearest_path(int path, const float *x, const float *w, const float *c, int64_t nb,
                     int64_t m, int d, int ncent, int64_t *out, int threads);
#define VQM_NEAREST_MAX_D 8
#define VQM_NEAREST_MAX_CENT 65536

/* ---- attention over a static KV cache (the exported decoders' layout) ------- */
/* out[hq, i, :] = softmax_j(scale * q[hq, i, :] . K[h, :, j]) . V[h, j, :] over the positions j the query at
 * position p = pos + i sees: lo..p, lo = max(0, p - window + 1) when window > 0, else 0. h = hq / (heads /
 * kv_heads) (grouped-query attention).
 *  q: float32 [t, heads, d] (a projection's output, its heads side by side);  k_cache: float32 [kv_heads, d,
 *  max_seq] (keys transposed);  v_cache: float32 [kv_heads, max_seq, d];  out: float32 [t, heads, d], the input
 *  of the output projection as it is.
 * Returns VQM_EINVAL for bad shapes or pos + t > max_seq. Plain C (no per-ISA variant); threads as for the linear
 * functions, split over (kv head, query) pairs. */
int vqm_attention(const float *q, const float *k_cache, const float *v_cache, int heads, int kv_heads, int t, int d,
                  int max_seq, int64_t pos, float scale, int window, float *out, int threads);
/* The same over a float16 cache (IEEE binary16 bits, same layouts): half the bytes a long context reads per token.
 * Every cached value is widened to float exactly; the arithmetic after that is vqm_attention's. */
int vqm_attention_f16(const float *q, const uint16_t *k_cache, const uint16_t *v_cache, int heads, int kv_heads, int t,
                      int d, int max_seq, int64_t pos, float scale, int window, float *out, int threads);
/* The new keys and values k, v: float32 [t, kv_heads, d] (the projections' layout), written into the caches above at
 * positions pos .. pos+t-1: float32 caches (f16 = 0) take them as they are, float16 ones (f16 = 1, IEEE binary16
 * bits) rounded to nearest even. Returns VQM_EINVAL for bad shapes or pos + t > max_seq. */
int vqm_kv_write(const float *k, const float *v, void *k_cache, void *v_cache, int f16, int kv_heads, int t, int d,
                 int max_seq, int64_t pos);

/* ---- RMSNorm, RoPE, SiLU-gated product (the exported decoders' steps between linears and attention) ---- */
/* out[r, :] = (x[r, :] * inv_r) * (offset + w), inv_r = 1 / sqrt(sum_c x[r, c]^2 / d + eps), for rows r of d values
 * (offset 0: Llama's norm; 1: Gemma's, whose weight is stored minus one). Returns VQM_EINVAL for bad arguments. */
int vqm_rms_norm(const float *x, const float *w, int64_t rows, int64_t d, float eps, float offset, float *out);
/* sum = x + residual (elementwise, rows x d), out = vqm_rms_norm of sum: a residual connection and the next norm in
 * one pass. sum and out must not be the same buffer. */
int vqm_add_rms_norm(const float *x, const float *residual, const float *w, int64_t rows, int64_t d, float eps,
                     float offset, float *sum, float *out);
/* Rotary position embedding, rotate-half convention, of x [t, heads, d] (a linear's output: heads side by side) into
 * out of the same layout: for each head and position i, feature j < rot / 2 becomes x_j cos_ij - x_{j + rot/2} sin_ij,
 * feature rot / 2 <= j < rot becomes x_j cos_ij + x_{j - rot/2} sin_ij, features j >= rot are copied; cos, sin:
 * [t, rot], rot even and <= d. Each value is rounded as PyTorch's x * cos + rotate_half(x) * sin rounds it. */
int vqm_rope(const float *x, const float *cos, const float *sin, int64_t t, int64_t heads, int64_t d, int64_t rot,
             float *out);
/* out[r, j] = silu(x[r, j]) * x[r, n + j], silu(g) = g * sigmoid(g): rows of [gate | up] (n values each) as a stacked
 * gate/up projection writes them, out [rows, n]. */
int vqm_silu_mul(const float *x, int64_t rows, int64_t n, float *out);

/* ---- dispatch ----------------------------------------------------------- */
int vqm_path_available(int path);
int vqm_get_path(void);                 /* currently selected path */
int vqm_set_path(int path);             /* VQM_PATH_AUTO restores the best available */
/* The path the environment variable VQMOBILE_PATH forces, in *path (VQM_PATH_AUTO when unset or "auto"); returns
 * VQM_OK, VQM_EINVAL for an unknown name or VQM_EPATH for a path this CPU lacks. The selection ignores an unusable
 * value (it takes the best path): programs report it to the user. */
int vqm_path_from_env(int *path);
const char *vqm_path_name(int path);    /* "ref", "avx2", "avx512", "neon", "neon_dot" */

/* ---- threads ------------------------------------------------------------ */
void vqm_set_num_threads(int n);        /* <= 0: number of online CPUs */
int vqm_get_num_threads(void);

/* ---- utilities ------------------------------------------------------------ */
/* Streaming read of a buffer split over threads; returns a checksum (so the
 * read cannot be optimised away). Used to measure memory bandwidth. */
uint64_t vqm_stream_read(const void *buf, size_t bytes, int threads);
/* Activation quantization used by VQM_ACT_INT8 (exposed for tests):
 * for each block [c0, c0+blk) of x[0..k): amax = max|x|, xs = amax/127,
 * q = round_half_even(x * (127/amax)) clamped to [-127, 127] (all 0 if amax == 0). */
void vqm_quantize_act(const float *x, int64_t k, int64_t blk, int8_t *q, float *xs);
/* fp16 bits -> float (reference conversion) */
float vqm_fp16_to_float(uint16_t h);


/* ---- QuIP#: random Hadamard transforms, E8P lattice-codebook weights ------ */
/* One block of the orthonormal random Hadamard transform, for each of `batch`
 * rows of n = m * p floats (x and y may be the same array):
 *   flags 0:                 y = H (s * x)
 *   flags VQM_HAD_TRANSPOSE: y = s * (H^T x)
 * with H = (H_m (x) H_p) / sqrt(m p) on the [m, p] view of a row: H_p Sylvester
 * (p a power of two, 1..65536), H_m = had (int8 +-1, [m, m], row-major; m in
 * 1..VQM_HAD_MAX_M; may be NULL when m == 1), s_j = -1 where bit j of signs
 * (LSB first, ceil(n/8) bytes) is set.
 * Defined operation order (every path is bit-identical): signs (flags 0);
 * per row of the [m, p] view the fast Walsh-Hadamard butterflies for
 * h = 1, 2, .., p/2: (a, b) -> (a + b, a - b); then per column j
 * acc = 0.0f; for l = 0..m-1: acc = H_m[i][l] > 0 ? acc + v[l][j] : acc - v[l][j]
 * (H_m^T with the transpose flag); then y = v * (float)(1 / sqrt(m p));
 * signs (VQM_HAD_TRANSPOSE). Runs on the calling thread. */
#define VQM_HAD_TRANSPOSE 1
#define VQM_HAD_MAX_M 256
int vqm_hadamard(const float *x, float *y, int64_t batch, int m, int p, const int8_t *had,
                 const uint8_t *signs, int flags);
int vqm_hadamard_path(int path, const float *x, float *y, int64_t batch, int m, int p,
                      const int8_t *had, const uint8_t *signs, int flags);

/* E8P weight (QuIP#, format in native/README.md), W is n x k, V = ceil(k/8)
 * codes per row, bits = 2, 3 or 4 byte planes per row:
 *  codes : uint8 [n, bits, V]: plane 0 abs index a, plane 1 sign byte b
 *          (bits 4: planes 2, 3 a second E8P stage; bits 3: plane 2 an E81B index)
 *  scales: float [stages] (1 for bits 2, else 2)
 *  E8P w4[t] = sgn(b', t) * A4[a][t] + sigma(b): sigma = +1 / -1 for even / odd
 *  popcount(b), b' = b with bit 0 flipped when popcount(b) is odd, sgn = -1
 *  where bit t of b' is set; A4 and the E81B table (x2) from vqm_e8p_tables.
 *  W[r, c] = sum over stages s of scales[s] * w_s[r, c].
 * int8 activations are quantized per block of VQM_E8P_ACT_BLOCK columns; per
 * block and stage isum is exact, then v = (float)isum * xs; v = v * scale;
 * acc = acc + v (blocks in order, stages in order), y = acc + bias. */
#define VQM_E8P_ACT_BLOCK 256
typedef struct vqm_e8p_weight {
    int32_t n, k;
    int32_t bits;
    const uint8_t *codes;
    const float *scales;
} vqm_e8p_weight;
int vqm_e8p_linear(const vqm_e8p_weight *w, const float *x, int64_t batch, const float *bias, float *y,
                   int flags, int threads);
int vqm_e8p_linear_path(int path, const vqm_e8p_weight *w, const float *x, int64_t batch,
                        const float *bias, float *y, int flags, int threads);
/* 1 if the path has a SIMD kernel for this weight (else the reference runs). */
int vqm_e8p_path_has_kernel(int path, const vqm_e8p_weight *w);
/* The decode tables: abs4 int8 [256][8] (A4) and e81 int8 [256][8] (2x E81B). */
void vqm_e8p_tables(int8_t *abs4, int8_t *e81);

/* ---- column-vector VQ (VPTQ) ----------------------------------------------- */
/* W is n x k. Stored column c is input column perm[c]; a vector is v consecutive
 * rows of one stored column, decoded as an axpy into v outputs:
 *   W[j*v+t, perm[c]] = col_scale[c] * (codebook[g(c), idx[j, c], t] * scale[g(c)]
 *                            + res_codebook[g(c), ridx[j, c], t] * res_scale[g(c)])
 * for rows j*v+t < n. Codebook groups g(c): stored columns [0, outlier_cols)
 * are group 0 when outlier_cols > 0, the rest form groups of cols_per_group.
 *  indices     : uint8 [ceil(n/v), ceil(k * b / 8)], b = ceil(log2 ncent) <= 16,
 *                one little-endian bitstream per vector row (code c = column c)
 *  codebook    : int8  [G, ncent, v];  scale: fp16 [G]
 *  res_*       : the same for the residual stage (res_ncent 0: none, pointers ignored)
 *  col_scale   : fp16 [k];  perm: int16 [k], a permutation of 0..k-1
 * Semantics (native/README.md): x'[c] = x[perm[c]] * col_scale[c]; each group is
 * cut into activation blocks of VQM_CVQ_ACT_BLOCK stored columns (int8 mode:
 * x' quantized per block, integer block sums per stage). */
typedef struct vqm_cvq_weight {
    int32_t n, k;
    int32_t v, ncent, res_ncent;
    int32_t outlier_cols, cols_per_group;
    const uint8_t *indices;
    const int8_t *codebook;
    const uint16_t *scale;
    const uint8_t *res_indices;
    const int8_t *res_codebook;
    const uint16_t *res_scale;
    const uint16_t *col_scale;
    const int16_t *perm;
} vqm_cvq_weight;
#define VQM_CVQ_MAX_V 8
#define VQM_CVQ_MAX_CENT 65536
#define VQM_CVQ_MAX_K 32768
#define VQM_CVQ_ACT_BLOCK 256

/* Number of codebook groups G, or -1 if the parameters are invalid. */
int vqm_cvq_groups(const vqm_cvq_weight *w);
/* Bytes per vector row of the (residual = 1: residual) index array. */
int64_t vqm_cvq_row_bytes(const vqm_cvq_weight *w, int residual);
/* Parameters, every index < ncent (and < res_ncent) and perm a permutation.
 * VQM_OK, VQM_EINVAL or VQM_EINDEX (*bad_row / *bad_col: first bad index; a bad
 * perm reports row -1 and its position). The kernels clamp indices and perm
 * entries, so even unvalidated data never reads outside its arrays. */
int vqm_cvq_validate(const vqm_cvq_weight *w, int64_t *bad_row, int64_t *bad_col);
/* y[b, :] = W x[b, :] + bias, as vqm_vq_linear. */
int vqm_cvq_linear(const vqm_cvq_weight *w, const float *x, int64_t batch,
                   const float *bias, float *y, int flags, int threads);
int vqm_cvq_linear_path(int path, const vqm_cvq_weight *w, const float *x, int64_t batch,
                        const float *bias, float *y, int flags, int threads);
int vqm_cvq_path_has_kernel(int path, const vqm_cvq_weight *w);

#ifdef __cplusplus
}
#endif
#endif
