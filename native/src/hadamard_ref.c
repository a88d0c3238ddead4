/* Reference Hadamard transform: defines the operation order the SIMD versions reproduce bit for bit (the
 * butterflies and the H_m sums in the same order, no FMA). */
#include "quip.h"

void vqm_fwht_ref(float *v, int p);

void vqm_fwht_ref(float *v, int p)
{
    for (int h = 1; h < p; h *= 2)
        for (int i = 0; i < p; i += 2 * h)
            for (int j = i; j < i + h; j++) {
                const float a = v[j], b = v[j + h];
                v[j] = a + b;
                v[j + h] = a - b;
            }
}

static int ref_rows(float *v, int64_t batch, int m, int p, const int8_t *had, int transpose, float scale, float *tmp)
{
    const int64_t n = (int64_t)m * p;
    for (int64_t b = 0; b < batch; b++) {
        float *row = v + b * n;
        for (int i = 0; i < m; i++) vqm_fwht_ref(row + (int64_t)i * p, p);
        if (m > 1) {
            memcpy(tmp, row, sizeof(float) * (size_t)n);
            for (int i = 0; i < m; i++)
                for (int j = 0; j < p; j++) {
                    float acc = 0.0f;
                    for (int l = 0; l < m; l++) {
                        const int8_t h = transpose ? had[l * m + i] : had[i * m + l];
                        const float x = tmp[(int64_t)l * p + j];
                        acc = h > 0 ? acc + x : acc - x;
                    }
                    row[(int64_t)i * p + j] = acc;
                }
        }
        for (int64_t j = 0; j < n; j++) row[j] = row[j] * scale;
    }
    return 1;
}

const vqm_had_ops vqm_had_ref = { ref_rows };
