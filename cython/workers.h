/* A small thread pool for the forward pass, built to stay fast on a busy machine.
 *
 * A job (one forward pass) is a fixed sequence of ops; every thread walks the same sequence.
 * Each op is cut into chunks that threads take from a shared counter (dynamic scheduling), and
 * an op ends when all of its chunks are DONE - not when all threads have arrived. So a thread
 * that the OS has descheduled, or that wakes late, holds back nobody: the others take the
 * remaining chunks, and it joins wherever the job is when it runs again. (OpenMP barriers wait
 * for every thread at every op: with other processes competing for the two cores, 2-thread
 * decode fell from ~100 to 7 tokens/s; libgomp's spinning made it worse.)
 *
 * The counters carry the job's generation in their upper 32 bits: a worker still walking an
 * old job sees the generation change, takes no chunk, and returns to wait. Waiting spins
 * briefly (pause), then yields the CPU (sched_yield), and between jobs finally sleeps on a
 * condition variable, so idle workers cost nothing while Python samples the next token.
 *
 * Without pthreads (Windows builds) every job runs on the calling thread alone.
 */
#ifndef QPACK_WORKERS_H
#define QPACK_WORKERS_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(_WIN32)
#define QK_THREADS 1
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
typedef _Atomic uint64_t qk_atomic_u64;
typedef _Atomic uint32_t qk_atomic_u32;
#define QK_LOAD(p, order) atomic_load_explicit(p, order)
#define QK_STORE(p, v, order) atomic_store_explicit(p, v, order)
#define QK_ACQ memory_order_acquire
#define QK_REL memory_order_release
#define QK_RLX memory_order_relaxed
#else
#define QK_THREADS 0
typedef uint64_t qk_atomic_u64;
typedef uint32_t qk_atomic_u32;
#define QK_LOAD(p, order) (*(p))
#define QK_STORE(p, v, order) (*(p) = (v))
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define QK_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define QK_CPU_RELAX() __asm__ __volatile__("yield")
#else
#define QK_CPU_RELAX() ((void)0)
#endif

/* Waits: this many pauses (a few microseconds: the usual wait for a partner's last chunk),
 * then sched_yield; between jobs, after QK_DOCK_YIELDS yields, sleep. */
#define QK_SPIN_PAUSES 2000
#define QK_DOCK_YIELDS 200

typedef void (*qk_job_fn)(void *arg, int tid, uint32_t gen);

typedef struct {
    qk_atomic_u64 next; /* gen << 32 | next chunk to take */
    qk_atomic_u64 done; /* gen << 32 | chunks finished */
    char pad[64 - 2 * sizeof(uint64_t)];
} qk_op_counter;

typedef struct qk_pool qk_pool;

typedef struct {
    qk_pool *pool;
    int tid;
} qk_worker_arg;

struct qk_pool {
    int n_threads;
    int max_ops;
    qk_op_counter *ops;
    uint32_t gen; /* the last job published (main thread only) */
#if QK_THREADS
    qk_atomic_u32 job; /* generation workers wait for */
    qk_atomic_u32 quit;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int sleeping; /* under mu */
    qk_job_fn fn; /* under mu */
    void *arg;    /* under mu */
    pthread_t *threads;
    qk_worker_arg *wargs;
    int n_started;
#endif
};

/* One thread's walk through a job's ops. */
typedef struct {
    qk_pool *pool;
    int tid;
    uint32_t gen;
    int op;
    int stale; /* the job is over (a newer one began): do nothing more */
} qk_ctx;

static inline void qk_backoff(int *spins) {
    if (*spins < QK_SPIN_PAUSES) {
        QK_CPU_RELAX();
        (*spins)++;
    } else {
#if QK_THREADS
        sched_yield();
#endif
    }
}

/* The next chunk of the current op (0..n-1), or -1 when none is left. */
static inline int64_t qk_grab(qk_ctx *c, int64_t n) {
    if (c->stale || c->op >= c->pool->max_ops) return -1;
    qk_atomic_u64 *x = &c->pool->ops[c->op].next;
    uint64_t v = QK_LOAD(x, QK_RLX);
    for (;;) {
        if ((uint32_t)(v >> 32) != c->gen) {
            c->stale = 1;
            return -1;
        }
        const int64_t i = (int64_t)(uint32_t)v;
        if (i >= n) return -1;
#if QK_THREADS
        if (atomic_compare_exchange_weak_explicit(x, &v, v + 1, QK_ACQ, QK_RLX)) return i;
#else
        *x = v + 1;
        return i;
#endif
    }
}

static inline void qk_chunk_done(qk_ctx *c) {
#if QK_THREADS
    atomic_fetch_add_explicit(&c->pool->ops[c->op].done, 1, QK_REL);
#else
    c->pool->ops[c->op].done++;
#endif
}

/* Waits until all n chunks of the current op are done, then moves to the next op. Returns 0
 * when the job is over for this thread (stale: it must return at once). */
static inline int qk_op_end(qk_ctx *c, int64_t n) {
    if (c->stale || c->op >= c->pool->max_ops) {
        c->stale = 1;
        return 0;
    }
    qk_atomic_u64 *d = &c->pool->ops[c->op].done;
    int spins = 0;
    for (;;) {
        const uint64_t v = QK_LOAD(d, QK_ACQ);
        if ((uint32_t)(v >> 32) != c->gen) {
            c->stale = 1;
            return 0;
        }
        if ((int64_t)(uint32_t)v >= n) break;
        qk_backoff(&spins);
    }
    c->op++;
    return 1;
}

