/* moecarve's CPU kernels for carved MoE layers on a few tokens (decode, small batches).
 *
 * Compiled on first use by moecarve/kernels/native.py with the system C compiler (-O3
 * -march=native, about a second) and called through ctypes; plain C, one idea per function.
 * Every kernel reads weights in place, where the model keeps them: nothing is copied or
 * dequantised into a temporary, so the bytes read are the bytes the carve selected.
 *
 *   shadow_route    the shadow router: expert scores from a 4- or 8-bit copy of the routed
 *                   experts' gate/up rows against the token quantised to int8 (W4A8: integer
 *                   dot products, exact, then one float scale per row and token), then top-A
 *                   (or a threshold) and the combine weights.
 *   moe_experts     y[t] += sum_a w[t,a] * expert_{idx[t,a]}(x[t]) for any expert size m >= 1,
 *                   expert-major: each picked expert's rows are read once for all tokens that
 *                   picked it; one call whatever A and m are.
 *
 * Shapes: T tokens, d hidden, E experts, m neurons per expert, rows = 2m (gated: gate rows then
 * up rows) or m, A experts per token. Weights float32 or bfloat16 (wdtype 0 / 1); activations,
 * scores and outputs float32.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define HAVE_VNNI 1
#endif

#include "vecmath.h"

/* ------------------------------------------------------------------ token quantisation (A8) */

/* x [d] float -> q [d] int8 with q = round_half_even(x / s), s = max|x| / 127 (the shadow
 * router's reference, moecarve.modules.moe.quantize_tokens, does the same). Returns s; *sum = sum q. */
float quantize_token(const float* x, int d, int8_t* q, int32_t* sum) {
  float amax = 0.0f;
  for (int k = 0; k < d; k++) amax = fmaxf(amax, fabsf(x[k]));
  float s = fmaxf(amax / 127.0f, 1e-30f);
  int32_t total = 0;
  for (int k = 0; k < d; k++) {
    int32_t v = (int32_t)nearbyintf(x[k] / s);
    v = v > 127 ? 127 : (v < -127 ? -127 : v);
    q[k] = (int8_t)v;
    total += v;
  }
  *sum = total;
  return s;
}

/* ------------------------------------------------------------------ integer dot products */

/* Packed 4-bit rows ("nibbles" layout): byte k of a row holds element k in its low nibble and
 * element k + half in its high nibble, each stored as code + 8 (0..15). Returns
 * sum_k lo_k * x[k] + hi_k * x[k + half] for 4 rows `stride` bytes apart (the +8 offset is
 * removed by the caller with the token's sum). */
static void dot4_nibbles(const uint8_t* q, int64_t stride, const int8_t* x, int half, int32_t* r) {
  int k = 0;
  int32_t s[4] = {0, 0, 0, 0};
#ifdef HAVE_VNNI
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  const __m512i low = _mm512_set1_epi8(15);
  for (; k < half; k += 64) {  /* the last chunk masked: a row of d = 576 ends 32 bytes into one */
    const __mmask64 mk = half - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (half - k)) - 1);
    __m512i xl = _mm512_maskz_loadu_epi8(mk, x + k), xh = _mm512_maskz_loadu_epi8(mk, x + half + k), v;
#define ROW(i, acc)                                                         \
  v = _mm512_maskz_loadu_epi8(mk, q + (i) * stride + k);                    \
  acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(v, low), xl);             \
  acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(_mm512_srli_epi16(v, 4), low), xh);
    ROW(0, a0) ROW(1, a1) ROW(2, a2) ROW(3, a3)
#undef ROW
  }
  k = half;
  s[0] = _mm512_reduce_add_epi32(a0);
  s[1] = _mm512_reduce_add_epi32(a1);
  s[2] = _mm512_reduce_add_epi32(a2);
  s[3] = _mm512_reduce_add_epi32(a3);
#endif
  for (int i = 0; i < 4; i++) {
    const uint8_t* qi = q + i * stride;
    int32_t acc = 0;
    for (int j = k; j < half; j++) acc += (int32_t)(qi[j] & 15) * x[j] + (int32_t)(qi[j] >> 4) * x[half + j];
    r[i] = s[i] + acc;
  }
}

/* Two packed rows against eight int8 tokens: r[i * 8 + t] = row i . x_t (tokens past nt repeat
 * token 0; their sums are not used). The rows are unpacked once per 64 bytes for all tokens. */
static void dot2x8_nibbles(const uint8_t* q, int64_t stride, const int8_t* const* x, int nt, int half, int32_t* r) {
  int k = 0;
  int32_t s[16] = {0};
#ifdef HAVE_VNNI
  __m512i acc[16];
  for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_si512();
  const __m512i low = _mm512_set1_epi8(15);
  const int8_t* xt[8];
  for (int t = 0; t < 8; t++) xt[t] = x[t < nt ? t : 0];
  for (; k < half; k += 64) {  /* the last chunk masked (d = 576: 32 bytes into one) */
    const __mmask64 mk = half - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (half - k)) - 1);
    const __m512i v0 = _mm512_maskz_loadu_epi8(mk, q + k), v1 = _mm512_maskz_loadu_epi8(mk, q + stride + k);
    const __m512i l0 = _mm512_and_si512(v0, low), h0 = _mm512_and_si512(_mm512_srli_epi16(v0, 4), low);
    const __m512i l1 = _mm512_and_si512(v1, low), h1 = _mm512_and_si512(_mm512_srli_epi16(v1, 4), low);
    for (int t = 0; t < 8; t++) {
      const __m512i xl = _mm512_maskz_loadu_epi8(mk, xt[t] + k), xh = _mm512_maskz_loadu_epi8(mk, xt[t] + half + k);
      acc[t] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[t], l0, xl), h0, xh);
      acc[8 + t] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[8 + t], l1, xl), h1, xh);
    }
  }
  k = half;
  for (int i = 0; i < 16; i++) s[i] = _mm512_reduce_add_epi32(acc[i]);
