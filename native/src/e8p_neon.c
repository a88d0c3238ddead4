/* aarch64 NEON E8P kernels. Compiled twice: as is (int8 products with SMULL/SMLAL2 + SADALP) -> vqm_e8p_neon, and
 * from e8p_neon_dot.c with VQM_NEON_DOT (SDOT) -> vqm_e8p_neon_dot.
 *
 * int8 activations, E8P stages: chunks of 32 codes as two halves of 16. The abs indices fetch their 16-bit level
 * words with scalar loads; the low / high bytes hold the 2-bit levels of coordinates 0-3 / 4-7 (|A4| = 4 L + 2
 * through one TBL). CNT gives the sign byte's parity and the parity of the level sum (A4's negated coordinate 7), so that
 * c = b' ^ (P_a << 7) holds every coordinate's sign; per coordinate t, TST selects +-x (chunk-ordered activations,
 * prepared negated too) and |A4| * (+-x) accumulates in int32; sigma adds sum_c sigma_c * x8_c. E81B stages load the
 * 8-byte table rows and multiply natural-order activations. Float activations: one code at a time (A4 row XOR the
 * sign masks, FMA; sigma times the code's activation sum).
 */
#if defined(__aarch64__)
#include "quip.h"

#ifdef VQM_NEON_DOT
#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+dotprod")
#define OPS_NAME vqm_e8p_neon_dot
#else
#define OPS_NAME vqm_e8p_neon
#endif
#include <arm_neon.h>

#define INLINE static inline __attribute__((always_inline))

static int neon_plan(const vqm_e8p_weight *w, int flags, int *chunk)
{
    (void)w;
    *chunk = (flags & VQM_ACT_INT8) ? VQM_E8P_CHUNK : 0;
    return 1;
}

/* acc + sum of 16 products a * x (|a| small enough that pairs fit int16) */
INLINE int32x4_t dot16(int32x4_t acc, int8x16_t a, int8x16_t x)
{
#ifdef VQM_NEON_DOT
    return vdotq_s32(acc, a, x);
#else
    int16x8_t p = vmull_s8(vget_low_s8(a), vget_low_s8(x));
    p = vmlal_high_s8(p, a, x);
    return vpadalq_s16(acc, p);
#endif
}

static inline void chunk_bytes(const uint8_t *plane, int64_t c0, int64_t nc, uint8_t *pad, const uint8_t **out)
{
    if (c0 + VQM_E8P_CHUNK <= nc) {
        *out = plane + c0;
        return;
    }
    memset(pad, 0, VQM_E8P_CHUNK);
    memcpy(pad, plane + c0, (size_t)(nc - c0));
    *out = pad;
}

/* Decoded half chunk (16 codes): |A4| per coordinate, the sign byte c, sigma as int16. */
typedef struct {
    int8x16_t a[8];
    uint8x16_t c;
    int16x8_t sig_lo, sig_hi;
} e8p_half;

