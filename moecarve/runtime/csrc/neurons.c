/* Kernels for the neurons a carved layer picked: their rows dotted with a token (gate / up), and
 * their output columns added up (down), reading each picked row once, in place (RT_ROWS layout).
 *
 *   rows_dot    out[i] = W[rows[i]] . x for up to 8 rows per pass over x: one x load serves 8 rows,
 *               and the 8 sums leave the vector registers in one transposing reduction
 *   rows_axpy   y[k0:k1] += sum_i h[i] W[rows[i], k0:k1], 4 rows per pass over y: one load and store
 *               of y serves 4 rows
 * int8 rows (blocks of 32, float16 scales): 64 bytes are two blocks, in the low and high 8 lanes of
 * VPDPBUSD's result; the row's block scales are read 16 at a time and spread to those lanes by one
 * permute, times the token's block scales (the same for every row, spread once per token).
 */
#include <math.h>
#include <string.h>

#include "internal.h"

#define NR 8

#ifdef RT_AVX512
/* the 8 horizontal sums of a[0..8) as one vector [sum a0, ..., sum a7] */
static inline __m256 hsum8(const __m512* a) {
  __m256 s[NR];
  for (int i = 0; i < NR; i++) s[i] = _mm256_add_ps(_mm512_castps512_ps256(a[i]), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a[i]), 1)));
  const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(s[0], s[1]), _mm256_hadd_ps(s[2], s[3]));
  const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(s[4], s[5]), _mm256_hadd_ps(s[6], s[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}
#endif

static void dot8_generic(const rt_mat* W, const int64_t* rows, int nr, const rt_act* X, int64_t t, float* out) {
  const int64_t Kp = rt_pad(W->cols, RT_BLOCK), nb = Kp / RT_BLOCK;
  for (int i = 0; i < nr; i++) {
    float acc = 0.0f;
    if (W->dtype == RT_F32) {
      const float* w = (const float*)W->data + rows[i] * Kp;
      const float* x = X->f + t * X->ld;
      for (int64_t k = 0; k < Kp; k++) acc += w[k] * x[k];
    } else if (W->dtype == RT_BF16) {
      const uint16_t* w = (const uint16_t*)W->data + rows[i] * Kp;
      const uint16_t* x = X->b + t * X->ld;
      for (int64_t k = 0; k < Kp; k++) acc += bf16_to_f32(w[k]) * bf16_to_f32(x[k]);
    } else {
      const uint8_t* w = (const uint8_t*)W->data + rows[i] * rt_row_bytes(Kp);
      const uint16_t* ws = (const uint16_t*)(w + Kp);
      const int8_t* x = X->q + t * X->ld;
      for (int64_t b = 0; b < nb; b++) {
        int32_t dot = 0;
        for (int k = 0; k < RT_BLOCK; k++) dot += ((int32_t)w[b * RT_BLOCK + k] - 128) * x[b * RT_BLOCK + k];
        acc += (float)dot * f16_to_f32(ws[b]) * X->s[t * nb + b];
      }
    }
    out[i] = acc;
  }
}

#ifdef RT_AVX512
static void dot8_f32(const rt_mat* W, const int64_t* rows, const rt_act* X, int64_t t, float* out) {
  const int64_t Kp = rt_pad(W->cols, RT_BLOCK);
  const float* x = X->f + t * X->ld;
  const float* w[NR];
  __m512 acc[NR];
  for (int i = 0; i < NR; i++) w[i] = (const float*)W->data + rows[i] * Kp, acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < Kp; k += 16) {
    const __m512 xv = _mm512_loadu_ps(x + k);
    for (int i = 0; i < NR; i++) acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(w[i] + k), xv, acc[i]);
  }
  _mm256_storeu_ps(out, hsum8(acc));
}
#endif

#ifdef RT_AVX512BF16
static void dot8_bf16(const rt_mat* W, const int64_t* rows, const rt_act* X, int64_t t, float* out) {
  const int64_t Kp = rt_pad(W->cols, RT_BLOCK);
  const uint16_t* x = X->b + t * X->ld;
  const uint16_t* w[NR];
  __m512 acc[NR];
  for (int i = 0; i < NR; i++) w[i] = (const uint16_t*)W->data + rows[i] * Kp, acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < Kp; k += 32) {
    const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
    for (int i = 0; i < NR; i++) acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_loadu_si512(w[i] + k), xv);
  }
  _mm256_storeu_ps(out, hsum8(acc));
}
#endif

