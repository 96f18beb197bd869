/* Matrix products of the runtime, for the three weight types and two layouts of rt.h.
 *
 * Panels (the dense projections, the lm_head): a tile of NP <= 4 panels (16 outputs each) by NT
 * tokens keeps NP * NT accumulators of 16 floats in registers; per step along K it loads NP
 * weight vectors (64 bytes each) and broadcasts one element group of each token:
 *   f32   one float           -> FMA               (16 multiply-adds)
 *   bf16  a pair of bf16      -> VDPBF16PS         (32 multiply-adds)
 *   i8    a quad of int8      -> VPDPBUSD          (64 multiply-adds, int32), and per block of 32
 *         along K the int32 sums become floats: (sum - 128 * block sum of x) * w_scale * x_scale
 * No horizontal sums anywhere, so a matrix-vector product (NT = 1) streams the weights at the
 * memory's speed and a prefill tile (NT up to 6) reuses each loaded vector NT times.
 * Rows (the carved experts' picked neurons): dot products of one row with a few tokens, and
 * y += s * row (the neuron's down column).
 * Each kernel has a portable C version with the same layouts (machines without AVX-512).
 */
#include <math.h>
#include <string.h>

#include "internal.h"

#define MAX_NP 4

int64_t panels_of(const rt_mat* W) { return (W->rows + RT_PANEL_ROWS - 1) / RT_PANEL_ROWS; }
static inline int64_t kpad(const rt_mat* W) { return rt_pad(W->cols, RT_BLOCK); }

/* elements (or bytes) of one panel, and float16 scales of one panel */
static inline int64_t panel_elems(const rt_mat* W) { return kpad(W) * RT_PANEL_ROWS; }
static inline int64_t panel_scales(const rt_mat* W) { return kpad(W) / RT_BLOCK * RT_PANEL_ROWS; }

/* ------------------------------------------------------------------ panel tiles, AVX-512 */
#ifdef RT_AVX512

#define ALWAYS_INLINE static inline __attribute__((always_inline))

ALWAYS_INLINE void tile_f32(const float* W, int64_t ps, int Kp, const float* X, int ldx, float* Y, int ldy,
                            const int NP, const int NT) {
  __m512 acc[MAX_NP][6];
  for (int i = 0; i < NP; i++)
    for (int t = 0; t < NT; t++) acc[i][t] = _mm512_setzero_ps();
  for (int k = 0; k < Kp; k++) {
    __m512 w[MAX_NP];
    for (int i = 0; i < NP; i++) w[i] = _mm512_load_ps(W + i * ps + (int64_t)k * 16);
    for (int t = 0; t < NT; t++) {
      const __m512 xb = _mm512_set1_ps(X[(int64_t)t * ldx + k]);
      for (int i = 0; i < NP; i++) acc[i][t] = _mm512_fmadd_ps(w[i], xb, acc[i][t]);
    }
  }
  for (int t = 0; t < NT; t++)
    for (int i = 0; i < NP; i++) _mm512_storeu_ps(Y + (int64_t)t * ldy + i * 16, acc[i][t]);
}

#ifdef RT_AVX512BF16
ALWAYS_INLINE void tile_bf16(const uint16_t* W, int64_t ps, int Kp, const uint16_t* X, int ldx, float* Y, int ldy,
                             const int NP, const int NT) {
  __m512 acc[MAX_NP][6];
  for (int i = 0; i < NP; i++)
    for (int t = 0; t < NT; t++) acc[i][t] = _mm512_setzero_ps();
  for (int k = 0; k < Kp / 2; k++) {
    __m512bh w[MAX_NP];
    for (int i = 0; i < NP; i++) w[i] = (__m512bh)_mm512_load_si512(W + i * ps + (int64_t)k * 32);
    for (int t = 0; t < NT; t++) {
      int32_t pair;
      memcpy(&pair, X + (int64_t)t * ldx + 2 * k, 4);
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
      for (int i = 0; i < NP; i++) acc[i][t] = _mm512_dpbf16_ps(acc[i][t], w[i], xb);
    }
  }
  for (int t = 0; t < NT; t++)
    for (int i = 0; i < NP; i++) _mm512_storeu_ps(Y + (int64_t)t * ldy + i * 16, acc[i][t]);
}
#endif