INLINE void decode_half(const vqm_e8p_tab *tab, const uint8_t *ab, const uint8_t *sb, e8p_half *d)
{
    /* the level words of 16 abs indices: scalar table loads (a 256-entry TBL/TBX lookup is slower on the modelled
     * cores: `vqmobile bench cost`) */
    uint16_t w16[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; i++) w16[i] = (uint16_t)tab->lv[ab[i]];
    const uint16x8_t w0 = vld1q_u16(w16), w1 = vld1q_u16(w16 + 8);
    const uint8x16_t lo = vcombine_u8(vmovn_u16(w0), vmovn_u16(w1));
    const uint8x16_t hi = vcombine_u8(vshrn_n_u16(w0, 8), vshrn_n_u16(w1, 8));
    const uint8x16_t one = vdupq_n_u8(1);
    const uint8x16_t pa = vandq_u8(vcntq_u8(vandq_u8(veorq_u8(lo, hi), vdupq_n_u8(0x55))), one);
    const uint8x16_t b = vld1q_u8(sb);
    const uint8x16_t par = vandq_u8(vcntq_u8(b), one);
    d->c = veorq_u8(veorq_u8(b, par), vshlq_n_u8(pa, 7));
    static const uint8_t lut[16] = { 2, 6, 10, 14 };
    const uint8x16_t alut = vld1q_u8(lut), three = vdupq_n_u8(3);
#pragma GCC unroll 8
    for (int t = 0; t < 8; t++) {
        const uint8x16_t src = t < 4 ? lo : hi;
        const uint8x16_t l = vandq_u8(vshlq_u8(src, vdupq_n_s8((int8_t)(-2 * (t & 3)))), three);
        d->a[t] = vreinterpretq_s8_u8(vqtbl1q_u8(alut, l));
    }
    const int16x8_t p_lo = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(par)));
    const int16x8_t p_hi = vreinterpretq_s16_u16(vmovl_high_u8(par));
    d->sig_lo = vsubq_s16(vdupq_n_s16(1), vaddq_s16(p_lo, p_lo));
    d->sig_hi = vsubq_s16(vdupq_n_s16(1), vaddq_s16(p_hi, p_hi));
}

/* sum over a half chunk of w4 * q: qp/nq chunk-ordered (position t * 32 + c), x8 the codes' q sums */
INLINE int32x4_t dot_half(int32x4_t acc, const e8p_half *d, const int8_t *qp, const int8_t *nq,
                                 const int16_t *x8)
{
#pragma GCC unroll 8
    for (int t = 0; t < 8; t++) {
        const uint8x16_t neg = vtstq_u8(d->c, vdupq_n_u8((uint8_t)(1u << t)));
        const int8x16_t x = vbslq_s8(neg, vld1q_s8(nq + t * VQM_E8P_CHUNK), vld1q_s8(qp + t * VQM_E8P_CHUNK));
        acc = dot16(acc, d->a[t], x);
    }
    const int16x8_t x0 = vld1q_s16(x8), x1 = vld1q_s16(x8 + 8);
    acc = vmlal_s16(acc, vget_low_s16(d->sig_lo), vget_low_s16(x0));
    acc = vmlal_high_s16(acc, d->sig_lo, x0);
    acc = vmlal_s16(acc, vget_low_s16(d->sig_hi), vget_low_s16(x1));
    return vmlal_high_s16(acc, d->sig_hi, x1);
}

INLINE int32x4_t dot_e81(int32x4_t acc, const vqm_e8p_tab *tab, const uint8_t *ib, const int8_t *q)
{
#pragma GCC unroll 16
    for (int c = 0; c < VQM_E8P_CHUNK; c += 2) {
        const int8x16_t e = vcombine_s8(vld1_s8(tab->e81[ib[c]]), vld1_s8(tab->e81[ib[c + 1]]));
        acc = dot16(acc, e, vld1q_s8(q + 8 * c));
    }
    return acc;
}

static float fdot(const vqm_e8p_tab *tab, const uint8_t *p0, const uint8_t *p1, int e81, int64_t j0, int64_t j1,
                  const float *xf, const float *f8)
{
    float32x4_t a0 = vdupq_n_f32(0.0f), a1 = vdupq_n_f32(0.0f);
    float sig = 0.0f;
    for (int64_t j = j0; j < j1; j++) {
        const float *x = xf + 8 * j;
        if (e81) {
            a0 = vfmaq_f32(a0, vld1q_f32(tab->fe81[p0[j]]), vld1q_f32(x));
            a1 = vfmaq_f32(a1, vld1q_f32(tab->fe81[p0[j]] + 4), vld1q_f32(x + 4));
            continue;
        }
        const float *a = tab->fabs4[p0[j]];
        const uint32_t *s = tab->fsgn[p1[j]];
        const float32x4_t w0 = vreinterpretq_f32_u32(veorq_u32(vreinterpretq_u32_f32(vld1q_f32(a)), vld1q_u32(s)));
        const float32x4_t w1 = vreinterpretq_f32_u32(veorq_u32(vreinterpretq_u32_f32(vld1q_f32(a + 4)),
                                                               vld1q_u32(s + 4)));
        a0 = vfmaq_f32(a0, w0, vld1q_f32(x));
        a1 = vfmaq_f32(a1, w1, vld1q_f32(x + 4));
        sig += tab->fsigma[p1[j]] * f8[j];
    }
    return vaddvq_f32(vaddq_f32(a0, a1)) + sig;
}

