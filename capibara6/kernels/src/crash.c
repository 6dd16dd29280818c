/* The last log line of a process killed by a fatal signal (SIGSEGV, SIGBUS, SIGILL, SIGFPE,
 * SIGABRT): one JSON object in capibara6/logs.py's shape, naming the model the faulting thread was
 * running, written with one write(2) before the previous handler (Python's faulthandler, whose
 * tracebacks follow) runs and the process dies by the same signal.
 *
 * Why C: a segfault inside llama.cpp (measured: ldtilecfg in ggml's AMX matmul on an AMX-reporting
 * Xeon VM) kills the process before any Python code can run, and faulthandler alone names no model.
 *
 * Invariants of the handler: it calls only async-signal-safe functions (write, sigaction, raise,
 * clock_gettime, pthread_self) and never malloc or stdio, because the fault may be inside malloc.
 * It reads no thread-local storage either: in a dlopen'd library (this one) glibc allocates a
 * thread's TLS block with malloc on first touch. So the per-thread model ids live in a static
 * table of slots owned by pthread_self(); a pthread key destructor frees a thread's slot when the
 * thread exits (pthread_t values are reused, a stale slot would name a dead thread's model). */
#define _GNU_SOURCE
#include "capibara6_kernels.h"
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>
#if defined(__linux__)
#include <sys/syscall.h>
#endif

#define C6_CRASH_SLOTS 256            /* threads that may hold a model id at once (more: not named) */
#define C6_CRASH_LINE 2048            /* bytes of the JSON line: an id (<= 127 bytes, escaped <= 6x) twice + ~400 */

typedef struct {
    _Atomic uintptr_t owner;          /* (uintptr_t)pthread_self() of the holder; 0 = free */
    char id[C6_CRASH_ID];             /* NUL-terminated model id */
} crash_slot;

static crash_slot slots[C6_CRASH_SLOTS];
static _Atomic int holders;           /* slots in use: how many threads run a model now */
static char last_id[2][C6_CRASH_ID];  /* last model set by any thread: double buffer ... */
static _Atomic int last_ix;           /* ... readers take last_id[last_ix] */
static pthread_mutex_t last_mu = PTHREAD_MUTEX_INITIALIZER;  /* serialises writers of last_id */
static pthread_key_t slot_key;        /* value: slot index + 1 of the calling thread */
static pthread_once_t key_once = PTHREAD_ONCE_INIT;

static const int fatal_signals[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT};
#define N_FATAL ((int)(sizeof fatal_signals / sizeof fatal_signals[0]))
static struct sigaction previous[N_FATAL];   /* what was installed before us (faulthandler's) */
static _Atomic int installed;
static _Atomic uintptr_t first_thread;       /* the thread that entered the handler first */
static int log_fd = 2;

/* ------------------------------------------------------------------ per-thread model ids */
static void release_slot(void *value) {     /* also the key destructor, at thread exit */
    intptr_t ix = (intptr_t)value - 1;
    if (ix < 0 || ix >= C6_CRASH_SLOTS) return;
    slots[ix].id[0] = 0;
    atomic_store_explicit(&slots[ix].owner, 0, memory_order_release);
    atomic_fetch_sub(&holders, 1);
}

static void make_key(void) { pthread_key_create(&slot_key, release_slot); }

/* the calling thread's slot, claimed if it has none; -1 if all are taken */
static int own_slot(void) {
    intptr_t ix = (intptr_t)pthread_getspecific(slot_key) - 1;
    if (ix >= 0) return (int)ix;
    uintptr_t self = (uintptr_t)pthread_self();
    for (int i = 0; i < C6_CRASH_SLOTS; i++) {
        uintptr_t free_ = 0;
        if (atomic_load_explicit(&slots[i].owner, memory_order_relaxed) == 0 &&
            atomic_compare_exchange_strong(&slots[i].owner, &free_, self)) {
            atomic_fetch_add(&holders, 1);
            pthread_setspecific(slot_key, (void *)(intptr_t)(i + 1));
            return i;
        }
    }
    return -1;
}

/* copy id into dst[C6_CRASH_ID], cut at a UTF-8 character boundary */
static void copy_id(char *dst, const char *id) {
    size_t n = strnlen(id, C6_CRASH_ID - 1);
    if (n == C6_CRASH_ID - 1)
        while (n > 0 && ((unsigned char)id[n] & 0xC0) == 0x80) n--;
    memcpy(dst, id, n);
    dst[n] = 0;
}

