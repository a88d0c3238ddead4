/* E8P (QuIP#) linear layers: the decode tables, argument checks, activation
 * preparation, the row split over the thread pool and the per-path dispatch of
 * the kernels (e8p_ref.c and its SIMD versions). */
#include "quip.h"
#include <pthread.h>
#include <stdlib.h>

/* ---------------------------------------------------------------- tables */
/* The 29 norm^2-12 abs patterns: positions of their three 1/2 coordinates (the others are 3/2), in the order of
 * the reference implementation (vqmobile/formats/e8p.py holds the same list). */
static const uint8_t norm12_halves[29][3] = {
    { 1, 2, 3 }, { 0, 2, 3 }, { 0, 1, 3 }, { 0, 1, 2 }, { 3, 6, 7 }, { 3, 5, 7 }, { 3, 4, 7 }, { 3, 5, 6 },
    { 3, 4, 6 }, { 3, 4, 5 }, { 2, 6, 7 }, { 2, 5, 7 }, { 2, 4, 7 }, { 2, 5, 6 }, { 2, 4, 6 }, { 2, 4, 5 },
    { 1, 6, 7 }, { 1, 5, 7 }, { 1, 4, 7 }, { 1, 5, 6 }, { 1, 4, 6 }, { 0, 4, 5 }, { 0, 6, 7 }, { 0, 5, 7 },
    { 0, 4, 7 }, { 0, 5, 6 }, { 0, 4, 6 }, { 0, 1, 4 }, { 2, 3, 7 },
};

static vqm_e8p_tab g_tab;
static pthread_once_t g_tab_once = PTHREAD_ONCE_INIT;

static int lex(const int8_t *a, const int8_t *b)
{
    for (int t = 0; t < 8; t++)
        if (a[t] != b[t]) return a[t] < b[t] ? -1 : 1;
    return 0;
}

static int cmp_lex(const void *a, const void *b) { return lex((const int8_t *)a, (const int8_t *)b); }

static void build_tables(void)
{
    int na = 0;
    uint8_t lev[256][8];
    /* abs patterns with norm^2 <= 10, lexicographic (coordinate 0 slowest): levels L (|v| = L + 1/2) */
    for (int c = 0; c < 65536; c++) {
        int l[8], s2 = 0;
        for (int t = 0; t < 8; t++) {
            l[t] = (c >> (2 * (7 - t))) & 3;
            s2 += (2 * l[t] + 1) * (2 * l[t] + 1);
        }
        if (s2 > 40) continue;
        for (int t = 0; t < 8; t++) lev[na][t] = (uint8_t)l[t];
        na++;
    }
    for (int i = 0; i < 29; i++, na++) {
        for (int t = 0; t < 8; t++) lev[na][t] = 1;
        for (int j = 0; j < 3; j++) lev[na][norm12_halves[i][j]] = 0;
    }
    for (int a = 0; a < 256; a++) {
        int sum2 = 0; /* 2 sum |v| */
        uint32_t word = 0;
        for (int t = 0; t < 8; t++) {
            sum2 += 2 * lev[a][t] + 1;
            g_tab.abs4[a][t] = (int8_t)(4 * lev[a][t] + 2);
            word |= (uint32_t)lev[a][t] << (2 * t);
        }
        if ((sum2 / 2) % 2) {
            g_tab.abs4[a][7] = (int8_t)-g_tab.abs4[a][7];
            word |= 1u << 16;
        }
        g_tab.lv[a] = word;
        for (int t = 0; t < 8; t++) g_tab.fabs4[a][t] = (float)g_tab.abs4[a][t];
    }
    for (int b = 0; b < 256; b++) {
        const int par = vqm_parity8((unsigned)b);
        const unsigned bp = (unsigned)b ^ (unsigned)par;
        for (int t = 0; t < 8; t++) g_tab.fsgn[b][t] = ((bp >> t) & 1u) ? 0x80000000u : 0u;
        g_tab.fsigma[b] = par ? -1.0f : 1.0f;
    }
    /* E81B x2: 0 and the 240 roots of E8 (lexicographic), then 4 e_i (i < 8), -4 e_i (i < 7) */
    static int8_t pts[241][8];
    int np = 0;
    for (int c = 0; c < 6561; c++) { /* 2x integer points with entries in {-1, 0, 1}: at most two nonzero, even sum */
        int8_t v[8];
        int cc = c, nz = 0, sum = 0;
        for (int t = 7; t >= 0; t--) {
            v[t] = (int8_t)(2 * (cc % 3) - 2);
            cc /= 3;
            nz += v[t] != 0;
            sum += v[t];
        }
        if (nz <= 2 && sum % 4 == 0) memcpy(pts[np++], v, 8);
    }
    for (int c = 0; c < 256; c++) { /* 2x (+-1/2)^8 with an even number of minus signs */
        if (vqm_parity8((unsigned)c)) continue;
        for (int t = 0; t < 8; t++) pts[np][t] = (int8_t)(((c >> t) & 1) ? -1 : 1);
        np++;
    }
    qsort(pts, (size_t)np, 8, cmp_lex);
    memcpy(g_tab.e81, pts, sizeof pts);
    for (int i = 0; i < 15; i++) {
        memset(g_tab.e81[241 + i], 0, 8);
        g_tab.e81[241 + i][i % 8] = (int8_t)(i < 8 ? 4 : -4);
    }
    for (int a = 0; a < 256; a++)
        for (int t = 0; t < 8; t++) g_tab.fe81[a][t] = (float)g_tab.e81[a][t];
}

