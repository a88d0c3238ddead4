/* aarch64 NEON Hadamard transform: the reference's butterflies and H_m sums with 4 columns per vector
 * (bit-identical: same additions and subtractions of the same operands). p < 4 runs the reference. */
#if defined(__aarch64__)
#include "quip.h"
#include <arm_neon.h>

/* Stages h = 1, 2 inside one vector: lane j pairs with lane j ^ h; the lower lane keeps a + b, the upper a - b. */
static inline float32x4_t fwht4(float32x4_t v)
{
    static const uint32_t odd[4] = { 0, ~0u, 0, ~0u }, hi[4] = { 0, 0, ~0u, ~0u };
    float32x4_t s = vrev64q_f32(v);
    v = vbslq_f32(vld1q_u32(odd), vsubq_f32(s, v), vaddq_f32(v, s));
    s = vextq_f32(v, v, 2);
    return vbslq_f32(vld1q_u32(hi), vsubq_f32(s, v), vaddq_f32(v, s));
}

static void fwht(float *v, int p)
{
    for (int j = 0; j < p; j += 4) vst1q_f32(v + j, fwht4(vld1q_f32(v + j)));
    for (int h = 4; h < p; h *= 2)
        for (int i = 0; i < p; i += 2 * h)
            for (int j = i; j < i + h; j += 4) {
                const float32x4_t a = vld1q_f32(v + j), b = vld1q_f32(v + j + h);
                vst1q_f32(v + j, vaddq_f32(a, b));
                vst1q_f32(v + j + h, vsubq_f32(a, b));
            }
}

static int neon_rows(float *v, int64_t batch, int m, int p, const int8_t *had, int transpose, float scale, float *tmp)
{
    if (p < 4) return 0;
    const int64_t n = (int64_t)m * p;
    const float32x4_t sc = vdupq_n_f32(scale);
    for (int64_t b = 0; b < batch; b++) {
        float *row = v + b * n;
        for (int i = 0; i < m; i++) fwht(row + (int64_t)i * p, p);
        if (m > 1) {
            memcpy(tmp, row, sizeof(float) * (size_t)n);
            for (int i = 0; i < m; i++)
                for (int j = 0; j < p; j += 4) {
                    float32x4_t acc = vdupq_n_f32(0.0f);
                    for (int l = 0; l < m; l++) {
                        const int8_t h = transpose ? had[l * m + i] : had[i * m + l];
                        const float32x4_t x = vld1q_f32(tmp + (int64_t)l * p + j);
                        acc = h > 0 ? vaddq_f32(acc, x) : vsubq_f32(acc, x);
                    }
                    vst1q_f32(row + (int64_t)i * p + j, vmulq_f32(acc, sc));
                }
        } else {
            for (int64_t j = 0; j < n; j += 4) vst1q_f32(row + j, vmulq_f32(vld1q_f32(row + j), sc));
        }
    }
    return 1;
}

const vqm_had_ops vqm_had_neon = { neon_rows };
#endif
