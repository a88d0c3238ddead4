/* C unit tests of the QuIP# kernels (vqm_hadamard, vqm_e8p_linear): every available SIMD path against the reference
 * (bit-identical for the transform and with int8 activations, FLOAT_TOL with float activations), the reference
 * against an independent double-precision computation, odd shapes (partial codes, partial chunks, batch > 8),
 * argument checks. Exit status 0 = all passed. */
#include "vqmobile.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t g_rng = 0x243f6a8885a308d3ull;
static uint32_t rnd(void)
{
    g_rng ^= g_rng << 13; g_rng ^= g_rng >> 7; g_rng ^= g_rng << 17;
    return (uint32_t)(g_rng >> 16);
}
static float rndf(void) { return ((float)(rnd() & 0xffffff) / 16777216.0f) * 2.0f - 1.0f; }

static int g_fail, g_checks, g_simd;
#define FLOAT_TOL 2e-5

static void fail(const char *what) { printf("FAIL %s\n", what); g_fail++; }

static int differs(const float *a, const float *b, long cnt)
{
    return memcmp(a, b, sizeof(float) * (size_t)cnt) != 0;
}

/* ---------------------------------------------------------------- hadamard */
static void test_hadamard(int m, int p, int batch, int flags, int in_place)
{
    const long n = (long)m * p;
    float *x = malloc(sizeof(float) * (size_t)(n * batch)), *y0 = malloc(sizeof(float) * (size_t)(n * batch));
    float *y1 = malloc(sizeof(float) * (size_t)(n * batch));
    int8_t *had = malloc((size_t)(m * m));
    uint8_t *signs = calloc((size_t)((n + 7) / 8), 1);
    for (long i = 0; i < n * batch; i++) x[i] = rndf() * ((i % 5) == 0 ? 10.0f : 1.0f);
    for (long i = 0; i < (long)m * m; i++) had[i] = (int8_t)((rnd() & 1) || m == 1 ? 1 : -1); /* H_1 = [1] */
    for (long j = 0; j < n; j++)
        if (rnd() & 1) signs[j / 8] |= (uint8_t)(1u << (j % 8));
    char what[160];
    snprintf(what, sizeof what, "hadamard m=%d p=%d batch=%d flags=%d in_place=%d", m, p, batch, flags, in_place);
    g_checks++;
    if (vqm_hadamard_path(VQM_PATH_REF, x, y0, batch, m, p, had, signs, flags) != VQM_OK) { fail(what); goto out; }
    /* double-precision expectation: dense (H_m (x) H_p) / sqrt(n) */
    for (int b = 0; b < batch; b++) {
        for (long o = 0; o < n; o++) {
            const long i = o / p, j = o % p;
            double acc = 0, mag = 0;
            for (long c = 0; c < n; c++) {
                const long l = c / p, jj = c % p;
                const int hm = (flags & VQM_HAD_TRANSPOSE) ? had[l * m + i] : had[i * m + l];
                const int hp = (__builtin_popcountl((unsigned long)(j & jj)) & 1) ? -1 : 1;
                double v = x[b * n + c];
                if (!(flags & VQM_HAD_TRANSPOSE) && ((signs[c / 8] >> (c % 8)) & 1)) v = -v;
                acc += hm * hp * v;
                mag += fabs(v);
            }
            acc /= sqrt((double)n);
            if ((flags & VQM_HAD_TRANSPOSE) && ((signs[o / 8] >> (o % 8)) & 1)) acc = -acc;
            if (fabs(acc - y0[b * n + o]) > 1e-5 * mag / sqrt((double)n) + 1e-6) {
                printf("FAIL %s ref vs double at %d,%ld: %.8g vs %.8g\n", what, b, o, y0[b * n + o], acc);
                g_fail++;
                goto out;
            }
        }
    }
    for (int path = 1; path < VQM_NPATHS; path++) {
        if (!vqm_path_available(path)) continue;
        g_checks++;
        float *dst = y1;
        if (in_place) memcpy(y1, x, sizeof(float) * (size_t)(n * batch));
        if (vqm_hadamard_path(path, in_place ? y1 : x, dst, batch, m, p, had, signs, flags) != VQM_OK ||
            differs(y1, y0, n * batch)) {
            printf("FAIL %s path %s differs from the reference\n", what, vqm_path_name(path));
            g_fail++;
        }
    }
out:
    free(x); free(y0); free(y1); free(had); free(signs);
}

