/* A fixed pool of threads that all run the same job (SPMD), with a spinning barrier between the
 * job's phases. A decode step has a few hundred phases (one or two per matrix product), so the
 * barrier must cost well under a microsecond: arrivals are counted on one atomic and waiters spin.
 * Between jobs the workers spin for a while (the next step follows within microseconds while
 * tokens stream), then sleep on a condition variable so an idle runtime costs no CPU. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <time.h>

#include "internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

/* how long an idle worker spins before it sleeps (the gap between two steps of a stream, when
 * Python samples the next token, is ~50-200 us) */
#define IDLE_SPIN_NS 2000000L

struct rt_pool {
  int n;
  pthread_t* threads;
  rt_job job;
  void* arg;
  _Atomic long job_gen;
  _Atomic int stop;
  _Atomic int bar_count;
  _Atomic int bar_gen;
  _Atomic int sleepers;
  pthread_mutex_t mu;
  pthread_cond_t cv;
};

typedef struct {
  rt_pool* pool;
  int tid;
} worker_arg;

static long now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000000000L + t.tv_nsec;
}

void pool_barrier(rt_pool* p) {
  if (p->n == 1) return;
  const int gen = atomic_load(&p->bar_gen);
  if (atomic_fetch_add(&p->bar_count, 1) == p->n - 1) {
    atomic_store(&p->bar_count, 0);  /* reset before release: no thread can arrive early */
    atomic_fetch_add(&p->bar_gen, 1);
  } else {
    unsigned spins = 0;
    while (atomic_load(&p->bar_gen) == gen) {
      cpu_relax();
      if (++spins % 4096 == 0) sched_yield();  /* a descheduled peer: give it the core */
    }
  }
}

static void* worker(void* v) {
  worker_arg* wa = (worker_arg*)v;
  rt_pool* p = wa->pool;
  const int tid = wa->tid;
  free(wa);
  long seen = 0;
  for (;;) {
    long gen = atomic_load(&p->job_gen);
    if (gen == seen) {
      const long t0 = now_ns();
      unsigned spins = 0;
      while ((gen = atomic_load(&p->job_gen)) == seen && !atomic_load(&p->stop)) {
        cpu_relax();
        if (++spins % 1024 == 0 && now_ns() - t0 > IDLE_SPIN_NS) {
          pthread_mutex_lock(&p->mu);
          atomic_fetch_add(&p->sleepers, 1);
          while ((gen = atomic_load(&p->job_gen)) == seen && !atomic_load(&p->stop)) pthread_cond_wait(&p->cv, &p->mu);
          atomic_fetch_sub(&p->sleepers, 1);
          pthread_mutex_unlock(&p->mu);
          break;
        }
      }
    }
    if (atomic_load(&p->stop)) return NULL;
    seen = gen;
    p->job(p->arg, tid, p->n);
    pool_barrier(p);  /* the job's end: the caller returns once every worker got here */
  }
}

rt_pool* pool_create(int n_threads) {
  rt_pool* p = (rt_pool*)calloc(1, sizeof(rt_pool));
  if (!p) return NULL;
  p->n = n_threads < 1 ? 1 : n_threads;
  pthread_mutex_init(&p->mu, NULL);
  pthread_cond_init(&p->cv, NULL);
  p->threads = (pthread_t*)calloc((size_t)p->n, sizeof(pthread_t));
  if (!p->threads) { free(p); return NULL; }
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
  atomic_fetch_add(&p->job_gen, 1);
  if (atomic_load(&p->sleepers) > 0) {
    pthread_mutex_lock(&p->mu);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
  }
  job(arg, 0, p->n);
  pool_barrier(p);
}

void pool_free(rt_pool* p) {
  if (!p) return;
  atomic_store(&p->stop, 1);
  pthread_mutex_lock(&p->mu);
  pthread_cond_broadcast(&p->cv);
  pthread_mutex_unlock(&p->mu);
  for (int i = 1; i < p->n; i++) pthread_join(p->threads[i], NULL);
  pthread_mutex_destroy(&p->mu);
  pthread_cond_destroy(&p->cv);
  free(p->threads);
  free(p);
}
