/* Public API: parameter checks, validation, runtime ISA dispatch, activation
 * preparation (int8 quantization / permutation into the path's layout),
 * batch tiling and the multi-threaded row split. */
#include "internal.h"
#include <stdlib.h>
#include <math.h>
#include <float.h>
#include <stdatomic.h>

#if defined(__x86_64__)
#include <cpuid.h>
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

/* ---------------------------------------------------------------- features */
#if defined(__x86_64__)
/* AVX2 + FMA + F16C, and the OS saving YMM state */
static int x86_has_avx2(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    int osxsave = (c >> 27) & 1, fma = (c >> 12) & 1, f16c = (c >> 29) & 1, avx = (c >> 28) & 1;
    if (!(osxsave && fma && f16c && avx)) return 0;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & 6u) != 6u) return 0; /* XMM and YMM state enabled by the OS */
    if (__get_cpuid_max(0, NULL) < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    return (b >> 5) & 1;
}

/* the AVX2 set plus AVX512 F, BW, VL, VBMI and VNNI, and the OS saving opmask and ZMM state */
static int x86_has_avx512(void)
{
#if defined(VQM_SIMDE)
    return 1; /* the test-only build runs this path through SIMDe on any x86-64 CPU */
#else
    if (!x86_has_avx2()) return 0;
    unsigned lo, hi, a, b, c, d;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & 0xe6u) != 0xe6u) return 0; /* XMM, YMM, opmask, ZMM 0-15 upper halves, ZMM 16-31 */
    __cpuid_count(7, 0, a, b, c, d);
    const int f = (b >> 16) & 1, bw = (b >> 30) & 1, vl = (b >> 31) & 1, vbmi = (c >> 1) & 1, vnni = (c >> 11) & 1;
    return f && bw && vl && vbmi && vnni;
#endif
}
#endif

static int detect_uncached(int path)
{
    switch (path) {
    case VQM_PATH_REF: return 1;
#if defined(__x86_64__)
    case VQM_PATH_AVX2: return x86_has_avx2();
    case VQM_PATH_AVX512: return x86_has_avx512();
#endif
#if defined(__aarch64__)
    case VQM_PATH_NEON: return 1;
    case VQM_PATH_NEON_DOT:
#if defined(__linux__)
        return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#else
        return 0;
#endif
#endif
    default: return 0;
    }
}

/* Every product checks its path: CPUID is a VM exit under a hypervisor (microseconds), so each answer is kept. */
static atomic_int g_detected[VQM_NPATHS]; /* 0: not asked yet, 1: no, 2: yes */

static int detect(int path)
{
    if (path < 0 || path >= VQM_NPATHS) return 0;
    int v = atomic_load_explicit(&g_detected[path], memory_order_relaxed);
    if (!v) {
        v = detect_uncached(path) ? 2 : 1;
        atomic_store_explicit(&g_detected[path], v, memory_order_relaxed);
    }
    return v == 2;
}

static const vqm_path_ops *ops_of(int path)
{
    switch (path) {
#if defined(__x86_64__)
    case VQM_PATH_AVX2: return &vqm_ops_avx2;
    case VQM_PATH_AVX512: return &vqm_ops_avx512;
#endif
#if defined(__aarch64__)
    case VQM_PATH_NEON: return &vqm_ops_neon;
    case VQM_PATH_NEON_DOT: return &vqm_ops_neon_dot;
#endif
    default: return &vqm_ops_ref;
    }
}

static int best_path(void)
{
    static const int order[] = { VQM_PATH_NEON_DOT, VQM_PATH_NEON, VQM_PATH_AVX512, VQM_PATH_AVX2, VQM_PATH_REF };
    for (size_t i = 0; i < sizeof order / sizeof order[0]; i++)
        if (detect(order[i])) return order[i];
    return VQM_PATH_REF;
}

