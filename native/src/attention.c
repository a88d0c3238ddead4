/* Attention over a static KV cache (the exported decoders' layout), for decoding on the device.
 *
 * The decoder keeps every layer's cache at its full length (max_seq positions) and a program that runs standard ops
 * attends over all of it with a mask: at position p of a 512-position cache that is 512 / (p + 1) times the work,
 * and XNNPACK copies (packs) the cache operand of every batch matmul at every step. This kernel reads the caches in
 * place and only the positions a query sees: for query t at position p = pos + t, the keys lo..p with lo = 0, or
 * p - window + 1 in a sliding-window layer.
 *
 * Portable C with GCC vector extensions (16 floats): the inner loops run over contiguous memory (positions of a
 * transposed key row, components of a value row); on x86 the loader picks an AVX-512, AVX2 or baseline build of the
 * same source. No path selection or bit-exactness contract (unlike the linear kernels): every build computes the
 * same sums in the same order and may differ only where the compiler fuses a multiply and an add.
 * Float semantics: the scores are q . k accumulated over the head dimension in order, times scale; the softmax
 * subtracts the maximum and exponentiates with a degree-6 polynomial (about 1 ulp of expf); the output is
 * sum_s e_s v_s (positions in order) times 1 / sum_s e_s. A float16 cache (vqm_attention_f16) is widened to float
 * value by value (exact) and then computed the same way: one source, instantiated for each element type. */
#include "internal.h"
#include "vecf.h"
#include <math.h>
#include <stdlib.h>

typedef struct {
    const float *q;
    const void *kt, *v; /* float, or _Float16 for a float16 cache */
    float *out;
    int heads, kv_heads, t, d, s, window;
    int64_t pos;
    float scale;
} attn_ctx;

/* 16 cached values from element i of a float (F16 = 0) or float16 (F16 = 1) cache, widened to float exactly */
typedef _Float16 vh __attribute__((vector_size(VL * sizeof(_Float16))));

static inline __attribute__((always_inline)) vf vload_kv(const void *base, int64_t i, const int F16)
{
    if (!F16) return vload((const float *)base + i);
    vh h;
    __builtin_memcpy(&h, (const _Float16 *)base + i, sizeof h);
    return __builtin_convertvector(h, vf);
}

static inline __attribute__((always_inline)) float kv_at(const void *base, int64_t i, const int F16)
{
    return F16 ? (float)((const _Float16 *)base)[i] : ((const float *)base)[i];
}

static inline vf vmax(vf a, vf b) { return vsel(a > b, a, b); }

static __thread float *t_scores;
static __thread size_t t_scores_cap;

/* Query heads of one group attended together (their keys and values loaded once for all of them): one vector
 * accumulator per head keeps 3-4 independent chains of adds in flight where one head alone waits on each add. */
#define NH_MAX 4