const vqm_e8p_tab *vqm_e8p_init(void)
{
    pthread_once(&g_tab_once, build_tables);
    return &g_tab;
}

void vqm_e8p_tables(int8_t *abs4, int8_t *e81)
{
    const vqm_e8p_tab *t = vqm_e8p_init();
    if (abs4) memcpy(abs4, t->abs4, sizeof t->abs4);
    if (e81) memcpy(e81, t->e81, sizeof t->e81);
}

/* ---------------------------------------------------------------- dispatch */
static const vqm_e8p_ops *e8p_ops(int path)
{
    switch (path) {
#if defined(__x86_64__)
    case VQM_PATH_AVX2: return &vqm_e8p_avx2;
    case VQM_PATH_AVX512: return &vqm_e8p_avx512;
#endif
#if defined(__aarch64__)
    case VQM_PATH_NEON: return &vqm_e8p_neon;
    case VQM_PATH_NEON_DOT: return &vqm_e8p_neon_dot;
#endif
    default: return &vqm_e8p_ref;
    }
}

static int check_e8p(const vqm_e8p_weight *w)
{
    if (!w || !w->codes || !w->scales) return VQM_EINVAL;
    if (w->n < 1 || w->k < 1 || w->bits < 2 || w->bits > 4) return VQM_EINVAL;
    return VQM_OK;
}

int vqm_e8p_path_has_kernel(int path, const vqm_e8p_weight *w)
{
    int chunk;
    if (check_e8p(w) || !vqm_path_available(path) || path == VQM_PATH_REF) return 0;
    return e8p_ops(path)->plan(w, 0, &chunk) && e8p_ops(path)->plan(w, VQM_ACT_INT8, &chunk);
}

/* ---------------------------------------------------------------- activations */
static __thread void *t_buf;
static __thread size_t t_cap;

static size_t a64(size_t v) { return (v + 63) & ~(size_t)63; }

static int prep(const float *x, int64_t batch, int64_t k, int flags, int chunk, vqm_e8p_xprep *xp)
{
    const int cs = chunk ? chunk : VQM_E8P_CHUNK; /* codes per chunk */
    const int64_t nc = vqm_cdiv(k, 8), nch = vqm_cdiv(nc, cs), kpad = nch * 8 * cs;
    const int int8 = (flags & VQM_ACT_INT8) != 0;
    xp->batch = batch;
    xp->k = k;
    xp->ncodes = nc;
    xp->nchunk = nch;
    xp->chunk = cs;
    xp->kpad = kpad;
    xp->nblk = vqm_cdiv(k, VQM_E8P_ACT_BLOCK);
    const size_t nq = int8 ? a64((size_t)(batch * kpad)) : 0, nqp = int8 && chunk ? nq : 0;
    const int64_t ncp = nch * cs; /* codes per row, padded to whole chunks */
    const size_t n8 = int8 ? a64(sizeof(int16_t) * (size_t)(batch * ncp)) : 0;
    const size_t nxs = int8 ? a64(sizeof(float) * (size_t)(batch * xp->nblk)) : 0;
    const size_t nf = int8 ? 0 : a64(sizeof(float) * (size_t)(batch * kpad));
    const size_t nf8 = int8 ? 0 : a64(sizeof(float) * (size_t)(batch * ncp));
    const size_t total = nq + 2 * nqp + n8 + nxs + nf + nf8;
    if (total > t_cap) {
        free(t_buf);
        t_buf = aligned_alloc(64, total);
        t_cap = t_buf ? total : 0;
        if (!t_buf) return VQM_ENOMEM;
    }
    uint8_t *p = t_buf;
    xp->q = int8 ? (int8_t *)p : NULL;
    p += nq;
    xp->qp = nqp ? (int8_t *)p : NULL;
    p += nqp;
    xp->nq = nqp ? (int8_t *)p : NULL;
    p += nqp;
    xp->x8 = int8 ? (int16_t *)(void *)p : NULL;
    p += n8;
    xp->xs = int8 ? (float *)(void *)p : NULL;
    p += nxs;
    xp->xf = int8 ? NULL : (float *)(void *)p;
    p += nf;
    xp->f8 = int8 ? NULL : (float *)(void *)p;
    for (int64_t b = 0; b < batch; b++) {
        const float *xr = x + b * k;
        if (int8) {
            int8_t *q = xp->q + b * kpad;
            vqm_quantize_act(xr, k, VQM_E8P_ACT_BLOCK, q, xp->xs + b * xp->nblk);
            memset(q + k, 0, (size_t)(kpad - k));
            for (int64_t c = 0; c < ncp; c++) {
                int s = 0;
                for (int t = 0; t < 8; t++) s += q[8 * c + t];
                xp->x8[b * ncp + c] = (int16_t)s;
            }
            if (chunk) {
                int8_t *qp = xp->qp + b * kpad, *nq2 = xp->nq + b * kpad;
                for (int64_t ch = 0; ch < nch; ch++)
                    for (int t = 0; t < 8; t++)
                        for (int c = 0; c < cs; c++) {
                            const int8_t v = q[ch * 8 * cs + 8 * c + t];
                            qp[ch * 8 * cs + t * cs + c] = v;
                            nq2[ch * 8 * cs + t * cs + c] = (int8_t)-v;
                        }
            }
        } else {
            float *f = xp->xf + b * kpad;
            memcpy(f, xr, sizeof(float) * (size_t)k);
            for (int64_t c = k; c < kpad; c++) f[c] = 0.0f;
            for (int64_t c = 0; c < ncp; c++) {
                float s = 0.0f;
                for (int t = 0; t < 8; t++) s += f[8 * c + t];
                xp->f8[b * ncp + c] = s;
            }
        }
    }
    return VQM_OK;
}