int vqm_path_from_env(int *path)
{
    const char *e = getenv("VQMOBILE_PATH");
    *path = VQM_PATH_AUTO;
    if (!e || !*e || !strcmp(e, "auto")) return VQM_OK;
    for (int p = 0; p < VQM_NPATHS; p++)
        if (!strcmp(e, vqm_path_name(p))) {
            if (!detect(p)) return VQM_EPATH;
            *path = p;
            return VQM_OK;
        }
    return VQM_EINVAL;
}

static atomic_int g_path = -2;     /* -2: not initialised */
static atomic_int g_threads = 0;   /* 0: not initialised */

const char *vqm_path_name(int path)
{
    switch (path) {
    case VQM_PATH_REF: return "ref";
    case VQM_PATH_AVX2: return "avx2";
    case VQM_PATH_AVX512: return "avx512";
    case VQM_PATH_NEON: return "neon";
    case VQM_PATH_NEON_DOT: return "neon_dot";
    default: return "unknown";
    }
}

int vqm_path_available(int path) { return path >= 0 && path < VQM_NPATHS && detect(path); }

int vqm_get_path(void)
{
    int p = atomic_load(&g_path);
    if (p == -2) {
        /* an unusable VQMOBILE_PATH leaves the best path selected; programs report it (vqm_path_from_env) */
        if (vqm_path_from_env(&p) != VQM_OK || p == VQM_PATH_AUTO) p = best_path();
        atomic_store(&g_path, p);
    }
    return p;
}

int vqm_set_path(int path)
{
    if (path == VQM_PATH_AUTO) { atomic_store(&g_path, best_path()); return VQM_OK; }
    if (!vqm_path_available(path)) return VQM_EPATH;
    atomic_store(&g_path, path);
    return VQM_OK;
}

void vqm_set_num_threads(int n)
{
    if (n <= 0) n = vqm_online_cpus();
    if (n > 64) n = 64;
    atomic_store(&g_threads, n);
}

int vqm_get_num_threads(void)
{
    int n = atomic_load(&g_threads);
    if (n <= 0) {
        const char *e = getenv("VQMOBILE_NUM_THREADS");
        n = e ? atoi(e) : 0;
        if (n <= 0) n = vqm_online_cpus();
        if (n > 64) n = 64;
        atomic_store(&g_threads, n);
    }
    return n;
}

/* ---------------------------------------------------------------- shapes */
int vqm_vq_index_bits(int ncent)
{
    if (ncent < 1 || ncent > 256) return -1;
    int b = 1;
    while ((1 << b) < ncent) b++;
    return b;
}

int64_t vqm_vq_row_bytes(const vqm_vq_weight *w)
{
    int b = vqm_vq_index_bits(w->ncent);
    if (b < 0 || w->d < 1 || w->k < 1) return -1;
    int64_t v = vqm_cdiv(w->k, w->d);
    return vqm_cdiv(v * b, 8);
}

int64_t vqm_int_row_bytes(const vqm_int_weight *w)
{
    if (w->bits < 1 || w->bits > 8 || w->k < 1) return -1;
    return vqm_cdiv((int64_t)w->k * w->bits, 8);
}

static int check_vq(const vqm_vq_weight *w)
{
    if (!w || !w->indices || !w->codebook || !w->scale) return VQM_EINVAL;
    if (w->n < 1 || w->k < 1) return VQM_EINVAL;
    if (w->d < 1 || w->d > 8) return VQM_EINVAL;
    if (vqm_vq_index_bits(w->ncent) < 0) return VQM_EINVAL;
    if (w->rows_per_block < 1 || w->cols_per_block < 1 || w->cols_per_block > 65536) return VQM_EINVAL;
    if (w->cols_per_block % w->d) return VQM_EINVAL;
    return VQM_OK;
}

