/* Sixteen floats as a GCC vector (one zmm, two ymm, four xmm or four NEON q registers, whatever the target), and the
 * helpers the portable-C kernels (attention.c, decoder_steps.c) share. The helpers are static inline: the ABI of
 * 64-byte vector arguments that GCC notes never applies. */
#ifndef VQM_VECF_H
#define VQM_VECF_H

#include <stdint.h>

#pragma GCC diagnostic ignored "-Wpsabi"

#define VL 16
typedef float vf __attribute__((vector_size(VL * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(VL * sizeof(int32_t))));

static inline vf vload(const float *p)
{
    vf v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

static inline void vstore(float *p, vf v) { __builtin_memcpy(p, &v, sizeof v); }

static inline vf vsplat(float x) { return (vf){ 0 } + x; }

static inline vf vsel(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); } /* mask ? a : b */

/* e^x for x <= 0: 2^n * p(r), n = round(x / ln 2), r = x - n ln 2 (two-part ln 2), p Cephes' degree-6 polynomial
 * (expf's, about 1 ulp); below -87.3 the result is 0. */
static inline vf vexp_nonpos(vf x)
{
    const vf lo = vsplat(-87.3f);
    const vi under = x < lo;
    x = vsel(under, lo, x);
    vf n = x * 1.44269504088896341f + 12582912.0f; /* + 1.5 * 2^23: round to nearest in the low mantissa bits */
    n = n - 12582912.0f;
    const vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
    vf p = vsplat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    vf scale;
    __builtin_memcpy(&scale, &bits, sizeof scale);
    p = p * scale;
    return vsel(under, vsplat(0.0f), p);
}

#endif