#ifdef RT_VNNI
ALWAYS_INLINE void tile_i8(const uint8_t* W, int64_t ps, const uint16_t* S, int64_t ss, int Kp, const rt_act* X,
                           int t0, float* Y, int ldy, const int NP, const int NT) {
  __m512 acc[MAX_NP][6];  /* NT <= 3 is used; 6 keeps every dispatched size in bounds */
  for (int i = 0; i < NP; i++)
    for (int t = 0; t < NT; t++) acc[i][t] = _mm512_setzero_ps();
  const int nb = Kp / RT_BLOCK, ld = X->ld;
  for (int b = 0; b < nb; b++) {
    __m512i ai[MAX_NP][6];
    for (int i = 0; i < NP; i++)
      for (int t = 0; t < NT; t++) ai[i][t] = _mm512_setzero_si512();
    for (int q = 0; q < RT_BLOCK / 4; q++) {
      const int64_t kk = (int64_t)b * (RT_BLOCK / 4) + q;
      __m512i w[MAX_NP];
      for (int i = 0; i < NP; i++) w[i] = _mm512_load_si512(W + i * ps + kk * 64);
      for (int t = 0; t < NT; t++) {
        int32_t quad;
        memcpy(&quad, X->q + (int64_t)(t0 + t) * ld + 4 * kk, 4);
        const __m512i xb = _mm512_set1_epi32(quad);
        for (int i = 0; i < NP; i++) ai[i][t] = _mm512_dpbusd_epi32(ai[i][t], w[i], xb);
      }
    }
    __m512 ws[MAX_NP];
    for (int i = 0; i < NP; i++) ws[i] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(S + i * ss + b * 16)));
    for (int t = 0; t < NT; t++) {
      const int64_t o = (int64_t)(t0 + t) * (ld / RT_BLOCK) + b;
      const __m512i corr = _mm512_set1_epi32(128 * X->sum[o]);
      const __m512 xs = _mm512_set1_ps(X->s[o]);
      for (int i = 0; i < NP; i++)
        acc[i][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(ai[i][t], corr)), _mm512_mul_ps(ws[i], xs),
                                    acc[i][t]);
    }
  }
  for (int t = 0; t < NT; t++)
    for (int i = 0; i < NP; i++) _mm512_storeu_ps(Y + (int64_t)t * ldy + i * 16, acc[i][t]);
}
#endif

/* calls TILE(..., NP, NT) with NP, NT as compile-time constants (so the accumulators live in registers) */
#define DISPATCH_NP_NT(TILE, np, nt, ...)                                  \
  switch ((np) * 8 + (nt)) {                                               \
    case 1 * 8 + 1: TILE(__VA_ARGS__, 1, 1); break;                        \
    case 1 * 8 + 2: TILE(__VA_ARGS__, 1, 2); break;                        \
    case 1 * 8 + 3: TILE(__VA_ARGS__, 1, 3); break;                        \
    case 1 * 8 + 4: TILE(__VA_ARGS__, 1, 4); break;                        \
    case 1 * 8 + 5: TILE(__VA_ARGS__, 1, 5); break;                        \
    case 1 * 8 + 6: TILE(__VA_ARGS__, 1, 6); break;                        \
    case 2 * 8 + 1: TILE(__VA_ARGS__, 2, 1); break;                        \
    case 2 * 8 + 2: TILE(__VA_ARGS__, 2, 2); break;                        \
    case 2 * 8 + 3: TILE(__VA_ARGS__, 2, 3); break;                        \
    case 2 * 8 + 4: TILE(__VA_ARGS__, 2, 4); break;                        \
    case 2 * 8 + 5: TILE(__VA_ARGS__, 2, 5); break;                        \
    case 2 * 8 + 6: TILE(__VA_ARGS__, 2, 6); break;                        \
    case 3 * 8 + 1: TILE(__VA_ARGS__, 3, 1); break;                        \
    case 3 * 8 + 2: TILE(__VA_ARGS__, 3, 2); break;                        \
    case 3 * 8 + 3: TILE(__VA_ARGS__, 3, 3); break;                        \
    case 3 * 8 + 4: TILE(__VA_ARGS__, 3, 4); break;                        \
    case 3 * 8 + 5: TILE(__VA_ARGS__, 3, 5); break;                        \
    case 3 * 8 + 6: TILE(__VA_ARGS__, 3, 6); break;                        \
    case 4 * 8 + 1: TILE(__VA_ARGS__, 4, 1); break;                        \
    case 4 * 8 + 2: TILE(__VA_ARGS__, 4, 2); break;                        \
    case 4 * 8 + 3: TILE(__VA_ARGS__, 4, 3); break;                        \
    case 4 * 8 + 4: TILE(__VA_ARGS__, 4, 4); break;                        \
    case 4 * 8 + 5: TILE(__VA_ARGS__, 4, 5); break;                        \
    case 4 * 8 + 6: TILE(__VA_ARGS__, 4, 6); break;                        \
    default: break;                                                        \
  }
#endif /* RT_AVX512 */

/* ------------------------------------------------------------------ panel tiles, portable C */

