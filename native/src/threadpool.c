/* A small persistent thread pool: workers are created once (lazily, grown on
 * demand) and reused by every call. Calls serialise on a mutex. Tasks are
 * claimed from a counter tagged with the job generation, so the calling thread
 * runs whatever the workers have not claimed yet and never waits for a worker
 * that has not woken up (important on loaded machines); it only waits for
 * tasks that were actually claimed. Workers spin briefly after a job (token
 * generation issues back-to-back products), then sleep on a condition variable. */
#include "internal.h"
#include <pthread.h>
#include <stdatomic.h>
#include <sched.h>
#include <unistd.h>

#define VQM_MAX_THREADS 64
#define SPIN_ITERS 4000

typedef struct {
    void (*fn)(void *ctx, int i);
    void *ctx;
    int ntasks;
    uint32_t gen;
} job_t;

static pthread_mutex_t g_call_mu = PTHREAD_MUTEX_INITIALIZER;  /* one job at a time */
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv = PTHREAD_COND_INITIALIZER;
static pthread_t g_threads[VQM_MAX_THREADS];
static int g_nthreads;                   /* workers created */
static job_t g_job;                      /* current job (guarded by g_mu) */
static atomic_uint g_gen;                /* job generation */
static _Atomic uint64_t g_claim;         /* (generation << 32) | next task index */
static atomic_int g_done;                /* tasks of the current job finished */
static uint32_t g_start_gen[VQM_MAX_THREADS];

int vqm_online_cpus(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : (n > VQM_MAX_THREADS ? VQM_MAX_THREADS : (int)n);
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* claim and run tasks of job `job` until none is left */
static void run_tasks(const job_t *job)
{
    for (;;) {
        uint64_t v = atomic_load_explicit(&g_claim, memory_order_acquire);
        for (;;) {
            if ((uint32_t)(v >> 32) != job->gen || (int)(uint32_t)v >= job->ntasks) return;
            if (atomic_compare_exchange_weak_explicit(&g_claim, &v, v + 1, memory_order_acq_rel, memory_order_acquire))
                break;
        }
        job->fn(job->ctx, (int)(uint32_t)v);
        atomic_fetch_add_explicit(&g_done, 1, memory_order_release);
    }
}

static void *worker_main(void *arg)
{
    int id = (int)(intptr_t)arg;
    uint32_t seen = g_start_gen[id];
    for (;;) {
        int spins = 0;
        while (atomic_load_explicit(&g_gen, memory_order_acquire) == seen) {
            if (++spins < SPIN_ITERS) { cpu_relax(); continue; }
            pthread_mutex_lock(&g_mu);
            while (atomic_load(&g_gen) == seen) pthread_cond_wait(&g_cv, &g_mu);
            pthread_mutex_unlock(&g_mu);
        }
        job_t job;
        pthread_mutex_lock(&g_mu);   /* job and generation are published together */
        job = g_job;
        seen = job.gen;
        pthread_mutex_unlock(&g_mu);
        run_tasks(&job);
    }
    return NULL;
}

void vqm_pool_run(int nthreads, int ntasks, void (*fn)(void *ctx, int i), void *ctx)
{
    if (nthreads > VQM_MAX_THREADS) nthreads = VQM_MAX_THREADS;
    if (nthreads <= 1 || ntasks <= 1) {
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
    pthread_mutex_lock(&g_mu);
    uint32_t gen = atomic_load(&g_gen) + 1u;
    g_job.fn = fn;
    g_job.ctx = ctx;
    g_job.ntasks = ntasks;
    g_job.gen = gen;
    atomic_store(&g_done, 0);
    atomic_store_explicit(&g_claim, (uint64_t)gen << 32, memory_order_release);
    atomic_store_explicit(&g_gen, gen, memory_order_release);
    pthread_cond_broadcast(&g_cv);
    pthread_mutex_unlock(&g_mu);

    job_t job = { fn, ctx, ntasks, gen };
    run_tasks(&job);
    int spins = 0;
    while (atomic_load_explicit(&g_done, memory_order_acquire) < ntasks) {
        if (++spins > SPIN_ITERS) sched_yield();
        else cpu_relax();
    }
    pthread_mutex_unlock(&g_call_mu);
}
