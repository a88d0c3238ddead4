/* Column-vector VQ (VPTQ) public API: parameter checks, validation, the
 * activations prepared once per call (permutation, column scales, int8 blocks),
 * the dispatch to a path's row kernel and the multi-threaded split over vector
 * rows. */
#include "cvq_internal.h"
#include <stdlib.h>

static int cvq_check(const vqm_cvq_weight *w)
{
    if (!w || !w->indices || !w->codebook || !w->scale || !w->col_scale || !w->perm) return VQM_EINVAL;
    if (w->n < 1 || w->k < 1 || w->k > VQM_CVQ_MAX_K) return VQM_EINVAL;
    if (w->v < 1 || w->v > VQM_CVQ_MAX_V) return VQM_EINVAL;
    if (w->ncent < 2 || w->ncent > VQM_CVQ_MAX_CENT) return VQM_EINVAL;
    if (w->res_ncent && (w->res_ncent < 2 || w->res_ncent > VQM_CVQ_MAX_CENT || !w->res_indices ||
                         !w->res_codebook || !w->res_scale))
        return VQM_EINVAL;
    if (w->res_ncent < 0 || w->outlier_cols < 0 || w->outlier_cols >= w->k || w->cols_per_group < 1)
        return VQM_EINVAL;
    return VQM_OK;
}

int vqm_cvq_groups(const vqm_cvq_weight *w)
{
    if (cvq_check(w)) return -1;
    return (w->outlier_cols > 0) + (int)vqm_cdiv(w->k - w->outlier_cols, w->cols_per_group);
}

int64_t vqm_cvq_row_bytes(const vqm_cvq_weight *w, int residual)
{
    if (cvq_check(w) || (residual && !w->res_ncent)) return -1;
    return vqm_cdiv((int64_t)w->k * vqm_cvq_bits(residual ? w->res_ncent : w->ncent), 8);
}

static int64_t first_bad_code(const uint8_t *idx, int64_t rows, int64_t k, int ncent, int64_t *bad_col)
{
    const int b = vqm_cvq_bits(ncent);
    if ((1 << b) == ncent) return -1; /* every b-bit code is < 2^b = ncent */
    const int64_t rowbytes = vqm_cdiv(k * b, 8);
    for (int64_t j = 0; j < rows; j++)
        for (int64_t c = 0; c < k; c++)
            if ((int)vqm_cvq_code(idx + j * rowbytes, c, b) >= ncent) {
                *bad_col = c;
                return j;
            }
    return -1;
}

int vqm_cvq_validate(const vqm_cvq_weight *w, int64_t *bad_row, int64_t *bad_col)
{
    int rc = cvq_check(w);
    if (rc) return rc;
    int64_t row = -1, col = -1;
    const int64_t nv = vqm_cdiv(w->n, w->v);
    uint8_t *seen = calloc((size_t)w->k, 1);
    if (!seen) return VQM_ENOMEM;
    for (int64_t c = 0; c < w->k && col < 0; c++) {
        int p = w->perm[c];
        if (p < 0 || p >= w->k || seen[p]) col = c;
        else seen[p] = 1;
    }
    free(seen);
    if (col < 0 && (row = first_bad_code(w->indices, nv, w->k, w->ncent, &col)) < 0 && w->res_ncent)
        row = first_bad_code(w->res_indices, nv, w->k, w->res_ncent, &col);
    if (col < 0) return VQM_OK;
    if (bad_row) *bad_row = row;
    if (bad_col) *bad_col = col;
    return VQM_EINDEX;
}

/* ---------------------------------------------------------------- activations */
typedef struct {
    cvq_prep p;
    void *mem;
} cvq_call;

static size_t a64(size_t v) { return (v + 63) & ~(size_t)63; }

/* end (exclusive) of codebook group g, which starts at stored column `start` */
static int64_t group_end(const vqm_cvq_weight *w, int g, int64_t start)
{
    int64_t e = (w->outlier_cols && g == 0) ? w->outlier_cols : start + w->cols_per_group;
    return e < w->k ? e : w->k;
}

