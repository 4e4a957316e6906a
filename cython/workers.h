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
 * briefly (pause), then yields the CPU (sched_yield / SwitchToThread), and between jobs
 * finally sleeps on a condition variable, so idle workers cost nothing while Python samples
 * the next token.
 *
 * Threads are pthreads, or on Windows their Win32 equivalents behind the same few calls (below).
 */
#ifndef QPACK_WORKERS_H
#define QPACK_WORKERS_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- threads: pthreads / Win32 */
#if defined(_WIN32)
#ifndef WIN32_LEAN_AND_MEAN
#define WIN32_LEAN_AND_MEAN
#endif
#ifndef NOMINMAX
#define NOMINMAX
#endif
#include <windows.h>
#include <process.h>
typedef SRWLOCK qk_mutex;
typedef CONDITION_VARIABLE qk_cond;
typedef HANDLE qk_thread;
#define QK_THREAD_FN unsigned __stdcall /* _beginthreadex: the CRT is set up for the thread */
#define QK_THREAD_RETURN 0
static inline void qk_mutex_init(qk_mutex *mu) { InitializeSRWLock(mu); }
static inline void qk_mutex_destroy(qk_mutex *mu) { (void)mu; } /* SRW locks need no clean-up */
static inline void qk_mutex_lock(qk_mutex *mu) { AcquireSRWLockExclusive(mu); }
static inline void qk_mutex_unlock(qk_mutex *mu) { ReleaseSRWLockExclusive(mu); }
static inline void qk_cond_init(qk_cond *cv) { InitializeConditionVariable(cv); }
static inline void qk_cond_destroy(qk_cond *cv) { (void)cv; }
static inline void qk_cond_wait(qk_cond *cv, qk_mutex *mu) { SleepConditionVariableSRW(cv, mu, INFINITE, 0); }
static inline void qk_cond_broadcast(qk_cond *cv) { WakeAllConditionVariable(cv); }
static inline int qk_thread_start(qk_thread *t, unsigned(__stdcall *fn)(void *), void *arg) {
    *t = (HANDLE)_beginthreadex(NULL, 0, fn, arg, 0, NULL);
    return *t ? 0 : -1;
}
static inline void qk_thread_join(qk_thread t) {
    WaitForSingleObject(t, INFINITE);
    CloseHandle(t);
}
static inline void qk_yield(void) { SwitchToThread(); }
#else
#include <pthread.h>
#include <sched.h>
typedef pthread_mutex_t qk_mutex;
typedef pthread_cond_t qk_cond;
typedef pthread_t qk_thread;
#define QK_THREAD_FN void *
#define QK_THREAD_RETURN NULL
static inline void qk_mutex_init(qk_mutex *mu) { pthread_mutex_init(mu, NULL); }
static inline void qk_mutex_destroy(qk_mutex *mu) { pthread_mutex_destroy(mu); }
static inline void qk_mutex_lock(qk_mutex *mu) { pthread_mutex_lock(mu); }
static inline void qk_mutex_unlock(qk_mutex *mu) { pthread_mutex_unlock(mu); }
static inline void qk_cond_init(qk_cond *cv) { pthread_cond_init(cv, NULL); }
static inline void qk_cond_destroy(qk_cond *cv) { pthread_cond_destroy(cv); }
static inline void qk_cond_wait(qk_cond *cv, qk_mutex *mu) { pthread_cond_wait(cv, mu); }
static inline void qk_cond_broadcast(qk_cond *cv) { pthread_cond_broadcast(cv); }
static inline int qk_thread_start(qk_thread *t, void *(*fn)(void *), void *arg) { return pthread_create(t, NULL, fn, arg); }
static inline void qk_thread_join(qk_thread t) { pthread_join(t, NULL); }
static inline void qk_yield(void) { sched_yield(); }
#endif

/* ---------------------------------------------------------------- atomics: C11 / MSVC */
/* MSVC's C has no <stdatomic.h> (without an experimental switch): its x64 loads and stores are
 * acquire / release in hardware, so a compiler barrier makes them so in the code too, and the
 * read-modify-writes are Interlocked (full barriers). QK_MSVC_ATOMICS=1 forces this path on
 * another Windows x64 compiler, to test it. */