#ifdef RT_VNNI
/* Eight (row, token) pairs: out[i] = W[rows[i]] . X[token i], for int8 rows and int8 tokens, with
 * the token's block scales spread per 64-byte chunk (spread[i]: [s_2c x8, s_2c+1 x8] per chunk c)
 * and corrections (corr[i]: c_b = 128 s_b sum_b). Decode passes one token eight times, prefill two
 * rows four tokens: either way each pair gets the same arithmetic, in the same order. */
static void dot8_i8_pairs(const rt_mat* W, const int64_t* rows, const int8_t* const* x, const float* const* spread,
                          const float* const* corr, float* out) {
  const int64_t Kp = rt_pad(W->cols, RT_BLOCK), nc = Kp / 64;
  const uint8_t* w[NR];
  const uint16_t* ws[NR];
  __m512 acc[NR];
  for (int i = 0; i < NR; i++) {
    w[i] = (const uint8_t*)W->data + rows[i] * rt_row_bytes(Kp);
    ws[i] = (const uint16_t*)(w[i] + Kp);
    acc[i] = _mm512_setzero_ps();
  }
  float cacc[NR] = {0};
  for (int64_t c0 = 0; c0 < nc; c0 += 8) {  /* 8 chunks = 16 blocks: one 16-scale load per row */
    const int cn = (int)RT_MIN(8, nc - c0);
    __m512 wsv[NR];
    const __mmask16 mk = (__mmask16)((1u << (2 * cn)) - 1);
    for (int i = 0; i < NR; i++) {
      wsv[i] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, ws[i] + 2 * c0));
      /* the correction of these blocks: sum_b w_scale_b * corr_b */
      cacc[i] += _mm512_reduce_add_ps(_mm512_mul_ps(wsv[i], _mm512_maskz_loadu_ps(mk, corr[i] + 2 * c0)));
    }
    for (int c = 0; c < cn; c++) {
      const int64_t k = (c0 + c) * 64;
      const __m512i lanes = _mm512_set_epi32(2 * c + 1, 2 * c + 1, 2 * c + 1, 2 * c + 1, 2 * c + 1, 2 * c + 1, 2 * c + 1,
                                             2 * c + 1, 2 * c, 2 * c, 2 * c, 2 * c, 2 * c, 2 * c, 2 * c, 2 * c);
      for (int i = 0; i < NR; i++) {
        const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(w[i] + k), _mm512_loadu_si512(x[i] + k));
        const __m512 xs = _mm512_loadu_ps(spread[i] + (c0 + c) * 16);
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(_mm512_permutexvar_ps(lanes, wsv[i]), xs), acc[i]);
      }
    }
  }
  __m256 r = hsum8(acc);
  _mm256_storeu_ps(out, _mm256_sub_ps(r, _mm256_loadu_ps(cacc)));
}

static void dot8_i8(const rt_mat* W, const int64_t* rows, const rt_act* X, int64_t t, const float* spread,
                    const float* corr, float* out) {
  const int8_t* x[NR];
  const float* sp[NR];
  const float* co[NR];
  for (int i = 0; i < NR; i++) x[i] = X->q + t * X->ld, sp[i] = spread, co[i] = corr;
  dot8_i8_pairs(W, rows, x, sp, co, out);
}
#endif

/* The token's int8 block scales spread to the lanes of each 64-byte chunk (lanes 0-7: block 2c,
 * 8-15: block 2c+1), spread [Kp / 4], and its corrections corr [Kp / 32], c_b = 128 s_b sum_b
 * (what the +128 of the stored codes adds to block b's integer dot product). */
void token_spread(const rt_act* X, int64_t t, int64_t Kp, float* spread, float* corr) {
  const int64_t nb = Kp / RT_BLOCK;
  const float* s = X->s + t * nb;
  const int32_t* sum = X->sum + t * nb;
  for (int64_t b = 0; b < nb; b++) {
    for (int j = 0; j < 8; j++) spread[b * 8 + j] = s[b];
    corr[b] = 128.0f * s[b] * (float)sum[b];
  }
}

/* whether dot8 has a vector kernel for W on this machine (else every row takes dot8_generic) */
static int dot8_vector(const rt_mat* W) {
#ifdef RT_AVX512
  if (W->dtype == RT_F32) return 1;
#ifdef RT_AVX512BF16
  if (W->dtype == RT_BF16) return 1;
#endif
#ifdef RT_VNNI
  if (W->dtype == RT_I8 && rt_pad(W->cols, RT_BLOCK) % 64 == 0) return 1;
#endif
#endif
  (void)W;
  return 0;
}