void c6_crash_set_model(const char *id) {
    pthread_once(&key_once, make_key);
    if (id == NULL || id[0] == 0) {
        void *v = pthread_getspecific(slot_key);
        if (v != NULL) {
            pthread_setspecific(slot_key, NULL);
            release_slot(v);
        }
        return;
    }
    int ix = own_slot();
    if (ix >= 0) copy_id(slots[ix].id, id);
    pthread_mutex_lock(&last_mu);
    int next = 1 - atomic_load_explicit(&last_ix, memory_order_relaxed);
    copy_id(last_id[next], id);
    atomic_store_explicit(&last_ix, next, memory_order_release);
    pthread_mutex_unlock(&last_mu);
}

/* async-signal-safe: the slot owned by this thread, else NULL */
static const char *thread_model(void) {
    uintptr_t self = (uintptr_t)pthread_self();
    for (int i = 0; i < C6_CRASH_SLOTS; i++)
        if (atomic_load_explicit(&slots[i].owner, memory_order_acquire) == self && slots[i].id[0])
            return slots[i].id;
    return NULL;
}

static const char *last_model(void) {
    const char *s = last_id[atomic_load_explicit(&last_ix, memory_order_acquire)];
    return s[0] ? s : NULL;
}

int c6_crash_model(char *out, int cap) {
    const char *t = thread_model(), *l = last_model();
    const char *s = t ? t : l;
    if (out != NULL && cap > 0) {
        size_t n = s ? strnlen(s, (size_t)cap - 1) : 0;
        if (n) memcpy(out, s, n);
        out[n] = 0;
    }
    return t ? 1 : (l ? 2 : 0);
}

/* ------------------------------------------------------------------ the line (no malloc, no stdio) */
typedef struct { char *p; size_t n, cap; } buf_t;

static void put(buf_t *b, const char *s) {
    while (*s && b->n + 1 < b->cap) b->p[b->n++] = *s++;
}

static void put_json(buf_t *b, const char *s) {   /* a JSON string body: " \ and controls escaped */
    static const char hex[] = "0123456789abcdef";
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        char e[7] = {0};
        if (c == '"' || c == '\\') { e[0] = '\\'; e[1] = (char)c; }
        else if (c < 0x20) { memcpy(e, "\\u00", 4); e[4] = hex[c >> 4]; e[5] = hex[c & 15]; }
        else e[0] = (char)c;
        put(b, e);
    }
}

static void put_uint(buf_t *b, uint64_t v, int width) {  /* decimal, zero-padded to width */
    char d[24];
    int n = 0;
    do { d[n++] = (char)('0' + v % 10); v /= 10; } while (v && n < 20);
    while (n < width && n < 20) d[n++] = '0';
    char s[24];
    for (int i = 0; i < n; i++) s[i] = d[n - 1 - i];
    s[n] = 0;
    put(b, s);
}

static void put_hex(buf_t *b, uint64_t v, int width) {
    static const char hex[] = "0123456789abcdef";
    char s[20] = "0x";
    int n = 16;
    while (n > width && ((v >> (4 * (n - 1))) & 15) == 0) n--;
    for (int i = 0; i < n; i++) s[2 + i] = hex[(v >> (4 * (n - 1 - i))) & 15];
    s[2 + n] = 0;
    put(b, s);
}

static int leap(uint64_t y) { return (y % 4 == 0 && y % 100 != 0) || y % 400 == 0; }