static int check_int(const vqm_int_weight *w)
{
    if (!w || !w->codes || !w->scales) return VQM_EINVAL;
    if (w->n < 1 || w->k < 1) return VQM_EINVAL;
    if (w->bits < 1 || w->bits > 8) return VQM_EINVAL;
    if (w->group < 1 || w->group > 65536) return VQM_EINVAL;
    return VQM_OK;
}

int vqm_vq_validate(const vqm_vq_weight *w, int64_t *bad_row, int64_t *bad_pos)
{
    int rc = check_vq(w);
    if (rc) return rc;
    const int b = vqm_vq_index_bits(w->ncent);
    if ((1 << b) == w->ncent) return VQM_OK; /* every b-bit code is < 2^b = ncent */
    const int64_t v = vqm_cdiv(w->k, w->d), rowbytes = vqm_vq_row_bytes(w);
    for (int64_t r = 0; r < w->n; r++) {
        const uint8_t *row = w->indices + r * rowbytes;
        for (int64_t j = 0; j < v; j++) {
            if ((int)vqm_get_code(row, j, b) >= w->ncent) {
                if (bad_row) *bad_row = r;
                if (bad_pos) *bad_pos = j;
                return VQM_EINDEX;
            }
        }
    }
    return VQM_OK;
}

int vqm_int_validate(const vqm_int_weight *w) { return check_int(w); }

/* ---------------------------------------------------------------- activations */
static inline int8_t quant1(float x, float inv)
{
    float v = x * inv;
    if (!(v == v)) v = 0.0f;
    if (v > 127.0f) v = 127.0f;
    if (v < -127.0f) v = -127.0f;
    return (int8_t)lrintf(v); /* round half to even (default rounding mode) */
}

/* Sixteen lanes (one zmm, two ymm, four SSE2 / NEON registers: independent chains on every target), compiled for
 * AVX-512, AVX2 and the baseline on x86 (VQM_CLONES): every call of a decoded token quantizes its input, and the
 * scalar loop cost more than a small matrix's lookups. The lanes compute quant1 exactly: the same product, the same
 * NaN and clamp rules, and adding then subtracting 1.5 * 2^23 rounds |v| <= 127 half to even as lrintf does (the
 * tests compare the two on ties, NaN and infinities). */
#define QL 16
/* The vector helpers are static inline: the ABI of 64-byte vector arguments that GCC warns about never applies. */
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float vqm_f16 __attribute__((vector_size(QL * sizeof(float))));
typedef int32_t vqm_i16 __attribute__((vector_size(QL * sizeof(int32_t))));
typedef int8_t vqm_b16 __attribute__((vector_size(QL)));

static inline vqm_f16 f16_sel(vqm_i16 m, vqm_f16 a, vqm_f16 b) { return (vqm_f16)(((vqm_i16)a & m) | ((vqm_i16)b & ~m)); }

static inline vqm_f16 f16_splat(float x) { return (vqm_f16){ 0 } + x; }

VQM_CLONES void vqm_quantize_act(const float *x, int64_t k, int64_t blk, int8_t *q, float *xs)
{
    for (int64_t c0 = 0, bi = 0; c0 < k; c0 += blk, bi++) {
        const int64_t c1 = c0 + blk < k ? c0 + blk : k;
        int64_t c = c0;
        vqm_f16 vmax = f16_splat(0.0f);
        for (; c + QL <= c1; c += QL) { /* a NaN never compares greater: it never becomes the maximum */
            vqm_f16 a;
            memcpy(&a, x + c, sizeof a);
            a = (vqm_f16)((vqm_i16)a & 0x7fffffff);
            vmax = f16_sel(a > vmax, a, vmax);
        }
        float amax = 0.0f;
        for (int l = 0; l < QL; l++) amax = vmax[l] > amax ? vmax[l] : amax;
        for (; c < c1; c++) {
            float a = fabsf(x[c]);
            amax = a > amax ? a : amax;
        }
        if (amax == 0.0f) {
            xs[bi] = 0.0f;
            memset(q + c0, 0, (size_t)(c1 - c0));
            continue;
        }
        const float inv = 127.0f / amax;
        xs[bi] = amax / 127.0f;
        for (c = c0; c + QL <= c1; c += QL) {
            vqm_f16 v;
            memcpy(&v, x + c, sizeof v);
            v = v * inv;
            v = f16_sel(v == v, v, f16_splat(0.0f));
            v = f16_sel(v > 127.0f, f16_splat(127.0f), v);
            v = f16_sel(v < -127.0f, f16_splat(-127.0f), v);
            v = (v + 12582912.0f) - 12582912.0f;
            const vqm_b16 b = __builtin_convertvector(__builtin_convertvector(v, vqm_i16), vqm_b16);
            memcpy(q + c, &b, sizeof b);
        }
        for (; c < c1; c++) q[c] = quant1(x[c], inv);
    }
}