static void dot8(const rt_mat* W, const int64_t* rows, const rt_act* X, int64_t t, const float* spread,
                 const float* corr, float* out) {
#ifdef RT_AVX512
  if (W->dtype == RT_F32) return dot8_f32(W, rows, X, t, out);
#ifdef RT_AVX512BF16
  if (W->dtype == RT_BF16) return dot8_bf16(W, rows, X, t, out);
#endif
#ifdef RT_VNNI
  if (W->dtype == RT_I8) return dot8_i8(W, rows, X, t, spread, corr, out);
#endif
#endif
  (void)spread;
  (void)corr;
  dot8_generic(W, rows, NR, X, t, out);
}

/* Every row goes through the same kernel (a last group of fewer than 8 is padded with repeats of its
 * first row), so a row's value does not depend on the rows it was grouped with: results stay the
 * same whatever the batch or thread count. */
void rows_dot(const rt_mat* W, const int64_t* rows, int n, const rt_act* X, int64_t t, const float* spread,
              const float* corr, float* out) {
  if (!dot8_vector(W)) {
    dot8_generic(W, rows, n, X, t, out);
    return;
  }
  for (int i = 0; i < n; i += NR) {
    const int k = RT_MIN(NR, n - i);
    if (k == NR) {
      dot8(W, rows + i, X, t, spread, corr, out + i);
      continue;
    }
    int64_t r8[NR];
    float o8[NR];
    for (int j = 0; j < NR; j++) r8[j] = rows[i + (j < k ? j : 0)];
    dot8(W, r8, X, t, spread, corr, o8);
    memcpy(out + i, o8, (size_t)k * sizeof(float));
  }
}

void rows_axpy(const rt_mat* W, const int64_t* rows, const float* h, int n, int k0, int k1, float* y) {
  const int64_t Kp = rt_pad(W->cols, RT_BLOCK);
  int i = 0;
#ifdef RT_AVX512
  if (W->dtype == RT_BF16 || W->dtype == RT_F32) {
    for (; i + 4 <= n; i += 4) {
      const __m512 h0 = _mm512_set1_ps(h[i]), h1 = _mm512_set1_ps(h[i + 1]), h2 = _mm512_set1_ps(h[i + 2]),
                   h3 = _mm512_set1_ps(h[i + 3]);
      int k = k0;
      if (W->dtype == RT_BF16) {
        const uint16_t* w0 = (const uint16_t*)W->data + rows[i] * Kp;
        const uint16_t* w1 = (const uint16_t*)W->data + rows[i + 1] * Kp;
        const uint16_t* w2 = (const uint16_t*)W->data + rows[i + 2] * Kp;
        const uint16_t* w3 = (const uint16_t*)W->data + rows[i + 3] * Kp;
#define BF(p) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(p))), 16))
        for (; k + 16 <= k1; k += 16) {
          __m512 acc = _mm512_loadu_ps(y + k - k0);
          acc = _mm512_fmadd_ps(BF(w0 + k), h0, acc);
          acc = _mm512_fmadd_ps(BF(w1 + k), h1, acc);
          acc = _mm512_fmadd_ps(BF(w2 + k), h2, acc);
          acc = _mm512_fmadd_ps(BF(w3 + k), h3, acc);
          _mm512_storeu_ps(y + k - k0, acc);
        }
#undef BF
      } else {
        const float* w0 = (const float*)W->data + rows[i] * Kp;
        const float* w1 = (const float*)W->data + rows[i + 1] * Kp;
        const float* w2 = (const float*)W->data + rows[i + 2] * Kp;
        const float* w3 = (const float*)W->data + rows[i + 3] * Kp;
        for (; k + 16 <= k1; k += 16) {
          __m512 acc = _mm512_loadu_ps(y + k - k0);
          acc = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + k), h0, acc);
          acc = _mm512_fmadd_ps(_mm512_loadu_ps(w1 + k), h1, acc);
          acc = _mm512_fmadd_ps(_mm512_loadu_ps(w2 + k), h2, acc);
          acc = _mm512_fmadd_ps(_mm512_loadu_ps(w3 + k), h3, acc);
          _mm512_storeu_ps(y + k - k0, acc);
        }
      }
      if (k < k1)  /* a tail shorter than 16 (k1 = d not a multiple of 16) */
        for (int j = 0; j < 4; j++) row_axpy(W, rows[i + j], h[i + j], k, k1, y + (k - k0));
    }
  } else if (W->dtype == RT_I8) {
    const __m128i off = _mm_set1_epi8((char)0x80);
    for (; i + 4 <= n; i += 4) {
      const uint8_t* w[4];
      const uint16_t* ws[4];
      for (int j = 0; j < 4; j++) w[j] = (const uint8_t*)W->data + rows[i + j] * rt_row_bytes(Kp), ws[j] = (const uint16_t*)(w[j] + Kp);
      for (int b = k0 / RT_BLOCK; b * RT_BLOCK < k1; b++) {
        __m512 s[4];
        for (int j = 0; j < 4; j++) s[j] = _mm512_set1_ps(h[i + j] * f16_to_f32(ws[j][b]));
        const int lo = b * RT_BLOCK, hi = RT_MIN(lo + RT_BLOCK, k1);
        int k = lo;
        for (; k + 16 <= hi; k += 16) {
          __m512 acc = _mm512_loadu_ps(y + k - k0);
          for (int j = 0; j < 4; j++) {
            const __m128i q = _mm_xor_si128(_mm_loadu_si128((const __m128i*)(w[j] + k)), off);
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), s[j], acc);
          }
          _mm512_storeu_ps(y + k - k0, acc);
        }
        for (; k < hi; k++)
          for (int j = 0; j < 4; j++) y[k - k0] = fmaf((float)((int32_t)w[j][k] - 128), h[i + j] * f16_to_f32(ws[j][b]), y[k - k0]);
      }
    }
  }