static void tile_generic(const rt_mat* W, int64_t p, int np, const rt_act* X, int t0, int nt, float* Y, int ldy) {
  const int64_t Kp = kpad(W), nb = Kp / RT_BLOCK;
  for (int t = 0; t < nt; t++)
    for (int i = 0; i < np; i++) {
      float acc[RT_PANEL_ROWS] = {0};
      if (W->dtype == RT_F32) {
        const float* w = (const float*)W->data + (p + i) * panel_elems(W);
        const float* x = X->f + (int64_t)(t0 + t) * X->ld;
        for (int64_t k = 0; k < Kp; k++)
          for (int j = 0; j < 16; j++) acc[j] += w[k * 16 + j] * x[k];
      } else if (W->dtype == RT_BF16) {
        const uint16_t* w = (const uint16_t*)W->data + (p + i) * panel_elems(W);
        const uint16_t* x = X->b + (int64_t)(t0 + t) * X->ld;
        for (int64_t k = 0; k < Kp; k += 2)
          for (int j = 0; j < 16; j++)
            acc[j] += bf16_to_f32(w[k * 16 + 2 * j]) * bf16_to_f32(x[k]) +
                      bf16_to_f32(w[k * 16 + 2 * j + 1]) * bf16_to_f32(x[k + 1]);
      } else {
        const uint8_t* w = (const uint8_t*)W->data + (p + i) * panel_elems(W);
        const uint16_t* s = W->scales + (p + i) * panel_scales(W);
        const int8_t* x = X->q + (int64_t)(t0 + t) * X->ld;
        const float* xs = X->s + (int64_t)(t0 + t) * nb;
        for (int64_t b = 0; b < nb; b++) {
          int32_t dot[RT_PANEL_ROWS] = {0};
          for (int64_t k = b * RT_BLOCK; k < (b + 1) * RT_BLOCK; k++)
            for (int j = 0; j < 16; j++) dot[j] += ((int32_t)w[(k / 4) * 64 + j * 4 + k % 4] - 128) * x[k];
          for (int j = 0; j < 16; j++) acc[j] += (float)dot[j] * f16_to_f32(s[b * 16 + j]) * xs[b];
        }
      }
      memcpy(Y + (int64_t)t * ldy + i * 16, acc, sizeof(acc));
    }
}

void panel_matmul(const rt_mat* W, int p0, int p1, const rt_act* X, int T, float* Y, int ldy) {
  const int64_t Kp = kpad(W);
  const int max_nt = W->dtype == RT_I8 ? 3 : 6;
  for (int p = p0; p < p1; p += MAX_NP) {
    const int np = RT_MIN(MAX_NP, p1 - p);
    for (int t = 0; t < T; t += max_nt) {
      const int nt = RT_MIN(max_nt, T - t);
      float* y = Y + (int64_t)t * ldy + (int64_t)p * 16;
      int done = 0;
#ifdef RT_AVX512
      const int64_t ps = panel_elems(W);
      if (W->dtype == RT_F32) {
        DISPATCH_NP_NT(tile_f32, np, nt, (const float*)W->data + p * ps, ps, (int)Kp, X->f + (int64_t)t * X->ld, X->ld, y, ldy);
        done = 1;
      }
#ifdef RT_AVX512BF16
      if (W->dtype == RT_BF16) {
        DISPATCH_NP_NT(tile_bf16, np, nt, (const uint16_t*)W->data + p * ps, ps, (int)Kp, X->b + (int64_t)t * X->ld, X->ld, y,
                       ldy);
        done = 1;
      }
#endif
#ifdef RT_VNNI
      if (W->dtype == RT_I8) {
        const int64_t ss = panel_scales(W);
        DISPATCH_NP_NT(tile_i8, np, nt, (const uint8_t*)W->data + p * ps, ps, W->scales + p * ss, ss, (int)Kp, X, t, y, ldy);
        done = 1;
      }
#endif
#endif
      if (!done) tile_generic(W, p, np, X, t, nt, y, ldy);
    }
  }
}

/* Y[t, 16 i + j] = W panel i row j . X[t] for np <= 4 panels starting at W (ps elements apart) and
 * nt <= 6 rows of X (f32 rows, or bf16 rows for bf16 panels; ldx apart), K = Kp (a multiple of
 * 32): the attention's q . k over panels of 16 cached keys. */