/* ---------------------------------------------------------------- linear */
typedef struct {
    const vqm_e8p_ops *ops;
    const vqm_e8p_weight *w;
    const vqm_e8p_tab *tab;
    const vqm_e8p_xprep *xp;
    const float *bias;
    float *y;
    int flags, ntasks;
} e8p_ctx;

static void e8p_task(void *vctx, int i)
{
    const e8p_ctx *c = vctx;
    const int64_t units = vqm_cdiv(c->w->n, 4);
    const int64_t r0 = units * i / c->ntasks * 4, r1e = units * (i + 1) / c->ntasks * 4;
    const int64_t r1 = r1e < c->w->n ? r1e : c->w->n;
    if (r0 < r1) c->ops->rows(c->w, c->tab, c->xp, r0, r1, c->bias, c->y, c->flags);
}

int vqm_e8p_linear_path(int path, const vqm_e8p_weight *w, const float *x, int64_t batch, const float *bias,
                        float *y, int flags, int threads)
{
    int rc = check_e8p(w);
    if (rc) return rc;
    if (!x || !y || batch < 0 || (flags & ~VQM_ACT_INT8)) return VQM_EINVAL;
    if (path == VQM_PATH_AUTO) path = vqm_get_path();
    if (!vqm_path_available(path)) return VQM_EPATH;
    if (batch == 0) return VQM_OK;
    const vqm_e8p_tab *tab = vqm_e8p_init();
    const vqm_e8p_ops *ops = e8p_ops(path);
    int chunk = 0;
    if (!ops->plan(w, flags, &chunk)) {
        ops = &vqm_e8p_ref;
        ops->plan(w, flags, &chunk);
    }
    if (threads <= 0) threads = vqm_get_num_threads();
    if (threads > 64) threads = 64;
    const int64_t units = vqm_cdiv(w->n, 4);
    if (units < threads) threads = (int)units;
    for (int64_t b0 = 0; b0 < batch; b0 += VQM_BATCH_TILE) {
        const int64_t nb = batch - b0 < VQM_BATCH_TILE ? batch - b0 : VQM_BATCH_TILE;
        vqm_e8p_xprep xp;
        rc = prep(x + b0 * w->k, nb, w->k, flags, chunk, &xp);
        if (rc) return rc;
        const int ntasks = threads == 1 ? 1 : (int)(units < 4 * threads ? units : 4 * threads);
        e8p_ctx c = { ops, w, tab, &xp, bias, y + b0 * w->n, flags, ntasks };
        vqm_pool_run(threads, ntasks, e8p_task, &c);
    }
    return VQM_OK;
}

int vqm_e8p_linear(const vqm_e8p_weight *w, const float *x, int64_t batch, const float *bias, float *y, int flags,
                   int threads)
{
    return vqm_e8p_linear_path(VQM_PATH_AUTO, w, x, batch, bias, y, flags, threads);
}
