/* C unit tests: every available SIMD path against the reference on random
 * shapes (exact equality in int8-activation mode, relative tolerance in float
 * mode), the reference against an independent double-precision dequantized
 * product, validation, and the thread pool. Exit status 0 = all passed. */
#include "vqmobile.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t g_rng = 0x9e3779b97f4a7c15ull;
static uint32_t rnd(void)
{
    g_rng ^= g_rng << 13; g_rng ^= g_rng >> 7; g_rng ^= g_rng << 17;
    return (uint32_t)(g_rng >> 16);
}
static float rndf(void) { return ((float)(rnd() & 0xffffff) / 16777216.0f) * 2.0f - 1.0f; }

static uint16_t f2h(float f) /* simple float -> fp16 (normal range, truncating) */
{
    uint32_t b; memcpy(&b, &f, 4);
    uint32_t s = (b >> 16) & 0x8000u; int e = (int)((b >> 23) & 0xff) - 127 + 15; uint32_t m = (b >> 13) & 0x3ffu;
    if (e <= 0) return (uint16_t)s;
    if (e >= 31) return (uint16_t)(s | 0x7bffu);
    return (uint16_t)(s | ((uint32_t)e << 10) | m);
}

static int g_fail, g_checks;
#define FLOAT_TOL 2e-5   /* documented float-mode tolerance, relative to sum|w*x| + |bias| */

static unsigned code_at(const uint8_t *row, long j, int b)
{
    unsigned v = 0;
    for (int i = 0; i < b; i++) {
        long bit = j * b + i;
        v |= (unsigned)((row[bit / 8] >> (bit % 8)) & 1) << i;
    }
    return v;
}

static void fill_codes(uint8_t *codes, long nbytes_row, long n, long ncodes, int b, int maxcode)
{
    memset(codes, 0, (size_t)(nbytes_row * n));
    for (long r = 0; r < n; r++)
        for (long j = 0; j < ncodes; j++) {
            unsigned c = rnd() % (unsigned)maxcode;
            for (int i = 0; i < b; i++) {
                long bit = j * b + i;
                if ((c >> i) & 1) codes[r * nbytes_row + bit / 8] |= (uint8_t)(1u << (bit % 8));
            }
        }
    /* random padding bits in the last byte of each row must be ignored */
    long used = ncodes * b;
    if (used % 8)
        for (long r = 0; r < n; r++) codes[r * nbytes_row + nbytes_row - 1] |= (uint8_t)(0xffu << (used % 8));
}

/* y = W x + bias in double, W dequantized independently */
static void vq_dense(const vqm_vq_weight *w, const float *x, long batch, const float *bias, double *out, double *mag)
{
    int b = vqm_vq_index_bits(w->ncent);
    long rowbytes = (long)vqm_vq_row_bytes(w), ncb = (w->k + w->cols_per_block - 1) / w->cols_per_block;
    for (long bi = 0; bi < batch; bi++)
        for (long r = 0; r < w->n; r++) {
            double acc = 0, m = 0;
            for (long c = 0; c < w->k; c++) {
                long j = c / w->d, t = c % w->d, cb = c / w->cols_per_block, rb = r / w->rows_per_block;
                unsigned idx = code_at(w->indices + r * rowbytes, j, b);
                double wv = (double)w->codebook[((rb * ncb + cb) * w->ncent + idx) * w->d + t] *
                            (double)vqm_fp16_to_float(w->scale[rb * ncb + cb]);
                acc += wv * x[bi * w->k + c];
                m += fabs(wv * x[bi * w->k + c]);
            }
            out[bi * w->n + r] = acc + (bias ? bias[r] : 0);
            mag[bi * w->n + r] = m + (bias ? fabs(bias[r]) : 0);
        }
}

static void int_dense(const vqm_int_weight *w, const float *x, long batch, const float *bias, double *out, double *mag)
{
    long rowbytes = (long)vqm_int_row_bytes(w), ng = (w->k + w->group - 1) / w->group;
    for (long bi = 0; bi < batch; bi++)
        for (long r = 0; r < w->n; r++) {
            double acc = 0, m = 0;
            for (long c = 0; c < w->k; c++) {
                long g = c / w->group;
                int z = w->zeros ? w->zeros[r * ng + g] : 1 << (w->bits - 1);
                double wv = ((double)code_at(w->codes + r * rowbytes, c, w->bits) - z) * (double)vqm_fp16_to_float(w->scales[r * ng + g]);
                acc += wv * x[bi * w->k + c];
                m += fabs(wv * x[bi * w->k + c]);
            }
            out[bi * w->n + r] = acc + (bias ? bias[r] : 0);
            mag[bi * w->n + r] = m + (bias ? fabs(bias[r]) : 0);
        }
}

static void check_close(const char *what, const float *y, const double *ref, const double *mag, long cnt, double tol)
{
    g_checks++;
    for (long i = 0; i < cnt; i++) {
        double e = fabs((double)y[i] - ref[i]);
        if (!(e <= tol * mag[i] + 1e-6)) {
            printf("FAIL %s: elem %ld got %.8g want %.8g (err %.3g, mag %.3g)\n", what, i, y[i], ref[i], e, mag[i]);
            g_fail++;
            return;
        }
    }
}

static void check_equal(const char *what, const float *y, const float *ref, long cnt)
{
    g_checks++;
    for (long i = 0; i < cnt; i++)
        if (memcmp(&y[i], &ref[i], 4)) {
            printf("FAIL %s: elem %ld got %.9g want %.9g (must be bit-identical)\n", what, i, y[i], ref[i]);
            g_fail++;
            return;
        }
}

/* exact int8-activation expectation computed here from the quantized activations */
static void vq_int8_expect(const vqm_vq_weight *w, const float *x, long batch, const float *bias, double *out, double *mag)
{
    long C = w->cols_per_block, ncb = (w->k + C - 1) / C;
    int8_t *q = malloc((size_t)w->k);
    float *xs = malloc(sizeof(float) * (size_t)ncb);
    float *xd = malloc(sizeof(float) * (size_t)w->k);
    for (long bi = 0; bi < batch; bi++) {
        vqm_quantize_act(x + bi * w->k, w->k, C, q, xs);
        for (long c = 0; c < w->k; c++) xd[c] = (float)q[c] * xs[c / C];
        vq_dense(w, xd, 1, bias, out + bi * w->n, mag + bi * w->n);
    }
    free(q); free(xs); free(xd);
}

static void int_int8_expect(const vqm_int_weight *w, const float *x, long batch, const float *bias, double *out, double *mag)
{
    long G = w->group, ng = (w->k + G - 1) / G;
    int8_t *q = malloc((size_t)w->k);
    float *xs = malloc(sizeof(float) * (size_t)ng);
    float *xd = malloc(sizeof(float) * (size_t)w->k);
    for (long bi = 0; bi < batch; bi++) {
        vqm_quantize_act(x + bi * w->k, w->k, G, q, xs);
        for (long c = 0; c < w->k; c++) xd[c] = (float)q[c] * xs[c / G];
        int_dense(w, xd, 1, bias, out + bi * w->n, mag + bi * w->n);
    }
    free(q); free(xs); free(xd);
}

/* vqm_quantize_act (four lanes at a time) against the scalar rule written out here: amax over the block, v = x *
 * (127 / amax), NaN -> 0, clamp to +-127, lrintf (half to even); on ties, NaN, infinities, zeros and odd lengths */