#endif
  for (int i = 0; i < 2; i++)
    for (int t = 0; t < nt; t++) {
      const uint8_t* qi = q + i * stride;
      int32_t a = 0;
      for (int j = k; j < half; j++) a += (int32_t)(qi[j] & 15) * x[t][j] + (int32_t)(qi[j] >> 4) * x[t][half + j];
      r[i * 8 + t] = s[i * 8 + t] + a;
    }
}

static int32_t dot_nibbles(const uint8_t* q, const int8_t* x, int half) {
  int32_t acc = 0;
  for (int j = 0; j < half; j++) acc += (int32_t)(q[j] & 15) * x[j] + (int32_t)(q[j] >> 4) * x[half + j];
  return acc;
}

/* int8 rows ("int8" layout, one code per byte): sum_k q[k] * x[k]. */
static int32_t dot_int8(const int8_t* q, const int8_t* x, int d) {
  int32_t acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int k = 0; k < d; k++) acc += (int32_t)q[k] * x[k];
  return acc;
}

/* Four int8 rows `stride` bytes apart against x: r[i] = sum_k q_i[k] x[k], exactly. VPDPBUSD
 * multiplies unsigned by signed bytes, so each code goes in as code + 128 (its top bit flipped)
 * and 128 * xsum (xsum = sum_k x[k]) comes off the integer sum afterwards; four rows at once keep
 * four streams from memory in flight, as dot4_nibbles does. */
static void dot4_int8(const int8_t* q, int64_t stride, const int8_t* x, int d, int32_t xsum, int32_t* r) {
#ifdef HAVE_VNNI
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  for (int k = 0; k < d; k += 64) {  /* the last chunk masked: x's masked lanes are 0, so they add nothing */
    const __mmask64 mk = d - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (d - k)) - 1);
    const __m512i xv = _mm512_maskz_loadu_epi8(mk, x + k);
    a0 = _mm512_dpbusd_epi32(a0, _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, q + k), flip), xv);
    a1 = _mm512_dpbusd_epi32(a1, _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, q + stride + k), flip), xv);
    a2 = _mm512_dpbusd_epi32(a2, _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, q + 2 * stride + k), flip), xv);
    a3 = _mm512_dpbusd_epi32(a3, _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, q + 3 * stride + k), flip), xv);
  }
  r[0] = _mm512_reduce_add_epi32(a0) - 128 * xsum;
  r[1] = _mm512_reduce_add_epi32(a1) - 128 * xsum;
  r[2] = _mm512_reduce_add_epi32(a2) - 128 * xsum;
  r[3] = _mm512_reduce_add_epi32(a3) - 128 * xsum;
#else
  (void)xsum;
  for (int i = 0; i < 4; i++) r[i] = dot_int8(q + i * stride, x, d);
#endif
}

/* ------------------------------------------------------------------ the shadow router */

/* scores[t, e] = sum_{j<m} | act(g~_j) * u~_j |  (gated)  or  sum_j | act(h~_j) |,
 * where h~_r = s_t * row_scale[r] * (codes_r . q_t) + in_bias[r], q_t the int8 token.
 * codes: "nibbles" uint8 [E*rows, d/2] (layout 4) or int8 [E*rows, d] (layout 8).
 * Rows outer, tokens inner: the codes stream from memory once for all T tokens.
 * shadow_scores_q takes the tokens already quantised (q [T, d] int8, their scales qs [T] and code
 * sums qsum [T], as quantize_token makes them) and writes scores [T, lds]: a caller scoring a
 * range of experts offsets the code, scale and bias pointers (the decode runtime splits experts
 * across threads); with est (not NULL) also each neuron's signed estimate act(g~_j) * u~_j into
 * est [T, lde] (the tail of a carved layer multiplies its columns by them). shadow_scores quantises
 * x [T, d] and scores all E (est [T, E m] or NULL). Both return 0, or -1 when out of memory. */