/* nh (a constant after inlining) query heads of kv head h, query t: sc holds nh score rows of nv floats */
static inline __attribute__((always_inline)) void attend(const attn_ctx *a, int h, int t, int g0, const int nh,
                                                         float *sc, int64_t nv, const int F16)
{
    const int groups = a->heads / a->kv_heads, D = a->d, S = a->s;
    const int64_t p = a->pos + t;
    const int64_t lo = a->window > 0 && p - a->window + 1 > 0 ? p - a->window + 1 : 0;
    const int64_t n = p - lo + 1;
    const int64_t kt = (int64_t)h * D * S + lo; /* element of K^T [D][S] at position lo */
    const int64_t v = ((int64_t)h * S + lo) * D; /* element of V [S][D] at position lo */
    const float *q[NH_MAX];
    float *o[NH_MAX];
    _Pragma("GCC unroll 4") for (int g = 0; g < nh; g++) {
        const int hq = h * groups + g0 + g;
        q[g] = a->q + ((int64_t)t * a->heads + hq) * D;
        o[g] = a->out + ((int64_t)t * a->heads + hq) * D;
    }
    /* Scores, a vector of positions at a time, each accumulated over the head dimension in order. Vectors may run
     * past the last position the query sees (those lanes become -inf below) but never past the cache's end. */
    const int64_t vend = nv < (S - lo) / VL * VL ? nv : (S - lo) / VL * VL;
    int64_t j = 0;
    for (; j < vend; j += VL) {
        vf acc[NH_MAX];
        _Pragma("GCC unroll 4") for (int g = 0; g < nh; g++) acc[g] = vsplat(0.0f);
        for (int c = 0; c < D; c++) {
            const vf k = vload_kv(a->kt, kt + (int64_t)c * S + j, F16);
            _Pragma("GCC unroll 4") for (int g = 0; g < nh; g++) acc[g] += q[g][c] * k;
        }
        _Pragma("GCC unroll 4") for (int g = 0; g < nh; g++) vstore(sc + g * nv + j, acc[g] * a->scale);
    }
    for (; j < n; j++) /* the cache's last positions: the same sums, one lane at a time */
        _Pragma("GCC unroll 4") for (int g = 0; g < nh; g++) {
            float acc = 0.0f;
            for (int c = 0; c < D; c++) acc += q[g][c] * kv_at(a->kt, kt + (int64_t)c * S + j, F16);
            sc[g * nv + j] = acc * a->scale;
        }
    float inv[NH_MAX];
    _Pragma("GCC unroll 4") for (int g = 0; g < nh; g++) {
        float *s = sc + g * nv;
        for (j = n; j < nv; j++) s[j] = -INFINITY;
        vf vm = vsplat(-INFINITY);
        for (j = 0; j < nv; j += VL) vm = vmax(vload(s + j), vm);
        float m = vm[0];
        for (int l = 1; l < VL; l++) m = vm[l] > m ? vm[l] : m;
        vf vsum = vsplat(0.0f);
        for (j = 0; j < nv; j += VL) { /* padding lanes are -inf: e = 0 */
            const vf e = vexp_nonpos(vload(s + j) - m);
            vstore(s + j, e);
            vsum += e;
        }
        float sum = 0.0f;
        for (int l = 0; l < VL; l++) sum += vsum[l];
        inv[g] = 1.0f / sum;
    }
    /* Outputs, a vector of components at a time, each summed over the positions in order. */
    int c = 0;
    for (; c + VL <= D; c += VL) {
        vf acc[NH_MAX];
        _Pragma("GCC unroll 4") for (int g = 0; g < nh; g++) acc[g] = vsplat(0.0f);
        for (j = 0; j < n; j++) {
            const vf x = vload_kv(a->v, v + j * D + c, F16);
            _Pragma("GCC unroll 4") for (int g = 0; g < nh; g++) acc[g] += sc[g * nv + j] * x;
        }
        _Pragma("GCC unroll 4") for (int g = 0; g < nh; g++) vstore(o[g] + c, acc[g] * inv[g]);
    }
    for (; c < D; c++)
        _Pragma("GCC unroll 4") for (int g = 0; g < nh; g++) {
            float acc = 0.0f;
            for (j = 0; j < n; j++) acc += sc[g * nv + j] * kv_at(a->v, v + j * D + c, F16);
            o[g][c] = acc * inv[g];
        }
}

/* one (kv head, query) pair: the group's query heads, NH_MAX at a time */
static inline __attribute__((always_inline)) void attn_pair(const attn_ctx *a, int i, const int F16)
{
    const int groups = a->heads / a->kv_heads;
    const int h = i / a->t, t = i % a->t;
    const int64_t p = a->pos + t;
    const int64_t lo = a->window > 0 && p - a->window + 1 > 0 ? p - a->window + 1 : 0;
    const int64_t nv = (p - lo + 1 + VL - 1) / VL * VL; /* scores padded to whole vectors */
    /* The caches are cold (a token streams megabytes of weights between two visits of a layer) and a key row of
     * the transposed cache is D lines S values apart, too many streams for the hardware prefetchers: asking for
     * every line this task reads before touching any of them lets the misses overlap. */
    {
        const int D = a->d, S = a->s;
        const int64_t es = F16 ? 2 : 4;
        const char *kt = (const char *)a->kt + ((int64_t)h * D * S + lo) * es;
        const char *v = (const char *)a->v + ((int64_t)h * S + lo) * D * es;
        const int64_t kbytes = (p - lo + 1) * es;
        for (int c = 0; c < D; c++)
            for (int64_t o = 0; o < kbytes; o += 64) __builtin_prefetch(kt + (int64_t)c * S * es + o);
        for (int64_t o = 0; o < kbytes * D; o += 64) __builtin_prefetch(v + o);
    }
    const size_t need = (size_t)NH_MAX * (size_t)nv;
    if (need > t_scores_cap) {
        free(t_scores);
        t_scores = malloc(sizeof(float) * need);
        t_scores_cap = t_scores ? need : 0;
        if (!t_scores) abort();
    }
    for (int g0 = 0; g0 < groups; g0 += NH_MAX) {
        switch (groups - g0 < NH_MAX ? groups - g0 : NH_MAX) { /* constant head counts: accumulators in registers */
        case 1: attend(a, h, t, g0, 1, t_scores, nv, F16); break;
        case 2: attend(a, h, t, g0, 2, t_scores, nv, F16); break;
        case 3: attend(a, h, t, g0, 3, t_scores, nv, F16); break;
        default: attend(a, h, t, g0, 4, t_scores, nv, F16); break;
        }
    }
}