/* for (c = each chunk this thread gets) { body }: */
#define QK_CHUNKS(ctx, idx, n) for (int64_t idx; (idx = qk_grab(ctx, n)) >= 0; qk_chunk_done(ctx))

#if QK_THREADS
static void *qk_worker_main(void *p) {
    qk_worker_arg *wa = (qk_worker_arg *)p;
    qk_pool *pool = wa->pool;
    uint32_t seen = 0;
    for (;;) {
        int spins = 0;
        while (QK_LOAD(&pool->job, QK_ACQ) == seen && !QK_LOAD(&pool->quit, QK_ACQ)) {
            if (spins < QK_SPIN_PAUSES + QK_DOCK_YIELDS) {
                qk_backoff(&spins);
                spins += spins >= QK_SPIN_PAUSES; /* count the yields too */
                continue;
            }
            pthread_mutex_lock(&pool->mu);
            pool->sleeping++;
            while (QK_LOAD(&pool->job, QK_RLX) == seen && !QK_LOAD(&pool->quit, QK_RLX))
                pthread_cond_wait(&pool->cv, &pool->mu);
            pool->sleeping--;
            pthread_mutex_unlock(&pool->mu);
        }
        pthread_mutex_lock(&pool->mu);
        const int quit = (int)QK_LOAD(&pool->quit, QK_RLX);
        const uint32_t gen = QK_LOAD(&pool->job, QK_RLX);
        qk_job_fn fn = pool->fn;
        void *arg = pool->arg;
        pthread_mutex_unlock(&pool->mu);
        if (quit) return NULL;
        seen = gen;
        if (fn) fn(arg, wa->tid, gen);
    }
}
#endif

/* Returns NULL when out of memory. Threads that cannot be started are simply absent: the
 * caller's thread takes every chunk. */
static qk_pool *qk_pool_new(int n_threads, int max_ops) {
    qk_pool *pool = (qk_pool *)calloc(1, sizeof(qk_pool));
    if (!pool) return NULL;
    pool->n_threads = n_threads < 1 ? 1 : n_threads;
    pool->max_ops = max_ops;
    pool->ops = (qk_op_counter *)calloc((size_t)max_ops, sizeof(qk_op_counter));
    if (!pool->ops) {
        free(pool);
        return NULL;
    }
#if QK_THREADS
    pthread_mutex_init(&pool->mu, NULL);
    pthread_cond_init(&pool->cv, NULL);
    if (pool->n_threads > 1) {
        pool->threads = (pthread_t *)calloc((size_t)pool->n_threads, sizeof(pthread_t));
        pool->wargs = (qk_worker_arg *)calloc((size_t)pool->n_threads, sizeof(qk_worker_arg));
        if (pool->threads && pool->wargs)
            for (int t = 1; t < pool->n_threads; t++) {
                pool->wargs[t].pool = pool;
                pool->wargs[t].tid = t;
                if (pthread_create(&pool->threads[pool->n_started], NULL, qk_worker_main, &pool->wargs[t]) != 0)
                    break;
                pool->n_started++;
            }
    }
#endif
    return pool;
}

static void qk_pool_free(qk_pool *pool) {
    if (!pool) return;
#if QK_THREADS
    pthread_mutex_lock(&pool->mu);
    QK_STORE(&pool->quit, 1u, QK_REL);
    pthread_cond_broadcast(&pool->cv);
    pthread_mutex_unlock(&pool->mu);
    for (int i = 0; i < pool->n_started; i++) pthread_join(pool->threads[i], NULL);
    free(pool->threads);
    free(pool->wargs);
    pthread_mutex_destroy(&pool->mu);
    pthread_cond_destroy(&pool->cv);
#endif
    free(pool->ops);
    free(pool);
}

/* Runs fn(arg, tid, gen) on every thread; returns when the calling thread (tid 0) has walked
 * the whole job, i.e. when the job's last op is done. fn must end with an op that covers all
 * of its results. */
static void qk_pool_run(qk_pool *pool, qk_job_fn fn, void *arg) {
    const uint32_t gen = ++pool->gen == 0 ? ++pool->gen : pool->gen; /* 0 = no job yet */
    const uint64_t tag = (uint64_t)gen << 32;
    for (int k = 0; k < pool->max_ops; k++) {
        QK_STORE(&pool->ops[k].next, tag, QK_RLX);
        QK_STORE(&pool->ops[k].done, tag, QK_RLX);
    }
#if QK_THREADS
    if (pool->n_started > 0) {
        pthread_mutex_lock(&pool->mu);
        pool->fn = fn;
        pool->arg = arg;
        QK_STORE(&pool->job, gen, QK_REL);
        if (pool->sleeping) pthread_cond_broadcast(&pool->cv);
        pthread_mutex_unlock(&pool->mu);
    }
#endif
    fn(arg, 0, gen);
}

static inline qk_ctx qk_ctx_start(qk_pool *pool, int tid, uint32_t gen) {
    qk_ctx c = {pool, tid, gen, 0, 0};
    return c;
}

#endif
