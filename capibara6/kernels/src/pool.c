/* Small pthread pool: workers SLEEP on a condvar between jobs (no spinning), tasks are handed out
 * with an atomic counter, the caller participates. One job at a time: a caller that finds the pool
 * busy (another Python thread / model) runs its job inline on its own thread instead of waiting.
 * A worker joins a job only while it is open; the caller closes the job once every task has been
 * claimed and then waits only for the workers that joined (not for workers that were never
 * scheduled: on a busy machine a late worker would otherwise stall every call). */
#define _GNU_SOURCE
#include "capibara6_kernels.h"
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

#define C6_MAX_THREADS 256

static pthread_mutex_t run_mu = PTHREAD_MUTEX_INITIALIZER; /* held by the job owner / resizer */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv_work = PTHREAD_COND_INITIALIZER;
static pthread_cond_t cv_done = PTHREAD_COND_INITIALIZER;
static pthread_t workers[C6_MAX_THREADS];
static int n_workers = 0;          /* threads besides the caller */
static int n_threads = 1;
static uint64_t generation = 0;
static int shutting_down = 0;
static int inflight = 0;           /* workers that joined the open job and have not finished */
static int job_open = 0;
static int job_slots = 0;          /* workers that may still join the open job */
static __thread int tl_threads = 0; /* the calling thread's own count (c6_use_threads); 0: n_threads */
static c6_task_fn job_fn;
static void *job_ctx;
static int64_t job_n;
static _Atomic int64_t job_next;

static void run_tasks(c6_task_fn fn, void *ctx, int64_t n) {
    for (;;) {
        int64_t i = atomic_fetch_add_explicit(&job_next, 1, memory_order_relaxed);
        if (i >= n) break;
        fn(ctx, i);
    }
}

static void *worker_main(void *arg) {
    pthread_mutex_lock(&mu);
    uint64_t seen = (uint64_t)(uintptr_t)arg;   /* generation at creation: never miss a job */
    for (;;) {
        while (generation == seen && !shutting_down) pthread_cond_wait(&cv_work, &mu);
        if (shutting_down) break;
        seen = generation;
        if (!job_open || job_slots <= 0) continue; /* too late, or the job has its threads */
        c6_task_fn fn = job_fn; void *ctx = job_ctx; int64_t n = job_n;
        job_slots--;
        inflight++;
        pthread_mutex_unlock(&mu);
        run_tasks(fn, ctx, n);
        pthread_mutex_lock(&mu);
        if (--inflight == 0 && !job_open) pthread_cond_signal(&cv_done);
    }
    pthread_mutex_unlock(&mu);
    return NULL;
}

int c6_set_num_threads(int n) {
    if (n < 1) n = 1;
    if (n > C6_MAX_THREADS) n = C6_MAX_THREADS;
    pthread_mutex_lock(&run_mu);
    if (n_workers > 0) {
        pthread_mutex_lock(&mu);
        shutting_down = 1;
        pthread_cond_broadcast(&cv_work);
        pthread_mutex_unlock(&mu);
        for (int i = 0; i < n_workers; i++) pthread_join(workers[i], NULL);
        shutting_down = 0;
        n_workers = 0;
    }
    int want = n - 1, made = 0;
    for (; made < want; made++)
        if (pthread_create(&workers[made], NULL, worker_main, (void *)(uintptr_t)generation) != 0) break;
    n_workers = made;
    n_threads = made + 1;
    tl_threads = 0;  /* the caller now uses the new default too */
    pthread_mutex_unlock(&run_mu);
    return n_threads;
}

/* The calling thread's count: its own (c6_use_threads), capped by the pool, else the pool's. */
int c6_get_num_threads(void) {
    int pool = n_workers + 1;
    return tl_threads > 0 ? (tl_threads < pool ? tl_threads : pool) : n_threads;
}

/* Jobs started by the calling thread use n threads (0: the pool default), so models or consensus
 * experts running at once each keep their own share; the pool grows to n if it is smaller. */