void panel_tile(int dtype, const void* W, int64_t ps, int Kp, const void* X, int ldx, float* Y, int ldy, int np, int nt) {
#ifdef RT_AVX512
  if (dtype == RT_F32) {
    DISPATCH_NP_NT(tile_f32, np, nt, (const float*)W, ps, Kp, (const float*)X, ldx, Y, ldy);
    return;
  }
#ifdef RT_AVX512BF16
  if (dtype == RT_BF16) {
    DISPATCH_NP_NT(tile_bf16, np, nt, (const uint16_t*)W, ps, Kp, (const uint16_t*)X, ldx, Y, ldy);
    return;
  }
#endif
#endif
  for (int t = 0; t < nt; t++)
    for (int i = 0; i < np; i++)
      for (int j = 0; j < RT_PANEL_ROWS; j++) {
        float acc = 0.0f;
        for (int k = 0; k < Kp; k++)
          acc += dtype == RT_F32
                     ? ((const float*)W)[i * ps + (int64_t)k * 16 + j] * ((const float*)X)[(int64_t)t * ldx + k]
                     : bf16_to_f32(((const uint16_t*)W)[i * ps + (int64_t)(k / 2) * 32 + j * 2 + k % 2]) *
                           bf16_to_f32(((const uint16_t*)X)[(int64_t)t * ldx + k]);
        Y[(int64_t)t * ldy + i * 16 + j] = acc;
      }
}

/* ------------------------------------------------------------------ rows */

void row_axpy(const rt_mat* W, int64_t row, float s, int k0, int k1, float* y) {
  const int64_t Kp = kpad(W);
  const int n = k1 - k0;
  /* every update is one fused multiply-add, vector or scalar, so that a neuron's contribution is
   * rounded the same whichever kernel adds it (rows_axpy adds four rows per pass the same way) */
  if (W->dtype == RT_F32) {
    const float* w = (const float*)W->data + row * Kp + k0;
    int k = 0;
#ifdef RT_AVX512
    const __m512 sv = _mm512_set1_ps(s);
    for (; k + 16 <= n; k += 16) _mm512_storeu_ps(y + k, _mm512_fmadd_ps(_mm512_loadu_ps(w + k), sv, _mm512_loadu_ps(y + k)));
#endif
    for (; k < n; k++) y[k] = fmaf(w[k], s, y[k]);
  } else if (W->dtype == RT_BF16) {
    const uint16_t* w = (const uint16_t*)W->data + row * Kp + k0;
    int k = 0;
#ifdef RT_AVX512
    const __m512 sv = _mm512_set1_ps(s);
    for (; k + 16 <= n; k += 16) {
      const __m512 wf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(w + k))), 16));
      _mm512_storeu_ps(y + k, _mm512_fmadd_ps(wf, sv, _mm512_loadu_ps(y + k)));
    }
#endif
    for (; k < n; k++) y[k] = fmaf(bf16_to_f32(w[k]), s, y[k]);
  } else {
    const uint8_t* w = (const uint8_t*)W->data + row * rt_row_bytes(Kp);
    const uint16_t* ws = (const uint16_t*)(w + Kp);
    for (int b = k0 / RT_BLOCK; b * RT_BLOCK < k1; b++) {
      const float sb = s * f16_to_f32(ws[b]);
      const int lo = b * RT_BLOCK, hi = RT_MIN(lo + RT_BLOCK, k1);
      int k = lo;
#ifdef RT_AVX512
      const __m512 sv = _mm512_set1_ps(sb);
      const __m128i off = _mm_set1_epi8((char)0x80);
      for (; k + 16 <= hi; k += 16) {  /* u8 ^ 0x80 is the signed code */
        const __m128i q = _mm_xor_si128(_mm_loadu_si128((const __m128i*)(w + k)), off);
        const __m512 wf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
        _mm512_storeu_ps(y + k - k0, _mm512_fmadd_ps(wf, sv, _mm512_loadu_ps(y + k - k0)));
      }
#endif
      for (; k < hi; k++) y[k - k0] = fmaf((float)((int32_t)w[k] - 128), sb, y[k - k0]);
    }
  }
}

void mat_row(const rt_mat* W, int64_t n, float* out) {
  const int64_t Kp = kpad(W), K = W->cols;
  if (W->layout == RT_ROWS) {
    memset(out, 0, (size_t)K * sizeof(float));
    row_axpy(W, n, 1.0f, 0, (int)K, out);
    return;
  }
  const int64_t p = n / RT_PANEL_ROWS, j = n % RT_PANEL_ROWS;
  for (int64_t k = 0; k < K; k++) {
    if (W->dtype == RT_F32) {
      out[k] = ((const float*)W->data)[p * panel_elems(W) + k * 16 + j];
    } else if (W->dtype == RT_BF16) {
      out[k] = bf16_to_f32(((const uint16_t*)W->data)[p * panel_elems(W) + (k / 2) * 32 + j * 2 + k % 2]);
    } else {
      const uint8_t q = ((const uint8_t*)W->data)[p * panel_elems(W) + (k / 4) * 64 + j * 4 + k % 4];
      out[k] = ((float)q - 128.0f) * f16_to_f32(W->scales[p * panel_scales(W) + (k / RT_BLOCK) * 16 + j]);
    }
  }
  (void)Kp;
}