int shadow_scores_q(const int8_t* q, const float* qs, const int32_t* qsum, int T, int d, const void* codes, int layout,
                    const float* row_scale, const float* in_bias, int E, int m, int gated, int act, float* scores,
                    int lds, float* est, int64_t lde) {
  const int rows = gated ? 2 * m : m, R = E * rows, half = d / 2;
  int32_t* dots = (int32_t*)malloc((size_t)T * R * sizeof(int32_t) + 4);  /* [T, R] */
  if (!dots) return -1;
  if (layout == 4) {
    const uint8_t* c = (const uint8_t*)codes;
    int r = 0;
    if (T >= 4)  /* two rows against eight tokens at a time: each row unpacked once per token block */
      for (; r + 2 <= R; r += 2)
        for (int t0 = 0; t0 < T; t0 += 8) {
          const int nt = T - t0 < 8 ? T - t0 : 8;
          const int8_t* xs[8];
          int32_t out[16];
          for (int t = 0; t < nt; t++) xs[t] = q + (int64_t)(t0 + t) * d;
          dot2x8_nibbles(c + (int64_t)r * half, half, xs, nt, half, out);
          for (int t = 0; t < nt; t++) {
            dots[(int64_t)(t0 + t) * R + r] = out[t] - 8 * qsum[t0 + t];
            dots[(int64_t)(t0 + t) * R + r + 1] = out[8 + t] - 8 * qsum[t0 + t];
          }
        }
    /* four rows a quarter of the codes apart: four streams from memory at once, as one alone
     * does not fill the memory system (the codes are read once per token: this is a stream) */
    const int Q = (R - r) / 4;
    for (int i = 0; i < Q; i++)
      for (int t = 0; t < T; t++) {
        int32_t out[4];
        dot4_nibbles(c + (int64_t)(r + i) * half, (int64_t)Q * half, q + (int64_t)t * d, half, out);
        for (int k = 0; k < 4; k++) dots[(int64_t)t * R + r + i + k * Q] = out[k] - 8 * qsum[t];
      }
    r += 4 * Q;
    for (; r < R; r++)
      for (int t = 0; t < T; t++)
        dots[(int64_t)t * R + r] = dot_nibbles(c + (int64_t)r * half, q + (int64_t)t * d, half) - 8 * qsum[t];
  } else {
    const int8_t* c = (const int8_t*)codes;
    const int Q = R / 4;  /* four rows a quarter of the codes apart, as above */
    for (int i = 0; i < Q; i++)
      for (int t = 0; t < T; t++) {
        int32_t out[4];
        dot4_int8(c + (int64_t)i * d, (int64_t)Q * d, q + (int64_t)t * d, d, qsum[t], out);
        for (int k = 0; k < 4; k++) dots[(int64_t)t * R + i + k * Q] = out[k];
      }
    for (int r = 4 * Q; r < R; r++)
      for (int t = 0; t < T; t++) dots[(int64_t)t * R + r] = dot_int8(c + (int64_t)r * d, q + (int64_t)t * d, d);
  }
  float* h = (float*)malloc((size_t)R * 2 * sizeof(float) + 4);  /* [R] rows, then [R] activations */
  if (!h) {
    free(dots);
    return -1;
  }
  float* a = h + R;
  for (int t = 0; t < T; t++) {
    const float s = qs[t];
    const int32_t* dt = dots + (int64_t)t * R;
    float* out = scores + (int64_t)t * lds;
#ifdef HAVE_VNNI
    if (gated && m == 1) {  /* single-neuron experts: 16 at a time, the gate and up rows de-interleaved */
      const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
      const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
      const __m512 sv = _mm512_set1_ps(s);
      int e = 0;
      for (; e + 16 <= E; e += 16) {
        const int64_t r = 2 * (int64_t)e;
        __m512 h0 = _mm512_mul_ps(_mm512_mul_ps(sv, _mm512_loadu_ps(row_scale + r)), _mm512_cvtepi32_ps(_mm512_loadu_si512(dt + r)));
        __m512 h1 = _mm512_mul_ps(_mm512_mul_ps(sv, _mm512_loadu_ps(row_scale + r + 16)), _mm512_cvtepi32_ps(_mm512_loadu_si512(dt + r + 16)));
        if (in_bias) {
          h0 = _mm512_add_ps(h0, _mm512_loadu_ps(in_bias + r));
          h1 = _mm512_add_ps(h1, _mm512_loadu_ps(in_bias + r + 16));
        }
        float g[16];
        _mm512_storeu_ps(g, _mm512_permutex2var_ps(h0, even, h1));
        act_vec(g, 16, act);
        const __m512 prod = _mm512_mul_ps(_mm512_loadu_ps(g), _mm512_permutex2var_ps(h0, odd, h1));
        if (est) _mm512_storeu_ps(est + (int64_t)t * lde + e, prod);
        _mm512_storeu_ps(out + e, _mm512_abs_ps(prod));
      }
      for (; e < E; e++) {
        float g = s * row_scale[2 * e] * (float)dt[2 * e] + (in_bias ? in_bias[2 * e] : 0.0f);
        const float u = s * row_scale[2 * e + 1] * (float)dt[2 * e + 1] + (in_bias ? in_bias[2 * e + 1] : 0.0f);
        act_vec(&g, 1, act);
        if (est) est[(int64_t)t * lde + e] = g * u;
        out[e] = fabsf(g * u);
      }
      continue;
    }
#endif
#pragma omp simd
    for (int r = 0; r < R; r++) h[r] = s * row_scale[r] * (float)dt[r] + (in_bias ? in_bias[r] : 0.0f);
    memcpy(a, h, (size_t)R * sizeof(float));
    act_vec(a, R, act);  /* every row (the up rows' activations go unused): one vector pass */
    for (int e = 0; e < E; e++) {
      const float* ae = a + (int64_t)e * rows;
      const float* he = h + (int64_t)e * rows;
      float sum = 0.0f;
      float* ee = est ? est + (int64_t)t * lde + (int64_t)e * m : NULL;  /* the signed estimates (a tail reads them) */
      for (int j = 0; j < m; j++) {
        const float v = gated ? ae[j] * he[m + j] : ae[j];
        if (ee) ee[j] = v;
        sum += fabsf(v);
      }
      out[e] = sum;
    }
  }
  free(dots); free(h);
  return 0;
}

int shadow_scores(const float* x, int T, int d, const void* codes, int layout, const float* row_scale,
                  const float* in_bias, int E, int m, int gated, int act, float* scores, float* est) {
  int8_t* q = (int8_t*)malloc((size_t)T * d + 64);
  float* qs = (float*)malloc((size_t)T * sizeof(float) + 4);
  int32_t* qsum = (int32_t*)malloc((size_t)T * sizeof(int32_t) + 4);
  int rc = (!q || !qs || !qsum) ? -1 : 0;
  for (int t = 0; !rc && t < T; t++) qs[t] = quantize_token(x + (int64_t)t * d, d, q + (int64_t)t * d, qsum + t);
  if (!rc) rc = shadow_scores_q(q, qs, qsum, T, d, codes, layout, row_scale, in_bias, E, m, gated, act, scores, E, est, (int64_t)E * m);
  free(q); free(qs); free(qsum);
  return rc;
}

/* ------------------------------------------------------------------ selection */

/* a ranks before b: larger value first, ties to the lower index (deterministic) */
static inline int before(const float* v, int32_t a, int32_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); }

/* a float's bits as an unsigned key in the float's order (-inf < ... < -0 = +0 ... < +inf) */
static inline uint32_t order_key(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if (u == 0x80000000u) u = 0;  /* -0 == +0, as the comparisons of `before` have it */
  return (u & 0x80000000u) ? ~u : u | 0x80000000u;
}

/* The k-th largest key of v[ids[0..n)] by radix selection: three histogram passes over the keys'
 * 11 + 11 + 10 bits, each narrowing the prefix the k-th key has. O(n), no data-dependent swaps. */
