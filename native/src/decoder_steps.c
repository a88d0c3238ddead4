/* The exported decoders' steps between the linears and attention: RMSNorm (with the residual sum before it), RoPE
 * and the SiLU-gated product of the MLP.
 *
 * Written in standard ops, each RMSNorm is pow, mean, add, rsqrt and two products, each RoPE two slices, a negation,
 * a concatenation, two products and a sum, and the gated product a split, a sigmoid and two products: in an
 * ExecuTorch program a portable mean between two XNNPACK partitions per norm, slice copies and partitions, each call
 * costing more than the arithmetic of a 576-wide row. One call each instead.
 *
 * Portable C with GCC vector extensions, one build per x86 level (VQM_CLONES), compiled without contraction
 * (-ffp-contract=off): every value is the product or sum PyTorch's standard-op definition rounds, in its order, so
 * RoPE equals PyTorch's bit for bit; RMSNorm's mean of squares is summed in 16 lanes, then across them, an order of
 * its own (PyTorch's differs between its own CPU builds), and SiLU takes its exponential from a polynomial (about
 * 1 ulp, as PyTorch's vectorized one is). */
#include "internal.h"
#include "vecf.h"
#include <math.h>

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

/* 16 values of silu(g) * u = (g * sigmoid(g)) * u, sigmoid from e^-|g| (no overflow for any g) */
static inline vf silu_mul16(vf g, vf u)
{
    const vi neg = g < 0.0f;
    const vf e = vexp_nonpos(vsel(neg, g, -g)), inv = 1.0f / (1.0f + e);
    return (g * vsel(neg, e * inv, inv)) * u;
}

/* out[r, j] = silu(x[r, j]) * x[r, n + j]: rows of [gate | up], n features each, as the stacked gate/up projection
 * writes them. A row's last n % 16 values go through the same vector code (zero-padded copies). */
VQM_CLONES static void silu_mul(const float *x, int64_t rows, int64_t n, float *out)
{
    for (int64_t r = 0; r < rows; r++) {
        const float *g = x + r * 2 * n, *u = g + n;
        float *y = out + r * n;
        int64_t j = 0;
        for (; j + VL <= n; j += VL) vstore(y + j, silu_mul16(vload(g + j), vload(u + j)));
        if (j < n) {
            float gt[VL] = { 0 }, ut[VL] = { 0 }, yt[VL];
            __builtin_memcpy(gt, g + j, sizeof(float) * (size_t)(n - j));
            __builtin_memcpy(ut, u + j, sizeof(float) * (size_t)(n - j));
            vstore(yt, silu_mul16(vload(gt), vload(ut)));
            __builtin_memcpy(y + j, yt, sizeof(float) * (size_t)(n - j));
        }
    }
}

int vqm_silu_mul(const float *x, int64_t rows, int64_t n, float *out)
{
    if (!x || !out || rows < 0 || n < 1) return VQM_EINVAL;
    silu_mul(x, rows, n, out);
    return VQM_OK;
}