/* Batch 1, int8 activations, the full chunks of row r: straight-line chunk bodies (BITS a compile-time constant),
 * the reference's finish per chunk. */
static inline __attribute__((always_inline)) float
row_b1(const vqm_e8p_weight *w, const vqm_e8p_tab *tab, const vqm_e8p_xprep *xp, int64_t r, int64_t nfull,
       const int BITS)
{
    const int64_t nc = xp->ncodes;
    const uint8_t *a0 = vqm_e8p_plane(w, nc, r, 0), *b0 = vqm_e8p_plane(w, nc, r, 1);
    const uint8_t *a1 = BITS > 2 ? vqm_e8p_plane(w, nc, r, 2) : NULL, *b1 = BITS == 4 ? vqm_e8p_plane(w, nc, r, 3) : NULL;
    const float s0 = w->scales[0], s1 = BITS > 2 ? w->scales[1] : 0.0f;
    float acc = 0.0f;
    e8p_half d0, d1;
    for (int64_t ch = 0; ch < nfull; ch++) {
        VQM_MCA_BEGIN("neon.e8p.loop", BITS, 0, 0, 0);
        const int64_t c0 = ch * VQM_E8P_CHUNK;
        const int8_t *qp = xp->qp + ch * 256, *nq = xp->nq + ch * 256;
        const int16_t *x8 = xp->x8 + c0;
        decode_half(tab, a0 + c0, b0 + c0, &d0);
        decode_half(tab, a0 + c0 + 16, b0 + c0 + 16, &d1);
        const int32_t i0 = vaddvq_s32(dot_half(dot_half(vdupq_n_s32(0), &d0, qp, nq, x8), &d1, qp + 16, nq + 16,
                                               x8 + 16));
        int32_t i1 = 0;
        if (BITS == 4) {
            decode_half(tab, a1 + c0, b1 + c0, &d0);
            decode_half(tab, a1 + c0 + 16, b1 + c0 + 16, &d1);
            i1 = vaddvq_s32(dot_half(dot_half(vdupq_n_s32(0), &d0, qp, nq, x8), &d1, qp + 16, nq + 16, x8 + 16));
        } else if (BITS == 3) {
            i1 = vaddvq_s32(dot_e81(vdupq_n_s32(0), tab, a1 + c0, xp->q + ch * 256));
        }
        const float xs = xp->xs[ch];
        float v = (float)i0 * xs;
        v = v * s0;
        acc = acc + v;
        if (BITS > 2) {
            v = (float)i1 * xs;
            v = v * s1;
            acc = acc + v;
        }
        VQM_MCA_END("neon.e8p.loop", BITS, 0, 0, 0);
    }
    return acc;
}

static void neon_rows_general(const vqm_e8p_weight *w, const vqm_e8p_tab *tab, const vqm_e8p_xprep *xp, int64_t r0,
                              int64_t r1, int64_t ch0, const float *acc0, const float *bias, float *y, int flags);

static void neon_rows(const vqm_e8p_weight *w, const vqm_e8p_tab *tab, const vqm_e8p_xprep *xp, int64_t r0,
                      int64_t r1, const float *bias, float *y, int flags)
{
    if (xp->batch == 1 && (flags & VQM_ACT_INT8)) {
        const int64_t nfull = xp->ncodes / VQM_E8P_CHUNK;
        for (int64_t r = r0; r < r1; r++) {
            const float acc = w->bits == 2 ? row_b1(w, tab, xp, r, nfull, 2)
                            : w->bits == 3 ? row_b1(w, tab, xp, r, nfull, 3) : row_b1(w, tab, xp, r, nfull, 4);
            neon_rows_general(w, tab, xp, r, r + 1, nfull, &acc, bias, y, flags);
        }
        return;
    }
    neon_rows_general(w, tab, xp, r0, r1, 0, NULL, bias, y, flags);
}