static void test_quantize_act(void)
{
    static const float special[] = { 0.5f, -0.5f, 1.5f, -2.5f, 126.5f, -126.5f, 127.0f, NAN, 0.0f, -0.0f, 3.25f };
    float x[300];
    int8_t q[300];
    float xs[8];
    for (int trial = 0; trial < 40; trial++) {
        const int k = 1 + (int)(rnd() % 300), blk = 1 + (int)(rnd() % 80);
        for (int i = 0; i < k; i++) x[i] = trial % 4 == 0 ? special[rnd() % 11] : 4.0f * rndf() * (float)(1 + rnd() % 3);
        if (trial % 5 == 1) x[rnd() % k] = INFINITY;
        if (trial % 7 == 2) for (int i = 0; i < k && i < blk; i++) x[i] = 0.0f; /* an all-zero block */
        if (k / blk + 1 > 8) continue;
        g_checks++;
        vqm_quantize_act(x, k, blk, q, xs);
        for (int c0 = 0, bi = 0; c0 < k; c0 += blk, bi++) {
            const int c1 = c0 + blk < k ? c0 + blk : k;
            float amax = 0.0f;
            for (int c = c0; c < c1; c++) amax = fabsf(x[c]) > amax ? fabsf(x[c]) : amax;
            const float inv = amax == 0.0f ? 0.0f : 127.0f / amax, want_s = amax == 0.0f ? 0.0f : amax / 127.0f;
            int bad = memcmp(&xs[bi], &want_s, 4) != 0;
            for (int c = c0; c < c1 && !bad; c++) {
                float v = x[c] * inv;
                v = v != v ? 0.0f : v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
                if (q[c] != (int8_t)(amax == 0.0f ? 0 : lrintf(v))) bad = 1;
            }
            if (bad) {
                printf("FAIL quantize_act k=%d blk=%d block %d\n", k, blk, bi);
                g_fail++;
                break;
            }
        }
    }
}

static int g_simd_kernels;

static void test_vq(int d, int ncent, int R, int C, int n, int k, int batch, int use_bias)
{
    vqm_vq_weight w = { n, k, d, ncent, R, C, NULL, NULL, NULL };
    int b = vqm_vq_index_bits(ncent);
    long rowbytes = (long)vqm_vq_row_bytes(&w);
    long nrb = (n + R - 1) / R, ncb = (k + C - 1) / C, v = (k + d - 1) / d;
    uint8_t *idx = malloc((size_t)(rowbytes * n));
    int8_t *cb = malloc((size_t)(nrb * ncb * ncent * d));
    uint16_t *sc = malloc(sizeof(uint16_t) * (size_t)(nrb * ncb));
    float *x = malloc(sizeof(float) * (size_t)(batch * k)), *bias = malloc(sizeof(float) * (size_t)n);
    float *y0 = malloc(sizeof(float) * (size_t)(batch * n)), *y1 = malloc(sizeof(float) * (size_t)(batch * n));
    double *dref = malloc(sizeof(double) * (size_t)(batch * n)), *mag = malloc(sizeof(double) * (size_t)(batch * n));
    fill_codes(idx, rowbytes, n, v, b, ncent);
    for (long i = 0; i < nrb * ncb * ncent * d; i++) cb[i] = (int8_t)(rnd() & 0xff); /* includes -128 */
    for (long i = 0; i < nrb * ncb; i++) sc[i] = f2h(0.001f + 0.01f * (float)(rnd() % 100) / 100.0f);
    for (long i = 0; i < (long)batch * k; i++) x[i] = rndf() * ((i % 7) == 0 ? 8.0f : 1.0f);
    for (long i = 0; i < n; i++) bias[i] = rndf();
    w.indices = idx; w.codebook = cb; w.scale = sc;
    const float *bp = use_bias ? bias : NULL;
    char what[256];
    if (vqm_vq_validate(&w, NULL, NULL) != VQM_OK) { printf("FAIL validate rejected valid weights\n"); g_fail++; }

    for (int int8 = 0; int8 <= 1; int8++) {
        int flags = int8 ? VQM_ACT_INT8 : 0;
        snprintf(what, sizeof what, "vq d=%d k=%d R=%d C=%d n=%d K=%d batch=%d int8=%d ref-vs-dense", d, ncent, R, C, n, k, batch, int8);
        if (vqm_vq_linear_path(VQM_PATH_REF, &w, x, batch, bp, y0, flags, 1)) { printf("FAIL %s: rc\n", what); g_fail++; continue; }
        if (int8) vq_int8_expect(&w, x, batch, bp, dref, mag); else vq_dense(&w, x, batch, bp, dref, mag);
        check_close(what, y0, dref, mag, (long)batch * n, FLOAT_TOL);
        for (int p = 1; p < VQM_NPATHS; p++) {
            if (!vqm_path_available(p)) continue;
            g_simd_kernels += vqm_vq_path_has_kernel(p, &w);
            for (int th = 1; th <= 3; th += 2) {
                memset(y1, 0xff, sizeof(float) * (size_t)(batch * n));
                snprintf(what, sizeof what, "vq d=%d k=%d R=%d C=%d n=%d K=%d batch=%d int8=%d path=%s threads=%d",
                         d, ncent, R, C, n, k, batch, int8, vqm_path_name(p), th);
                if (vqm_vq_linear_path(p, &w, x, batch, bp, y1, flags, th)) { printf("FAIL %s: rc\n", what); g_fail++; continue; }
                if (int8) check_equal(what, y1, y0, (long)batch * n);
                else check_close(what, y1, dref, mag, (long)batch * n, FLOAT_TOL);
            }
        }
    }
    free(idx); free(cb); free(sc); free(x); free(bias); free(y0); free(y1); free(dref); free(mag);
}

static void test_int(int bits, int G, int asym, int n, int k, int batch, int use_bias)
{
    vqm_int_weight w = { n, k, bits, G, NULL, NULL, NULL };
    long rowbytes = (long)vqm_int_row_bytes(&w), ng = (k + G - 1) / G;
    uint8_t *codes = malloc((size_t)(rowbytes * n)), *zeros = malloc((size_t)(n * ng));
    uint16_t *sc = malloc(sizeof(uint16_t) * (size_t)(n * ng));
    float *x = malloc(sizeof(float) * (size_t)(batch * k)), *bias = malloc(sizeof(float) * (size_t)n);
    float *y0 = malloc(sizeof(float) * (size_t)(batch * n)), *y1 = malloc(sizeof(float) * (size_t)(batch * n));
    double *dref = malloc(sizeof(double) * (size_t)(batch * n)), *mag = malloc(sizeof(double) * (size_t)(batch * n));
    fill_codes(codes, rowbytes, n, k, bits, 1 << bits);
    for (long i = 0; i < n * ng; i++) { zeros[i] = (uint8_t)(rnd() % (1u << bits)); sc[i] = f2h(0.001f + 0.01f * (float)(rnd() % 100) / 100.0f); }
    for (long i = 0; i < (long)batch * k; i++) x[i] = rndf() * ((i % 5) == 0 ? 4.0f : 1.0f);
    for (long i = 0; i < n; i++) bias[i] = rndf();
    w.codes = codes; w.scales = sc; w.zeros = asym ? zeros : NULL;
    const float *bp = use_bias ? bias : NULL;
    char what[256];
    for (int int8 = 0; int8 <= 1; int8++) {
        int flags = int8 ? VQM_ACT_INT8 : 0;
        snprintf(what, sizeof what, "int b=%d G=%d asym=%d n=%d K=%d batch=%d int8=%d ref-vs-dense", bits, G, asym, n, k, batch, int8);
        if (vqm_int_linear_path(VQM_PATH_REF, &w, x, batch, bp, y0, flags, 1)) { printf("FAIL %s: rc\n", what); g_fail++; continue; }
        if (int8) int_int8_expect(&w, x, batch, bp, dref, mag); else int_dense(&w, x, batch, bp, dref, mag);
        check_close(what, y0, dref, mag, (long)batch * n, FLOAT_TOL);
        for (int p = 1; p < VQM_NPATHS; p++) {
            if (!vqm_path_available(p)) continue;
            g_simd_kernels += vqm_int_path_has_kernel(p, &w);
            for (int th = 1; th <= 3; th += 2) {
                memset(y1, 0xff, sizeof(float) * (size_t)(batch * n));
                snprintf(what, sizeof what, "int b=%d G=%d asym=%d n=%d K=%d batch=%d int8=%d path=%s threads=%d",
                         bits, G, asym, n, k, batch, int8, vqm_path_name(p), th);
                if (vqm_int_linear_path(p, &w, x, batch, bp, y1, flags, th)) { printf("FAIL %s: rc\n", what); g_fail++; continue; }
                if (int8) check_equal(what, y1, y0, (long)batch * n);
                else check_close(what, y1, dref, mag, (long)batch * n, FLOAT_TOL);
            }
        }
    }
    free(codes); free(zeros); free(sc); free(x); free(bias); free(y0); free(y1); free(dref); free(mag);
}

