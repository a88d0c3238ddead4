/* Portable reference kernel of the column-vector VQ (VPTQ) format. It defines the
 * semantics every SIMD path reproduces: bit for bit with int8 activations (the
 * same exact integer block sums, then the same float operations in the same
 * order), within FLOAT_TOL with float activations. */
#include "cvq_internal.h"

void vqm_cvq_rows_ref(const vqm_cvq_weight *w, const cvq_prep *p, int64_t j0, int64_t j1, const float *bias,
                      float *y, int flags)
{
    const int v = w->v, res = w->res_ncent > 0;
    const int b = vqm_cvq_bits(w->ncent), rb = res ? vqm_cvq_bits(w->res_ncent) : 0;
    const unsigned kmax = (unsigned)w->ncent - 1u, rkmax = res ? (unsigned)w->res_ncent - 1u : 0u;
    const int64_t n = w->n, k = w->k, nb = p->batch;
    const int64_t rowbytes = vqm_cdiv(k * b, 8), rrowbytes = vqm_cdiv(k * rb, 8);
    const int int8 = (flags & VQM_ACT_INT8) != 0;
    for (int64_t j = j0; j < j1; j++) {
        const uint8_t *row = w->indices + j * rowbytes;
        const uint8_t *rrow = res ? w->res_indices + j * rrowbytes : NULL;
        float acc[VQM_BATCH_TILE][VQM_CVQ_MAX_V];
        for (int64_t bi = 0; bi < nb; bi++)
            for (int t = 0; t < v; t++) acc[bi][t] = 0.0f;
        for (int blk = 0; blk < p->nblk; blk++) {
            const int64_t c0 = p->c0[blk], c1 = p->c0[blk + 1];
            const int g = p->grp[blk];
            const int8_t *cb = w->codebook + (int64_t)g * w->ncent * v;
            const int8_t *rcb = res ? w->res_codebook + (int64_t)g * w->res_ncent * v : NULL;
            for (int64_t bi = 0; bi < nb; bi++) {
                if (int8) {
                    const int8_t *xq = p->xq + bi * k;
                    int32_t is[VQM_CVQ_MAX_V] = { 0 }, ir[VQM_CVQ_MAX_V] = { 0 };
                    for (int64_t c = c0; c < c1; c++) {
                        unsigned idx = vqm_cvq_code(row, c, b);
                        if (idx > kmax) idx = kmax; /* only reachable for unvalidated data */
                        for (int t = 0; t < v; t++) is[t] += (int32_t)cb[idx * v + t] * (int32_t)xq[c];
                        if (res) {
                            unsigned r = vqm_cvq_code(rrow, c, rb);
                            if (r > rkmax) r = rkmax;
                            for (int t = 0; t < v; t++) ir[t] += (int32_t)rcb[r * v + t] * (int32_t)xq[c];
                        }
                    }
                    const float xs = p->xs[bi * p->nblk + blk];
                    for (int t = 0; t < v; t++) {
                        float a = (float)is[t] * xs;
                        a = a * p->gscale[g];
                        acc[bi][t] = acc[bi][t] + a;
                        if (res) {
                            a = (float)ir[t] * xs;
                            a = a * p->rscale[g];
                            acc[bi][t] = acc[bi][t] + a;
                        }
                    }
                } else {
                    const float *xf = p->xf + bi * k;
                    float fs[VQM_CVQ_MAX_V] = { 0 }, fr[VQM_CVQ_MAX_V] = { 0 };
                    for (int64_t c = c0; c < c1; c++) {
                        unsigned idx = vqm_cvq_code(row, c, b);
                        if (idx > kmax) idx = kmax;
                        for (int t = 0; t < v; t++) fs[t] += (float)cb[idx * v + t] * xf[c];
                        if (res) {
                            unsigned r = vqm_cvq_code(rrow, c, rb);
                            if (r > rkmax) r = rkmax;
                            for (int t = 0; t < v; t++) fr[t] += (float)rcb[r * v + t] * xf[c];
                        }
                    }
                    for (int t = 0; t < v; t++) {
                        acc[bi][t] = acc[bi][t] + fs[t] * p->gscale[g];
                        if (res) acc[bi][t] = acc[bi][t] + fr[t] * p->rscale[g];
                    }
                }
            }
        }
        const int64_t r0 = j * v;
        const int nvalid = n - r0 < v ? (int)(n - r0) : v;
        for (int64_t bi = 0; bi < nb; bi++)
            for (int t = 0; t < nvalid; t++)
                y[bi * n + r0 + t] = bias ? acc[bi][t] + bias[r0 + t] : acc[bi][t];
    }
}