static uint32_t kth_key(const float* v, const int32_t* ids, int n, int k, uint32_t* keys, uint32_t* cand) {
  static const int shift[3] = {21, 10, 0}, bits[3] = {11, 11, 10};
  uint32_t prefix = 0;
  int32_t hist[2048];
  for (int i = 0; i < n; i++) keys[i] = order_key(v[ids[i]]);
  const uint32_t* src = keys;
  int ns = n;
  for (int p = 0; p < 3; p++) {
    const int nb = 1 << bits[p];
    memset(hist, 0, (size_t)nb * sizeof(int32_t));
    for (int i = 0; i < ns; i++) hist[(src[i] >> shift[p]) & (nb - 1)]++;
    int b = nb - 1;
    for (; b > 0 && hist[b] < k; b--) k -= hist[b];  /* the bucket holding the k-th largest */
    prefix |= (uint32_t)b << shift[p];
    int nc = 0;  /* the next pass looks at this bucket's keys only */
    for (int i = 0; i < ns; i++)
      if (((src[i] >> shift[p]) & (nb - 1)) == (uint32_t)b) cand[nc++] = src[i];
    src = cand;
    ns = nc;
  }
  return prefix;
}

/* quickselect: reorder ids[0..n) so that its first k entries are the k best by `before` */
static void select_top_small(const float* v, int32_t* ids, int n, int k) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    int mid = lo + (hi - lo) / 2;  /* median of three as the pivot */
    if (before(v, ids[mid], ids[lo])) { int32_t t = ids[mid]; ids[mid] = ids[lo]; ids[lo] = t; }
    if (before(v, ids[hi], ids[lo])) { int32_t t = ids[hi]; ids[hi] = ids[lo]; ids[lo] = t; }
    if (before(v, ids[hi], ids[mid])) { int32_t t = ids[hi]; ids[hi] = ids[mid]; ids[mid] = t; }
    const int32_t pivot = ids[mid];
    int i = lo, j = hi;
    while (i <= j) {
      while (before(v, ids[i], pivot)) i++;
      while (before(v, pivot, ids[j])) j--;
      if (i <= j) { int32_t t = ids[i]; ids[i] = ids[j]; ids[j] = t; i++; j--; }
    }
    if (k - 1 <= j) hi = j;
    else if (k - 1 >= i) lo = i;
    else break;
  }
}

/* Reorder ids[0..n) so that its first k entries are the k best by `before` (larger value first,
 * ties to the lower index); also called by the decode runtime's routers. Large n: radix selection
 * of the k-th value, then one pass that keeps the ids' order (callers pass ids ascending, so ties
 * go to the lower index); small n: quickselect. */
void select_top(const float* v, int32_t* ids, int n, int k) {
  if (n >= 256 && k < n) {
    uint32_t* keys = (uint32_t*)malloc((size_t)n * (2 * sizeof(uint32_t) + sizeof(int32_t)));
    if (keys) {
      int32_t* out = (int32_t*)(keys + n);
      const uint32_t kth = kth_key(v, ids, n, k, keys, keys + 2 * n);
      int above = 0;
      for (int i = 0; i < n; i++) above += keys[i] > kth;
      int a = 0, t = above, r = k;  /* [0, above): above the k-th; [above, k): its ties, first come; [k, n): the rest */
      for (int i = 0; i < n; i++) {
        if (keys[i] > kth) out[a++] = ids[i];
        else if (keys[i] == kth && t < k) out[t++] = ids[i];
        else out[r++] = ids[i];
      }
      memcpy(ids, out, (size_t)n * sizeof(int32_t));
      free(keys);
      return;
    }
  }
  select_top_small(v, ids, n, k);
}

/* For each token: picks (top-A of scores + bias, or, when threshold is finite, every expert whose
 * score + bias exceeds it, at most A, the rest of the row -1) and combine weights
 * 1 + softmax(scores)_e * scale_e. scores [T, E] float; idx int64 [T, A]; w float [T, A].
 * Returns the largest number of experts any token picked, or -1 when out of memory. */
int select_experts(const float* scores, int T, int E, const float* bias, const float* scale, int A,
                   float threshold, int64_t* idx, float* w) {
  float* v = (float*)malloc((size_t)E * sizeof(float));
  int32_t* ids = (int32_t*)malloc((size_t)E * sizeof(int32_t));
  if (!v || !ids) {
    free(v); free(ids);
    return -1;
  }
  int any_scale = 0, most = 0;
  for (int e = 0; e < E; e++) any_scale |= scale[e] != 0.0f;
  for (int t = 0; t < T; t++) {
    const float* s = scores + (int64_t)t * E;
    int n = 0;
    for (int e = 0; e < E; e++) v[e] = s[e] + bias[e];
    if (isfinite(threshold)) {
      for (int e = 0; e < E; e++)
        if (v[e] > threshold) ids[n++] = e;
      if (n > A) { select_top(v, ids, n, A); n = A; }
    } else {
      for (int e = 0; e < E; e++) ids[e] = e;
      select_top(v, ids, E, A);
      n = A;
    }
    float mx = -INFINITY, sum = 0.0f;
    if (any_scale) {
      for (int e = 0; e < E; e++) mx = fmaxf(mx, s[e]);
      for (int e = 0; e < E; e++) sum += expf(s[e] - mx);
    }
    for (int a = 0; a < A; a++) {
      const int64_t o = (int64_t)t * A + a;
      if (a < n) {
        const int32_t e = ids[a];
        idx[o] = e;
        w[o] = any_scale ? 1.0f + expf(s[e] - mx) / sum * scale[e] : 1.0f;
      } else {
        idx[o] = -1;
        w[o] = 0.0f;
      }
    }
    if (n > most) most = n;
  }
  free(v); free(ids);
  return most;
}

/* ------------------------------------------------------------------ float micro-kernels */