/* saturated inputs (every code 15 or 0, every activation +-max): int16 partial sums in the SIMD int4 and VQ
 * kernels must not overflow */
static void test_extreme(void)
{
    static const int groups[] = { 32, 64, 128, 256, 512, 1024 };
    const int n = 9, k = 2048;
    uint8_t *codes = malloc((size_t)(n * k));
    uint16_t *sc = malloc(sizeof(uint16_t) * (size_t)(n * k));
    int8_t *cb = malloc((size_t)(n * k));
    float *x = malloc(sizeof(float) * (size_t)k), *y0 = malloc(sizeof(float) * (size_t)n), *y1 = malloc(sizeof(float) * (size_t)n);
    char what[160];
    for (int pat = 0; pat < 4; pat++) {
        for (int i = 0; i < k; i++) x[i] = pat & 1 ? ((i & 1) ? -1.0f : 1.0f) : 1.0f;
        memset(codes, pat & 2 ? 0x00 : 0xff, (size_t)(n * k));
        for (int i = 0; i < n * k; i++) sc[i] = 0x3c00;
        for (size_t gi = 0; gi < sizeof groups / sizeof groups[0]; gi++) {
            vqm_int_weight w = { n, k, 4, groups[gi], codes, sc, NULL };
            vqm_int_linear_path(VQM_PATH_REF, &w, x, 1, NULL, y0, VQM_ACT_INT8, 1);
            for (int p = 1; p < VQM_NPATHS; p++) {
                if (!vqm_path_available(p)) continue;
                snprintf(what, sizeof what, "extreme int4 G=%d pattern=%d path=%s", groups[gi], pat, vqm_path_name(p));
                if (vqm_int_linear_path(p, &w, x, 1, NULL, y1, VQM_ACT_INT8, 1)) { printf("FAIL %s: rc\n", what); g_fail++; continue; }
                check_equal(what, y1, y0, n);
            }
        }
        /* VQ: codebooks of +-127 / -128, indices all ones or zeros */
        static const int vcfg[][4] = { { 2, 16, 4, 256 }, { 2, 64, 32, 256 }, { 1, 16, 8, 1024 }, { 4, 64, 4, 2048 } };
        for (size_t c = 0; c < sizeof vcfg / sizeof vcfg[0]; c++) {
            vqm_vq_weight w = { n, k, vcfg[c][0], vcfg[c][1], vcfg[c][2], vcfg[c][3], codes, cb, sc };
            long ncb = (long)((n + w.rows_per_block - 1) / w.rows_per_block) * ((k + w.cols_per_block - 1) / w.cols_per_block);
            for (long i = 0; i < ncb * w.ncent * w.d; i++) cb[i] = (int8_t)(pat & 2 ? (i & 1 ? -128 : 127) : (i % 3 ? 127 : -127));
            vqm_vq_linear_path(VQM_PATH_REF, &w, x, 1, NULL, y0, VQM_ACT_INT8, 1);
            for (int p = 1; p < VQM_NPATHS; p++) {
                if (!vqm_path_available(p)) continue;
                snprintf(what, sizeof what, "extreme vq d=%d k=%d pattern=%d path=%s", w.d, w.ncent, pat, vqm_path_name(p));
                if (vqm_vq_linear_path(p, &w, x, 1, NULL, y1, VQM_ACT_INT8, 1)) { printf("FAIL %s: rc\n", what); g_fail++; continue; }
                check_equal(what, y1, y0, n);
            }
        }
    }
    free(codes); free(sc); free(cb); free(x); free(y0); free(y1);
}

/* 8-bit codes at the extremes (q = 0 / 255, zeros 0 / 128 / 255, activations +-127 after quantization):
 * w = q - 128 = -128 meets negative activations, and asymmetric |q - z| reaches 255 */
static void test_extreme8(void)
{
    static const int groups[] = { 32, 64, 128, 1024 };
    const int n = 9, k = 2048, batch = 3;
    const long ng_max = k / 32;
    uint8_t *codes = malloc((size_t)(n * k)), *zeros = malloc((size_t)(n * ng_max));
    uint16_t *sc = malloc(sizeof(uint16_t) * (size_t)(n * ng_max));
    float *x = malloc(sizeof(float) * (size_t)(batch * k)), *y0 = malloc(sizeof(float) * (size_t)(batch * n));
    float *y1 = malloc(sizeof(float) * (size_t)(batch * n));
    double *dref = malloc(sizeof(double) * (size_t)(batch * n)), *mag = malloc(sizeof(double) * (size_t)(batch * n));
    char what[160];
    for (int i = 0; i < n * ng_max; i++) sc[i] = 0x3c00;
    for (int pat = 0; pat < 5; pat++) {
        for (int i = 0; i < batch * k; i++) {
            float v = pat & 1 ? ((i & 1) ? -1.0f : 1.0f) : 1.0f;
            x[i] = pat == 4 ? (rnd() & 1 ? -1.0f : 1.0f) : v;
        }
        for (int i = 0; i < n * k; i++) codes[i] = pat == 4 ? (rnd() & 1 ? 0xff : 0x00) : pat & 2 ? 0x00 : 0xff;
        for (int zmode = 0; zmode < 4; zmode++) {
            for (int i = 0; i < n * ng_max; i++)
                zeros[i] = zmode == 1 ? 0 : zmode == 2 ? 255 : zmode == 3 ? (rnd() & 1 ? 0 : 255) : 128;
            for (size_t gi = 0; gi < sizeof groups / sizeof groups[0]; gi++) {
                vqm_int_weight w = { n, k, 8, groups[gi], codes, sc, zmode ? zeros : NULL };
                for (int int8 = 0; int8 <= 1; int8++) {
                    const int flags = int8 ? VQM_ACT_INT8 : 0;
                    vqm_int_linear_path(VQM_PATH_REF, &w, x, batch, NULL, y0, flags, 1);
                    if (!int8) int_dense(&w, x, batch, NULL, dref, mag);
                    for (int p = 1; p < VQM_NPATHS; p++) {
                        if (!vqm_path_available(p)) continue;
                        for (int b = 1; b <= batch; b += batch - 1) {
                            snprintf(what, sizeof what, "extreme int8 G=%d pattern=%d zeros=%d int8=%d batch=%d path=%s",
                                     groups[gi], pat, zmode, int8, b, vqm_path_name(p));
                            if (vqm_int_linear_path(p, &w, x, b, NULL, y1, flags, 1)) { printf("FAIL %s: rc\n", what); g_fail++; continue; }
                            if (int8) check_equal(what, y1, y0, (long)b * n);
                            else check_close(what, y1, dref, mag, (long)b * n, FLOAT_TOL);
                        }
                    }
                }
            }
        }
    }
    free(codes); free(zeros); free(sc); free(x); free(y0); free(y1); free(dref); free(mag);
}