/* |q| into a, and the sum of q (exact in int32) */
VQM_CLONES static int32_t abs_sum(const int8_t *q, uint8_t *a, int64_t n)
{
    vqm_i16 acc = { 0 };
    int64_t c = 0;
    for (; c + QL <= n; c += QL) {
        vqm_b16 v;
        memcpy(&v, q + c, sizeof v);
        const vqm_b16 m = v < 0;
        const vqm_b16 av = (-v & m) | (v & ~m); /* |v| <= 127: no overflow */
        memcpy(a + c, &av, sizeof av);
        acc += __builtin_convertvector(v, vqm_i16);
    }
    int32_t s = 0;
    for (int l = 0; l < QL; l++) s += acc[l];
    for (; c < n; c++) {
        s += q[c];
        a[c] = (uint8_t)(q[c] < 0 ? -q[c] : q[c]);
    }
    return s;
}

/* Per-thread scratch reused across calls. */
static __thread void *t_buf;
static __thread size_t t_cap;

static void *scratch(size_t bytes)
{
    if (bytes > t_cap) {
        free(t_buf);
        t_buf = aligned_alloc(64, (bytes + 63) & ~(size_t)63);
        t_cap = t_buf ? bytes : 0;
    }
    return t_buf;
}

static size_t align64(size_t v) { return (v + 63) & ~(size_t)63; }