int c6_use_threads(int n) {
    if (n < 0) n = 0;
    if (n > C6_MAX_THREADS) n = C6_MAX_THREADS;
    if (n > n_workers + 1) {
        pthread_mutex_lock(&run_mu);
        for (int i = n_workers; i < n - 1; i++) {
            pthread_mutex_lock(&mu);
            uint64_t g = generation;
            pthread_mutex_unlock(&mu);
            if (pthread_create(&workers[i], NULL, worker_main, (void *)(uintptr_t)g) != 0) break;
            n_workers = i + 1;
        }
        pthread_mutex_unlock(&run_mu);
    }
    tl_threads = n;
    return c6_get_num_threads();
}

void c6_parallel_for(int64_t ntasks, c6_task_fn fn, void *ctx) {
    if (ntasks <= 0) return;
    int nt = c6_get_num_threads();
    if (ntasks == 1 || nt == 1 || pthread_mutex_trylock(&run_mu) != 0) {
        for (int64_t i = 0; i < ntasks; i++) fn(ctx, i);
        return;
    }
    if (n_workers == 0) {            /* resized to 1 between the check and the lock */
        pthread_mutex_unlock(&run_mu);
        for (int64_t i = 0; i < ntasks; i++) fn(ctx, i);
        return;
    }
    pthread_mutex_lock(&mu);
    job_fn = fn; job_ctx = ctx; job_n = ntasks;
    atomic_store(&job_next, 0);
    job_open = 1;
    int64_t wake = (ntasks < nt ? ntasks : nt) - 1;
    job_slots = (int)wake;
    generation++;
    if (wake >= n_workers) pthread_cond_broadcast(&cv_work);
    else for (int64_t i = 0; i < wake; i++) pthread_cond_signal(&cv_work);
    pthread_mutex_unlock(&mu);
    run_tasks(fn, ctx, ntasks);
    pthread_mutex_lock(&mu);
    job_open = 0;                                /* every task is claimed: nobody else may join */
    while (inflight > 0) pthread_cond_wait(&cv_done, &mu);
    pthread_mutex_unlock(&mu);
    pthread_mutex_unlock(&run_mu);
}

/* Thread-local scratch buffers, freed when their thread exits (a pthread key destructor): the
 * server runs each generation on a new thread, so buffers kept past it would pile up. */
typedef struct {
    float *ptr[C6_SCRATCH_SLOTS];
    size_t cap[C6_SCRATCH_SLOTS];
} scratch_set;
static pthread_key_t scr_key;
static pthread_once_t scr_once = PTHREAD_ONCE_INIT;
static __thread scratch_set *tl_scr;

static void scr_free(void *p) {
    scratch_set *s = p;
    for (int i = 0; i < C6_SCRATCH_SLOTS; i++) free(s->ptr[i]);
    free(s);
}
static void scr_key_init(void) { pthread_key_create(&scr_key, scr_free); }

float *c6_scratch(int slot, size_t nfloats) {
    scratch_set *s = tl_scr;
    if (!s) {
        pthread_once(&scr_once, scr_key_init);
        s = calloc(1, sizeof *s);
        if (!s || pthread_setspecific(scr_key, s) != 0) { free(s); return NULL; }
        tl_scr = s;
    }
    if (s->cap[slot] < nfloats) {
        free(s->ptr[slot]);
        size_t bytes = (nfloats * sizeof(float) + 63) & ~(size_t)63;
        s->ptr[slot] = aligned_alloc(64, bytes);
        s->cap[slot] = s->ptr[slot] ? nfloats : 0;
    }
    return s->ptr[slot];
}

int c6_build_flags(void) {
    int f = 0;
#if C6_USE_NEON
    f |= 1;
#endif
#ifdef __AVX2__
    f |= 2;
#endif
#ifdef __AVX512F__
    f |= 4;
#endif
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
    f |= 8;
#endif
#ifdef C6_FORCE_PORTABLE
    f |= 16;
#endif
    return f;
}