static void test_validation(void)
{
    /* k=5 (3-bit codes): a code of 7 must be rejected */
    uint8_t idx[2 * 2] = { 0 };
    int8_t cb[5 * 2] = { 0 };
    uint16_t sc[1] = { 0x3c00 };
    vqm_vq_weight w = { 2, 10, 2, 5, 2, 10, idx, cb, sc };
    g_checks++;
    if (vqm_vq_validate(&w, NULL, NULL) != VQM_OK) { printf("FAIL validate zero indices\n"); g_fail++; }
    idx[2] = 7 << 3; /* row 1, code 1 */
    int64_t br = -1, bp = -1;
    g_checks++;
    if (vqm_vq_validate(&w, &br, &bp) != VQM_EINDEX || br != 1 || bp != 1) { printf("FAIL validate bad index (%ld,%ld)\n", (long)br, (long)bp); g_fail++; }
    /* the hot path clamps instead of reading outside the codebook */
    float x[10] = { 1 }, y[2];
    g_checks++;
    if (vqm_vq_linear(&w, x, 1, NULL, y, 0, 1) != VQM_OK) { printf("FAIL linear on unvalidated data\n"); g_fail++; }
    vqm_vq_weight bad = w;
    bad.cols_per_block = 3; /* not a multiple of d */
    g_checks++;
    if (vqm_vq_linear(&bad, x, 1, NULL, y, 0, 1) != VQM_EINVAL) { printf("FAIL bad C accepted\n"); g_fail++; }
    bad = w; bad.ncent = 300;
    g_checks++;
    if (vqm_vq_validate(&bad, NULL, NULL) != VQM_EINVAL) { printf("FAIL bad ncent accepted\n"); g_fail++; }
}

/* Every path returns the reference's indices exactly; the reference returns the first minimum of the distances
 * computed here independently. Values on a coarse grid, duplicated centroids and zero weights make ties common. */
static void test_nearest(int d, int ncent, long nb, long m)
{
    long nx = nb * m * d, nc = nb * ncent * d;
    float *x = malloc(sizeof(float) * (size_t)nx), *w = malloc(sizeof(float) * (size_t)nx);
    float *c = malloc(sizeof(float) * (size_t)nc);
    int64_t *ref = malloc(sizeof(int64_t) * (size_t)(nb * m)), *got = malloc(sizeof(int64_t) * (size_t)(nb * m));
    for (long i = 0; i < nx; i++) {
        x[i] = (float)((int)(rnd() % 17) - 8) * 0.25f;
        w[i] = rnd() % 5 == 0 ? 0.0f : (float)(1 + rnd() % 4) * 0.5f;
    }
    for (long i = 0; i < nc; i++) c[i] = (i / d) % 3 == 2 ? c[i - d] : (float)((int)(rnd() % 9) - 4) * 0.5f;
    g_checks++;
    if (vqm_nearest_path(VQM_PATH_REF, x, w, c, nb, m, d, ncent, ref, 2) != VQM_OK) {
        printf("FAIL nearest ref d=%d k=%d\n", d, ncent);
        g_fail++;
    }
    for (long p = 0; p < nb; p++)
        for (long i = 0; i < m; i++) {
            const float *xi = x + (p * m + i) * d, *wi = w + (p * m + i) * d;
            float best = INFINITY;
            long bj = 0;
            for (long j = 0; j < ncent; j++) {
                float s = 0.0f;
                for (int t = 0; t < d; t++) {
                    float df = xi[t] - c[(p * ncent + j) * d + t];
                    s = s + wi[t] * (df * df);
                }
                if (s < best) { best = s; bj = j; }
            }
            if (ref[p * m + i] != bj) {
                printf("FAIL nearest ref d=%d k=%d p=%ld i=%ld: %ld != %ld\n", d, ncent, p, i, (long)ref[p * m + i], bj);
                g_fail++;
                p = nb;
                break;
            }
        }
    for (int path = 1; path < VQM_NPATHS; path++) {
        if (!vqm_path_available(path)) continue;
        for (int threads = 1; threads <= 3; threads += 2) {
            memset(got, 0xff, sizeof(int64_t) * (size_t)(nb * m));
            g_checks++;
            if (vqm_nearest_path(path, x, w, c, nb, m, d, ncent, got, threads) != VQM_OK ||
                memcmp(got, ref, sizeof(int64_t) * (size_t)(nb * m))) {
                printf("FAIL nearest %s d=%d k=%d nb=%ld m=%ld threads=%d\n", vqm_path_name(path), d, ncent, nb, m,
                       threads);
                g_fail++;
            }
        }
    }
    free(x); free(w); free(c); free(ref); free(got);
}

static void test_nearest_args(void)
{
    float v[8] = { 0 };
    int64_t o[1];
    g_checks++;
    if (vqm_nearest(v, v, v, 1, 1, 9, 1, o, 1) != VQM_EINVAL || vqm_nearest(v, v, v, 1, 1, 2, 0, o, 1) != VQM_EINVAL ||
        vqm_nearest(v, v, v, 1, 1, 2, 65537, o, 1) != VQM_EINVAL || vqm_nearest(NULL, v, v, 1, 1, 1, 1, o, 1) != VQM_EINVAL ||
        vqm_nearest(v, v, v, 1, -1, 1, 1, o, 1) != VQM_EINVAL || vqm_nearest(NULL, NULL, NULL, 0, 5, 1, 1, NULL, 1) != VQM_OK) {
        printf("FAIL nearest argument checks\n");
        g_fail++;
    }
    /* NaN distances never win; all-NaN gives 0 on every path */
    float x[2] = { NAN, 1.0f }, w[2] = { 1.0f, 1.0f }, c[18];
    for (int i = 0; i < 18; i++) c[i] = (float)i;
    for (int path = 0; path < VQM_NPATHS; path++) {
        if (!vqm_path_available(path)) continue;
        int64_t out[1] = { -1 };
        g_checks++;
        if (vqm_nearest_path(path, x, w, c, 1, 1, 2, 9, out, 1) != VQM_OK || out[0] != 0) {
            printf("FAIL nearest NaN %s: %ld\n", vqm_path_name(path), (long)out[0]);
            g_fail++;
        }
    }
}

/* a float16 cache holding exactly the float cache's values (which are rounded to float16 first) */
static uint16_t *to_f16(float *x, int n)
{
    uint16_t *h = malloc(sizeof(uint16_t) * (size_t)n);
    for (int i = 0; i < n; i++) {
        _Float16 v = (_Float16)x[i];
        x[i] = (float)v;
        memcpy(&h[i], &v, sizeof v);
    }
    return h;
}

/* vqm_attention and vqm_attention_f16 against a double-precision attention over the same cache (positions the query
 * sees only), with grouped heads, a sliding window, several queries at once and threads; and the argument checks */
