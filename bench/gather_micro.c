/* The picked-neuron gather of one int8 decode step, alone (bench/RESULTS.md, "Decode speed on CPU").
 *
 * Times the decode runtime's own kernels (runtime/csrc/neurons.c: rows_dot for gate / up, unit_down for
 * the output columns) on A picked neurons of each of L layers shaped like SmolLM2-135M (d = 576,
 * 1536 neurons, int8 rows of 32-element blocks), one thread, best of 30 steps. The picks are random
 * (sorted, as the runtime reads them) or one contiguous run at a random offset: if the two take about
 * as long, the gather is bound by per-row work and latency, not by bandwidth. PF=0|1|2|3 requests each
 * unit's rows first (none, or hint T0 / T1 / T2) to try software prefetching.
 *
 *   cc -O3 -march=native -mprefer-vector-width=512 -fopenmp-simd -std=c11 -D_POSIX_C_SOURCE=200112L \
 *      -Imoecarve/runtime/csrc -Imoecarve/kernels bench/gather_micro.c moecarve/runtime/csrc/neurons.c \
 *      moecarve/runtime/csrc/math.c -lm -o /tmp/gather     (the runtime's flags: moecarve/kernels/build.py)
 *   /tmp/gather 384 0; /tmp/gather 384 1; PF=3 /tmp/gather 384 0
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "internal.h"

enum { D = 576, NEURONS = 1536, ROWS_PER = 3, LAYERS = 30, UNIT = 32, STEPS = 30 };

void row_axpy(const rt_mat* W, int64_t r, float h, int k0, int k1, float* y) {  /* unused here (rows_axpy) */
  (void)W, (void)r, (void)h, (void)k0, (void)k1, (void)y;
}

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* A sorted random subset of A of the n neurons, or a contiguous run at a random offset */
static void pick(int64_t* ids, int A, int n, int contiguous) {
  if (contiguous) {
    const int o = rand() % (n - A);
    for (int a = 0; a < A; a++) ids[a] = o + a;
    return;
  }
  for (int i = 0, k = 0; i < n && k < A; i++)
    if (rand() % (n - i) < A - k) ids[k++] = i;
}

int main(int argc, char** argv) {
  const int A = argc > 1 ? atoi(argv[1]) : 384, contiguous = argc > 2 ? atoi(argv[2]) : 0;
  const int pf = getenv("PF") ? atoi(getenv("PF")) : 0;
  if (A < UNIT || A % UNIT || A >= NEURONS) return fprintf(stderr, "A: a multiple of %d below %d\n", UNIT, NEURONS), 2;
  const int64_t rb = rt_row_bytes(D), layer_bytes = (int64_t)NEURONS * ROWS_PER * rb;
  uint8_t* data = aligned_alloc(64, (size_t)(LAYERS * layer_bytes));
  for (int64_t i = 0; i < LAYERS * layer_bytes; i++) data[i] = (uint8_t)rand();
  for (int64_t r = 0; r < (int64_t)LAYERS * NEURONS * ROWS_PER; r++)  /* block scales 2^-7 (float16 0x2000) */
    for (int b = 0; b < D / RT_BLOCK; b++) ((uint16_t*)(data + r * rb + D))[b] = 0x2000;
  int8_t q[D];
  float s[D / RT_BLOCK], spread[D / 4 + D / RT_BLOCK], out[16], h[UNIT], part[D];
  int32_t sum[D / RT_BLOCK];
  for (int k = 0; k < D; k++) q[k] = (int8_t)(rand() % 101 - 50);
  for (int b = 0; b < D / RT_BLOCK; b++) s[b] = 0.01f, sum[b] = 0;
  for (int i = 0; i < UNIT; i++) h[i] = 0.1f;
  rt_act X = {.q = q, .s = s, .sum = sum, .ld = D};
  token_spread(&X, 0, D, spread, spread + D / 4);
  int64_t* ids = malloc(sizeof(int64_t) * LAYERS * A);
  double best = 1e30;
  for (int step = 0; step < STEPS; step++) {
    for (int l = 0; l < LAYERS; l++) pick(ids + (int64_t)l * A, A, NEURONS, contiguous);
    const double t0 = now();
    for (int l = 0; l < LAYERS; l++) {
      const rt_mat W = {.data = data + l * layer_bytes, .rows = NEURONS * ROWS_PER, .cols = D, .dtype = RT_I8};
      for (int u = 0; u < A; u += UNIT) {
        const int64_t* unit = ids + (int64_t)l * A + u;
        for (int k = 0; pf && k < UNIT; k++)
          for (int64_t o = 0; o < ROWS_PER * rb; o += 64) {
            const char* p = (const char*)W.data + unit[k] * ROWS_PER * rb + o;
            if (pf == 1) __builtin_prefetch(p, 0, 3);
            else if (pf == 2) __builtin_prefetch(p, 0, 2);
            else __builtin_prefetch(p, 0, 1);
          }
        for (int g = 0; g < UNIT; g += 8) {  /* gate and up rows of 8 neurons, as ffn.c neuron_group */
          int64_t rows[16];
          for (int k = 0; k < 8; k++) rows[k] = unit[g + k] * ROWS_PER, rows[8 + k] = unit[g + k] * ROWS_PER + 1;
          rows_dot(&W, rows, 16, &X, 0, spread, spread + D / 4, out);
        }
        int64_t cols[UNIT];
        for (int k = 0; k < UNIT; k++) cols[k] = unit[k] * ROWS_PER + 2;
        unit_down(&W, cols, h, UNIT, D, part);
      }
    }
    const double t = now() - t0;
    best = t < best ? t : best;
  }
  printf("A=%d %s PF=%d: %.3f ms per step (%d layers), %.1f GB/s of picked rows (part[0] %g)\n", A,
         contiguous ? "contiguous" : "random", pf, best * 1e3, LAYERS, (double)LAYERS * A * ROWS_PER * rb / best / 1e9,
         (double)part[0]);
  free(ids);
  free(data);
  return 0;
}