static int prep_x(const vqm_layout *lay, const float *x, int64_t batch, int64_t k, int64_t blk,
                  int flags, vqm_xprep *xp)
{
    const int64_t cc = lay->chunk_cols;
    xp->batch = batch;
    xp->k = k;
    xp->blk = blk;
    xp->nblk = vqm_cdiv(k, blk);
    xp->blk_pad = vqm_cdiv(blk, cc) * cc;
    xp->stride = xp->nblk * xp->blk_pad;
    const int int8 = (flags & VQM_ACT_INT8) != 0;
    size_t nq = int8 ? align64((size_t)(batch * xp->stride)) : 0;
    size_t nxs = int8 ? align64(sizeof(float) * (size_t)(batch * xp->nblk)) : 0;
    size_t nsum = int8 ? align64(sizeof(int32_t) * (size_t)(batch * xp->nblk)) : 0;
    size_t nf = int8 ? 0 : align64(sizeof(float) * (size_t)(batch * xp->stride));
    size_t ntmp = int8 ? align64((size_t)xp->blk_pad) : 0;
    uint8_t *base = scratch(nq + nxs + nsum + nf + ntmp + nq);
    if (!base) return VQM_ENOMEM;
    xp->xq = int8 ? (int8_t *)base : NULL;
    xp->xs = int8 ? (float *)(base + nq) : NULL;
    xp->xsum = int8 ? (int32_t *)(base + nq + nxs) : NULL;
    xp->xf = int8 ? NULL : (float *)(base + nq + nxs + nsum);
    int8_t *tmp = int8 ? (int8_t *)(base + nq + nxs + nsum + nf) : NULL;
    xp->xa = int8 ? base + nq + nxs + nsum + nf + ntmp : NULL;

    for (int64_t bi = 0; bi < batch; bi++) {
        const float *xr = x + bi * k;
        for (int64_t g = 0; g < xp->nblk; g++) {
            const int64_t c0 = g * blk;
            const int64_t len = (c0 + blk < k ? c0 + blk : k) - c0;
            if (int8) {
                int8_t *dst = xp->xq + bi * xp->stride + g * xp->blk_pad;
                uint8_t *adst = xp->xa + bi * xp->stride + g * xp->blk_pad;
                vqm_quantize_act(xr + c0, len, len, tmp, &xp->xs[bi * xp->nblk + g]);
                memset(tmp + len, 0, (size_t)(xp->blk_pad - len)); /* columns past the block read as 0 */
                if (lay->identity) {
                    memcpy(dst, tmp, (size_t)xp->blk_pad);
                } else {
                    for (int64_t h = 0; h < xp->blk_pad; h += cc)
                        for (int64_t q = 0; q < cc; q++) dst[h + q] = tmp[h + lay->perm[q]];
                }
                const int32_t s = abs_sum(dst, adst, xp->blk_pad);
                xp->xsum[bi * xp->nblk + g] = s;
            } else {
                float *dst = xp->xf + bi * xp->stride + g * xp->blk_pad;
                if (lay->identity) {
                    memcpy(dst, xr + c0, sizeof(float) * (size_t)len);
                    for (int64_t c = len; c < xp->blk_pad; c++) dst[c] = 0.0f;
                } else {
                    for (int64_t h = 0; h < xp->blk_pad; h += cc)
                        for (int64_t q = 0; q < cc; q++) {
                            int64_t col = h + lay->perm[q];
                            dst[h + q] = col < len ? xr[c0 + col] : 0.0f;
                        }
                }
            }
        }
    }
    return VQM_OK;
}

/* ---------------------------------------------------------------- row split */
typedef struct {
    const vqm_path_ops *ops;
    const vqm_vq_weight *vw;
    const vqm_int_weight *iw;
    const vqm_layout *lay;
    const vqm_xprep *xp;
    const float *bias;
    float *y;
    int flags;
    int64_t n, gran;
    int ntasks;
} split_ctx;

static void split_task(void *vctx, int i)
{
    const split_ctx *c = vctx;
    int64_t nunits = vqm_cdiv(c->n, c->gran);
    int64_t u0 = nunits * i / c->ntasks, u1 = nunits * (i + 1) / c->ntasks;
    int64_t r0 = u0 * c->gran, r1 = u1 * c->gran;
    if (r1 > c->n) r1 = c->n;
    if (r0 >= r1) return;
    if (c->vw) c->ops->vq_rows(c->vw, c->lay, c->xp, r0, r1, c->bias, c->y, c->flags);
    else c->ops->int_rows(c->iw, c->lay, c->xp, r0, r1, c->bias, c->y, c->flags);
}