static void test_attention(int heads, int kv, int t, int d, int S, long pos, int window)
{
    float *q = malloc(sizeof(float) * (size_t)(heads * t * d)), *kc = malloc(sizeof(float) * (size_t)(kv * d * S));
    float *vc = malloc(sizeof(float) * (size_t)(kv * S * d)), *out = malloc(sizeof(float) * (size_t)(heads * t * d));
    double *sc = malloc(sizeof(double) * (size_t)S);
    for (int i = 0; i < heads * t * d; i++) q[i] = 2.0f * rndf();
    for (int i = 0; i < kv * d * S; i++) kc[i] = rndf();
    for (int i = 0; i < kv * S * d; i++) vc[i] = rndf();
    uint16_t *kh = to_f16(kc, kv * d * S), *vh = to_f16(vc, kv * S * d);
    const float scale = 1.0f / sqrtf((float)d);
    for (int run = 0; run < 4; run++) {
        const int th = 1 + (run & 1), f16 = run >> 1;
        char what[160];
        snprintf(what, sizeof what, "attention%s H=%d Hkv=%d T=%d D=%d S=%d pos=%ld window=%d threads=%d",
                 f16 ? "_f16" : "", heads, kv, t, d, S, pos, window, th);
        g_checks++;
        const int rc = f16 ? vqm_attention_f16(q, kh, vh, heads, kv, t, d, S, pos, scale, window, out, th)
                           : vqm_attention(q, kc, vc, heads, kv, t, d, S, pos, scale, window, out, th);
        if (rc != VQM_OK) {
            printf("FAIL %s: rc\n", what);
            g_fail++;
            continue;
        }
        int bad = 0;
        for (int hq = 0; hq < heads && !bad; hq++)
            for (int i = 0; i < t && !bad; i++) {
                const int h = hq / (heads / kv);
                const long p = pos + i, lo = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
                double m = -1e300, sum = 0;
                for (long j = lo; j <= p; j++) {
                    double a = 0;
                    for (int c = 0; c < d; c++) a += (double)q[(i * heads + hq) * d + c] * kc[((long)h * d + c) * S + j];
                    sc[j] = a * scale;
                    m = sc[j] > m ? sc[j] : m;
                }
                for (long j = lo; j <= p; j++) sum += (sc[j] = exp(sc[j] - m));
                for (int c = 0; c < d && !bad; c++) {
                    double o = 0;
                    for (long j = lo; j <= p; j++) o += sc[j] * vc[((long)h * S + j) * d + c];
                    o /= sum;
                    if (!(fabs(out[(i * heads + hq) * d + c] - o) <= 1e-5 + 1e-5 * fabs(o))) {
                        printf("FAIL %s: head %d query %d component %d got %.8g want %.8g\n", what, hq, i, c,
                               out[(i * heads + hq) * d + c], o);
                        bad = 1;
                    }
                }
            }
        g_fail += bad;
    }
    g_checks++;
    if (vqm_attention(q, kc, vc, heads, kv, t, d, S, S - t + 1, scale, window, out, 1) != VQM_EINVAL ||
        vqm_attention(q, kc, vc, heads, heads + 1, t, d, S, 0, scale, window, out, 1) != VQM_EINVAL ||
        vqm_attention(NULL, kc, vc, heads, kv, t, d, S, 0, scale, window, out, 1) != VQM_EINVAL ||
        vqm_attention_f16(q, kh, vh, heads, kv, t, d, S, S - t + 1, scale, window, out, 1) != VQM_EINVAL ||
        vqm_attention_f16(q, NULL, vh, heads, kv, t, d, S, 0, scale, window, out, 1) != VQM_EINVAL) {
        printf("FAIL attention argument checks\n");
        g_fail++;
    }
    free(q); free(kc); free(vc); free(kh); free(vh); free(out); free(sc);
}

/* ---------------------------------------------------------------- column-vector VQ (VPTQ) */
/* FNV-1a over the bit patterns of n floats: the decoder steps' outputs must be the same on every build (x86 clones,
 * arm64), which tests/test_native_c.py checks by running `vqm_test --steps` on each */
static uint64_t g_steps_hash = 0xcbf29ce484222325ull;
static void hash_floats(const float *y, long n)
{
    const unsigned char *b = (const unsigned char *)y;
    for (long i = 0; i < 4 * n; i++) g_steps_hash = (g_steps_hash ^ b[i]) * 0x100000001b3ull;
}

/* RMSNorm (plain and after a residual sum), RoPE (full and partial rotary dimensions) and silu(gate) * up against
 * double precision, with row lengths that leave a vector tail, and their argument checks */
static void test_decoder_steps(void)
{
    enum { ROWS = 3, D = 83, T = 2, H = 3, HD = 20 };
    float x[ROWS * 2 * D], r[ROWS * D], w[D], y[ROWS * 2 * D], sum[ROWS * D], y2[ROWS * D];
    double ref[ROWS * 2 * D], mag[ROWS * 2 * D];
    for (int i = 0; i < ROWS * 2 * D; i++) x[i] = 3.0f * rndf();
    x[5] = 40.0f; x[6] = -40.0f; x[7] = 0.0f; /* silu's saturated ends and zero */
    for (int i = 0; i < ROWS * D; i++) r[i] = rndf();
    for (int i = 0; i < D; i++) w[i] = 1.0f + 0.5f * rndf();
    for (int offset = 0; offset <= 1; offset++) {
        const float eps = 1e-5f;
        char what[96];
        snprintf(what, sizeof what, "rms_norm offset=%d", offset);
        if (vqm_rms_norm(x, w, ROWS, D, eps, (float)offset, y) != VQM_OK) { g_fail++; printf("FAIL %s: rc\n", what); }
        for (int k = 0; k < ROWS; k++) {
            double ss = 0;
            for (int c = 0; c < D; c++) ss += (double)x[k * D + c] * x[k * D + c];
            const double inv = 1.0 / sqrt(ss / D + eps);
            for (int c = 0; c < D; c++) {
                ref[k * D + c] = x[k * D + c] * inv * (offset + (double)w[c]);
                mag[k * D + c] = fabs(ref[k * D + c]) + 1e-3;
            }
        }
        check_close(what, y, ref, mag, ROWS * D, 2e-6);
        hash_floats(y, ROWS * D);
        snprintf(what, sizeof what, "add_rms_norm offset=%d", offset);
        if (vqm_add_rms_norm(x, r, w, ROWS, D, eps, (float)offset, sum, y2) != VQM_OK) { g_fail++; printf("FAIL %s\n", what); }
        float expect_sum[ROWS * D];
        for (int i = 0; i < ROWS * D; i++) expect_sum[i] = x[i] + r[i];
        check_equal(what, sum, expect_sum, ROWS * D);
        vqm_rms_norm(expect_sum, w, ROWS, D, eps, (float)offset, y);
        check_equal(what, y2, y, ROWS * D); /* the fused pass is the plain norm of the sum, bit for bit */
        hash_floats(y2, ROWS * D);
    }
    float c[T * HD], sn[T * HD], q[T * H * HD];
    for (int i = 0; i < T * H * HD; i++) q[i] = 2.0f * rndf();
    for (int rot = HD; rot >= 2; rot -= HD - 6) { /* full (20) and partial (6) rotary dimensions */
        for (int i = 0; i < T; i++)
            for (int j = 0; j < rot; j++) {
                const double a = (i + 7) * pow(10000.0, -(double)(2 * (j % (rot / 2))) / rot);
                c[i * rot + j] = (float)cos(a);
                sn[i * rot + j] = (float)sin(a);
            }
        float out[T * H * HD];
        if (vqm_rope(q, c, sn, T, H, HD, rot, out) != VQM_OK) { g_fail++; printf("FAIL rope rc\n"); }
        const int half = rot / 2;
        for (int i = 0; i < T; i++)
            for (int h = 0; h < H; h++)
                for (int j = 0; j < HD; j++) {
                    const float *xr = q + (i * H + h) * HD;
                    double v = xr[j];
                    if (j < half) v = (double)xr[j] * c[i * rot + j] - (double)xr[j + half] * sn[i * rot + j];
                    else if (j < rot) v = (double)xr[j] * c[i * rot + j] + (double)xr[j - half] * sn[i * rot + j];
                    ref[(i * H + h) * HD + j] = v;
                    mag[(i * H + h) * HD + j] = fabs((double)xr[j]) + fabs((double)xr[j < half ? j + half : j < rot ? j - half : j]);
                }
        char what[64];
        snprintf(what, sizeof what, "rope rot=%d of %d", rot, (int)HD);
        check_close(what, out, ref, mag, T * H * HD, 2e-7);
        hash_floats(out, T * H * HD);
    }
    if (vqm_silu_mul(x, ROWS, D, y) != VQM_OK) { g_fail++; printf("FAIL silu_mul rc\n"); }
    for (int k = 0; k < ROWS; k++)
        for (int j = 0; j < D; j++) {
            const double g = x[k * 2 * D + j], u = x[k * 2 * D + D + j];
            ref[k * D + j] = g / (1.0 + exp(-g)) * u;
            mag[k * D + j] = fabs(ref[k * D + j]);
        }
    check_close("silu_mul", y, ref, mag, ROWS * D, 4e-7);
    hash_floats(y, ROWS * D);
    g_checks++;
    if (vqm_rms_norm(x, w, ROWS, 0, 1e-5f, 0.0f, y) != VQM_EINVAL || vqm_rope(q, c, sn, T, H, HD, 7, y) != VQM_EINVAL ||
        vqm_rope(q, c, sn, T, H, HD, HD + 2, y) != VQM_EINVAL || vqm_silu_mul(NULL, ROWS, D, y) != VQM_EINVAL ||
        vqm_add_rms_norm(x, r, w, ROWS, D, 1e-5f, 0.0f, y, y) != VQM_EINVAL) {
        printf("FAIL decoder steps: bad arguments were not refused\n");
        g_fail++;
    }
    printf("decoder steps hash %016llx\n", (unsigned long long)g_steps_hash);
}

