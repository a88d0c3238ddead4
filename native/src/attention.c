/* Attention over a static KV cache (the exported decoders' layout), for decoding on the device.
 *
 * The decoder keeps every layer's cache at its full length (max_seq positions) and a program that runs standard ops
 * attends over all of it with a mask: at position p of a 512-position cache that is 512 / (p + 1) times the work,
 * and XNNPACK copies (packs) the cache operand of every batch matmul at every step. This kernel reads the caches in
 * place and only the positions a query sees: for query t at position p = pos + t, the keys lo..p with lo = 0, or
 * p - window + 1 in a sliding-window layer.
 *
 * Plain C: the inner loops run over contiguous memory (positions of a transposed key row, components of a value
 * row) and the compiler vectorizes them on every target; there is no per-ISA variant (so no path to compare).
 * Float semantics: the scores are q . k * scale accumulated over the head dimension in order, the softmax subtracts
 * the maximum, and the output is sum_s e_s v_s / sum_s e_s (the division once per component at the end). */
#include "internal.h"
#include <math.h>
#include <stdlib.h>

typedef struct {
    const float *q, *kt, *v;
    float *out;
    int heads, kv_heads, t, d, s, window;
    int64_t pos;
    float scale;
} attn_ctx;

static __thread float *t_scores;
static __thread size_t t_scores_cap;

/* one (kv head, query) pair: the group's query heads read each key and value row once */
static void attn_task(void *vctx, int i)
{
    const attn_ctx *a = vctx;
    const int groups = a->heads / a->kv_heads, D = a->d, S = a->s;
    const int h = i / a->t, t = i % a->t;
    const int64_t p = a->pos + t;
    const int64_t lo = a->window > 0 && p - a->window + 1 > 0 ? p - a->window + 1 : 0;
    const int64_t n = p - lo + 1;
    const size_t need = (size_t)groups * (size_t)n;
    if (need > t_scores_cap) {
        free(t_scores);
        t_scores = malloc(sizeof(float) * need);
        t_scores_cap = t_scores ? need : 0;
        if (!t_scores) abort();
    }
    const float *kt = a->kt + (int64_t)h * D * S + lo; /* [D][S] from position lo */
    const float *v = a->v + ((int64_t)h * S + lo) * D; /* [S][D] from position lo */
    for (int g = 0; g < groups; g++) {
        const int hq = h * groups + g;
        const float *q = a->q + ((int64_t)hq * a->t + t) * D;
        float *sc = t_scores + (size_t)g * (size_t)n;
        for (int64_t j = 0; j < n; j++) sc[j] = 0.0f;
        for (int c = 0; c < D; c++) {
            const float qc = q[c];
            const float *krow = kt + (int64_t)c * S;
            for (int64_t j = 0; j < n; j++) sc[j] += qc * krow[j];
        }
        float m = -INFINITY;
        for (int64_t j = 0; j < n; j++) {
            sc[j] *= a->scale;
            m = sc[j] > m ? sc[j] : m;
        }
        float sum = 0.0f;
        for (int64_t j = 0; j < n; j++) {
            sc[j] = expf(sc[j] - m);
            sum += sc[j];
        }
        float *o = a->out + ((int64_t)hq * a->t + t) * D;
        for (int c = 0; c < D; c++) o[c] = 0.0f;
        for (int64_t j = 0; j < n; j++) {
            const float e = sc[j];
            const float *vrow = v + j * D;
            for (int c = 0; c < D; c++) o[c] += e * vrow[c];
        }
        const float inv = 1.0f / sum;
        for (int c = 0; c < D; c++) o[c] *= inv;
    }
}

int vqm_attention(const float *q, const float *k_cache, const float *v_cache, int heads, int kv_heads, int t, int d,
                  int max_seq, int64_t pos, float scale, int window, float *out, int threads)
{
    if (!q || !k_cache || !v_cache || !out) return VQM_EINVAL;
    if (heads < 1 || kv_heads < 1 || heads % kv_heads || t < 1 || d < 1 || max_seq < 1 || window < 0)
        return VQM_EINVAL;
    if (pos < 0 || pos + t > max_seq) return VQM_EINVAL; /* a query past the cache */
    attn_ctx a = { q, k_cache, v_cache, out, heads, kv_heads, t, d, max_seq, window, pos, scale };
    const int ntasks = kv_heads * t;
    if (threads <= 0) threads = vqm_get_num_threads();
    if (threads > ntasks) threads = ntasks;
    vqm_pool_run(threads, ntasks, attn_task, &a);
    return VQM_OK;
}