/* The block structure (independent of x) and the prepared activations of rows [0, batch) of x; with `tables` (the
 * AVX-512 kernel) also the codebooks' component tables and each block's sum of q. */
static int cvq_prepare(const vqm_cvq_weight *w, const float *x, int64_t batch, int flags, int tables, cvq_call *call)
{
    const int64_t k = w->k;
    const int ng = vqm_cvq_groups(w);
    /* blocks: every group cut into VQM_CVQ_ACT_BLOCK columns */
    int nblk = 0;
    for (int64_t g = 0, c = 0; g < ng; c = group_end(w, (int)g, c), g++)
        nblk += (int)vqm_cdiv(group_end(w, (int)g, c) - c, VQM_CVQ_ACT_BLOCK);
    const int int8 = (flags & VQM_ACT_INT8) != 0;
    const int64_t npairs_max = k / 2 + nblk, nquads_max = k / 4 + nblk;
    size_t off_c0 = 0, off_grp = off_c0 + a64(sizeof(int32_t) * (size_t)(nblk + 1));
    size_t off_poff = off_grp + a64(sizeof(int32_t) * (size_t)nblk);
    size_t off_qoff = off_poff + a64(sizeof(int32_t) * (size_t)(nblk + 1));
    size_t off_gs = off_qoff + a64(sizeof(int32_t) * (size_t)(nblk + 1));
    size_t off_rs = off_gs + a64(sizeof(float) * (size_t)ng);
    size_t off_xf = off_rs + a64(sizeof(float) * (size_t)ng);
    size_t off_xq = off_xf + a64(sizeof(float) * (size_t)(batch * k));
    size_t off_xp2 = off_xq + (int8 ? a64((size_t)(batch * k)) : 0);
    size_t off_xquad = off_xp2 + (int8 ? a64(sizeof(int32_t) * (size_t)(batch * npairs_max)) : 0);
    size_t off_xs = off_xquad + (int8 ? a64((size_t)(16 * batch * nquads_max)) : 0);
    size_t off_qsum = off_xs + (int8 ? a64(sizeof(float) * (size_t)(batch * nblk)) : 0);
    size_t off_tab = off_qsum + (tables ? a64(sizeof(int32_t) * (size_t)(batch * nblk)) : 0);
    size_t off_rtab = off_tab + (tables ? a64((size_t)ng * (size_t)w->v * (size_t)vqm_cvq_tab_stride(w->ncent)) : 0);
    size_t total = off_rtab + (tables && w->res_ncent
                                   ? a64((size_t)ng * (size_t)w->v * (size_t)vqm_cvq_tab_stride(w->res_ncent)) : 0);
    uint8_t *mem = aligned_alloc(64, total);
    if (!mem) return VQM_ENOMEM;
    int32_t *c0 = (int32_t *)(void *)(mem + off_c0), *grp = (int32_t *)(void *)(mem + off_grp);
    int32_t *poff = (int32_t *)(void *)(mem + off_poff), *qoff = (int32_t *)(void *)(mem + off_qoff);
    float *gs = (float *)(void *)(mem + off_gs), *rs = (float *)(void *)(mem + off_rs);
    float *xf = (float *)(void *)(mem + off_xf);
    int8_t *xq = int8 ? (int8_t *)(mem + off_xq) : NULL;
    int32_t *xp2 = int8 ? (int32_t *)(void *)(mem + off_xp2) : NULL;
    int8_t *xquad = int8 ? (int8_t *)(mem + off_xquad) : NULL;
    float *xs = int8 ? (float *)(void *)(mem + off_xs) : NULL;
    int32_t *qsum = tables ? (int32_t *)(void *)(mem + off_qsum) : NULL;

    int bi = 0;
    int64_t pairs = 0, quads = 0;
    for (int64_t g = 0, c = 0; g < ng; c = group_end(w, (int)g, c), g++) {
        const int64_t e = group_end(w, (int)g, c);
        for (int64_t s0 = c; s0 < e; s0 += VQM_CVQ_ACT_BLOCK, bi++) {
            c0[bi] = (int32_t)s0;
            grp[bi] = (int32_t)g;
            poff[bi] = (int32_t)pairs;
            qoff[bi] = (int32_t)quads;
            pairs += vqm_cdiv((s0 + VQM_CVQ_ACT_BLOCK < e ? s0 + VQM_CVQ_ACT_BLOCK : e) - s0, 2);
            quads += vqm_cdiv((s0 + VQM_CVQ_ACT_BLOCK < e ? s0 + VQM_CVQ_ACT_BLOCK : e) - s0, 4);
        }
        gs[g] = vqm_fp16_to_float(w->scale[g]);
        rs[g] = w->res_ncent ? vqm_fp16_to_float(w->res_scale[g]) : 0.0f;
    }
    c0[nblk] = (int32_t)k;
    poff[nblk] = (int32_t)pairs;
    qoff[nblk] = (int32_t)quads;

    for (int64_t b = 0; b < batch; b++) {
        const float *xr = x + b * k;
        float *dst = xf + b * k;
        for (int64_t cc = 0; cc < k; cc++) {
            int pi = w->perm[cc];
            if (pi < 0) pi = 0; /* an unvalidated perm never reads outside x */
            if (pi >= k) pi = (int)k - 1;
            dst[cc] = xr[pi] * vqm_fp16_to_float(w->col_scale[cc]);
        }
        if (!int8) continue;
        for (int blk = 0; blk < nblk; blk++) {
            const int64_t s = c0[blk], len = c0[blk + 1] - s;
            int8_t *q = xq + b * k + s;
            vqm_quantize_act(dst + s, len, len, q, &xs[b * nblk + blk]);
            if (qsum) {
                int32_t sum = 0;
                for (int64_t i = 0; i < len; i++) sum += q[i];
                qsum[b * nblk + blk] = sum;
            }
            int32_t *pp = xp2 + b * pairs + poff[blk];
            for (int64_t i = 0; i < len; i += 2) {
                uint32_t lo = (uint16_t)(int16_t)q[i], hi = i + 1 < len ? (uint16_t)(int16_t)q[i + 1] : 0u;
                pp[i / 2] = (int32_t)(lo | (hi << 16));
            }
            int8_t *qq = xquad + 16 * (b * quads + qoff[blk]);
            for (int64_t i = 0; i < len; i += 4)
                for (int r = 0; r < 4; r++)
                    for (int u = 0; u < 4; u++) qq[4 * i + 4 * r + u] = i + u < len ? q[i + u] : 0;
        }
    }
    uint8_t *tab = NULL, *rtab = NULL;
#if defined(__x86_64__) || defined(_M_X64)
    if (tables) {
        tab = mem + off_tab;
        vqm_cvq_build_tables(w->codebook, ng, w->ncent, w->v, tab);
        if (w->res_ncent) {
            rtab = mem + off_rtab;
            vqm_cvq_build_tables(w->res_codebook, ng, w->res_ncent, w->v, rtab);
        }
    }
#endif
    call->mem = mem;
    call->p = (cvq_prep){ batch, k, nblk, c0, grp, poff, pairs, xf, xq, xp2, qoff, quads, xquad, xs, gs,
                          w->res_ncent ? rs : NULL, qsum, tab, rtab };
    return VQM_OK;
}