/* "2025-01-31T12:34:56.789Z" (UTC) like logs.py, from the epoch by plain calendar arithmetic */
static void put_ts(buf_t *b, struct timespec ts) {
    static const int mdays[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    uint64_t secs = ts.tv_sec > 0 ? (uint64_t)ts.tv_sec : 0, days = secs / 86400, sod = secs % 86400;
    uint64_t y = 1970;
    while (days >= (uint64_t)(365 + leap(y))) days -= (uint64_t)(365 + leap(y++));
    int m = 0;
    while (days >= (uint64_t)(mdays[m] + (m == 1 && leap(y)))) days -= (uint64_t)(mdays[m] + (m == 1 && leap(y))), m++;
    put_uint(b, y, 4); put(b, "-"); put_uint(b, (uint64_t)m + 1, 2); put(b, "-"); put_uint(b, days + 1, 2);
    put(b, "T"); put_uint(b, sod / 3600, 2); put(b, ":"); put_uint(b, sod / 60 % 60, 2); put(b, ":");
    put_uint(b, sod % 60, 2); put(b, "."); put_uint(b, (uint64_t)ts.tv_nsec / 1000000, 3); put(b, "Z");
}

static const char *signal_name(int sig) {
    switch (sig) {
    case SIGSEGV: return "SIGSEGV";
    case SIGBUS: return "SIGBUS";
    case SIGILL: return "SIGILL";
    case SIGFPE: return "SIGFPE";
    case SIGABRT: return "SIGABRT";
    default: return NULL;
    }
}

/* One JSON line ending in '\n' into out[cap]; returns its length. Fields: ts, level, logger, msg,
 * model (null if none), model_from ("thread": the faulting thread's own; "last": it had none,
 * e.g. a llama.cpp or kernel-pool worker, so the last model any thread set; "none"), threads_in_model
 * (how many threads run a model now: with 1 the "last" guess is the one), signal, code (si_code;
 * <= 0: sent by a process), addr (kernel faults), pid, thread (pthread id as faulthandler prints it). */
int c6_crash_format(int sig, int code, uintptr_t addr, char *out, int cap) {
    if (out == NULL || cap < 2) return 0;
    buf_t b = {out, 0, (size_t)cap - 1};   /* room for the final '\n' */
    struct timespec ts = {0, 0};
    clock_gettime(CLOCK_REALTIME, &ts);
    const char *own = thread_model(), *last = own ? NULL : last_model();
    const char *model = own ? own : last, *name = signal_name(sig);
    char num[24];
    buf_t nb = {num, 0, sizeof num};
    if (name == NULL) { put(&nb, "signal "); put_uint(&nb, (uint64_t)(sig > 0 ? sig : 0), 1); }
    num[nb.n] = 0;
    name = name ? name : num;

    put(&b, "{\"ts\":\""); put_ts(&b, ts);
    put(&b, "\",\"level\":\"critical\",\"logger\":\"capibara6.crash\",\"msg\":\"fatal signal ");
    put(&b, name);
    if (own) { put(&b, " in model "); put_json(&b, own); }
    else if (last) { put(&b, " in a thread running no model; last model set: "); put_json(&b, last); }
    else put(&b, " outside any model");
    put(&b, "\",\"model\":");
    if (model) { put(&b, "\""); put_json(&b, model); put(&b, "\""); } else put(&b, "null");
    put(&b, ",\"model_from\":\""); put(&b, own ? "thread" : (last ? "last" : "none"));
    put(&b, "\",\"threads_in_model\":"); put_uint(&b, (uint64_t)atomic_load(&holders), 1);
    put(&b, ",\"signal\":\""); put(&b, name); put(&b, "\",\"code\":");
    if (code < 0) put(&b, "-");
    put_uint(&b, (uint64_t)(code < 0 ? -(int64_t)code : code), 1);
    if (code > 0) { put(&b, ",\"addr\":\""); put_hex(&b, addr, 1); put(&b, "\""); }
    put(&b, ",\"pid\":"); put_uint(&b, (uint64_t)getpid(), 1);
    put(&b, ",\"thread\":\""); put_hex(&b, (uint64_t)(uintptr_t)pthread_self(), 16); put(&b, "\"}");
    out[b.n++] = '\n';
    out[b.n] = 0;
    return (int)b.n;
}

/* ------------------------------------------------------------------ the handler */
static void write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return;
        p += w;
        n -= (size_t)w;
    }
}

static int signal_index(int sig) {
    for (int i = 0; i < N_FATAL; i++)
        if (fatal_signals[i] == sig) return i;
    return -1;
}

/* Write the line, put the previous action back, then make it run:
 *  - a fault the kernel raised for an instruction (si_code > 0) recurs when we return, and now
 *    reaches the previous handler with the original context (faulthandler dumps, then dies by it);
 *  - a signal sent by kill(), raise(), abort() (si_code <= 0) does not recur: re-raise it; it is
 *    blocked while we run, so it is delivered to the previous handler as we return.
 * Another thread faulting at the same time writes its own line and chains the same way. If the
 * first thread comes back here (a previous handler that re-installed us and re-raised), it goes
 * to the default action instead, so the chain can never loop and the process always dies. */
static void on_fatal(int sig, siginfo_t *info, void *uctx) {
    (void)uctx;
    int saved = errno;
    int ix = signal_index(sig);
    int code = info ? info->si_code : SI_USER;
    uintptr_t self = (uintptr_t)pthread_self(), none = 0;
    if (!atomic_compare_exchange_strong(&first_thread, &none, self) && none == self) {
        signal(sig, SIG_DFL);
    } else {
        char line[C6_CRASH_LINE];
        int n = c6_crash_format(sig, code, info ? (uintptr_t)info->si_addr : 0, line, sizeof line);
        write_all(log_fd, line, (size_t)n);
        if (ix >= 0) sigaction(sig, &previous[ix], NULL);
    }
    if (code <= 0) raise(sig);
    errno = saved;
}

int c6_crash_install(int fd) {
    if (fd < 0) return -1;
    log_fd = fd;
    pthread_once(&key_once, make_key);
    if (atomic_exchange(&installed, 1)) return 0;   /* installed once: never save ourselves as "previous" */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fatal;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;   /* the alternate stack faulthandler set up, if any */
    sigemptyset(&sa.sa_mask);
    for (int i = 0; i < N_FATAL; i++)
        if (sigaction(fatal_signals[i], &sa, &previous[i]) != 0) return -1;
    return 0;
}
