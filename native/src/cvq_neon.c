/* aarch64 NEON kernel of the column-vector VQ (VPTQ) format, used by both NEON
 * paths (with and without dotprod: a decoded vector is an axpy into v outputs,
 * which SDOT's four-element dot products do not fit without a transposition).
 *
 * Per vector row and activation block, each column's codebook entry (v <= 8
 * int8 values) is widened to int16 and accumulated with SMLAL / SMLAL2 by the
 * column's activation (int8 mode: exact int32 sums, then the reference's float
 * finish lane by lane, so results are bit-identical), or converted to f32 and
 * FMA'd (float mode).
 */
#if defined(__aarch64__)
#include "cvq_internal.h"
#include <arm_neon.h>

static inline __attribute__((always_inline)) int16x8_t entry16(const int8_t *p, const int v)
{
    uint64_t u = 0;
    memcpy(&u, p, (size_t)v);
    return vmovl_s8(vcreate_s8(u));
}

static inline __attribute__((always_inline)) void rows_v(const vqm_cvq_weight *w, const cvq_prep *p, int64_t j0,
                                                         int64_t j1, const float *bias, float *y, int flags,
                                                         const int v)
{
    const int res = w->res_ncent > 0;
    const int b = vqm_cvq_bits(w->ncent), rb = res ? vqm_cvq_bits(w->res_ncent) : 0;
    const unsigned kmax = (unsigned)w->ncent - 1u, rkmax = res ? (unsigned)w->res_ncent - 1u : 0u;
    const int64_t n = w->n, k = w->k, nb = p->batch;
    const int64_t rowbytes = vqm_cdiv(k * b, 8), rrowbytes = vqm_cdiv(k * rb, 8);
    const int int8 = (flags & VQM_ACT_INT8) != 0;
    uint32_t idx[VQM_CVQ_ACT_BLOCK], ridx[VQM_CVQ_ACT_BLOCK];
    float32x4_t acc[VQM_BATCH_TILE][2];
    for (int64_t j = j0; j < j1; j++) {
        const uint8_t *row = w->indices + j * rowbytes;
        const uint8_t *rrow = res ? w->res_indices + j * rrowbytes : NULL;
        for (int64_t bi = 0; bi < nb; bi++) acc[bi][0] = acc[bi][1] = vdupq_n_f32(0.0f);
        for (int blk = 0; blk < p->nblk; blk++) {
            const int64_t c0 = p->c0[blk];
            const int len = (int)(p->c0[blk + 1] - c0), g = p->grp[blk];
            vqm_cvq_codes_scalar(row, c0, len, b, kmax, idx);
            if (res) vqm_cvq_codes_scalar(rrow, c0, len, rb, rkmax, ridx);
            for (int stage = 0; stage <= res; stage++) {
                const int8_t *cb = stage ? w->res_codebook + (int64_t)g * w->res_ncent * v
                                         : w->codebook + (int64_t)g * w->ncent * v;
                const uint32_t *ix = stage ? ridx : idx;
                const float32x4_t gs = vdupq_n_f32(stage ? p->rscale[g] : p->gscale[g]);
                if (int8) {
                    int32x4_t s[VQM_BATCH_TILE][2];
                    for (int64_t bi = 0; bi < nb; bi++) s[bi][0] = s[bi][1] = vdupq_n_s32(0);
                    for (int c = 0; c < len; c++) {
                        const int16x8_t e = entry16(cb + ix[c] * v, v);
                        for (int64_t bi = 0; bi < nb; bi++) {
                            const int16_t q = p->xq[bi * k + c0 + c];
                            s[bi][0] = vmlal_n_s16(s[bi][0], vget_low_s16(e), q);
                            if (v > 4) s[bi][1] = vmlal_high_n_s16(s[bi][1], e, q);
                        }
                    }
                    for (int64_t bi = 0; bi < nb; bi++) {
                        const float32x4_t xs = vdupq_n_f32(p->xs[bi * p->nblk + blk]);
                        for (int h = 0; h < (v > 4 ? 2 : 1); h++) {
                            float32x4_t a = vmulq_f32(vcvtq_f32_s32(s[bi][h]), xs);
                            acc[bi][h] = vaddq_f32(acc[bi][h], vmulq_f32(a, gs));
                        }
                    }
                } else {
                    float32x4_t s[VQM_BATCH_TILE][2];
                    for (int64_t bi = 0; bi < nb; bi++) s[bi][0] = s[bi][1] = vdupq_n_f32(0.0f);
                    for (int c = 0; c < len; c++) {
                        const int16x8_t e = entry16(cb + ix[c] * v, v);
                        const float32x4_t lo = vcvtq_f32_s32(vmovl_s16(vget_low_s16(e)));
                        const float32x4_t hi = vcvtq_f32_s32(vmovl_high_s16(e));
                        for (int64_t bi = 0; bi < nb; bi++) {
                            const float x = p->xf[bi * k + c0 + c];
                            s[bi][0] = vfmaq_n_f32(s[bi][0], lo, x);
                            if (v > 4) s[bi][1] = vfmaq_n_f32(s[bi][1], hi, x);
                        }
                    }
                    for (int64_t bi = 0; bi < nb; bi++)
                        for (int h = 0; h < (v > 4 ? 2 : 1); h++)
                            acc[bi][h] = vaddq_f32(acc[bi][h], vmulq_f32(s[bi][h], gs));
                }
            }
        }
        const int64_t r0 = j * v;
        const int nvalid = n - r0 < v ? (int)(n - r0) : v;
        for (int64_t bi = 0; bi < nb; bi++) {
            float out[8];
            vst1q_f32(out, acc[bi][0]);
            vst1q_f32(out + 4, acc[bi][1]);
            for (int t = 0; t < nvalid; t++) y[bi * n + r0 + t] = bias ? out[t] + bias[r0 + t] : out[t];
        }
    }
}

void vqm_cvq_rows_neon(const vqm_cvq_weight *w, const cvq_prep *p, int64_t j0, int64_t j1, const float *bias,
                       float *y, int flags)
{
    switch (w->v) { /* a constant v lets the compiler turn every entry read into plain loads */
    case 1: rows_v(w, p, j0, j1, bias, y, flags, 1); break;
    case 2: rows_v(w, p, j0, j1, bias, y, flags, 2); break;
    case 3: rows_v(w, p, j0, j1, bias, y, flags, 3); break;
    case 4: rows_v(w, p, j0, j1, bias, y, flags, 4); break;
    case 5: rows_v(w, p, j0, j1, bias, y, flags, 5); break;
    case 6: rows_v(w, p, j0, j1, bias, y, flags, 6); break;
    case 7: rows_v(w, p, j0, j1, bias, y, flags, 7); break;
    default: rows_v(w, p, j0, j1, bias, y, flags, 8); break; /* v <= 8 is checked by the caller */
    }
}
#endif /* __aarch64__ */