/* ---------------------------------------------------------------- dispatch */
static cvq_rows_fn rows_of(int path, const vqm_cvq_weight *w, int flags)
{
#if defined(__x86_64__) || defined(_M_X64)
    /* AVX-512 looks the codebooks up in registers (cvq_avx512.c) where their codes are 4 or 8 bits wide and the
     * activations int8; otherwise it runs the AVX2 kernel, which an AVX-512 CPU has (the SIMDe test build, which
     * emulates AVX-512 on any x86-64 CPU, checks it). */
    if (path == VQM_PATH_AVX512 && (flags & VQM_ACT_INT8) && vqm_cvq_avx512_fits(w)) return vqm_cvq_rows_avx512;
    if (path == VQM_PATH_AVX2 || (path == VQM_PATH_AVX512 && vqm_path_available(VQM_PATH_AVX2)))
        return vqm_cvq_rows_avx2;
#endif
#if defined(__aarch64__)
    if (path == VQM_PATH_NEON || path == VQM_PATH_NEON_DOT) return vqm_cvq_rows_neon;
#endif
    (void)path, (void)w, (void)flags;
    return vqm_cvq_rows_ref;
}

int vqm_cvq_path_has_kernel(int path, const vqm_cvq_weight *w)
{
    if (cvq_check(w) || !vqm_path_available(path)) return 0;
    return rows_of(path, w, VQM_ACT_INT8) != vqm_cvq_rows_ref;
}