static inline float bf16_to_f32(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

#define LD_F32(p, k) ((p)[k])
#define LD_BF16(p, k) bf16_to_f32((p)[k])

/* The same micro-kernels for float32 and bfloat16 weights (W: the tensor, o: element offsets;
 * activations x / h and outputs are float32). Several independent accumulators per loop keep the
 * FMA units busy; each weight element is loaded once per call.
 *   dots4    four rows against one vector:    out[r] = W[o_r : o_r + n] . x
 *   dots8    eight rows against one vector
 *   dots2x4  two rows against four vectors:   out[r * 4 + i] = W[o_r : o_r + n] . x_i
 *   axpy     y += h * W[o : o + n]
 *   axpy4    y += sum_r h_r * W[o_r : o_r + n]   (four rows, one pass over y)
 *   axpy_s   y[k] += h * W[o + k * stride]    (a column of a row-major block) */
#define DEFINE_MICRO_KERNELS(SUF, TYPE, LD)                                                              \
  static void dots4_##SUF(const void* W, const int64_t* o, const float* x, int n, float* out) {         \
    const TYPE *w0 = (const TYPE*)W + o[0], *w1 = (const TYPE*)W + o[1];                                \
    const TYPE *w2 = (const TYPE*)W + o[2], *w3 = (const TYPE*)W + o[3];                                \
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;                                                   \
    _Pragma("omp simd reduction(+ : a0, a1, a2, a3)") for (int k = 0; k < n; k++) {                     \
      const float xk = x[k];                                                                             \
      a0 += LD(w0, k) * xk;                                                                              \
      a1 += LD(w1, k) * xk;                                                                              \
      a2 += LD(w2, k) * xk;                                                                              \
      a3 += LD(w3, k) * xk;                                                                              \
    }                                                                                                    \
    out[0] = a0; out[1] = a1; out[2] = a2; out[3] = a3;                                                  \
  }                                                                                                      \
  static void dots2x4_##SUF(const void* W, const int64_t* o, const float* const* x, int n, float* out) { \
    const TYPE *w0 = (const TYPE*)W + o[0], *w1 = (const TYPE*)W + o[1];                                \
    const float *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];                                         \
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f, b0 = 0.0f, b1 = 0.0f, b2 = 0.0f, b3 = 0.0f;       \
    _Pragma("omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3)") for (int k = 0; k < n; k++) {     \
      const float u = LD(w0, k), v = LD(w1, k);                                                          \
      a0 += u * x0[k]; a1 += u * x1[k]; a2 += u * x2[k]; a3 += u * x3[k];                                \
      b0 += v * x0[k]; b1 += v * x1[k]; b2 += v * x2[k]; b3 += v * x3[k];                                \
    }                                                                                                    \
    out[0] = a0; out[1] = a1; out[2] = a2; out[3] = a3; out[4] = b0; out[5] = b1; out[6] = b2; out[7] = b3; \
  }                                                                                                      \
  static void axpy_##SUF(const void* W, int64_t o, float h, float* y, int n) {                          \
    const TYPE* w = (const TYPE*)W + o;                                                                  \
    _Pragma("omp simd") for (int k = 0; k < n; k++) y[k] += LD(w, k) * h;                                \
  }                                                                                                      \
  static void axpy_s_##SUF(const void* W, int64_t o, int64_t stride, float h, float* y, int n) {        \
    const TYPE* w = (const TYPE*)W + o;                                                                  \
    _Pragma("omp simd") for (int k = 0; k < n; k++) y[k] += LD(w, k * stride) * h;                       \
  }                                                                                                      \
  static void dots8_##SUF(const void* W, const int64_t* o, const float* x, int n, float* out) {         \
    const TYPE *w0 = (const TYPE*)W + o[0], *w1 = (const TYPE*)W + o[1], *w2 = (const TYPE*)W + o[2];   \
    const TYPE *w3 = (const TYPE*)W + o[3], *w4 = (const TYPE*)W + o[4], *w5 = (const TYPE*)W + o[5];   \
    const TYPE *w6 = (const TYPE*)W + o[6], *w7 = (const TYPE*)W + o[7];                                \
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f, a4 = 0.0f, a5 = 0.0f, a6 = 0.0f, a7 = 0.0f;       \
    _Pragma("omp simd reduction(+ : a0, a1, a2, a3, a4, a5, a6, a7)") for (int k = 0; k < n; k++) {     \
      const float xk = x[k];                                                                             \
      a0 += LD(w0, k) * xk; a1 += LD(w1, k) * xk; a2 += LD(w2, k) * xk; a3 += LD(w3, k) * xk;            \
      a4 += LD(w4, k) * xk; a5 += LD(w5, k) * xk; a6 += LD(w6, k) * xk; a7 += LD(w7, k) * xk;            \
    }                                                                                                    \
    out[0] = a0; out[1] = a1; out[2] = a2; out[3] = a3; out[4] = a4; out[5] = a5; out[6] = a6; out[7] = a7; \
  }                                                                                                      \
  static void axpy4_##SUF(const void* W, const int64_t* o, const float* h, float* y, int n) {           \
    const TYPE *w0 = (const TYPE*)W + o[0], *w1 = (const TYPE*)W + o[1];                                \
    const TYPE *w2 = (const TYPE*)W + o[2], *w3 = (const TYPE*)W + o[3];                                \
    const float h0 = h[0], h1 = h[1], h2 = h[2], h3 = h[3];                                              \
    _Pragma("omp simd") for (int k = 0; k < n; k++)                                                      \
      y[k] += LD(w0, k) * h0 + LD(w1, k) * h1 + LD(w2, k) * h2 + LD(w3, k) * h3;                         \
  }

DEFINE_MICRO_KERNELS(f32, float, LD_F32)
DEFINE_MICRO_KERNELS(bf16, uint16_t, LD_BF16)

typedef struct {
  void (*dots4)(const void*, const int64_t*, const float*, int, float*);
  void (*dots8)(const void*, const int64_t*, const float*, int, float*);
  void (*dots2x4)(const void*, const int64_t*, const float* const*, int, float*);
  void (*axpy)(const void*, int64_t, float, float*, int);
  void (*axpy4)(const void*, const int64_t*, const float*, float*, int);
  void (*axpy_s)(const void*, int64_t, int64_t, float, float*, int);
} WeightOps;

static const WeightOps OPS[2] = {
    {dots4_f32, dots8_f32, dots2x4_f32, axpy_f32, axpy4_f32, axpy_s_f32},
    {dots4_bf16, dots8_bf16, dots2x4_bf16, axpy_bf16, axpy4_bf16, axpy_s_bf16},
};

