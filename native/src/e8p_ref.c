/* Reference E8P kernels: the semantics every SIMD path reproduces (exactly with int8 activations, within the float
 * tolerance with float activations). One code at a time through the decode tables. */
#include "quip.h"

/* The integer weights of code j of one stage (w4 for E8P, 2x for E81B). */
static void stage_code(const vqm_e8p_tab *tab, const uint8_t *p0, const uint8_t *p1, int e81, int64_t j, int w[8])
{
    if (e81) {
        for (int t = 0; t < 8; t++) w[t] = tab->e81[p0[j]][t];
        return;
    }
    const unsigned b = p1[j];
    const int par = vqm_parity8(b);
    const unsigned bp = b ^ (unsigned)par;
    for (int t = 0; t < 8; t++) {
        const int a = tab->abs4[p0[j]][t];
        w[t] = (((bp >> t) & 1u) ? -a : a) + (par ? -1 : 1);
    }
}

static int ref_plan(const vqm_e8p_weight *w, int flags, int *chunk)
{
    (void)w; (void)flags;
    *chunk = 0;
    return 1;
}

static void ref_rows(const vqm_e8p_weight *w, const vqm_e8p_tab *tab, const vqm_e8p_xprep *xp, int64_t r0, int64_t r1,
                     const float *bias, float *y, int flags)
{
    const int64_t nc = xp->ncodes, k = w->k, nstage = w->bits == 2 ? 1 : 2;
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t bi = 0; bi < xp->batch; bi++) {
            float acc = 0.0f;
            for (int64_t g = 0; g < xp->nblk; g++) {
                const int64_t c0 = g * VQM_E8P_ACT_BLOCK, c1 = c0 + VQM_E8P_ACT_BLOCK < k ? c0 + VQM_E8P_ACT_BLOCK : k;
                for (int64_t s = 0; s < nstage; s++) {
                    const int e81 = s == 1 && w->bits == 3;
                    const uint8_t *p0 = vqm_e8p_plane(w, nc, r, (int)(2 * s));
                    const uint8_t *p1 = e81 ? NULL : vqm_e8p_plane(w, nc, r, (int)(2 * s + 1));
                    int32_t isum = 0;
                    float fsum = 0.0f;
                    for (int64_t j = c0 / 8; j < vqm_cdiv(c1, 8); j++) {
                        int wv[8];
                        stage_code(tab, p0, p1, e81, j, wv);
                        for (int t = 0; t < 8 && 8 * j + t < c1; t++) {
                            if (flags & VQM_ACT_INT8) isum += wv[t] * xp->q[bi * xp->kpad + 8 * j + t];
                            else fsum += (float)wv[t] * xp->xf[bi * xp->kpad + 8 * j + t];
                        }
                    }
                    float v;
                    if (flags & VQM_ACT_INT8) {
                        v = (float)isum * xp->xs[bi * xp->nblk + g];
                        v = v * w->scales[s];
                    } else {
                        v = fsum * w->scales[s];
                    }
                    acc = acc + v;
                }
            }
            y[bi * w->n + r] = bias ? acc + bias[r] : acc;
        }
    }
}

const vqm_e8p_ops vqm_e8p_ref = { ref_plan, ref_rows };
