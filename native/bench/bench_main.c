/* Standalone C benchmark: streaming-read bandwidth and y = W x for the VQ,
 * int4 and int8 kernels, and a float32 dense gemv of the same shape for
 * comparison, over a stack of distinct matrices (DRAM-resident by default).
 *   vqm_bench [-n N] [-k K] [-t threads] [-s stack_MB] [-r passes] [-p path] [-f] [-c name]
 *   -c: only the kernels whose name contains this substring.
 *   -f: float activations (default int8 activations); -s 0: one cached matrix.
 * Reports microseconds per product (best pass), weight GB/s, and per-product
 * CPU time of the calling thread (useful on a loaded machine). */
#include "vqmobile.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now(clockid_t c)
{
    struct timespec t;
    clock_gettime(c, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static uint64_t g_rng = 88172645463325252ull;
static void fill(void *p, size_t n)
{
    uint8_t *b = p;
    for (size_t i = 0; i < n; i++) {
        g_rng ^= g_rng << 13; g_rng ^= g_rng >> 7; g_rng ^= g_rng << 17;
        b[i] = (uint8_t)(g_rng >> 24);
    }
}

typedef struct { const char *name; int d, ncent, R, C; int bits, group; } cfg_t;

/* float32 dense y = W x (bits = 32 in the table). Memory-bound at these sizes, so the baseline vector width
 * of the build (SSE2 / NEON via 8-float vector types) is enough. */
static void dense_gemv(const float *W, const float *x, int n, int k, float *y)
{
    typedef float v8 __attribute__((vector_size(32)));
    for (int r = 0; r < n; r++) {
        const float *w = W + (size_t)r * (size_t)k;
        v8 a[4] = { { 0 }, { 0 }, { 0 }, { 0 } };
        int c = 0;
        for (; c + 32 <= k; c += 32)
            for (int j = 0; j < 4; j++) {
                v8 wv, xv;
                memcpy(&wv, w + c + 8 * j, sizeof wv);
                memcpy(&xv, x + c + 8 * j, sizeof xv);
                a[j] += wv * xv;
            }
        v8 s = (a[0] + a[1]) + (a[2] + a[3]);
        float acc = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
        for (; c < k; c++) acc += w[c] * x[c];
        y[r] = acc;
    }
}

/* -a POS: vqm_attention for one decoded token at position POS over 30 layers of SmolLM2-135M's geometry (9 query
 * heads, 3 kv heads, head dim 64, a 512-position cache), each layer's caches evicted from the CPU's caches before
 * the token (a 64 MB write), as in a model whose weights stream through between two tokens; the best of R passes */
static int bench_attention(long pos, int passes, int threads)
{
    enum { L = 30, H = 9, KV = 3, D = 64, S = 512 };
    if (pos < 0 || pos >= S) { fprintf(stderr, "-a: a position in 0..%d\n", S - 1); return 2; }
    float *kc = malloc(sizeof(float) * (size_t)L * KV * D * S), *vc = malloc(sizeof(float) * (size_t)L * KV * S * D);
    float *q = malloc(sizeof(float) * H * D), *out = malloc(sizeof(float) * H * D);
    size_t evict = (size_t)64 << 20;
    uint8_t *junk = malloc(evict);
    for (size_t i = 0; i < (size_t)L * KV * D * S; i++) { /* finite values in [-1, 1) */
        kc[i] = (float)(i % 2003) / 1001.5f - 1.0f;
        vc[i] = (float)(i % 1999) / 999.5f - 1.0f;
    }
    for (int i = 0; i < H * D; i++) q[i] = (float)((i * 37) % 101) / 50.0f - 1.0f;
    double best = 1e30;
    for (int p = 0; p < passes; p++) {
        memset(junk, p, evict);
        double t0 = now(CLOCK_MONOTONIC);
        for (int l = 0; l < L; l++)
            if (vqm_attention(q, kc + (size_t)l * KV * D * S, vc + (size_t)l * KV * S * D, H, KV, 1, D, S, pos,
                              0.125f, 0, out, threads) != VQM_OK) { fprintf(stderr, "attention failed\n"); return 1; }
        double t = now(CLOCK_MONOTONIC) - t0;
        if (t < best) best = t;
    }
    printf("attention, 30 layers x (9 heads, 3 kv heads, dim 64, cache 512), position %ld, threads %d: %.3f ms "
           "per token (best of %d)\n", pos, threads, best * 1e3, passes);
    free(kc); free(vc); free(q); free(out); free(junk);
    return 0;
}

int main(int argc, char **argv)
{
    int n = 4096, k = 4096, threads = 1, passes = 5, path = VQM_PATH_AUTO, flags = VQM_ACT_INT8;
    double stack_mb = 1100;
    const char *only = NULL;
    long attn_pos = -1;
    int opt;
    while ((opt = getopt(argc, argv, "n:k:t:s:r:p:fc:a:")) != -1) {
        switch (opt) {
        case 'n': n = atoi(optarg); break;
        case 'k': k = atoi(optarg); break;
        case 't': threads = atoi(optarg); break;
        case 's': stack_mb = atof(optarg); break;
        case 'r': passes = atoi(optarg); break;
        case 'p': for (int p = 0; p < VQM_NPATHS; p++) if (!strcmp(optarg, vqm_path_name(p))) path = p; break;
        case 'f': flags = 0; break;
        case 'c': only = optarg; break;
        case 'a': attn_pos = atol(optarg); break;
        default: fprintf(stderr, "usage: %s [-n N] [-k K] [-t threads] [-s stack_MB] [-r passes] [-p path] [-f] [-c name_substring] [-a position]\n", argv[0]); return 2;
        }
    }
    if (path != VQM_PATH_AUTO && vqm_set_path(path)) { fprintf(stderr, "path not available\n"); return 2; }
    if (attn_pos >= 0) return bench_attention(attn_pos, passes, threads);
    printf("path %s, %dx%d, threads %d, stack %.0f MB, %s activations\n", vqm_path_name(vqm_get_path()), n, k,
           threads, stack_mb, flags ? "int8" : "float");

    /* streaming read bandwidth over >= 1 GB */
    size_t sb = (size_t)1 << 30;
    uint8_t *buf = aligned_alloc(64, sb);
    memset(buf, 1, sb);
    double best = 1e30;
    for (int i = 0; i < 3; i++) {
        double t0 = now(CLOCK_MONOTONIC);
        volatile uint64_t s = vqm_stream_read(buf, sb, threads);
        (void)s;
        double t = now(CLOCK_MONOTONIC) - t0;
        if (t < best) best = t;
    }
    free(buf);
    printf("%-22s %8s %10s %8s %10s\n", "kernel", "bpv", "us", "GB/s", "cpu_us");
    printf("%-22s %8s %10s %8.2f\n", "stream-read", "-", "-", (double)sb / best / 1e9);

    static const cfg_t cfgs[] = {
        { "vq d2 k16 R8 (2.13)", 2, 16, 8, 256, 0, 0 }, { "vq d2 k16 R4 (2.27)", 2, 16, 4, 256, 0, 0 },
        { "vq d2 k64 R32 (3.13)", 2, 64, 32, 256, 0, 0 }, { "vq d4 k256 R128", 4, 256, 128, 256, 0, 0 },
        { "vq d1 k4 R1", 1, 4, 1, 256, 0, 0 }, { "int4 g32", 0, 0, 0, 0, 4, 32 }, { "int4 g128", 0, 0, 0, 0, 4, 128 },
        { "int8 g32", 0, 0, 0, 0, 8, 32 }, { "dense f32", 0, 0, 0, 0, 32, 0 },
    };
    float *x = malloc(sizeof(float) * (size_t)k), *y = malloc(sizeof(float) * (size_t)n);
    for (int i = 0; i < k; i++) x[i] = (float)((i * 37) % 101) / 50.0f - 1.0f;
    for (size_t c = 0; c < sizeof cfgs / sizeof cfgs[0]; c++) {
        const cfg_t *cf = &cfgs[c];
        if (only && !strstr(cf->name, only)) continue;
        size_t per;
        vqm_vq_weight vw = { n, k, cf->d, cf->ncent, cf->R, cf->C, NULL, NULL, NULL };
        vqm_int_weight iw = { n, k, cf->bits, cf->group, NULL, NULL, NULL };
        size_t a_bytes, b_bytes, s_bytes;
        if (cf->bits == 32) {
            a_bytes = sizeof(float) * (size_t)n * (size_t)k;
            b_bytes = s_bytes = 0;
        } else if (cf->d) {
            long nrb = (n + cf->R - 1) / cf->R, ncb = (k + cf->C - 1) / cf->C;
            a_bytes = (size_t)vqm_vq_row_bytes(&vw) * (size_t)n;
            b_bytes = (size_t)(nrb * ncb * cf->ncent * cf->d);
            s_bytes = (size_t)(nrb * ncb) * 2;
        } else {
            a_bytes = (size_t)vqm_int_row_bytes(&iw) * (size_t)n;
            b_bytes = 0;
            s_bytes = (size_t)n * (size_t)((k + cf->group - 1) / cf->group) * 2;
        }
        per = a_bytes + b_bytes + s_bytes;
        int m = stack_mb > 0 ? (int)(stack_mb * 1e6 / (double)per) + 1 : 1;
        uint8_t *mem = malloc(per * (size_t)m);
        if (cf->bits == 32) /* finite weights, no subnormals */
            for (size_t j = 0; j < per * (size_t)m / sizeof(float); j++) ((float *)(void *)mem)[j] = (float)(j % 61) / 30.0f - 1.0f;
        else
            fill(mem, per * (size_t)m);
        for (int i = 0; i < m; i++) { /* valid scales: small positive fp16 */
            uint16_t *s = (uint16_t *)(void *)(mem + (size_t)i * per + a_bytes + b_bytes);
            for (size_t j = 0; j < s_bytes / 2; j++) s[j] = 0x1800 + (uint16_t)(j & 0xff);
        }
        double bestw = 1e30, bestc = 1e30;
        for (int p = 0; p < passes + 1; p++) {
            double t0 = now(CLOCK_MONOTONIC), c0 = now(CLOCK_THREAD_CPUTIME_ID);
            for (int i = 0; i < m; i++) {
                uint8_t *base = mem + (size_t)i * per;
                int rc;
                if (cf->bits == 32) {
                    dense_gemv((const float *)(void *)base, x, n, k, y);
                    rc = 0;
                } else if (cf->d) {
                    vw.indices = base; vw.codebook = (const int8_t *)(base + a_bytes);
                    vw.scale = (const uint16_t *)(void *)(base + a_bytes + b_bytes);
                    rc = vqm_vq_linear(&vw, x, 1, NULL, y, flags, threads);
                } else {
                    iw.codes = base; iw.scales = (const uint16_t *)(void *)(base + a_bytes);
                    rc = vqm_int_linear(&iw, x, 1, NULL, y, flags, threads);
                }
                if (rc) { fprintf(stderr, "error %d\n", rc); return 1; }
            }
            double tw = (now(CLOCK_MONOTONIC) - t0) / m, tc = (now(CLOCK_THREAD_CPUTIME_ID) - c0) / m;
            if (p > 0 && tw < bestw) bestw = tw;
            if (p > 0 && tc < bestc) bestc = tc;
        }
        printf("%-22s %8.3f %10.1f %8.2f %10.1f\n", cf->name, (double)per * 8.0 / ((double)n * k), bestw * 1e6,
               (double)per / bestw / 1e9, bestc * 1e6);
        free(mem);
    }
    free(x); free(y);
    return 0;
}
