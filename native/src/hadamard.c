/* vqm_hadamard: argument checks, the sign flips, per-path dispatch of the
 * transform (hadamard_ref.c and its SIMD versions). */
#include "quip.h"
#include <math.h>
#include <stdlib.h>

static const vqm_had_ops *had_ops(int path)
{
    switch (path) {
#if defined(__x86_64__)
    case VQM_PATH_AVX2: return &vqm_had_avx2;
    case VQM_PATH_AVX512: return &vqm_had_avx512;
#endif
#if defined(__aarch64__)
    case VQM_PATH_NEON:
    case VQM_PATH_NEON_DOT: return &vqm_had_neon;
#endif
    default: return &vqm_had_ref;
    }
}

static void flip(float *v, int64_t n, const uint8_t *signs)
{
    uint32_t *u = (uint32_t *)(void *)v;
    for (int64_t j = 0; j < n; j++) u[j] ^= (uint32_t)((signs[j >> 3] >> (j & 7)) & 1u) << 31;
}

static __thread float *t_tmp;
static __thread size_t t_tmp_n;

int vqm_hadamard_path(int path, const float *x, float *y, int64_t batch, int m, int p, const int8_t *had,
                      const uint8_t *signs, int flags)
{
    if (batch < 0 || m < 1 || m > VQM_HAD_MAX_M || p < 1 || p > 65536 || (p & (p - 1)) || (flags & ~VQM_HAD_TRANSPOSE))
        return VQM_EINVAL;
    if ((m > 1 && !had) || !signs || !x || !y) return VQM_EINVAL;
    if (path == VQM_PATH_AUTO) path = vqm_get_path();
    if (!vqm_path_available(path)) return VQM_EPATH;
    if (batch == 0) return VQM_OK;
    const int64_t n = (int64_t)m * p;
    if ((size_t)n > t_tmp_n) {
        free(t_tmp);
        t_tmp = malloc(sizeof(float) * (size_t)n);
        t_tmp_n = t_tmp ? (size_t)n : 0;
        if (!t_tmp) return VQM_ENOMEM;
    }
    const int transpose = (flags & VQM_HAD_TRANSPOSE) != 0;
    if (y != x) memcpy(y, x, sizeof(float) * (size_t)(n * batch));
    if (!transpose)
        for (int64_t b = 0; b < batch; b++) flip(y + b * n, n, signs);
    const float scale = (float)(1.0 / sqrt((double)n));
    if (!had_ops(path)->rows(y, batch, m, p, had, transpose, scale, t_tmp))
        vqm_had_ref.rows(y, batch, m, p, had, transpose, scale, t_tmp);
    if (transpose)
        for (int64_t b = 0; b < batch; b++) flip(y + b * n, n, signs);
    return VQM_OK;
}

int vqm_hadamard(const float *x, float *y, int64_t batch, int m, int p, const int8_t *had, const uint8_t *signs,
                 int flags)
{
    return vqm_hadamard_path(VQM_PATH_AUTO, x, y, batch, m, p, had, signs, flags);
}