#ifndef QK_MSVC_ATOMICS
#if defined(_MSC_VER) && !defined(__clang__)
#define QK_MSVC_ATOMICS 1
#else
#define QK_MSVC_ATOMICS 0
#endif
#endif
#if QK_MSVC_ATOMICS
#if !defined(_M_X64) && !defined(__x86_64__)
#error "QK_MSVC_ATOMICS relies on x86-64 ordering"
#endif
#if defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>
#define QK_COMPILER_BARRIER() _ReadWriteBarrier()
#else
#define QK_COMPILER_BARRIER() __asm__ __volatile__("" ::: "memory")
#endif
typedef volatile uint64_t qk_atomic_u64;
typedef volatile uint32_t qk_atomic_u32;
static inline uint64_t qk_load64(const qk_atomic_u64 *p) {
    const uint64_t v = *p;
    QK_COMPILER_BARRIER();
    return v;
}
static inline uint32_t qk_load32(const qk_atomic_u32 *p) {
    const uint32_t v = *p;
    QK_COMPILER_BARRIER();
    return v;
}
static inline void qk_store64(qk_atomic_u64 *p, uint64_t v) {
    QK_COMPILER_BARRIER();
    *p = v;
}
static inline void qk_store32(qk_atomic_u32 *p, uint32_t v) {
    QK_COMPILER_BARRIER();
    *p = v;
}
/* compare-exchange: on failure *expected = the value found */
static inline int qk_cas64(qk_atomic_u64 *p, uint64_t *expected, uint64_t desired) {
    const uint64_t seen = (uint64_t)InterlockedCompareExchange64((volatile LONG64 *)p, (LONG64)desired, (LONG64)*expected);
    if (seen == *expected) return 1;
    *expected = seen;
    return 0;
}
#define QK_LOAD64(p, order) qk_load64(p)
#define QK_LOAD32(p, order) qk_load32(p)
#define QK_STORE64(p, v, order) qk_store64(p, v)
#define QK_STORE32(p, v, order) qk_store32(p, v)
#define QK_CAS64(p, expected, desired) qk_cas64(p, expected, desired)
#define QK_FETCH_ADD64(p, v, order) ((void)InterlockedExchangeAdd64((volatile LONG64 *)(p), (LONG64)(v)))
#else
#include <stdatomic.h>
typedef _Atomic uint64_t qk_atomic_u64;
typedef _Atomic uint32_t qk_atomic_u32;
#define QK_LOAD64(p, order) atomic_load_explicit(p, order)
#define QK_LOAD32(p, order) atomic_load_explicit(p, order)
#define QK_STORE64(p, v, order) atomic_store_explicit(p, v, order)
#define QK_STORE32(p, v, order) atomic_store_explicit(p, v, order)
#define QK_CAS64(p, expected, desired) \
    atomic_compare_exchange_weak_explicit(p, expected, desired, memory_order_acquire, memory_order_relaxed)
#define QK_FETCH_ADD64(p, v, order) ((void)atomic_fetch_add_explicit(p, v, order))
#endif
#define QK_ACQ memory_order_acquire
#define QK_REL memory_order_release
#define QK_RLX memory_order_relaxed

#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64) || defined(_M_IX86)
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
    qk_atomic_u32 job; /* generation workers wait for */
    qk_atomic_u32 quit;
    qk_mutex mu;
    qk_cond cv;
    int sleeping; /* under mu */
    qk_job_fn fn; /* under mu */
    void *arg;    /* under mu */
    qk_thread *threads;
    qk_worker_arg *wargs;
    int n_started;
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
        qk_yield();
    }
}