static int run_linear(int path, const vqm_vq_weight *vw, const vqm_int_weight *iw,
                      const float *x, int64_t batch, const float *bias, float *y, int flags, int threads)
{
    if (!x || !y || batch < 0) return VQM_EINVAL;
    if (flags & ~VQM_ACT_INT8) return VQM_EINVAL;
    if (path == VQM_PATH_AUTO) path = vqm_get_path();
    if (!vqm_path_available(path)) return VQM_EPATH;
    if (batch == 0) return VQM_OK;
    const vqm_path_ops *ops = ops_of(path);
    vqm_layout lay;
    memset(&lay, 0, sizeof lay);
    int ok = vw ? ops->vq_plan(vw, flags, &lay) : ops->int_plan(iw, flags, &lay);
    if (!ok) {
        ops = &vqm_ops_ref;
        if (vw) ops->vq_plan(vw, flags, &lay); else ops->int_plan(iw, flags, &lay);
    }
    const int64_t n = vw ? vw->n : iw->n, k = vw ? vw->k : iw->k;
    const int64_t blk = vw ? vw->cols_per_block : iw->group;
    if (threads <= 0) threads = vqm_get_num_threads();
    if (threads > 64) threads = 64;
    /* rows are split in units of whole codebook row blocks when there are enough
     * of them, else in units of 4 rows */
    int64_t gran = 4;
    if (vw && vw->rows_per_block > 1 && vqm_cdiv(n, vw->rows_per_block) >= 2 * threads)
        gran = vw->rows_per_block;
    if (vqm_cdiv(n, gran) < threads) threads = (int)vqm_cdiv(n, gran);
    for (int64_t b0 = 0; b0 < batch; b0 += VQM_BATCH_TILE) {
        int64_t nb = batch - b0 < VQM_BATCH_TILE ? batch - b0 : VQM_BATCH_TILE;
        vqm_xprep xp;
        int rc = prep_x(&lay, x + b0 * k, nb, k, blk, flags, &xp);
        if (rc) return rc;
        /* a few tasks per thread: the caller runs whatever the workers have not
         * claimed, so a worker that is slow to wake up costs little */
        int64_t units = vqm_cdiv(n, gran);
        int ntasks = threads == 1 ? 1 : (int)(units < 4 * threads ? units : 4 * threads);
        split_ctx c = { ops, vw, iw, &lay, &xp, bias, y + b0 * n, flags, n, gran, ntasks };
        vqm_pool_run(threads, ntasks, split_task, &c);
    }
    return VQM_OK;
}

int vqm_vq_linear_path(int path, const vqm_vq_weight *w, const float *x, int64_t batch,
                       const float *bias, float *y, int flags, int threads)
{
    int rc = check_vq(w);
    if (rc) return rc;
    return run_linear(path, w, NULL, x, batch, bias, y, flags, threads);
}

int vqm_int_linear_path(int path, const vqm_int_weight *w, const float *x, int64_t batch,
                        const float *bias, float *y, int flags, int threads)
{
    int rc = check_int(w);
    if (rc) return rc;
    return run_linear(path, NULL, w, x, batch, bias, y, flags, threads);
}

int vqm_vq_linear(const vqm_vq_weight *w, const float *x, int64_t batch,
                  const float *bias, float *y, int flags, int threads)
{
    return vqm_vq_linear_path(VQM_PATH_AUTO, w, x, batch, bias, y, flags, threads);
}

int vqm_int_linear(const vqm_int_weight *w, const float *x, int64_t batch,
                   const float *bias, float *y, int flags, int threads)
{
    return vqm_int_linear_path(VQM_PATH_AUTO, w, x, batch, bias, y, flags, threads);
}

int vqm_vq_path_has_kernel(int path, const vqm_vq_weight *w)
{
    if (check_vq(w) || !vqm_path_available(path)) return 0;
    vqm_layout lay;
    return path != VQM_PATH_REF && ops_of(path)->vq_plan(w, 0, &lay) && ops_of(path)->vq_plan(w, VQM_ACT_INT8, &lay);
}

int vqm_int_path_has_kernel(int path, const vqm_int_weight *w)
{
    if (check_int(w) || !vqm_path_available(path)) return 0;
    vqm_layout lay;
    return path != VQM_PATH_REF && ops_of(path)->int_plan(w, 0, &lay) && ops_of(path)->int_plan(w, VQM_ACT_INT8, &lay);
}

/* ---------------------------------------------------------------- codebook search */
/* Work is split in units of up to NEAREST_UNIT vectors of one problem, so both many small problems (EM over all
 * row blocks of a column group) and one large one spread over the threads. */
#define NEAREST_UNIT 512

