/* A matrix's output rows split over threads inside the C expert kernels (nvfp4_cpu.c,
 * fp8_cpu.c), one call from Python per matrix.
 *
 * Why not Python threads: a span handed to a Python thread pool costs its future and the GIL
 * twice, ~100 us a call for 16 spans (measured here), against ~0.35 ms for the whole of one
 * NVFP4 expert's weights at 40 GB/s, and the GIL is contended by the thread driving the GPU.
 * Here the caller holds no GIL (ctypes releases it) and the workers are plain pthreads asleep on
 * a condition variable between calls.
 *
 * Spans are taken from a shared counter, so a slow worker (a core busy elsewhere) costs its one
 * span, not a share fixed in advance. One call at a time per library (a mutex): concurrent
 * callers queue. After a fork the child starts a fresh pool (the parent's threads are not in
 * it). Each kernel library has its own pool: the header's state is static. */
#ifndef QUIRE_CPU_POOL_H
#define QUIRE_CPU_POOL_H

#include <pthread.h>
#include <stdint.h>

#define POOL_MAX_THREADS 256

typedef void (*span_fn)(const void *args, int64_t r0, int64_t r1);

static struct {
    pthread_mutex_t call, lock;
    pthread_cond_t wake, done;
    int workers;          /* threads started */
    uint64_t generation;  /* bumped per call: workers wake for a new one */
    span_fn fn;
    const void *args;
    int64_t rows, step;
    int spans, next, remaining;
    int fork_handled;     /* pthread_atfork registered (once per process image) */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,
          PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};

/* Runs spans of the current call until none is left; called and returns with pool.lock held. */
static void pool_take_spans(void) {
    while (pool.next < pool.spans) {
        int64_t r0 = (int64_t)pool.next++ * pool.step;
        int64_t r1 = r0 + pool.step < pool.rows ? r0 + pool.step : pool.rows;
        span_fn fn = pool.fn;
        const void *args = pool.args;
        pthread_mutex_unlock(&pool.lock);
        fn(args, r0, r1);
        pthread_mutex_lock(&pool.lock);
        if (--pool.remaining == 0) pthread_cond_signal(&pool.done);
    }
}

static void *pool_worker(void *unused) {
    (void)unused;
    pthread_mutex_lock(&pool.lock);
    uint64_t seen = pool.generation;
    for (;;) {
        while (pool.generation == seen) pthread_cond_wait(&pool.wake, &pool.lock);
        seen = pool.generation;
        pool_take_spans();
    }
    return NULL;
}

static void pool_after_fork_in_child(void) {
    pthread_mutex_init(&pool.call, NULL);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.done, NULL);
    pool.workers = 0;
}

/* fn(args, r0, r1) over rows [0, rows) in spans of `step` rows, on up to `threads` threads
 * (the caller is one of them). Returns once every span has run. */
static void pool_run(int threads, int64_t rows, int64_t step, span_fn fn, const void *args) {
    if (rows <= 0) return;
    if (step <= 0 || step >= rows || threads <= 1) {
        fn(args, 0, rows);
        return;
    }
    pthread_mutex_lock(&pool.call);
    if (!pool.fork_handled) pool.fork_handled = pthread_atfork(NULL, NULL, pool_after_fork_in_child) == 0;
    int wanted = threads - 1 < POOL_MAX_THREADS ? threads - 1 : POOL_MAX_THREADS;
    while (pool.workers < wanted) {
        pthread_t thread;
        if (pthread_create(&thread, NULL, pool_worker, NULL) != 0) break; /* fewer threads: slower */
        pthread_detach(thread);
        pool.workers++;
    }
    pthread_mutex_lock(&pool.lock);
    pool.fn = fn;
    pool.args = args;
    pool.rows = rows;
    pool.step = step;
    pool.spans = (int)((rows + step - 1) / step);
    pool.next = 0;
    pool.remaining = pool.spans;
    pool.generation++;
    pthread_cond_broadcast(&pool.wake);
    pool_take_spans();
    while (pool.remaining > 0) pthread_cond_wait(&pool.done, &pool.lock);
    pthread_mutex_unlock(&pool.lock);
    pthread_mutex_unlock(&pool.call);
}

#endif
