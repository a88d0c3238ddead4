/* Portable reference kernels. These define the semantics every SIMD path must
 * reproduce: exactly in int8-activation mode (same integer block sums, same
 * float operation order), within a documented tolerance in float mode. */
#include "internal.h"
#include <math.h>

float vqm_fp16_to_float_ref(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do { e++; man <<= 1; } while ((man & 0x400u) == 0);
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

float vqm_fp16_to_float(uint16_t h) { return vqm_fp16_to_float_ref(h); }

static int ref_vq_plan(const vqm_vq_weight *w, int flags, vqm_layout *lay)
{
    (void)w; (void)flags;
    lay->chunk_cols = 1;
    lay->identity = 1;
    lay->perm[0] = 0;
    return 1;
}

static void ref_vq_rows(const vqm_vq_weight *w, const vqm_layout *lay, const vqm_xprep *xp,
                        int64_t r0, int64_t r1, const float *bias, float *y, int flags)
{
    (void)lay;
    const int64_t n = w->n, k = w->k, d = w->d, R = w->rows_per_block, C = w->cols_per_block;
    const int b = vqm_vq_index_bits(w->ncent);
    const unsigned kmax = (unsigned)w->ncent - 1u;
    const int64_t ncb = vqm_cdiv(k, C);
    const int64_t rowbytes = vqm_vq_row_bytes(w);
    const int64_t nb = xp->batch;
    for (int64_t r = r0; r < r1; r++) {
        const int64_t rb = r / R;
        const uint8_t *row = w->indices + r * rowbytes;
        float acc[VQM_BATCH_TILE];
        for (int64_t bi = 0; bi < nb; bi++) acc[bi] = 0.0f;
        for (int64_t cb = 0; cb < ncb; cb++) {
            const int64_t c0 = cb * C;
            const int64_t c1 = c0 + C < k ? c0 + C : k;
            const int8_t *cbk = w->codebook + (rb * ncb + cb) * (int64_t)w->ncent * d;
            const float s = vqm_fp16_to_float_ref(w->scale[rb * ncb + cb]);
            const int64_t j0 = c0 / d, j1 = vqm_cdiv(c1, d);
            for (int64_t bi = 0; bi < nb; bi++) {
                if (flags & VQM_ACT_INT8) {
                    const int8_t *xq = xp->xq + bi * xp->stride + cb * xp->blk_pad;
                    int32_t isum = 0;
                    for (int64_t j = j0; j < j1; j++) {
                        unsigned idx = vqm_get_code(row, j, b);
                        if (idx > kmax) idx = kmax; /* only reachable for unvalidated data */
                        for (int64_t t = 0; t < d; t++) {
                            int64_t col = j * d + t;
                            if (col < c1) isum += (int32_t)cbk[idx * d + t] * (int32_t)xq[col - c0];
                        }
                    }
                    float v = (float)isum * xp->xs[bi * xp->nblk + cb];
                    v = v * s;
                    acc[bi] = acc[bi] + v;
                } else {
                    const float *xf = xp->xf + bi * xp->stride + cb * xp->blk_pad;
                    float bs = 0.0f;
                    for (int64_t j = j0; j < j1; j++) {
                        unsigned idx = vqm_get_code(row, j, b);
                        if (idx > kmax) idx = kmax;
                        for (int64_t t = 0; t < d; t++) {
                            int64_t col = j * d + t;
                            if (col < c1) bs += (float)cbk[idx * d + t] * xf[col - c0];
                        }
                    }
                    acc[bi] = acc[bi] + bs * s;
                }
            }
        }
        for (int64_t bi = 0; bi < nb; bi++) y[bi * n + r] = bias ? acc[bi] + bias[r] : acc[bi];
    }
}

static int ref_int_plan(const vqm_int_weight *w, int flags, vqm_layout *lay)
{
    (void)w; (void)flags;
    lay->chunk_cols = 1;
    lay->identity = 1;
    lay->perm[0] = 0;
    return 1;
}

static void ref_int_rows(const vqm_int_weight *w, const vqm_layout *lay, const vqm_xprep *xp,
                         int64_t r0, int64_t r1, const float *bias, float *y, int flags)
{
    (void)lay;
    const int64_t n = w->n, k = w->k, G = w->group;
    const int b = w->bits;
    const int64_t ng = vqm_cdiv(k, G);
    const int64_t rowbytes = vqm_int_row_bytes(w);
    const int64_t nb = xp->batch;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = w->codes + r * rowbytes;
        float acc[VQM_BATCH_TILE];
        for (int64_t bi = 0; bi < nb; bi++) acc[bi] = 0.0f;
        for (int64_t g = 0; g < ng; g++) {
            const int64_t c0 = g * G;
            const int64_t c1 = c0 + G < k ? c0 + G : k;
            const int32_t z = w->zeros ? (int32_t)w->zeros[r * ng + g] : (int32_t)(1 << (b - 1));
            const float s = vqm_fp16_to_float_ref(w->scales[r * ng + g]);
            for (int64_t bi = 0; bi < nb; bi++) {
                if (flags & VQM_ACT_INT8) {
                    const int8_t *xq = xp->xq + bi * xp->stride + g * xp->blk_pad;
                    int32_t isum = 0;
                    for (int64_t c = c0; c < c1; c++)
                        isum += ((int32_t)vqm_get_code(row, c, b) - z) * (int32_t)xq[c - c0];
                    float v = (float)isum * xp->xs[bi * xp->nblk + g];
                    v = v * s;
                    acc[bi] = acc[bi] + v;
                } else {
                    const float *xf = xp->xf + bi * xp->stride + g * xp->blk_pad;
                    float gs = 0.0f;
                    for (int64_t c = c0; c < c1; c++)
                        gs += (float)((int32_t)vqm_get_code(row, c, b) - z) * xf[c - c0];
                    acc[bi] = acc[bi] + gs * s;
                }
            }
        }
        for (int64_t bi = 0; bi < nb; bi++) y[bi * n + r] = bias ? acc[bi] + bias[r] : acc[bi];
    }
}

static void ref_nearest(const float *x, const float *w, const float *c, int64_t m, int d, int ncent, int64_t *out)
{
    for (int64_t i = 0; i < m; i++) {
        const float *xi = x + i * d, *wi = w + i * d;
        float best = INFINITY;
        int64_t bj = 0;
        for (int j = 0; j < ncent; j++) {
            const float *cj = c + (int64_t)j * d;
            float s = 0.0f;
            for (int t = 0; t < d; t++) {
                float df = xi[t] - cj[t];
                s = s + wi[t] * (df * df);
            }
            if (s < best) { best = s; bj = j; }
        }
        out[i] = bj;
    }
}

const vqm_path_ops vqm_ops_ref = { ref_vq_plan, ref_vq_rows, ref_int_plan, ref_int_rows, ref_nearest };