typedef struct {
    void (*fn)(const float *, const float *, const float *, int64_t, int, int, int64_t *);
    const float *x, *w, *c;
    int64_t m, units_per_problem, units;
    int d, ncent, ntasks;
    int64_t *out;
} nearest_ctx;

static void nearest_task(void *vctx, int i)
{
    const nearest_ctx *n = vctx;
    for (int64_t u = n->units * i / n->ntasks; u < n->units * (i + 1) / n->ntasks; u++) {
        int64_t p = u / n->units_per_problem, i0 = (u % n->units_per_problem) * NEAREST_UNIT;
        int64_t cnt = n->m - i0 < NEAREST_UNIT ? n->m - i0 : NEAREST_UNIT;
        int64_t off = p * n->m + i0;
        n->fn(n->x + off * n->d, n->w + off * n->d, n->c + p * n->ncent * n->d, cnt, n->d, n->ncent, n->out + off);
    }
}

int vqm_nearest_path(int path, const float *x, const float *w, const float *c, int64_t nb, int64_t m,
                     int d, int ncent, int64_t *out, int threads)
{
    if (nb < 0 || m < 0 || d < 1 || d > VQM_NEAREST_MAX_D || ncent < 1 || ncent > VQM_NEAREST_MAX_CENT)
        return VQM_EINVAL;
    if (path == VQM_PATH_AUTO) path = vqm_get_path();
    if (!vqm_path_available(path)) return VQM_EPATH;
    if (nb == 0 || m == 0) return VQM_OK;
    if (!x || !w || !c || !out) return VQM_EINVAL;
    const vqm_path_ops *ops = ops_of(path);
    nearest_ctx n = { ops->nearest ? ops->nearest : vqm_ops_ref.nearest, x, w, c, m, vqm_cdiv(m, NEAREST_UNIT), 0,
                      d, ncent, 0, out };
    n.units = nb * n.units_per_problem;
    if (threads <= 0) threads = vqm_get_num_threads();
    if (threads > 64) threads = 64;
    if (n.units < threads) threads = (int)n.units;
    n.ntasks = threads == 1 ? 1 : (int)(n.units < 4 * threads ? n.units : 4 * threads);
    vqm_pool_run(threads, n.ntasks, nearest_task, &n);
    return VQM_OK;
}

int vqm_nearest(const float *x, const float *w, const float *c, int64_t nb, int64_t m, int d, int ncent,
                int64_t *out, int threads)
{
    return vqm_nearest_path(VQM_PATH_AUTO, x, w, c, nb, m, d, ncent, out, threads);
}

/* ---------------------------------------------------------------- bandwidth */
typedef struct { const uint8_t *p; size_t bytes; int parts; uint64_t sums[64]; } stream_ctx;

static void stream_task(void *vctx, int i)
{
    stream_ctx *c = vctx;
    size_t words = c->bytes / 8;
    size_t w0 = words * (size_t)i / (size_t)c->parts, w1 = words * (size_t)(i + 1) / (size_t)c->parts;
    const uint64_t *p = (const uint64_t *)(const void *)c->p;
    uint64_t a = 0, b = 0, cc = 0, d = 0;
    size_t j = w0;
    for (; j + 4 <= w1; j += 4) { a += p[j]; b += p[j + 1]; cc += p[j + 2]; d += p[j + 3]; }
    for (; j < w1; j++) a += p[j];
    c->sums[i] = a + b + cc + d;
}

uint64_t vqm_stream_read(const void *buf, size_t bytes, int threads)
{
    if (!buf) return 0;
    if (threads <= 0) threads = vqm_get_num_threads();
    if (threads > 64) threads = 64;
    stream_ctx c;
    memset(&c, 0, sizeof c);
    c.p = buf;
    c.bytes = bytes;
    c.parts = threads;
    vqm_pool_run(threads, threads, stream_task, &c);
    uint64_t s = 0;
    for (int i = 0; i < threads; i++) s += c.sums[i];
    return s;
}
