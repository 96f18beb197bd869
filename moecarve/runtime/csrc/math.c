/* Element-wise maths of the runtime: number formats, norms, softmax, activations, and the
 * conversion of a product's input rows into what its weights read (bf16, or int8 blocks). */
#include <math.h>
#include <string.h>

#include "internal.h"
#include "vecmath.h"

void act_inplace(float* v, int n, int act) { act_vec(v, n, act); }

void rms_norm(const float* x, const float* w, int n, float eps, float* out) {
  double ss = 0.0;  /* double: the sum of squares of a few thousand floats, order-independent enough */
  for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
  const float r = 1.0f / sqrtf((float)(ss / n) + eps);
#pragma omp simd
  for (int i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

void layer_norm(const float* x, const float* w, const float* b, int n, float eps, float* out) {
  double mean = 0.0, var = 0.0;
  for (int i = 0; i < n; i++) mean += x[i];
  mean /= n;
  for (int i = 0; i < n; i++) var += ((double)x[i] - mean) * ((double)x[i] - mean);
  const float r = 1.0f / sqrtf((float)(var / n) + eps), mu = (float)mean;
#pragma omp simd
  for (int i = 0; i < n; i++) out[i] = (x[i] - mu) * r * w[i] + (b ? b[i] : 0.0f);
}

void softmax_inplace(float* v, int n) {
  float mx = -INFINITY;
  for (int i = 0; i < n; i++) mx = v[i] > mx ? v[i] : mx;
#pragma omp simd
  for (int i = 0; i < n; i++) v[i] = exp_fast(v[i] - mx);
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int i = 0; i < n; i++) sum += v[i];
  const float inv = 1.0f / sum;
#pragma omp simd
  for (int i = 0; i < n; i++) v[i] *= inv;
}

/* one row of int8 blocks: q = round_half_even(x / s) per block of 32, s = max|x| / 127 */
static void quantize_blocks(const float* x, int ld, int8_t* q, float* s, int32_t* sum) {
  for (int b = 0; b < ld / RT_BLOCK; b++) {
    const float* xb = x + b * RT_BLOCK;
    float amax = 0.0f;
    for (int k = 0; k < RT_BLOCK; k++) amax = fmaxf(amax, fabsf(xb[k]));
    const float scale = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    int32_t total = 0;
    for (int k = 0; k < RT_BLOCK; k++) {
      const int32_t v = (int32_t)nearbyintf(xb[k] * inv);
      q[b * RT_BLOCK + k] = (int8_t)v;
      total += v;
    }
    s[b] = scale;
    sum[b] = total;
  }
}

void act_convert(rt_act* a, int K, int dtype, int t0, int t1) {
  (void)K;
  for (int t = t0; t < t1; t++) {
    const float* f = a->f + (int64_t)t * a->ld;
    if (dtype == RT_BF16) {
      uint16_t* b = a->b + (int64_t)t * a->ld;
      for (int k = 0; k < a->ld; k++) b[k] = f32_to_bf16(f[k]);
    } else if (dtype == RT_I8) {
      const int nb = a->ld / RT_BLOCK;
      quantize_blocks(f, a->ld, a->q + (int64_t)t * a->ld, a->s + (int64_t)t * nb, a->sum + (int64_t)t * nb);
    }
  }
}

void act_prepare(const float* x, int ldx, int K, int dtype, rt_act* a, int t0, int t1) {
  for (int t = t0; t < t1; t++) {
    float* f = a->f + (int64_t)t * a->ld;
    if (x != a->f || ldx != a->ld) memcpy(f, x + (int64_t)t * ldx, (size_t)K * sizeof(float));
    memset(f + K, 0, (size_t)(a->ld - K) * sizeof(float));
  }
  act_convert(a, K, dtype, t0, t1);
}