static void put_code(uint8_t *row, long c, int b, unsigned code)
{
    for (int i = 0; i < b; i++) {
        long bit = c * b + i;
        if ((code >> i) & 1) row[bit / 8] |= (uint8_t)(1u << (bit % 8));
    }
}

typedef struct {
    vqm_cvq_weight w;
    uint8_t *idx, *ridx;
    int8_t *cb, *rcb;
    uint16_t *sc, *rsc, *colsc;
    int16_t *perm;
} cvq_case;

static int cvq_bits(int ncent) { int b = 1; while ((1 << b) < ncent) b++; return b; }

/* group of every stored column and the activation block starts (an independent restatement of the format) */
static int cvq_blocks(const vqm_cvq_weight *w, int *grp_of_col, int *blk_of_col)
{
    int g = 0, blk = 0;
    long c = 0;
    while (c < w->k) {
        long e = (w->outlier_cols && g == 0) ? w->outlier_cols : c + w->cols_per_group;
        if (e > w->k) e = w->k;
        for (long s = c; s < e; s += VQM_CVQ_ACT_BLOCK, blk++)
            for (long i = s; i < e && i < s + VQM_CVQ_ACT_BLOCK; i++) { grp_of_col[i] = g; blk_of_col[i] = blk; }
        c = e;
        g++;
    }
    return blk;
}

static void cvq_make(cvq_case *t, int v, int ncent, int res_ncent, int outl, int cpg, int n, int k, int extreme)
{
    memset(t, 0, sizeof *t);
    vqm_cvq_weight w = { n, k, v, ncent, res_ncent, outl, cpg, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL };
    int ng = (outl > 0) + (k - outl + cpg - 1) / cpg;
    long nv = (n + v - 1) / v;
    int b = cvq_bits(ncent), rb = res_ncent ? cvq_bits(res_ncent) : 1;
    long rowb = ((long)k * b + 7) / 8, rrowb = ((long)k * rb + 7) / 8;
    t->idx = calloc((size_t)(nv * rowb), 1);
    t->ridx = calloc((size_t)(nv * rrowb), 1);
    t->cb = malloc((size_t)(ng * ncent * v));
    t->rcb = malloc((size_t)(ng * (res_ncent ? res_ncent : 1) * v));
    t->sc = malloc(sizeof(uint16_t) * (size_t)ng);
    t->rsc = malloc(sizeof(uint16_t) * (size_t)ng);
    t->colsc = malloc(sizeof(uint16_t) * (size_t)k);
    t->perm = malloc(sizeof(int16_t) * (size_t)k);
    for (long j = 0; j < nv; j++)
        for (long c = 0; c < k; c++) {
            put_code(t->idx + j * rowb, c, b, extreme ? (unsigned)(extreme & 1 ? ncent - 1 : 0) : rnd() % (unsigned)ncent);
            if (res_ncent) put_code(t->ridx + j * rrowb, c, rb, extreme ? 0u : rnd() % (unsigned)res_ncent);
        }
    /* random padding bits at the end of each row must be ignored */
    if ((k * b) % 8) for (long j = 0; j < nv; j++) t->idx[j * rowb + rowb - 1] |= (uint8_t)(0xffu << ((k * b) % 8));
    for (long i = 0; i < (long)ng * ncent * v; i++)
        t->cb[i] = extreme ? (int8_t)(extreme & 2 ? (i & 1 ? -128 : 127) : 127) : (int8_t)(rnd() & 0xff);
    for (long i = 0; i < (long)ng * (res_ncent ? res_ncent : 1) * v; i++)
        t->rcb[i] = extreme ? (int8_t)-127 : (int8_t)(rnd() & 0xff);
    for (int g = 0; g < ng; g++) {
        t->sc[g] = extreme ? 0x3c00 : f2h(0.001f + 0.01f * (float)(rnd() % 100) / 100.0f);
        t->rsc[g] = extreme ? 0x3c00 : f2h(0.0005f + 0.002f * (float)(rnd() % 100) / 100.0f);
    }
    for (long c = 0; c < k; c++) {
        t->colsc[c] = extreme ? 0x3c00 : f2h(0.25f + 2.0f * (float)(rnd() % 100) / 100.0f);
        t->perm[c] = (int16_t)c;
    }
    for (long c = k - 1; c > 0; c--) { /* Fisher-Yates */
        long o = (long)(rnd() % (unsigned)(c + 1));
        int16_t tmp = t->perm[c]; t->perm[c] = t->perm[o]; t->perm[o] = tmp;
    }
    w.indices = t->idx; w.codebook = t->cb; w.scale = t->sc; w.col_scale = t->colsc; w.perm = t->perm;
    if (res_ncent) { w.res_indices = t->ridx; w.res_codebook = t->rcb; w.res_scale = t->rsc; }
    t->w = w;
}

static void cvq_free(cvq_case *t)
{
    free(t->idx); free(t->ridx); free(t->cb); free(t->rcb); free(t->sc); free(t->rsc); free(t->colsc); free(t->perm);
}

/* y = W x + bias in double from the format's definition; int8: x' quantized per activation block first */
static void cvq_expect(const vqm_cvq_weight *w, const float *x, long batch, const float *bias, int int8, double *out,
                       double *mag)
{
    int *grp = malloc(sizeof(int) * (size_t)w->k), *blk = malloc(sizeof(int) * (size_t)w->k);
    int nblk = cvq_blocks(w, grp, blk);
    int b = cvq_bits(w->ncent), rb = w->res_ncent ? cvq_bits(w->res_ncent) : 1;
    long rowb = ((long)w->k * b + 7) / 8, rrowb = ((long)w->k * rb + 7) / 8;
    float *xp = malloc(sizeof(float) * (size_t)w->k), *xs = malloc(sizeof(float) * (size_t)nblk);
    double *xd = malloc(sizeof(double) * (size_t)w->k);
    int8_t *q = malloc((size_t)w->k);
    for (long bi = 0; bi < batch; bi++) {
        for (long c = 0; c < w->k; c++) xp[c] = x[bi * w->k + w->perm[c]] * vqm_fp16_to_float(w->col_scale[c]);
        if (int8) {
            long c = 0;
            for (int bl = 0; bl < nblk; bl++) {
                long e = c;
                while (e < w->k && blk[e] == bl) e++;
                vqm_quantize_act(xp + c, e - c, e - c, q + c, &xs[bl]);
                c = e;
            }
            for (c = 0; c < w->k; c++) xd[c] = (double)q[c] * xs[blk[c]];
        } else {
            for (long c = 0; c < w->k; c++) xd[c] = xp[c];
        }
        for (long r = 0; r < w->n; r++) {
            long j = r / w->v, t = r % w->v;
            double acc = 0, m = 0;
            for (long c = 0; c < w->k; c++) {
                unsigned i0 = code_at(w->indices + j * rowb, c, b);
                double wv = (double)w->codebook[((long)grp[c] * w->ncent + i0) * w->v + t] *
                            (double)vqm_fp16_to_float(w->scale[grp[c]]);
                if (w->res_ncent) {
                    unsigned i1 = code_at(w->res_indices + j * rrowb, c, rb);
                    wv += (double)w->res_codebook[((long)grp[c] * w->res_ncent + i1) * w->v + t] *
                          (double)vqm_fp16_to_float(w->res_scale[grp[c]]);
                }
                acc += wv * xd[c];
                m += fabs(wv * xd[c]);
            }
            out[bi * w->n + r] = acc + (bias ? bias[r] : 0);
            mag[bi * w->n + r] = m + (bias ? fabs(bias[r]) : 0);
        }
    }
    free(grp); free(blk); free(xp); free(xs); free(xd); free(q);
}