static inline float load_w(const void* w, int64_t i, int wdtype) {
  return wdtype ? bf16_to_f32(((const uint16_t*)w)[i]) : ((const float*)w)[i];
}

/* pre[i * R + r] = W[base + r * d : ... + d] . x_i for the R rows of one expert and n tokens */
static void expert_rows(const WeightOps* ops, const void* W, int64_t base, int R, int d,
                        const float* const* xs, int n, float* pre) {
  int i = 0;
  for (; i + 4 <= n; i += 4) {  /* four tokens: each pair of rows is read once for all four */
    for (int r = 0; r < R; r += 2) {
      const int r1 = r + 1 < R ? r + 1 : r;
      const int64_t o[2] = {base + (int64_t)r * d, base + (int64_t)r1 * d};
      float out[8];
      ops->dots2x4(W, o, xs + i, d, out);
      for (int k = 0; k < 4; k++) {
        pre[(int64_t)(i + k) * R + r] = out[k];
        pre[(int64_t)(i + k) * R + r1] = out[4 + k];
      }
    }
  }
  for (; i < n; i++) {  /* the rest one token at a time, four rows per pass */
    for (int r = 0; r < R; r += 4) {
      int64_t o[4];
      float out[4];
      for (int k = 0; k < 4; k++) o[k] = base + (int64_t)(r + k < R ? r + k : r) * d;
      ops->dots4(W, o, xs[i], d, out);
      for (int k = 0; k < 4 && r + k < R; k++) pre[(int64_t)i * R + r + k] = out[k];
    }
  }
}

/* y += O h for a block O [d, M] with M a compile-time constant: the compiler vectorises over the
 * output features with M-strided loads and the inner loop unrolled (no horizontal sums). */
#define DEFINE_DOWN_M(M)                                                                                  \
  static void down_m##M##_f32(const void* W, int64_t o, const float* h, float* y, int d) {              \
    const float* w = (const float*)W + o;                                                                \
    for (int k = 0; k < d; k++) {                                                                        \
      float acc = 0.0f;                                                                                  \
      for (int j = 0; j < M; j++) acc += w[(int64_t)k * M + j] * h[j];                                   \
      y[k] += acc;                                                                                       \
    }                                                                                                    \
  }                                                                                                      \
  static void down_m##M##_bf16(const void* W, int64_t o, const float* h, float* y, int d) {             \
    const uint16_t* w = (const uint16_t*)W + o;                                                          \
    for (int k = 0; k < d; k++) {                                                                        \
      float acc = 0.0f;                                                                                  \
      for (int j = 0; j < M; j++) acc += bf16_to_f32(w[(int64_t)k * M + j]) * h[j];                     \
      y[k] += acc;                                                                                       \
    }                                                                                                    \
  }
DEFINE_DOWN_M(2) DEFINE_DOWN_M(3) DEFINE_DOWN_M(4) DEFINE_DOWN_M(6) DEFINE_DOWN_M(8) DEFINE_DOWN_M(12) DEFINE_DOWN_M(16)

typedef void (*DownFn)(const void*, int64_t, const float*, float*, int);

static DownFn down_fixed(int m, int wdtype) {
#define CASE(M) case M: return wdtype ? down_m##M##_bf16 : down_m##M##_f32;
  switch (m) { CASE(2) CASE(3) CASE(4) CASE(6) CASE(8) CASE(12) CASE(16) default: return NULL; }
#undef CASE
}

#ifdef __AVX512F__
/* y[k] += O[k, :] . h for a row-major block O [d, m <= 256]: one 16-wide masked FMA chain and
 * one horizontal sum per row (measured 2x faster than four-row dot products for m = 12..48). */
static void down_rows_avx512(const void* O, int64_t off, int d, int m, const float* h, float* y, int bf16) {
  __m512 hv[16];
  __mmask16 mk[16];
  const int chunks = (m + 15) / 16;
  for (int c = 0; c < chunks; c++) {
    const int n = m - 16 * c < 16 ? m - 16 * c : 16;
    mk[c] = (__mmask16)((1u << n) - 1);
    hv[c] = _mm512_maskz_loadu_ps(mk[c], h + 16 * c);
  }
  for (int k = 0; k < d; k++) {
    __m512 acc = _mm512_setzero_ps();
    for (int c = 0; c < chunks; c++) {
      const int64_t at = off + (int64_t)k * m + 16 * c;
      __m512 w;
      if (bf16) {
        __m256i raw = _mm256_maskz_loadu_epi16(mk[c], (const uint16_t*)O + at);
        w = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
      } else {
        w = _mm512_maskz_loadu_ps(mk[c], (const float*)O + at);
      }
      acc = _mm512_fmadd_ps(w, hv[c], acc);
    }
    y[k] += _mm512_reduce_add_ps(acc);
  }
}
#endif

/* y += O h for a row-major block O [d, m] (an expert's down projection) */
static void down_block(const WeightOps* ops, const void* O, int64_t off, int d, int m, const float* h, float* y) {
  const DownFn fixed = down_fixed(m, ops == &OPS[1]);
  if (m == 1) {
    ops->axpy(O, off, h[0], y, d);
  } else if (fixed && m <= 8) {
    fixed(O, off, h, y, d);
#ifdef __AVX512F__
  } else if (m <= 256) {
    down_rows_avx512(O, off, d, m, h, y, ops == &OPS[1]);
#endif
  } else if (fixed) {
    fixed(O, off, h, y, d);
  } else if (m >= 16) {  /* long rows: four output features per pass */
    int k = 0;
    for (; k + 4 <= d; k += 4) {
      const int64_t o[4] = {off + (int64_t)k * m, off + (int64_t)(k + 1) * m, off + (int64_t)(k + 2) * m,
                            off + (int64_t)(k + 3) * m};
      float out[4];
      ops->dots4(O, o, h, m, out);
      y[k] += out[0]; y[k + 1] += out[1]; y[k + 2] += out[2]; y[k + 3] += out[3];
    }
    for (; k < d; k++) {
      const int64_t o[4] = {off + (int64_t)k * m, off + (int64_t)k * m, off + (int64_t)k * m, off + (int64_t)k * m};
      float out[4];
      ops->dots4(O, o, h, m, out);
      y[k] += out[0];
    }
  } else {  /* short rows: column by column; the block ([d, m], a few KB) stays in L1 */
    for (int j = 0; j < m; j++) ops->axpy_s(O, off + j, m, h[j], y, d);
  }
}

