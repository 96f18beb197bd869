/* Vectorisable float maths shared by moecarve's C code (kernels/native.c and the decode runtime,
 * runtime/csrc): the activations the carved layers use, written without libm calls so that loops
 * over them vectorise, and the tail's 4-bit column update. Header-only (static inline): each file
 * that includes it gets its own copy. */
#ifndef MOECARVE_VECMATH_H
#define MOECARVE_VECMATH_H

#include <math.h>
#include <stdint.h>

enum { ACT_SILU = 0, ACT_RELU = 1, ACT_GELU = 2, ACT_GELU_TANH = 3, ACT_QUICK_GELU = 4, ACT_IDENTITY = 5 };

/* exp(x) to ~1e-7 relative error, written so that loops of it vectorise (no libm call, no floorf,
 * which gcc does not vectorise without -ffast-math): Cody-Waite reduction by ln 2 with n rounded
 * by the 1.5 * 2^23 trick, a degree-6 polynomial on [-ln2/2, ln2/2], 2^n set in the exponent bits. */
static inline float exp_fast(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  union { int32_t u; float f; } scale = {.u = ((int32_t)n + 127) << 23};  /* 2^n */
  return p * scale.f;
}

/* erf(x) to 1.5e-7 absolute error (Abramowitz & Stegun 7.1.26), vectorisable */
static inline float erf_fast(float x) {
  const float a = fabsf(x), t = 1.0f / (1.0f + 0.3275911f * a);
  const float y = 1.0f - (((((1.061405429f * t - 1.453152027f) * t) + 1.421413741f) * t - 0.284496736f) * t +
                          0.254829592f) * t * exp_fast(-a * a);
  return x < 0.0f ? -y : y;
}

/* v[i] = act(v[i]) for i < n, vectorised (the activations the carved layers use) */
static inline void act_vec(float* v, int n, int act) {
  switch (act) {
    case ACT_SILU:
#pragma omp simd
      for (int i = 0; i < n; i++) v[i] = v[i] / (1.0f + exp_fast(-v[i]));
      break;
    case ACT_RELU:
#pragma omp simd
      for (int i = 0; i < n; i++) v[i] = v[i] > 0.0f ? v[i] : 0.0f;
      break;
    case ACT_GELU:
#pragma omp simd
      for (int i = 0; i < n; i++) v[i] = 0.5f * v[i] * (1.0f + erf_fast(v[i] * 0.70710678118654752f));
      break;
    case ACT_GELU_TANH:  /* tanh(z) = 1 - 2 / (exp(2z) + 1) */
#pragma omp simd
      for (int i = 0; i < n; i++) {
        const float z = 0.7978845608028654f * (v[i] + 0.044715f * v[i] * v[i] * v[i]);
        v[i] = 0.5f * v[i] * (2.0f - 2.0f / (exp_fast(2.0f * z) + 1.0f));
      }
      break;
    case ACT_QUICK_GELU:
#pragma omp simd
      for (int i = 0; i < n; i++) v[i] = v[i] / (1.0f + exp_fast(-1.702f * v[i]));
      break;
    default:
      break;
  }
}

/* part[0, 2 half) += v * (code - 8) of one 4-bit tail column (modules.moe.TailNeurons; codes [half]:
 * element k in the low nibble of byte k, element k + half in the high one) */
static inline void tail_column(const uint8_t* codes, float v, int half, float* part) {
  float* hi = part + half;
#pragma omp simd
  for (int k = 0; k < half; k++) {
    part[k] += v * (float)((int)(codes[k] & 15) - 8);
    hi[k] += v * (float)((int)(codes[k] >> 4) - 8);
  }
}

#endif