static void test_cvq(int v, int ncent, int res_ncent, int outl, int cpg, int n, int k, int batch, int use_bias,
                     int extreme)
{
    cvq_case t;
    cvq_make(&t, v, ncent, res_ncent, outl, cpg, n, k, extreme);
    float *x = malloc(sizeof(float) * (size_t)(batch * k)), *bias = malloc(sizeof(float) * (size_t)n);
    float *y0 = malloc(sizeof(float) * (size_t)(batch * n)), *y1 = malloc(sizeof(float) * (size_t)(batch * n));
    double *dref = malloc(sizeof(double) * (size_t)(batch * n)), *mag = malloc(sizeof(double) * (size_t)(batch * n));
    for (long i = 0; i < (long)batch * k; i++)
        x[i] = extreme ? ((i & 1) ? -1.0f : 1.0f) : rndf() * ((i % 7) == 0 ? 8.0f : 1.0f);
    for (long i = 0; i < n; i++) bias[i] = rndf();
    const float *bp = use_bias ? bias : NULL;
    char what[256];
    g_checks++;
    if (!extreme && vqm_cvq_validate(&t.w, NULL, NULL) != VQM_OK) { printf("FAIL cvq validate rejected valid weights\n"); g_fail++; }
    for (int int8 = 0; int8 <= 1; int8++) {
        int flags = int8 ? VQM_ACT_INT8 : 0;
        snprintf(what, sizeof what, "cvq v=%d k=%d rk=%d out=%d cpg=%d n=%d K=%d batch=%d int8=%d extreme=%d ref-vs-dense",
                 v, ncent, res_ncent, outl, cpg, n, k, batch, int8, extreme);
        if (vqm_cvq_linear_path(VQM_PATH_REF, &t.w, x, batch, bp, y0, flags, 1)) { printf("FAIL %s: rc\n", what); g_fail++; continue; }
        cvq_expect(&t.w, x, batch, bp, int8, dref, mag);
        check_close(what, y0, dref, mag, (long)batch * n, FLOAT_TOL);
        for (int p = 1; p < VQM_NPATHS; p++) {
            if (!vqm_path_available(p)) continue;
            g_simd_kernels += vqm_cvq_path_has_kernel(p, &t.w);
            for (int th = 1; th <= 3; th += 2) {
                memset(y1, 0xff, sizeof(float) * (size_t)(batch * n));
                snprintf(what, sizeof what, "cvq v=%d k=%d rk=%d out=%d cpg=%d n=%d K=%d batch=%d int8=%d extreme=%d path=%s threads=%d",
                         v, ncent, res_ncent, outl, cpg, n, k, batch, int8, extreme, vqm_path_name(p), th);
                if (vqm_cvq_linear_path(p, &t.w, x, batch, bp, y1, flags, th)) { printf("FAIL %s: rc\n", what); g_fail++; continue; }
                if (int8) check_equal(what, y1, y0, (long)batch * n);
                else check_close(what, y1, dref, mag, (long)batch * n, FLOAT_TOL);
            }
        }
    }
    cvq_free(&t);
    free(x); free(bias); free(y0); free(y1); free(dref); free(mag);
}

static void test_cvq_validation(void)
{
    cvq_case t;
    cvq_make(&t, 4, 5, 3, 2, 8, 10, 20, 0); /* non-power-of-two codebooks: codes 5..7 / 3 are out of range */
    int64_t br = -2, bc = -2;
    g_checks++;
    if (vqm_cvq_validate(&t.w, &br, &bc) != VQM_OK || vqm_cvq_groups(&t.w) != 4) { printf("FAIL cvq validate/groups\n"); g_fail++; }
    put_code(t.idx + 2 * ((20 * 3 + 7) / 8), 9, 3, 7); /* vector row 2, column 9 */
    g_checks++;
    if (vqm_cvq_validate(&t.w, &br, &bc) != VQM_EINDEX || br != 2 || bc != 9) { printf("FAIL cvq bad index (%ld,%ld)\n", (long)br, (long)bc); g_fail++; }
    float x[20], y[10];
    for (int i = 0; i < 20; i++) x[i] = 1.0f;
    g_checks++;
    if (vqm_cvq_linear(&t.w, x, 1, NULL, y, VQM_ACT_INT8, 1) != VQM_OK) { printf("FAIL cvq linear on unvalidated data\n"); g_fail++; }
    int16_t p0 = t.perm[0];
    t.perm[0] = t.perm[5]; /* a duplicate: not a permutation */
    g_checks++;
    if (vqm_cvq_validate(&t.w, &br, &bc) != VQM_EINDEX || br != -1) { printf("FAIL cvq duplicate perm accepted\n"); g_fail++; }
    t.perm[0] = 20; /* out of range: validation rejects it, the kernels clamp it */
    g_checks++;
    if (vqm_cvq_validate(&t.w, &br, &bc) != VQM_EINDEX || vqm_cvq_linear(&t.w, x, 1, NULL, y, 0, 1) != VQM_OK) {
        printf("FAIL cvq out-of-range perm\n");
        g_fail++;
    }
    t.perm[0] = p0;
    vqm_cvq_weight bad = t.w;
    bad.v = 9;
    int rc1 = vqm_cvq_linear(&bad, x, 1, NULL, y, 0, 1);
    bad = t.w; bad.outlier_cols = 20;
    int rc2 = vqm_cvq_linear(&bad, x, 1, NULL, y, 0, 1);
    bad = t.w; bad.ncent = 65537;
    int rc3 = vqm_cvq_validate(&bad, NULL, NULL);
    bad = t.w; bad.res_indices = NULL;
    int rc4 = vqm_cvq_linear(&bad, x, 1, NULL, y, 0, 1);
    g_checks++;
    if (rc1 != VQM_EINVAL || rc2 != VQM_EINVAL || rc3 != VQM_EINVAL || rc4 != VQM_EINVAL) {
        printf("FAIL cvq bad parameters accepted (%d %d %d %d)\n", rc1, rc2, rc3, rc4);
        g_fail++;
    }
    cvq_free(&t);
}