/* ------------------------------------------------------------------ routed / shared experts */

/* One token (decode): the picked experts' neurons as one list, four at a time across expert
 * boundaries (eight rows per pass when gated), so tiny experts cost no more per neuron than big
 * ones; down rows four at a time for single-neuron experts, per expert block otherwise. */
static int experts_one_token(const WeightOps* ops, const float* x, int d, const void* in_proj, const void* in_bias,
                             const void* out_proj, int wdtype, int E, int m, int gated, int act, const int64_t* idx,
                             const float* w, int A, float* y) {
  const int R = gated ? 2 * m : m;
  int64_t* expert = (int64_t*)malloc((size_t)A * m * sizeof(int64_t) + 8);
  float* h = (float*)malloc((size_t)A * m * 3 * sizeof(float) + 4);  /* gate pre-activations, up, weights */
  if (!expert || !h) { free(expert); free(h); return -1; }
  float* u = h + A * m;
  float* wn = u + A * m;
  int N = 0;  /* neuron i: expert expert[i], index j = i % m */
  for (int a = 0; a < A; a++)
    if (idx[a] >= 0 && idx[a] < E)
      for (int j = 0; j < m; j++) wn[N] = w[a], expert[N++] = idx[a];
  for (int i = 0; i < N; i += 4) {
    int64_t o[8];
    float out[8];
    for (int k = 0; k < 4; k++) {
      const int ik = i + k < N ? i + k : i;  /* past the end: repeat a neuron, ignore its result */
      const int64_t row = expert[ik] * R + ik % m;
      o[k] = row * d;
      o[4 + k] = (gated ? row + m : row) * d;
    }
    if (gated) ops->dots8(in_proj, o, x, d, out);
    else ops->dots4(in_proj, o, x, d, out);
    for (int k = 0; k < 4 && i + k < N; k++) {
      const int64_t row = expert[i + k] * R + (i + k) % m;
      h[i + k] = out[k] + (in_bias ? load_w(in_bias, row, wdtype) : 0.0f);
      u[i + k] = gated ? out[4 + k] + (in_bias ? load_w(in_bias, row + m, wdtype) : 0.0f) : 1.0f;
    }
  }
  act_vec(h, N, act);
#pragma omp simd
  for (int i = 0; i < N; i++) h[i] *= u[i] * wn[i];  /* act(gate) * up * combine weight */
  if (m == 1) {
    int k = 0;
    for (; k + 4 <= N; k += 4) {
      const int64_t o[4] = {expert[k] * d, expert[k + 1] * d, expert[k + 2] * d, expert[k + 3] * d};
      ops->axpy4(out_proj, o, h + k, y, d);
    }
    for (; k < N; k++) ops->axpy(out_proj, expert[k] * d, h[k], y, d);
  } else {
    for (int k = 0; k < N; k += m) down_block(ops, out_proj, expert[k] * d * m, d, m, h + k, y);
  }
  free(expert); free(h);
  return 0;
}

/* y[t] += sum_a w[t,a] * out_e (act(gate_e x_t + b) * (up_e x_t + b)),  e = idx[t,a].
 * in_proj [E, rows, d], in_bias [E, rows] or NULL, out_proj [E, d, m]; idx int64 [T, A]
 * (entries outside 0..E-1 are skipped: "no expert"), w float [T, A], y float [T, d].
 * Expert-major: slots are grouped by expert (counting sort), so each picked expert's rows are
 * read from memory once, then reused from registers or cache for every token that picked it.
 * Returns 0, or -1 when out of memory. */
int moe_experts(const float* x, int T, int d, const void* in_proj, const void* in_bias, const void* out_proj,
                int wdtype, int E, int m, int gated, int act, const int64_t* idx, const float* w, int A, float* y) {
  const WeightOps* ops = &OPS[wdtype ? 1 : 0];
  if (T == 1) return experts_one_token(ops, x, d, in_proj, in_bias, out_proj, wdtype, E, m, gated, act, idx, w, A, y);
  const int R = gated ? 2 * m : m, S = T * A > 0 ? T * A : 1, Tn = T > 0 ? T : 1;
  int32_t* start = (int32_t*)calloc((size_t)E + 1, sizeof(int32_t));
  int32_t* fill = (int32_t*)malloc((size_t)E * sizeof(int32_t));
  int32_t* slot = (int32_t*)malloc((size_t)S * sizeof(int32_t));
  float* pre = (float*)malloc((size_t)R * Tn * sizeof(float));
  float* h = (float*)malloc((size_t)m * Tn * sizeof(float));
  const float** xs = (const float**)malloc((size_t)Tn * sizeof(float*));
  if (!start || !fill || !slot || !pre || !h || !xs) {
    free(start); free(fill); free(slot); free(pre); free(h); free(xs);
    return -1;
  }
  for (int i = 0; i < T * A; i++)
    if (idx[i] >= 0 && idx[i] < E) start[idx[i] + 1]++;
  for (int e = 0; e < E; e++) start[e + 1] += start[e];
  memcpy(fill, start, (size_t)E * sizeof(int32_t));
  for (int i = 0; i < T * A; i++)
    if (idx[i] >= 0 && idx[i] < E) slot[fill[idx[i]]++] = i;  /* slot i belongs to token i / A */

  for (int e = 0; e < E; e++) {
    const int lo = start[e], n = start[e + 1] - lo;  /* n <= T: a token picks an expert once */
    if (n == 0) continue;
    for (int i = 0; i < n; i++) xs[i] = x + (int64_t)(slot[lo + i] / A) * d;
    expert_rows(ops, in_proj, (int64_t)e * R * d, R, d, xs, n, pre);
    for (int i = 0; i < n; i++)
      for (int j = 0; j < m; j++)
        h[(int64_t)i * m + j] = pre[(int64_t)i * R + j] + (in_bias ? load_w(in_bias, (int64_t)e * R + j, wdtype) : 0.0f);
    act_vec(h, n * m, act);
    for (int i = 0; i < n; i++) {
      const float wi = w[slot[lo + i]];
      for (int j = 0; j < m; j++) {
        const float up = gated ? pre[(int64_t)i * R + m + j] + (in_bias ? load_w(in_bias, (int64_t)e * R + m + j, wdtype) : 0.0f) : 1.0f;
        h[(int64_t)i * m + j] *= up * wi;
      }
      down_block(ops, out_proj, (int64_t)e * d * m, d, m, h + (int64_t)i * m, y + (int64_t)(slot[lo + i] / A) * d);
    }
  }
  free(start); free(fill); free(slot); free(pre); free(h); free(xs);
  return 0;
}