static void test_hadamard_args(void)
{
    float v[64] = { 0 };
    int8_t h[4] = { 1, 1, 1, -1 };
    uint8_t s[8] = { 0 };
    g_checks++;
    if (vqm_hadamard(v, v, 1, 2, 3, h, s, 0) != VQM_EINVAL || vqm_hadamard(v, v, 1, 2, 2, NULL, s, 0) != VQM_EINVAL ||
        vqm_hadamard(v, v, 1, 0, 2, h, s, 0) != VQM_EINVAL || vqm_hadamard(v, v, 1, 257, 1, h, s, 0) != VQM_EINVAL ||
        vqm_hadamard(v, v, 1, 1, 2, NULL, s, 2) != VQM_EINVAL || vqm_hadamard(v, v, -1, 1, 2, NULL, s, 0) != VQM_EINVAL ||
        vqm_hadamard(v, v, 1, 1, 64, NULL, s, 0) != VQM_OK || vqm_hadamard(v, v, 0, 2, 2, h, s, 0) != VQM_OK)
        fail("hadamard argument checks");
}

/* ---------------------------------------------------------------- e8p */
static int8_t g_abs4[256][8], g_e81[256][8];

static int parity(unsigned b) { return __builtin_popcount(b & 0xffu) & 1; }

/* the stage integers of code j, decoded here from the header's definition */
static void stage_code(const uint8_t *p0, const uint8_t *p1, int e81, long j, int w[8])
{
    if (e81) {
        for (int t = 0; t < 8; t++) w[t] = g_e81[p0[j]][t];
        return;
    }
    const unsigned b = p1[j], par = (unsigned)parity(b), bp = b ^ par;
    for (int t = 0; t < 8; t++) w[t] = (((bp >> t) & 1u) ? -1 : 1) * g_abs4[p0[j]][t] + (par ? -1 : 1);
}

/* y = W x (double), x optionally replaced by its int8 quantization */
static void e8p_expect(const vqm_e8p_weight *w, const float *x, long batch, const float *bias, int int8, double *out,
                       double *mag)
{
    const long nc = (w->k + 7) / 8, blk = VQM_E8P_ACT_BLOCK, nblk = (w->k + blk - 1) / blk;
    const int nstage = w->bits == 2 ? 1 : 2;
    int8_t *q = malloc((size_t)w->k);
    float *xs = malloc(sizeof(float) * (size_t)nblk);
    for (long bi = 0; bi < batch; bi++) {
        if (int8) vqm_quantize_act(x + bi * w->k, w->k, blk, q, xs);
        for (long r = 0; r < w->n; r++) {
            double acc = 0, m = 0;
            for (int s = 0; s < nstage; s++) {
                const int e81 = s == 1 && w->bits == 3;
                const uint8_t *p0 = w->codes + (r * w->bits + 2 * s) * nc, *p1 = p0 + nc;
                for (long j = 0; j < nc; j++) {
                    int wv[8];
                    stage_code(p0, p1, e81, j, wv);
                    for (int t = 0; t < 8 && 8 * j + t < w->k; t++) {
                        const long c = 8 * j + t;
                        const double xv = int8 ? (double)q[c] * xs[c / blk] : x[bi * w->k + c];
                        acc += (double)wv[t] * w->scales[s] * xv;
                        m += fabs((double)wv[t] * w->scales[s] * xv);
                    }
                }
            }
            out[bi * w->n + r] = acc + (bias ? bias[r] : 0);
            mag[bi * w->n + r] = m + (bias ? fabs(bias[r]) : 0);
        }
    }
    free(q); free(xs);
}