static void test_cvq_all(int quick)
{
    test_cvq_validation();
    static const int cfg[][5] = { /* v, ncent, res_ncent, outlier_cols, cols_per_group */
        { 4, 256, 0, 0, 1000 }, { 4, 256, 0, 3, 1000 }, { 8, 256, 256, 2, 1000 }, { 4, 256, 16, 5, 100 },
        { 6, 4096, 0, 1, 1000 }, { 8, 65536, 256, 0, 1000 }, { 1, 16, 0, 0, 37 }, { 2, 64, 4, 7, 300 },
        { 3, 100, 0, 0, 1000 }, { 5, 256, 3, 1, 64 }, { 7, 1000, 0, 2, 600 }, { 4, 2, 2, 1, 1 },
    };
    static const int shapes[][2] = { { 64, 64 }, { 33, 517 }, { 9, 300 }, { 16, 1024 }, { 130, 7 } };
    int ns = quick ? 3 : (int)(sizeof shapes / sizeof shapes[0]);
    for (size_t c = 0; c < sizeof cfg / sizeof cfg[0]; c++)
        for (int s = 0; s < ns; s++) {
            int k = shapes[s][1], outl = cfg[c][3] < k ? cfg[c][3] : k - 1;
            if (cfg[c][1] == 65536 && s > 1) continue; /* a 512 KB codebook per group: keep the test quick */
            test_cvq(cfg[c][0], cfg[c][1], cfg[c][2], outl, cfg[c][4], shapes[s][0], k, s == 0 ? 1 : 1 + (int)(rnd() % 8),
                     s & 1, 0);
        }
    test_cvq(4, 256, 16, 3, 1000, 40, 2000, 11, 1, 0); /* batch > 8: two passes */
    /* saturated codebooks and activations: int32 block sums of +-127 * 127 must stay exact on every path */
    for (int e = 1; e <= 3; e++) {
        test_cvq(4, 256, 16, 1, 4096, 12, 4096, 2, 0, e);
        test_cvq(8, 256, 0, 0, 4096, 16, 4096, 1, 0, e);
    }
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    int quick = argc > 1 && !strcmp(argv[1], "--quick");
    if (argc > 1 && !strcmp(argv[1], "--steps")) { /* the decoder steps alone: quick enough to run under qemu */
        test_decoder_steps();
        printf("%s: %d checks, %d failures\n", g_fail ? "FAILED" : "OK", g_checks, g_fail);
        return g_fail ? 1 : 0;
    }
    printf("paths:");
    for (int p = 0; p < VQM_NPATHS; p++)
        if (vqm_path_available(p)) printf(" %s", vqm_path_name(p));
    printf(" (selected %s)\n", vqm_path_name(vqm_get_path()));
#if defined(VQM_SIMDE)
    printf("avx512 runs through SIMDe (test-only build)\n");
#endif
    test_validation();
    static const int cfg[][4] = { /* d, ncent, R, C */
        { 1, 4, 1, 256 }, { 2, 16, 8, 256 }, { 4, 256, 16, 256 }, { 2, 16, 4, 256 }, { 2, 64, 32, 256 },
        { 1, 16, 2, 64 }, { 1, 64, 3, 96 }, { 1, 256, 1, 128 }, { 2, 256, 2, 64 }, { 4, 16, 5, 128 },
        { 4, 64, 4, 256 }, { 2, 16, 3, 6 }, { 1, 4, 2, 14 }, { 2, 5, 2, 10 }, { 1, 8, 1, 32 }, { 8, 16, 2, 256 },
        { 2, 64, 7, 1000 }, { 4, 256, 300, 4096 },
    };
    static const int shapes[][2] = { { 7, 172 }, { 33, 256 }, { 5, 517 }, { 16, 1024 }, { 3, 33 }, { 9, 2 } };
    int ns = quick ? 3 : (int)(sizeof shapes / sizeof shapes[0]);
    for (size_t c = 0; c < sizeof cfg / sizeof cfg[0]; c++)
        for (int s = 0; s < ns; s++) {
            int batch = 1 + (int)(rnd() % 8);
            if (s == 0) batch = 1;
            test_vq(cfg[c][0], cfg[c][1], cfg[c][2], cfg[c][3], shapes[s][0], shapes[s][1], batch, s & 1);
        }
    static const int icfg[][3] = { { 4, 32, 0 }, { 4, 32, 1 }, { 4, 128, 0 }, { 4, 128, 1 }, { 4, 64, 1 },
                                   { 4, 17, 1 }, { 3, 32, 1 }, { 8, 16, 1 }, { 2, 128, 0 }, { 8, 32, 0 },
                                   { 8, 32, 1 }, { 8, 64, 0 }, { 8, 128, 1 }, { 8, 20, 0 } };
    for (size_t c = 0; c < sizeof icfg / sizeof icfg[0]; c++)
        for (int s = 0; s < ns; s++) {
            int batch = 1 + (int)(rnd() % 8);
            if (s == 0) batch = 1;
            test_int(icfg[c][0], icfg[c][1], icfg[c][2], shapes[s][0], shapes[s][1], batch, !(s & 1));
        }
    /* batch 1 (the 4-row tile kernels) on larger shapes, several row and column blocks */
    static const int b1cfg[][4] = { { 2, 16, 4, 256 }, { 2, 16, 8, 256 }, { 2, 64, 32, 256 }, { 4, 64, 4, 256 },
                                    { 1, 16, 8, 64 }, { 2, 64, 4, 96 }, { 2, 64, 8, 20 }, { 1, 64, 12, 128 } };
    static const int b1shapes[][2] = { { 13, 172 }, { 37, 1000 }, { 70, 520 }, { 64, 4096 }, { 9, 576 } };
    for (size_t c = 0; c < sizeof b1cfg / sizeof b1cfg[0]; c++)
        for (int s = 0; s < (quick ? 2 : 5); s++)
            test_vq(b1cfg[c][0], b1cfg[c][1], b1cfg[c][2], b1cfg[c][3], b1shapes[s][0], b1shapes[s][1], 1, s & 1);
    static const int b1icfg[][3] = { { 4, 32, 0 }, { 4, 32, 1 }, { 4, 128, 0 }, { 4, 64, 0 }, { 4, 96, 1 }, { 4, 20, 0 } };
    for (size_t c = 0; c < sizeof b1icfg / sizeof b1icfg[0]; c++)
        for (int s = 0; s < (quick ? 2 : 5); s++)
            test_int(b1icfg[c][0], b1icfg[c][1], b1icfg[c][2], b1shapes[s][0], b1shapes[s][1], 1 + (s == 3), s & 1);
    /* 8-bit codes (embedding / lm_head: G = 32, k = 576), batch 1..8, widths that are not a multiple of G */
    static const int g8[] = { 32, 64, 128 };
    static const int k8[] = { 172, 520, 576, 4096 };
    int cnt8 = 0;
    for (int gi = 0; gi < 3; gi++)
        for (int asym = 0; asym <= 1; asym++)
            for (int ki = 0; ki < (quick ? 3 : 4); ki++) {
                test_int(8, g8[gi], asym, 13, k8[ki], 1 + cnt8 % 8, cnt8 & 1);
                if (g8[gi] == 32) test_int(8, 32, asym, 21, k8[ki], 1, !(cnt8 & 1));
                cnt8++;
            }
    test_extreme();
    test_extreme8();
    test_nearest_args();
    static const int ncfg[][2] = { { 1, 4 }, { 1, 8 }, { 2, 16 }, { 2, 64 }, { 2, 7 }, { 3, 13 }, { 4, 256 },
                                   { 8, 16 }, { 5, 1 }, { 2, 255 }, { 6, 33 }, { 6, 4096 }, { 8, 1000 } };
    for (size_t c = 0; c < sizeof ncfg / sizeof ncfg[0]; c++)
        test_nearest(ncfg[c][0], ncfg[c][1], 1 + (long)(c % 3) * 2, quick ? 300 : 1100);
    test_attention(9, 3, 1, 64, 512, 0, 0);
    test_attention(9, 3, 1, 64, 512, 300, 0);
    test_attention(4, 1, 5, 32, 64, 59, 0);
    test_attention(4, 2, 7, 16, 100, 20, 8);
    test_attention(2, 2, 3, 8, 40, 37, 1);
    test_attention(12, 2, 2, 64, 130, 100, 0); /* 6 heads a group: 4 + 2 */
    test_attention(4, 1, 1, 256, 600, 580, 512); /* Gemma 3's geometry, a sliding window */
    test_quantize_act();
    test_decoder_steps();
    /* batch > 8 (tiled) */
    test_vq(2, 16, 4, 256, 10, 300, 11, 1);
    test_int(4, 32, 1, 10, 300, 13, 1);
    test_int(8, 32, 0, 10, 576, 13, 1);
    test_cvq_all(quick);
    printf("%s: %d checks, %d failures, %d SIMD kernel configurations exercised\n",
           g_fail ? "FAILED" : "OK", g_checks, g_fail, g_simd_kernels);
    return g_fail ? 1 : 0;
}