/* A layer's tail (modules.moe.TailNeurons) added to y [T, d]: for each token, every routed neuron n
 * (of N = E m) outside the token's picked experts (idx [T, A] with weight w != 0) whose estimate
 * |est[t, n]| exceeds threshold adds est * scale[n] * (codes_n - 8), codes [N, half] (half =
 * ceil(d/2): element k in the low nibble of byte k, k + half in the high one), in neuron order.
 * Returns 0, or -1 when out of memory. */
int tail_add(int T, int d, int E, int m, const float* est, const int64_t* idx, const float* w, int A,
             const uint8_t* codes, const float* scale, float threshold, float* y) {
  const int half = (d + 1) / 2, N = E * m;
  uint8_t* picked = (uint8_t*)malloc((size_t)E + 1);
  float* part = (float*)malloc((size_t)2 * half * sizeof(float) + 4);
  if (!picked || !part) {
    free(picked); free(part);
    return -1;
  }
  for (int t = 0; t < T; t++) {
    memset(picked, 0, (size_t)E);
    for (int a = 0; a < A; a++) {
      const int64_t e = idx[(int64_t)t * A + a];
      if (e >= 0 && e < E && w[(int64_t)t * A + a] != 0.0f) picked[e] = 1;
    }
    memset(part, 0, (size_t)2 * half * sizeof(float));
    const float* et = est + (int64_t)t * N;
    for (int n = 0; n < N; n++)
      if (fabsf(et[n]) > threshold && !picked[n / m]) tail_column(codes + (int64_t)n * half, et[n] * scale[n], half, part);
    float* yt = y + (int64_t)t * d;
    for (int k = 0; k < d; k++) yt[k] += part[k];
  }
  free(picked); free(part);
  return 0;
}

/* A whole carved layer on T tokens: y = shared(x) + out_bias + sum_a w[t,a] * expert_{idx[t,a]}(x),
 * written to y float [T, d]. The shared experts are one expert of n neurons that every token
 * picks with weight 1 (s_in [rows_n, d], s_in_bias [rows_n] or NULL, s_out [d, n]; n = 0: none);
 * out_bias [d] or NULL; the routed experts as in moe_experts. Returns 0, or -1 out of memory. */
int moe_layer(const float* x, int T, int d, const void* s_in, const void* s_in_bias, const void* s_out, int n,
              const void* in_proj, const void* in_bias, const void* out_proj, const void* out_bias, int wdtype,
              int E, int m, int gated, int act, const int64_t* idx, const float* w, int A, float* y) {
  memset(y, 0, (size_t)T * d * sizeof(float));
  if (out_bias)
    for (int t = 0; t < T; t++)
      for (int k = 0; k < d; k++) y[(int64_t)t * d + k] = load_w(out_bias, k, wdtype);
  if (n > 0) {
    int64_t* zero = (int64_t*)calloc((size_t)T, sizeof(int64_t));
    float* one = (float*)malloc((size_t)T * sizeof(float));
    if (!zero || !one) { free(zero); free(one); return -1; }
    for (int t = 0; t < T; t++) one[t] = 1.0f;
    int rc = moe_experts(x, T, d, s_in, s_in_bias, s_out, wdtype, 1, n, gated, act, zero, one, 1, y);
    free(zero); free(one);
    if (rc) return rc;
  }
  return moe_experts(x, T, d, in_proj, in_bias, out_proj, wdtype, E, m, gated, act, idx, w, A, y);
}

/* The whole layer routed by the shadow router, in one call: shadow_scores -> select_experts ->
 * moe_layer (arguments as there; bias, scale [E] the router's load-balancing bias and combine
 * scale; threshold: +inf for top-A). Returns 0, or -1 when out of memory. */
int moe_layer_shadow(const float* x, int T, int d, const void* codes, int layout, const float* row_scale,
                     const float* shadow_bias, const float* bias, const float* scale, int A, float threshold,
                     const void* s_in, const void* s_in_bias, const void* s_out, int n, const void* in_proj,
                     const void* in_bias, const void* out_proj, const void* out_bias, int wdtype, int E, int m,
                     int gated, int act, float* y) {
  float* scores = (float*)malloc((size_t)T * E * sizeof(float));
  int64_t* idx = (int64_t*)malloc((size_t)T * A * sizeof(int64_t) + 8);
  float* w = (float*)malloc((size_t)T * A * sizeof(float) + 4);
  int rc = (!scores || !idx || !w) ? -1 : 0;
  if (!rc) rc = shadow_scores(x, T, d, codes, layout, row_scale, shadow_bias, E, m, gated, act, scores, NULL);
  if (!rc) rc = select_experts(scores, T, E, bias, scale, A, threshold, idx, w) < 0 ? -1 : 0;
  if (!rc) rc = moe_layer(x, T, d, s_in, s_in_bias, s_out, n, in_proj, in_bias, out_proj, out_bias, wdtype, E, m,
                          gated, act, idx, w, A, y);
  free(scores); free(idx); free(w);
  return rc;
}