/* The next chunk of the current op (0..n-1), or -1 when none is left. */
static inline int64_t qk_grab(qk_ctx *c, int64_t n) {
    if (c->stale || c->op >= c->pool->max_ops) return -1;
    qk_atomic_u64 *x = &c->pool->ops[c->op].next;
    uint64_t v = QK_LOAD64(x, QK_RLX);
    for (;;) {
        if ((uint32_t)(v >> 32) != c->gen) {
            c->stale = 1;
            return -1;
        }
        const int64_t i = (int64_t)(uint32_t)v;
        if (i >= n) return -1;
        if (QK_CAS64(x, &v, v + 1)) return i;
    }
}

static inline void qk_chunk_done(qk_ctx *c) {
    QK_FETCH_ADD64(&c->pool->ops[c->op].done, 1, QK_REL);
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
        const uint64_t v = QK_LOAD64(d, QK_ACQ);
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

static QK_THREAD_FN qk_worker_main(void *p) {
    qk_worker_arg *wa = (qk_worker_arg *)p;
    qk_pool *pool = wa->pool;
    uint32_t seen = 0;
    for (;;) {
        int spins = 0;
        while (QK_LOAD32(&pool->job, QK_ACQ) == seen && !QK_LOAD32(&pool->quit, QK_ACQ)) {
            if (spins < QK_SPIN_PAUSES + QK_DOCK_YIELDS) {
                qk_backoff(&spins);
                spins += spins >= QK_SPIN_PAUSES; /* count the yields too */
                continue;
            }
            qk_mutex_lock(&pool->mu);
            pool->sleeping++;
            while (QK_LOAD32(&pool->job, QK_RLX) == seen && !QK_LOAD32(&pool->quit, QK_RLX))
                qk_cond_wait(&pool->cv, &pool->mu);
            pool->sleeping--;
            qk_mutex_unlock(&pool->mu);
        }
        qk_mutex_lock(&pool->mu);
        const int quit = (int)QK_LOAD32(&pool->quit, QK_RLX);
        const uint32_t gen = QK_LOAD32(&pool->job, QK_RLX);
        qk_job_fn fn = pool->fn;
        void *arg = pool->arg;
        qk_mutex_unlock(&pool->mu);
        if (quit) return QK_THREAD_RETURN;
        seen = gen;
        if (fn) fn(arg, wa->tid, gen);
    }
}

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
    qk_mutex_init(&pool->mu);
    qk_cond_init(&pool->cv);
    if (pool->n_threads > 1) {
        pool->threads = (qk_thread *)calloc((size_t)pool->n_threads, sizeof(qk_thread));
        pool->wargs = (qk_worker_arg *)calloc((size_t)pool->n_threads, sizeof(qk_worker_arg));
        if (pool->threads && pool->wargs)
            for (int t = 1; t < pool->n_threads; t++) {
                pool->wargs[t].pool = pool;
                pool->wargs[t].tid = t;
                if (qk_thread_start(&pool->threads[pool->n_started], qk_worker_main, &pool->wargs[t]) != 0) break;
                pool->n_started++;
            }
    }
    return pool;
}

static void qk_pool_free(qk_pool *pool) {
    if (!pool) return;
    qk_mutex_lock(&pool->mu);
    QK_STORE32(&pool->quit, 1u, QK_REL);
    qk_cond_broadcast(&pool->cv);
    qk_mutex_unlock(&pool->mu);
    for (int i = 0; i < pool->n_started; i++) qk_thread_join(pool->threads[i]);
    free(pool->threads);
    free(pool->wargs);
    qk_mutex_destroy(&pool->mu);
    qk_cond_destroy(&pool->cv);
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
        QK_STORE64(&pool->ops[k].next, tag, QK_RLX);
        QK_STORE64(&pool->ops[k].done, tag, QK_RLX);
    }
    if (pool->n_started > 0) {
        qk_mutex_lock(&pool->mu);
        pool->fn = fn;
        pool->arg = arg;
        QK_STORE32(&pool->job, gen, QK_REL);
        if (pool->sleeping) qk_cond_broadcast(&pool->cv);
        qk_mutex_unlock(&pool->mu);
    }
    fn(arg, 0, gen);
}

static inline qk_ctx qk_ctx_start(qk_pool *pool, int tid, uint32_t gen) {
    qk_ctx c = {pool, tid, gen, 0, 0};
    return c;
}

#endif