/* Any batch: chunks [ch0, nchunk) of rows [r0, r1), starting from acc0 (batch 1) or 0. */
static void neon_rows_general(const vqm_e8p_weight *w, const vqm_e8p_tab *tab, const vqm_e8p_xprep *xp, int64_t r0,
                              int64_t r1, int64_t ch0, const float *acc0, const float *bias, float *y, int flags)
{
    const int64_t nc = xp->ncodes, ncp = xp->nchunk * VQM_E8P_CHUNK, nb = xp->batch;
    const int nstage = w->bits == 2 ? 1 : 2;
    const int int8 = (flags & VQM_ACT_INT8) != 0;
    uint8_t pad[2][VQM_E8P_CHUNK];
    e8p_half d[2];
    memset(d, 0, sizeof d); /* decoded before use; the compiler cannot see it through the stage switch */
    for (int64_t r = r0; r < r1; r++) {
        float acc[VQM_BATCH_TILE] = { 0 };
        if (acc0) acc[0] = *acc0;
        for (int64_t ch = ch0; ch < xp->nchunk; ch++) {
            const int64_t c0 = ch * VQM_E8P_CHUNK;
            for (int s = 0; s < nstage; s++) {
                const int e81 = s == 1 && w->bits == 3;
                const uint8_t *p0 = vqm_e8p_plane(w, nc, r, 2 * s);
                const uint8_t *p1 = e81 ? NULL : vqm_e8p_plane(w, nc, r, 2 * s + 1);
                const float scale = w->scales[s];
                if (int8) {
                    const uint8_t *ab, *sb = NULL;
                    chunk_bytes(p0, c0, nc, pad[0], &ab);
                    if (!e81) {
                        chunk_bytes(p1, c0, nc, pad[1], &sb);
                        decode_half(tab, ab, sb, &d[0]);
                        decode_half(tab, ab + 16, sb + 16, &d[1]);
                    }
                    for (int64_t bi = 0; bi < nb; bi++) {
                        int32x4_t s4 = vdupq_n_s32(0);
                        if (e81) {
                            s4 = dot_e81(s4, tab, ab, xp->q + bi * xp->kpad + ch * 256);
                        } else {
                            const int8_t *qp = xp->qp + bi * xp->kpad + ch * 256;
                            const int8_t *nq = xp->nq + bi * xp->kpad + ch * 256;
                            const int16_t *x8 = xp->x8 + bi * ncp + c0;
                            s4 = dot_half(s4, &d[0], qp, nq, x8);
                            s4 = dot_half(s4, &d[1], qp + 16, nq + 16, x8 + 16);
                        }
                        float v = (float)vaddvq_s32(s4) * xp->xs[bi * xp->nblk + ch];
                        v = v * scale;
                        acc[bi] = acc[bi] + v;
                    }
                } else {
                    const int64_t c1 = c0 + VQM_E8P_CHUNK < nc ? c0 + VQM_E8P_CHUNK : nc;
                    for (int64_t bi = 0; bi < nb; bi++) {
                        const float f = fdot(tab, p0, p1, e81, c0, c1, xp->xf + bi * xp->kpad, xp->f8 + bi * ncp);
                        acc[bi] = acc[bi] + f * scale;
                    }
                }
            }
        }
        for (int64_t bi = 0; bi < nb; bi++) y[bi * w->n + r] = bias ? acc[bi] + bias[r] : acc[bi];
    }
}

const vqm_e8p_ops OPS_NAME = { neon_plan, neon_rows };

#ifdef VQM_NEON_DOT
#pragma GCC pop_options
#endif
#endif /* __aarch64__ */