#endif
  for (; i < n; i++) row_axpy(W, rows[i], h[i], k0, k1, y);
}

/* Two rows (an expert neuron's gate and up) against n tokens X[tokens[i]]: oa[i], ob[i]. Four tokens
 * per pass (8 accumulators): each row vector loaded once serves four tokens (prefill, where the
 * picked rows stay put and the tokens stream). */
void rows2_dot_tokens(const rt_mat* W, int64_t ra, int64_t rb, const rt_act* X, const int32_t* tokens, int n,
                      float* oa, float* ob, float* scratch) {
  int i = 0;
#ifdef RT_VNNI
  if (W->dtype == RT_I8 && dot8_vector(W)) {  /* int8: the tokens' block scales spread, 4 tokens per pass */
    const int64_t Kp = rt_pad(W->cols, RT_BLOCK), span = Kp / 4 + Kp / RT_BLOCK;
    for (; i < n; i += 4) {
      const int nk = RT_MIN(4, n - i);
      int64_t rows[NR];
      const int8_t* x[NR];
      const float* sp[NR];
      const float* co[NR];
      float r[NR];
      for (int j = 0; j < 4; j++) {
        const int64_t t = tokens[i + (j < nk ? j : 0)];
        float* s = scratch + j * span;
        token_spread(X, t, Kp, s, s + Kp / 4);
        rows[j] = ra, rows[4 + j] = rb;
        x[j] = x[4 + j] = X->q + t * X->ld;
        sp[j] = sp[4 + j] = s;
        co[j] = co[4 + j] = s + Kp / 4;
      }
      dot8_i8_pairs(W, rows, x, sp, co, r);
      for (int j = 0; j < nk; j++) oa[i + j] = r[j], ob[i + j] = r[4 + j];
    }
    return;
  }
#endif
  (void)scratch;
#ifdef RT_AVX512
  const int64_t Kp = rt_pad(W->cols, RT_BLOCK);
#ifdef RT_AVX512BF16
  const int vec = W->dtype == RT_F32 || W->dtype == RT_BF16;
#else
  const int vec = W->dtype == RT_F32;
#endif
  if (vec) {
    for (; i < n; i += 4) {  /* a last group of fewer than 4 repeats its first token: same arithmetic for all */
      const int nk = RT_MIN(4, n - i);
      __m512 acc[NR];
      for (int j = 0; j < NR; j++) acc[j] = _mm512_setzero_ps();
      if (W->dtype == RT_F32) {
        const float* wa = (const float*)W->data + ra * Kp;
        const float* wb = (const float*)W->data + rb * Kp;
        const float* x[4];
        for (int j = 0; j < 4; j++) x[j] = X->f + (int64_t)tokens[i + (j < nk ? j : 0)] * X->ld;
        for (int64_t k = 0; k < Kp; k += 16) {
          const __m512 a = _mm512_loadu_ps(wa + k), b = _mm512_loadu_ps(wb + k);
          for (int j = 0; j < 4; j++) {
            const __m512 xv = _mm512_loadu_ps(x[j] + k);
            acc[j] = _mm512_fmadd_ps(a, xv, acc[j]);
            acc[4 + j] = _mm512_fmadd_ps(b, xv, acc[4 + j]);
          }
        }
      } else {
#ifdef RT_AVX512BF16
        const uint16_t* wa = (const uint16_t*)W->data + ra * Kp;
        const uint16_t* wb = (const uint16_t*)W->data + rb * Kp;
        const uint16_t* x[4];
        for (int j = 0; j < 4; j++) x[j] = X->b + (int64_t)tokens[i + (j < nk ? j : 0)] * X->ld;
        for (int64_t k = 0; k < Kp; k += 32) {
          const __m512bh a = (__m512bh)_mm512_loadu_si512(wa + k), b = (__m512bh)_mm512_loadu_si512(wb + k);
          for (int j = 0; j < 4; j++) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(x[j] + k);
            acc[j] = _mm512_dpbf16_ps(acc[j], a, xv);
            acc[4 + j] = _mm512_dpbf16_ps(acc[4 + j], b, xv);
          }
        }
#endif
      }
      float r[NR];
      _mm256_storeu_ps(r, hsum8(acc));
      for (int j = 0; j < nk; j++) oa[i + j] = r[j], ob[i + j] = r[4 + j];
    }
  }