VQM_CLONES static void attn_task(void *vctx, int i) { attn_pair(vctx, i, 0); }

VQM_CLONES static void attn_task_f16(void *vctx, int i) { attn_pair(vctx, i, 1); }

static int run_attention(const float *q, const void *k_cache, const void *v_cache, int heads, int kv_heads, int t,
                         int d, int max_seq, int64_t pos, float scale, int window, float *out, int threads,
                         void (*task)(void *, int))
{
    if (!q || !k_cache || !v_cache || !out) return VQM_EINVAL;
    if (heads < 1 || kv_heads < 1 || heads % kv_heads || t < 1 || d < 1 || max_seq < 1 || window < 0)
        return VQM_EINVAL;
    if (pos < 0 || pos + t > max_seq) return VQM_EINVAL; /* a query past the cache */
    attn_ctx a = { q, k_cache, v_cache, out, heads, kv_heads, t, d, max_seq, window, pos, scale };
    const int ntasks = kv_heads * t;
    if (threads <= 0) threads = vqm_get_num_threads();
    if (threads > ntasks) threads = ntasks;
    vqm_pool_run(threads, ntasks, task, &a);
    return VQM_OK;
}

int vqm_attention(const float *q, const float *k_cache, const float *v_cache, int heads, int kv_heads, int t, int d,
                  int max_seq, int64_t pos, float scale, int window, float *out, int threads)
{
    return run_attention(q, k_cache, v_cache, heads, kv_heads, t, d, max_seq, pos, scale, window, out, threads,
                         attn_task);
}

int vqm_attention_f16(const float *q, const uint16_t *k_cache, const uint16_t *v_cache, int heads, int kv_heads, int t,
                      int d, int max_seq, int64_t pos, float scale, int window, float *out, int threads)
{
    return run_attention(q, k_cache, v_cache, heads, kv_heads, t, d, max_seq, pos, scale, window, out, threads,
                         attn_task_f16);
}

/* One writer for both element types: a float16 cache takes each value rounded to nearest even (C's conversion, as
 * PyTorch's .to(torch.float16) rounds). Keys go to a transposed row: d values max_seq apart per position. */
int vqm_kv_write(const float *k, const float *v, void *k_cache, void *v_cache, int f16, int kv_heads, int t, int d,
                 int max_seq, int64_t pos)
{
    if (!k || !v || !k_cache || !v_cache || kv_heads < 1 || t < 0 || d < 1 || max_seq < 1) return VQM_EINVAL;
    if (pos < 0 || pos + t > max_seq) return VQM_EINVAL; /* a position past the cache */
    for (int i = 0; i < t; i++)
        for (int h = 0; h < kv_heads; h++) {
            const float *kr = k + ((int64_t)i * kv_heads + h) * d, *vr = v + ((int64_t)i * kv_heads + h) * d;
            const int64_t kt = (int64_t)h * d * max_seq + pos + i, vo = ((int64_t)h * max_seq + pos + i) * d;
            for (int c = 0; c < d; c++) {
                if (f16) {
                    ((_Float16 *)k_cache)[kt + (int64_t)c * max_seq] = (_Float16)kr[c];
                    ((_Float16 *)v_cache)[vo + c] = (_Float16)vr[c];
                } else {
                    ((float *)k_cache)[kt + (int64_t)c * max_seq] = kr[c];
                    ((float *)v_cache)[vo + c] = vr[c];
                }
            }
        }
    return VQM_OK;
}
