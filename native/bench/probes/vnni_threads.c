/* Does a second thread double vector compute on this machine? 8 independent vpdpbusd chains per thread, 400 M
 * instructions per thread, on 1 and then 2 threads: if the two vCPUs were hyperthreads of one core, the total rate
 * would stay about the same. Why it exists: the two-thread VQ 2.25 kernel rows (README, "Kernels on the AVX-512
 * machine") gain less than onnxruntime's from the second thread.
 *
 *   gcc -O2 -mavx512f -mavx512bw -mavx512vnni -pthread native/bench/probes/vnni_threads.c -o /tmp/vnni_threads
 *   /tmp/vnni_threads 1 && /tmp/vnni_threads 2
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define N 400000000L

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void *work(void *out)
{
    __m512i a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm512_set1_epi32(i);
    const __m512i b = _mm512_set1_epi8(1), c = _mm512_set1_epi8(2);
    for (long i = 0; i < N / 8; i++)
        for (int j = 0; j < 8; j++) a[j] = _mm512_dpbusd_epi32(a[j], b, c);
    int s = 0;
    for (int i = 0; i < 8; i++) s += _mm512_reduce_add_epi32(a[i]);
    *(int *)out = s; /* keeps the chains alive */
    return NULL;
}

int main(int argc, char **argv)
{
    const int th = argc > 1 ? atoi(argv[1]) : 1;
    if (th < 1 || th > 4) {
        fprintf(stderr, "vnni_threads: give 1 to 4 threads\n");
        return 2;
    }
    pthread_t t[4];
    int r[4];
    const double t0 = now();
    for (int i = 0; i < th; i++) pthread_create(&t[i], NULL, work, &r[i]);
    for (int i = 0; i < th; i++) pthread_join(t[i], NULL);
    const double dt = now() - t0;
    printf("%d thread(s): %.3f s, %.2f G vpdpbusd/s in all\n", th, dt, th * N / dt / 1e9);
    return 0;
}
