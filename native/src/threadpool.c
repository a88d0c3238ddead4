/* A small persistent thread pool: workers are created once (lazily, grown on
 * demand) and reused by every call. Calls serialise on a mutex. Workers spin
 * briefly after a job (token generation issues back-to-back products), then
 * sleep on a condition variable. */
#include "internal.h"
#include <pthread.h>
#include <stdatomic.h>
#include <sched.h>
#include <unistd.h>

#define VQM_MAX_THREADS 64
#define SPIN_ITERS 20000

typedef struct {
    void (*fn)(void *ctx, int i);
    void *ctx;
    int ntasks;
    int nworkers; /* workers participating in this job */
} job_t;

static pthread_mutex_t g_call_mu = PTHREAD_MUTEX_INITIALIZER;  /* one job at a time */
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv = PTHREAD_COND_INITIALIZER;
static pthread_t g_threads[VQM_MAX_THREADS];
static int g_nthreads;                   /* workers created */
static job_t g_job;
static atomic_uint g_gen;                /* job generation */
static atomic_int g_next;                /* next task index */
static atomic_int g_active;              /* workers still working on the current job */
static unsigned g_start_gen[VQM_MAX_THREADS];

int vqm_online_cpus(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : (n > VQM_MAX_THREADS ? VQM_MAX_THREADS : (int)n);
}

static void run_tasks(const job_t *job)
{
    for (;;) {
        int i = atomic_fetch_add(&g_next, 1);
        if (i >= job->ntasks) break;
        job->fn(job->ctx, i);
    }
}

static void *worker_main(void *arg)
{
    int id = (int)(intptr_t)arg;
    /* generation current when the worker was created (a job published after
     * that, even before this thread first runs, must not be missed) */
    unsigned seen = g_start_gen[id];
    for (;;) {
        unsigned gen;
        int spins = 0;
        while ((gen = atomic_load_explicit(&g_gen, memory_order_acquire)) == seen) {
            if (++spins < SPIN_ITERS) {
#if defined(__x86_64__)
                __builtin_ia32_pause();
#elif defined(__aarch64__)
                __asm__ __volatile__("yield");
#endif
                continue;
            }
            pthread_mutex_lock(&g_mu);
            while ((gen = atomic_load(&g_gen)) == seen) pthread_cond_wait(&g_cv, &g_mu);
            pthread_mutex_unlock(&g_mu);
            break;
        }
        (void)gen;
        job_t job;
        pthread_mutex_lock(&g_mu);   /* job and generation are published together */
        seen = atomic_load(&g_gen);
        job = g_job;
        pthread_mutex_unlock(&g_mu);
        if (id < job.nworkers) {
            run_tasks(&job);
            atomic_fetch_sub_explicit(&g_active, 1, memory_order_acq_rel);
        }
    }
    return NULL;
}

void vqm_pool_run(int nthreads, int ntasks, void (*fn)(void *ctx, int i), void *ctx)
{
    if (nthreads > VQM_MAX_THREADS) nthreads = VQM_MAX_THREADS;
    if (nthreads > ntasks) nthreads = ntasks;
    if (nthreads <= 1) {
        for (int i = 0; i < ntasks; i++) fn(ctx, i);
        return;
    }
    pthread_mutex_lock(&g_call_mu);
    int want = nthreads - 1;
    while (g_nthreads < want) {
        g_start_gen[g_nthreads] = atomic_load(&g_gen);
        if (pthread_create(&g_threads[g_nthreads], NULL, worker_main, (void *)(intptr_t)g_nthreads) != 0) break;
        pthread_detach(g_threads[g_nthreads]);
        g_nthreads++;
    }
    if (want > g_nthreads) want = g_nthreads;
    pthread_mutex_lock(&g_mu);
    g_job.fn = fn;
    g_job.ctx = ctx;
    g_job.ntasks = ntasks;
    g_job.nworkers = want;
    atomic_store(&g_next, 0);
    atomic_store(&g_active, want);
    atomic_fetch_add_explicit(&g_gen, 1, memory_order_release);
    pthread_cond_broadcast(&g_cv);
    pthread_mutex_unlock(&g_mu);

    job_t job = { fn, ctx, ntasks, want };
    run_tasks(&job);
    int spins = 0;
    while (atomic_load_explicit(&g_active, memory_order_acquire) > 0) {
        if (++spins > SPIN_ITERS) sched_yield();
#if defined(__x86_64__)
        else __builtin_ia32_pause();
#endif
    }
    pthread_mutex_unlock(&g_call_mu);
}