#endif
  for (; i < n; i++) {  /* the rest (and int8: block scales per token) one token at a time */
    const int64_t rows[2] = {ra, rb};
    float out[2];
    dot8_generic(W, rows, 2, X, tokens[i], out);
    oa[i] = out[0];
    ob[i] = out[1];
  }
}

/* part[0..d) = sum_i h[i] W[rows[i]] for n rows of a RT_ROWS matrix (a unit's output columns),
 * 64 outputs at a time held in registers across all n rows: each column chunk is loaded once and
 * the outputs are stored once (no load / store of the sum per row). Every output is the chain
 * fma(w_{n-1}, h_{n-1}, ... fma(w_0, h_0, 0)) in row order, in the vector and the scalar code alike,
 * so decode and prefill, which both come here, agree bit for bit (int8: w = code, h = h * block scale). */
void unit_down(const rt_mat* W, const int64_t* rows, const float* h, int n, int d, float* part) {
  const int64_t Kp = rt_pad(W->cols, RT_BLOCK);
  int k = 0;
#ifdef RT_AVX512
  for (; k + 64 <= d; k += 64) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int i = 0; i < n; i++) {
      __m512 w[4];
      if (W->dtype == RT_F32) {
        const float* r = (const float*)W->data + rows[i] * Kp + k;
        for (int q = 0; q < 4; q++) w[q] = _mm512_loadu_ps(r + 16 * q);
      } else if (W->dtype == RT_BF16) {
        const uint16_t* r = (const uint16_t*)W->data + rows[i] * Kp + k;
        for (int q = 0; q < 4; q++)
          w[q] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(r + 16 * q))), 16));
      } else {  /* int8: the codes times (h * the block's scale), 64 outputs = two blocks of 32 */
        const uint8_t* r = (const uint8_t*)W->data + rows[i] * rt_row_bytes(Kp);
        const uint16_t* ws = (const uint16_t*)(r + Kp);
        const __m128i off = _mm_set1_epi8((char)0x80);
        const __m512 hs0 = _mm512_set1_ps(h[i] * f16_to_f32(ws[k / RT_BLOCK]));
        const __m512 hs1 = _mm512_set1_ps(h[i] * f16_to_f32(ws[k / RT_BLOCK + 1]));
        for (int q = 0; q < 4; q++) {
          const __m128i c = _mm_xor_si128(_mm_loadu_si128((const __m128i*)(r + k + 16 * q)), off);
          acc[q] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c)), q < 2 ? hs0 : hs1, acc[q]);
        }
        continue;
      }
      const __m512 hv = _mm512_set1_ps(h[i]);
      for (int q = 0; q < 4; q++) acc[q] = _mm512_fmadd_ps(w[q], hv, acc[q]);
    }
    for (int q = 0; q < 4; q++) _mm512_storeu_ps(part + k + 16 * q, acc[q]);
  }
#endif
  for (; k < d; k++) {
    float acc = 0.0f;
    for (int i = 0; i < n; i++) {
      if (W->dtype == RT_F32) {
        acc = fmaf(((const float*)W->data)[rows[i] * Kp + k], h[i], acc);
      } else if (W->dtype == RT_BF16) {
        acc = fmaf(bf16_to_f32(((const uint16_t*)W->data)[rows[i] * Kp + k]), h[i], acc);
      } else {  /* as the vector code: code * (h * scale) */
        const uint8_t* r = (const uint8_t*)W->data + rows[i] * rt_row_bytes(Kp);
        acc = fmaf((float)((int32_t)r[k] - 128), h[i] * f16_to_f32(((const uint16_t*)(r + Kp))[k / RT_BLOCK]), acc);
      }
    }
    part[k] = acc;
  }
}
