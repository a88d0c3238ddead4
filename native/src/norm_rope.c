/* RMSNorm and RoPE for the exported decoders: the per-token steps between the linears and attention.
 *
 * Written in standard ops, each RMSNorm is pow, mean, add, rsqrt and two products, and each RoPE two slices, a
 * negation, a concatenation, two products and a sum: in an ExecuTorch program that is a portable mean between two
 * XNNPACK partitions per norm and four slice copies plus partitions per layer, each partition call costing more than
 * the arithmetic of a 576-wide row. One call each instead.
 *
 * Portable C with GCC vector extensions, one build per x86 level (VQM_CLONES), compiled without contraction
 * (-ffp-contract=off): every value is the product or sum PyTorch's standard-op definition rounds, in its order, so
 * RoPE equals PyTorch's bit for bit; RMSNorm's mean of squares is summed in 16 lanes, then across them, an order of
 * its own (PyTorch's differs between its own CPU builds). */
#include "internal.h"
#include <math.h>

#pragma GCC diagnostic ignored "-Wpsabi"

#define VL 16
typedef float vf __attribute__((vector_size(VL * sizeof(float))));

static inline vf vload(const float *p)
{
    vf v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

static inline void vstore(float *p, vf v) { __builtin_memcpy(p, &v, sizeof v); }

/* out = (x * inv) * (offset + w), inv = 1 / sqrt(mean(x^2) + eps): Llama's weight * (x * rsqrt(var + eps)) with
 * offset 0, Gemma's (x * rsqrt(var + eps)) * (1 + weight) with offset 1 (offset + w is exact for offset 0). With a
 * residual, x is first replaced by sum = x + residual (the decoder's h + a before its next norm). */
VQM_CLONES static void rms_norm(const float *x, const float *residual, const float *w, int64_t rows, int64_t d,
                                 float eps, float offset, float *sum, float *out)
{
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        float *yr = out + r * d;
        if (residual) {
            float *sr = sum + r * d;
            for (int64_t c = 0; c < d; c++) sr[c] = xr[c] + residual[r * d + c];
            xr = sr;
        }
        vf acc = { 0 };
        int64_t c = 0;
        for (; c + VL <= d; c += VL) {
            const vf v = vload(xr + c);
            acc += v * v;
        }
        float ss = 0.0f;
        for (int l = 0; l < VL; l++) ss += acc[l];
        for (; c < d; c++) ss += xr[c] * xr[c];
        const float inv = 1.0f / sqrtf(ss / (float)d + eps);
        for (c = 0; c + VL <= d; c += VL) vstore(yr + c, (vload(xr + c) * inv) * (vload(w + c) + offset));
        for (; c < d; c++) yr[c] = (xr[c] * inv) * (w[c] + offset);
    }
}

int vqm_rms_norm(const float *x, const float *w, int64_t rows, int64_t d, float eps, float offset, float *out)
{
    if (!x || !w || !out || rows < 0 || d < 1) return VQM_EINVAL;
    rms_norm(x, NULL, w, rows, d, eps, offset, NULL, out);
    return VQM_OK;
}

int vqm_add_rms_norm(const float *x, const float *residual, const float *w, int64_t rows, int64_t d, float eps,
                     float offset, float *sum, float *out)
{
    if (!x || !residual || !w || !sum || !out || sum == out || rows < 0 || d < 1) return VQM_EINVAL;
    rms_norm(x, residual, w, rows, d, eps, offset, sum, out);
    return VQM_OK;
}

/* out[i, h, :] = RoPE of x[i, h, :]: features j < rot / 2 become x_j cos_j - x_{j + rot/2} sin_j, features
 * rot / 2 <= j < rot become x_j cos_j + x_{j - rot/2} sin_j (rotate-half), the rest stay; cos, sin: [t, rot]. */
VQM_CLONES static void rope(const float *x, const float *cos, const float *sin, int64_t t, int64_t heads, int64_t d,
                             int64_t rot, float *out)
{
    const int64_t half = rot / 2;
    for (int64_t i = 0; i < t; i++) {
        const float *c = cos + i * rot, *s = sin + i * rot;
        for (int64_t h = 0; h < heads; h++) {
            const float *xr = x + (i * heads + h) * d;
            float *yr = out + (i * heads + h) * d;
            int64_t j = 0;
            for (; j + VL <= half; j += VL) {
                vstore(yr + j, vload(xr + j) * vload(c + j) + (-vload(xr + half + j)) * vload(s + j));
                vstore(yr + half + j, vload(xr + half + j) * vload(c + half + j) + vload(xr + j) * vload(s + half + j));
            }
            for (; j < half; j++) {
                yr[j] = xr[j] * c[j] + (-xr[half + j]) * s[j];
                yr[half + j] = xr[half + j] * c[half + j] + xr[j] * s[half + j];
            }
            for (j = rot; j < d; j++) yr[j] = xr[j];
        }
    }
}

int vqm_rope(const float *x, const float *cos, const float *sin, int64_t t, int64_t heads, int64_t d, int64_t rot,
             float *out)
{
    if (!x || !cos || !sin || !out || t < 0 || heads < 1 || d < 1 || rot < 0 || rot > d || rot % 2) return VQM_EINVAL;
    rope(x, cos, sin, t, heads, d, rot, out);
    return VQM_OK;
}