#define CVQ_UNIT 4 /* vector rows per unit of the thread split */

typedef struct {
    cvq_rows_fn fn;
    const vqm_cvq_weight *w;
    const cvq_prep *p;
    const float *bias;
    float *y;
    int flags, ntasks;
    int64_t nv;
} cvq_split;

static void cvq_task(void *vctx, int i)
{
    const cvq_split *s = vctx;
    int64_t units = vqm_cdiv(s->nv, CVQ_UNIT);
    int64_t j0 = units * i / s->ntasks * CVQ_UNIT, j1 = units * (i + 1) / s->ntasks * CVQ_UNIT;
    if (j1 > s->nv) j1 = s->nv;
    if (j0 < j1) s->fn(s->w, s->p, j0, j1, s->bias, s->y, s->flags);
}

int vqm_cvq_linear_path(int path, const vqm_cvq_weight *w, const float *x, int64_t batch, const float *bias,
                        float *y, int flags, int threads)
{
    int rc = cvq_check(w);
    if (rc) return rc;
    if (!x || !y || batch < 0 || (flags & ~VQM_ACT_INT8)) return VQM_EINVAL;
    if (path == VQM_PATH_AUTO) path = vqm_get_path();
    if (!vqm_path_available(path)) return VQM_EPATH;
    if (batch == 0) return VQM_OK;
    const cvq_rows_fn fn = rows_of(path, w, flags);
    const int64_t nv = vqm_cdiv(w->n, w->v), units = vqm_cdiv(nv, CVQ_UNIT);
    if (threads <= 0) threads = vqm_get_num_threads();
    if (threads > 64) threads = 64;
    if (units < threads) threads = (int)units;
    for (int64_t b0 = 0; b0 < batch; b0 += VQM_BATCH_TILE) {
        const int64_t nb = batch - b0 < VQM_BATCH_TILE ? batch - b0 : VQM_BATCH_TILE;
        cvq_call call;
#if defined(__x86_64__) || defined(_M_X64)
        const int tables = fn == vqm_cvq_rows_avx512;
#else
        const int tables = 0;
#endif
        rc = cvq_prepare(w, x + b0 * w->k, nb, flags, tables, &call);
        if (rc) return rc;
        const int ntasks = threads == 1 ? 1 : (int)(units < 4 * threads ? units : 4 * threads);
        cvq_split s = { fn, w, &call.p, bias, y + b0 * w->n, flags, ntasks, nv };
        vqm_pool_run(threads, ntasks, cvq_task, &s);
        free(call.mem);
    }
    return VQM_OK;
}

int vqm_cvq_linear(const vqm_cvq_weight *w, const float *x, int64_t batch, const float *bias, float *y, int flags,
                   int threads)
{
    return vqm_cvq_linear_path(VQM_PATH_AUTO, w, x, batch, bias, y, flags, threads);
}
