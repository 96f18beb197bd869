/* A fixed pool of threads that all run the same job (SPMD), with a barrier between the job's
 * phases. A decode step has a few hundred phases (one or two per matrix product), so a barrier
 * must cost well under a microsecond when the threads arrive together: arrivals are counted on one
 * atomic and waiters spin. A waiter that has spun for a while (a peer is late, or descheduled on
 * a busy machine) sleeps on a futex instead, so an oversubscribed CPU is not burnt on spinning;
 * between jobs the workers sleep the same way. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
/* sleep while *addr == value (returns at once when it no longer is) / wake every sleeper */
static void futex_wait(_Atomic int* addr, int value) {
  syscall(SYS_futex, (int*)addr, FUTEX_WAIT_PRIVATE, value, NULL, NULL, 0);
}
static void futex_wake(_Atomic int* addr) { syscall(SYS_futex, (int*)addr, FUTEX_WAKE_PRIVATE, 0x7fffffff, NULL, NULL, 0); }
#else
static void futex_wait(_Atomic int* addr, int value) {
  (void)addr;
  (void)value;
  sched_yield();
}
static void futex_wake(_Atomic int* addr) { (void)addr; }
#endif

/* spins before sleeping: ~10-30 us of PAUSE, longer than a peer's usual lag within a step (a few
 * us), far shorter than a scheduler slice a descheduled peer would cost a spinner */
#define BARRIER_SPINS 4000
/* between jobs: the next decode step follows in ~50-200 us while tokens stream */
#define IDLE_SPINS 20000

struct rt_pool {
  int n;
  int max_phases;
  _Atomic int* next;     /* [max_phases] the next unclaimed item of each phase of the running job */
  _Atomic int* done;     /* [max_phases] its items done */
  pthread_t* threads;
  rt_job job;
  void* arg;
  _Atomic int job_gen;
  _Atomic int stop;
  _Atomic int bar_count;
  _Atomic int bar_gen;
  _Atomic int sleepers;  /* threads asleep on bar_gen or job_gen */
};

typedef struct {
  rt_pool* pool;
  int tid;
} worker_arg;

/* wait until *gen != seen: spin `spins` times, then sleep on the futex */
static void await_change(rt_pool* p, _Atomic int* gen, int seen, int spins) {
  for (int i = 0; atomic_load(gen) == seen; i++) {
    if (i < spins) {
      cpu_relax();
      continue;
    }
    atomic_fetch_add(&p->sleepers, 1);
    if (atomic_load(gen) == seen) futex_wait(gen, seen);
    atomic_fetch_sub(&p->sleepers, 1);
  }
}

static void publish(rt_pool* p, _Atomic int* gen) {
  atomic_fetch_add(gen, 1);
  if (atomic_load(&p->sleepers) > 0) futex_wake(gen);
}

void pool_barrier(rt_pool* p) {
  if (p->n == 1) return;
  const int gen = atomic_load(&p->bar_gen);
  if (atomic_fetch_add(&p->bar_count, 1) == p->n - 1) {
    atomic_store(&p->bar_count, 0);  /* reset before release: no thread can arrive early */
    publish(p, &p->bar_gen);
  } else {
    await_change(p, &p->bar_gen, gen, BARRIER_SPINS);
  }
}

static void* worker(void* v) {
  worker_arg* wa = (worker_arg*)v;
  rt_pool* p = wa->pool;
  const int tid = wa->tid;
  free(wa);
  int seen = 0;
  for (;;) {
    await_change(p, &p->job_gen, seen, IDLE_SPINS);
    seen = atomic_load(&p->job_gen);
    if (atomic_load(&p->stop)) return NULL;
    p->job(p->arg, tid, p->n);
    pool_barrier(p);  /* the job's end: the caller returns once every worker got here */
  }
}

rt_pool* pool_create(int n_threads, int max_phases) {
  rt_pool* p = (rt_pool*)calloc(1, sizeof(rt_pool));
  if (!p) return NULL;
  p->n = n_threads < 1 ? 1 : n_threads;
  p->max_phases = max_phases;
  p->next = (_Atomic int*)calloc((size_t)max_phases, sizeof(int));
  p->done = (_Atomic int*)calloc((size_t)max_phases, sizeof(int));
  if (!p->next || !p->done) {
    free((void*)p->next);
    free((void*)p->done);
    free(p);
    return NULL;
  }
  p->threads = (pthread_t*)calloc((size_t)p->n, sizeof(pthread_t));
  if (!p->threads) {
    free(p);
    return NULL;
  }
  for (int i = 1; i < p->n; i++) {
    worker_arg* wa = (worker_arg*)malloc(sizeof(worker_arg));
    if (wa) {
      wa->pool = p;
      wa->tid = i;
    }
    if (!wa || pthread_create(&p->threads[i], NULL, worker, wa) != 0) {
      free(wa);
      p->n = i;  /* run with the threads that did start */
      break;
    }
  }
  return p;
}

int pool_size(const rt_pool* p) { return p->n; }

void pool_run(rt_pool* p, rt_job job, void* arg) {
  p->job = job;
  p->arg = arg;
  memset((void*)p->next, 0, (size_t)p->max_phases * sizeof(int));  /* every worker is idle: no race */
  memset((void*)p->done, 0, (size_t)p->max_phases * sizeof(int));
  publish(p, &p->job_gen);
  job(arg, 0, p->n);
  pool_barrier(p);
}

void pool_free(rt_pool* p) {
  if (!p) return;
  atomic_store(&p->stop, 1);
  publish(p, &p->job_gen);
  for (int i = 1; i < p->n; i++) pthread_join(p->threads[i], NULL);
  free(p->threads);
  free((void*)p->next);
  free((void*)p->done);
  free(p);
}

/* ------------------------------------------------------------------ phases
 * A job's phases are sets of independent items that any thread may take: a thread claims items
 * until none is left, then waits until every item is done. A thread the OS has descheduled
 * holds up a phase only while it holds an item: the others take the rest and move on, and it
 * catches up through phases already done without waiting. (A barrier would wait for every
 * thread at every phase: on a busy machine, once per scheduler slice.) */

int64_t pool_claim(rt_pool* p, int phase, int64_t n) {
  if (phase >= p->max_phases) abort();  /* more phases than the step was sized for: a bug, not bad input */
  if (n <= 0) return -1;
  const int64_t i = atomic_load(&p->next[phase]) < n ? atomic_fetch_add(&p->next[phase], 1) : n;
  return i < n ? i : -1;
}

void pool_done(rt_pool* p, int phase, int64_t n) {
  if (atomic_fetch_add(&p->done[phase], 1) == n - 1 && atomic_load(&p->sleepers) > 0) futex_wake(&p->done[phase]);
}

void pool_wait(rt_pool* p, int phase, int64_t n) {
  for (int i = 0;; i++) {
    const int d = atomic_load(&p->done[phase]);
    if (d >= n) return;
    if (i < BARRIER_SPINS) {
      cpu_relax();
      continue;
    }
    atomic_fetch_add(&p->sleepers, 1);
    if (atomic_load(&p->done[phase]) == d) futex_wait(&p->done[phase], d);
    atomic_fetch_sub(&p->sleepers, 1);
  }
}