static void test_e8p(int bits, int n, int k, int batch, int use_bias)
{
    const long nc = (k + 7) / 8;
    uint8_t *codes = malloc((size_t)(n * bits * nc));
    float scales[2] = { 0.003f + 0.001f * (float)(rnd() % 10), 0.0007f };
    float *x = malloc(sizeof(float) * (size_t)(batch * k)), *bias = malloc(sizeof(float) * (size_t)n);
    float *y0 = malloc(sizeof(float) * (size_t)(batch * n)), *y1 = malloc(sizeof(float) * (size_t)(batch * n));
    double *dref = malloc(sizeof(double) * (size_t)(batch * n)), *mag = malloc(sizeof(double) * (size_t)(batch * n));
    for (long i = 0; i < (long)n * bits * nc; i++) codes[i] = (uint8_t)rnd();
    for (long i = 0; i < (long)batch * k; i++) x[i] = rndf() * ((i % 7) == 0 ? 8.0f : 1.0f);
    for (long i = 0; i < n; i++) bias[i] = rndf();
    vqm_e8p_weight w = { n, k, bits, codes, scales };
    const float *bp = use_bias ? bias : NULL;
    char what[200];
    for (int int8 = 0; int8 <= 1; int8++) {
        const int flags = int8 ? VQM_ACT_INT8 : 0;
        snprintf(what, sizeof what, "e8p bits=%d n=%d k=%d batch=%d int8=%d", bits, n, k, batch, int8);
        g_checks++;
        if (vqm_e8p_linear_path(VQM_PATH_REF, &w, x, batch, bp, y0, flags, 1)) { fail(what); continue; }
        e8p_expect(&w, x, batch, bp, int8, dref, mag);
        for (long i = 0; i < (long)batch * n; i++)
            if (!(fabs(y0[i] - dref[i]) <= FLOAT_TOL * mag[i] + 1e-6)) {
                printf("FAIL %s ref vs double at %ld: %.8g vs %.8g\n", what, i, y0[i], dref[i]);
                g_fail++;
                break;
            }
        for (int path = 1; path < VQM_NPATHS; path++) {
            if (!vqm_path_available(path)) continue;
            g_simd += vqm_e8p_path_has_kernel(path, &w);
            for (int th = 1; th <= 3; th += 2) {
                memset(y1, 0xff, sizeof(float) * (size_t)(batch * n));
                g_checks++;
                if (vqm_e8p_linear_path(path, &w, x, batch, bp, y1, flags, th)) { fail(what); continue; }
                if (int8) {
                    if (differs(y1, y0, (long)batch * n)) {
                        printf("FAIL %s path %s threads %d differs from the reference\n", what, vqm_path_name(path), th);
                        g_fail++;
                    }
                } else {
                    for (long i = 0; i < (long)batch * n; i++)
                        if (!(fabs(y1[i] - dref[i]) <= FLOAT_TOL * mag[i] + 1e-6)) {
                            printf("FAIL %s path %s at %ld: %.8g vs %.8g\n", what, vqm_path_name(path), i, y1[i], dref[i]);
                            g_fail++;
                            break;
                        }
                }
            }
        }
    }
    free(codes); free(x); free(bias); free(y0); free(y1); free(dref); free(mag);
}

/* extreme inputs: the largest |w4| (15) with activations at +-127 in every column, for the int16 sums */
static void test_e8p_extreme(void)
{
    const int n = 4, k = 512, nc = k / 8;
    uint8_t codes[4 * 2 * 64];
    float scales[1] = { 0.01f }, x[512], y0[4], y1[4];
    /* abs index with |A4| = 14 in most coordinates: find the row with the largest sum */
    int best = 0, bsum = -1;
    for (int a = 0; a < 256; a++) {
        int s = 0;
        for (int t = 0; t < 8; t++) s += abs(g_abs4[a][t]);
        if (s > bsum) { bsum = s; best = a; }
    }
    for (int r = 0; r < n; r++)
        for (int j = 0; j < nc; j++) {
            codes[(r * 2) * nc + j] = (uint8_t)best;
            codes[(r * 2 + 1) * nc + j] = (uint8_t)(r == 0 ? 0 : r == 1 ? 0xff : (j & 1) ? 0x80 : 0x01);
        }
    for (int c = 0; c < k; c++) x[c] = (c & 1) ? -1.0f : 1.0f;
    vqm_e8p_weight w = { n, k, 2, codes, scales };
    g_checks++;
    if (vqm_e8p_linear_path(VQM_PATH_REF, &w, x, 1, NULL, y0, VQM_ACT_INT8, 1)) { fail("e8p extreme ref"); return; }
    for (int path = 1; path < VQM_NPATHS; path++) {
        if (!vqm_path_available(path)) continue;
        g_checks++;
        if (vqm_e8p_linear_path(path, &w, x, 1, NULL, y1, VQM_ACT_INT8, 1) || differs(y0, y1, n)) {
            printf("FAIL e8p extreme path %s\n", vqm_path_name(path));
            g_fail++;
        }
    }
}

static void test_e8p_args(void)
{
    uint8_t c[32] = { 0 };
    float s[2] = { 1, 1 }, x[8] = { 0 }, y[4];
    vqm_e8p_weight w = { 1, 8, 5, c, s };
    g_checks++;
    if (vqm_e8p_linear(&w, x, 1, NULL, y, 0, 1) != VQM_EINVAL) fail("e8p bits=5 accepted");
    w.bits = 2;
    if (vqm_e8p_linear(&w, x, 1, NULL, y, 2, 1) != VQM_EINVAL || vqm_e8p_linear(&w, NULL, 1, NULL, y, 0, 1) != VQM_EINVAL ||
        vqm_e8p_linear(NULL, x, 1, NULL, y, 0, 1) != VQM_EINVAL || vqm_e8p_linear(&w, x, 0, NULL, y, 0, 1) != VQM_OK)
        fail("e8p argument checks");
    w.k = 0;
    if (vqm_e8p_linear(&w, x, 1, NULL, y, 0, 1) != VQM_EINVAL) fail("e8p k=0 accepted");
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    const int quick = argc > 1 && !strcmp(argv[1], "--quick");
    printf("paths:");
    for (int p = 0; p < VQM_NPATHS; p++)
        if (vqm_path_available(p)) printf(" %s", vqm_path_name(p));
    printf(" (selected %s)\n", vqm_path_name(vqm_get_path()));
    vqm_e8p_tables(&g_abs4[0][0], &g_e81[0][0]);
    test_hadamard_args();
    static const int hcfg[][2] = { { 1, 1 }, { 1, 2 }, { 1, 4 }, { 1, 8 }, { 1, 64 }, { 1, 1024 }, { 12, 1 }, { 12, 8 },
                                   { 36, 16 }, { 12, 128 }, { 44, 2 }, { 84, 1 }, { 20, 4 }, { 3, 16 } };
    for (size_t i = 0; i < sizeof hcfg / sizeof hcfg[0]; i++)
        for (int f = 0; f <= 1; f++) test_hadamard(hcfg[i][0], hcfg[i][1], 1 + (int)(rnd() % 3), f, (int)(i & 1));
    test_e8p_args();
    test_e8p_extreme();
    static const int ecfg[][3] = { { 37, 172, 2 }, { 4, 264, 1 }, { 16, 576, 1 }, { 9, 1536, 5 }, { 3, 8, 1 },
                                   { 3, 4, 2 }, { 7, 520, 11 }, { 1, 300, 8 }, { 64, 1024, 1 } };
    const int ne = quick ? 5 : (int)(sizeof ecfg / sizeof ecfg[0]);
    for (int bits = 2; bits <= 4; bits++)
        for (int i = 0; i < ne; i++) test_e8p(bits, ecfg[i][0], ecfg[i][1], ecfg[i][2], (i & 1));
    printf("%s: %d checks, %d failures, %d SIMD kernel configurations exercised\n", g_fail ? "FAILED" : "OK", g_checks,
           g_fail, g_simd);
    return g_fail ? 1 : 0;
}
