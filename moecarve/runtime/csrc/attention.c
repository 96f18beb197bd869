/* The attention block: norm -> fused q/k/v product -> q/k norms and RoPE -> the KV cache ->
 * attention of each (token, head) over its sequence's cached positions -> output product ->
 * residual. A step's tokens may belong to different sequences (slots) at any positions: a prompt's
 * tokens (prefill), one token of each of several sequences (batched decode), or both. Every token
 * writes its keys and values first, then attends causally to positions <= its own, so a prefill of
 * n tokens and n single-token steps compute the same thing. */
#include <math.h>
#include <string.h>

#include "internal.h"

/* ------------------------------------------------------------------ RoPE */

int rope_tables(rt_ctx* c) {
  const rt_desc* D = &c->desc;
  const int half = D->rot / 2;
  for (int l = 0; l < D->n_layers; l++) {
    const rt_layer* L = &D->layers[l];
    rt_rope* r = &c->ropes[l];
    r->inv_freq = L->inv_freq;
    r->scale = L->rope_scale;
    r->cs = NULL;
    if (!L->inv_freq) continue;
    for (int j = 0; j < l; j++)  /* layers with the same frequencies share one table */
      if (c->ropes[j].cs && c->ropes[j].scale == r->scale &&
          !memcmp(c->ropes[j].inv_freq, L->inv_freq, (size_t)half * sizeof(float))) {
        r->cs = c->ropes[j].cs;
        break;
      }
    if (r->cs) continue;
    r->cs = (float*)rt_alloc((size_t)D->max_ctx * half * 2 * sizeof(float));
    if (!r->cs) return -1;
    for (int p = 0; p < D->max_ctx; p++)
      for (int i = 0; i < half; i++) {
        const float angle = (float)p * L->inv_freq[i];  /* float32, as transformers computes it */
        r->cs[(int64_t)p * half + i] = (float)cos((double)angle) * r->scale;
        r->cs[((int64_t)D->max_ctx + p) * half + i] = (float)sin((double)angle) * r->scale;
      }
  }
  return 0;
}

/* rotate v[0..rot) of one head at position p (the "rotate half" convention: pairs (i, i + rot/2)) */
static void rope_head(float* v, const rt_rope* r, int rot, int max_ctx, int p) {
  const int half = rot / 2;
  const float* cs = r->cs + (int64_t)p * half;
  const float* sn = r->cs + ((int64_t)max_ctx + p) * half;
#pragma omp simd
  for (int i = 0; i < half; i++) {
    const float a = v[i], b = v[i + half];
    v[i] = a * cs[i] - b * sn[i];
    v[i + half] = b * cs[i] + a * sn[i];
  }
}

/* ------------------------------------------------------------------ the KV cache */

static inline int64_t kv_offset(const rt_desc* D, int l, int slot, int g, int pos) {
  return ((((int64_t)l * D->max_slots + slot) * D->Hkv + g) * D->max_ctx + pos) * D->hd;
}

static void kv_store(void* cache, int dtype, int64_t off, const float* v, int hd) {
  if (dtype == RT_F32) {
    memcpy((float*)cache + off, v, (size_t)hd * sizeof(float));
  } else {
    uint16_t* o = (uint16_t*)cache + off;
    for (int i = 0; i < hd; i++) o[i] = f32_to_bf16(v[i]);
  }
}

static inline float kv_dot(const void* cache, int dtype, int64_t off, const float* q, int hd) {
  float acc = 0.0f;
  if (dtype == RT_F32) {
    const float* k = (const float*)cache + off;
#pragma omp simd reduction(+ : acc)
    for (int i = 0; i < hd; i++) acc += q[i] * k[i];
  } else {
    const uint16_t* k = (const uint16_t*)cache + off;
#pragma omp simd reduction(+ : acc)
    for (int i = 0; i < hd; i++) acc += q[i] * bf16_to_f32(k[i]);
  }
  return acc;
}

static inline void kv_axpy(const void* cache, int dtype, int64_t off, float p, float* out, int hd) {
  if (dtype == RT_F32) {
    const float* v = (const float*)cache + off;
#pragma omp simd
    for (int i = 0; i < hd; i++) out[i] += p * v[i];
  } else {
    const uint16_t* v = (const uint16_t*)cache + off;
#pragma omp simd
    for (int i = 0; i < hd; i++) out[i] += p * bf16_to_f32(v[i]);
  }
}

/* ------------------------------------------------------------------ the block */

/* per-head RMSNorm (weights [hd]) or, full = 1, one RMSNorm over all n heads (weights [n * hd]) */
static void qk_norm(float* v, int n, int hd, const float* w, int full, float eps) {
  if (full) {
    rms_norm(v, w, n * hd, eps, v);
  } else {
    for (int h = 0; h < n; h++) rms_norm(v + (int64_t)h * hd, w, hd, eps, v + (int64_t)h * hd);
  }
}

/* q/k norms, RoPE and the cache writes of token t */
static void place_token(rt_ctx* c, const rt_layer* L, int l, int t) {
  const rt_desc* D = &c->desc;
  float* q = c->qkv + (int64_t)t * c->qkv_n;
  float* k = q + (int64_t)D->H * D->hd;
  const float* v = k + (int64_t)D->Hkv * D->hd;
  const int p = c->pos[t], s = c->slot[t];
  if (L->q_norm) qk_norm(q, D->H, D->hd, L->q_norm, L->qk_norm_full, D->norm_eps);
  if (L->k_norm) qk_norm(k, D->Hkv, D->hd, L->k_norm, L->qk_norm_full, D->norm_eps);
  if (L->inv_freq) {
    for (int h = 0; h < D->H; h++) rope_head(q + (int64_t)h * D->hd, &c->ropes[l], D->rot, D->max_ctx, p);
    for (int h = 0; h < D->Hkv; h++) rope_head(k + (int64_t)h * D->hd, &c->ropes[l], D->rot, D->max_ctx, p);
  }
  for (int g = 0; g < D->Hkv; g++) {
    const int64_t off = kv_offset(D, l, s, g, p);
    kv_store(c->k_cache, D->kv_dtype, off, k + (int64_t)g * D->hd, D->hd);
    kv_store(c->v_cache, D->kv_dtype, off, v + (int64_t)g * D->hd, D->hd);
  }
}

/* softmax(q . K^T * scale) V for token t's head h over its slot's positions (window-limited) */
static void attend(rt_ctx* c, const rt_layer* L, int l, int t, int h, float* scores) {
  const rt_desc* D = &c->desc;
  const int hd = D->hd, p = c->pos[t], g = h / (D->H / D->Hkv);
  const int lo = L->window > 0 && p - L->window + 1 > 0 ? p - L->window + 1 : 0, n = p - lo + 1;
  const float* q = c->qkv + (int64_t)t * c->qkv_n + (int64_t)h * hd;
  float* out = c->a_att.f + (int64_t)t * c->a_att.ld + (int64_t)h * hd;
  const int64_t base = kv_offset(D, l, c->slot[t], g, lo);
  for (int j = 0; j < n; j++) {
    float s = kv_dot(c->k_cache, D->kv_dtype, base + (int64_t)j * hd, q, hd) * D->attn_scale;
    if (D->attn_softcap > 0.0f) s = tanhf(s / D->attn_softcap) * D->attn_softcap;
    scores[j] = s;
  }
  softmax_inplace(scores, n);
  memset(out, 0, (size_t)hd * sizeof(float));
  for (int j = 0; j < n; j++) kv_axpy(c->v_cache, D->kv_dtype, base + (int64_t)j * hd, scores[j], out, hd);
}

void attention_block(rt_ctx* c, const rt_layer* L, int l, int tid, int nth) {
  const rt_desc* D = &c->desc;
  const int T = c->T;
  int64_t t0, t1;
  int p0, p1;
  rt_share(T, tid, nth, &t0, &t1);

  norm_rows(c, &L->in_norm, c->x, D->d, &c->a_in, D->d, L->wqkv.dtype, (int)t0, (int)t1);
  pool_barrier(c->pool);

  panel_share(&L->wqkv, tid, nth, &p0, &p1);
  panel_matmul(&L->wqkv, p0, p1, &c->a_in, T, c->qkv, (int)c->qkv_n);
  if (L->bqkv) {
    const int n0 = p0 * RT_PANEL_ROWS, n1 = RT_MIN(p1 * RT_PANEL_ROWS, L->wqkv.rows);
    for (int t = 0; t < T; t++)
      for (int n = n0; n < n1; n++) c->qkv[(int64_t)t * c->qkv_n + n] += L->bqkv[n];
  }
  pool_barrier(c->pool);

  for (int64_t t = t0; t < t1; t++) place_token(c, L, l, (int)t);
  pool_barrier(c->pool);

  int64_t i0, i1;  /* (token, head) pairs */
  rt_share((int64_t)T * D->H, tid, nth, &i0, &i1);
  float* scores = c->att_scratch + (int64_t)tid * D->max_ctx;
  for (int64_t i = i0; i < i1; i++) attend(c, L, l, (int)(i / D->H), (int)(i % D->H), scores);
  pool_barrier(c->pool);

  act_convert(&c->a_att, (int)c->att_n, L->wo.dtype, (int)t0, (int)t1);
  pool_barrier(c->pool);

  panel_share(&L->wo, tid, nth, &p0, &p1);
  panel_matmul(&L->wo, p0, p1, &c->a_att, T, c->tmp, (int)c->dp);
  const int n0 = p0 * RT_PANEL_ROWS, n1 = RT_MIN(p1 * RT_PANEL_ROWS, D->d);
  if (L->bo)
    for (int t = 0; t < T; t++)
      for (int n = n0; n < n1; n++) c->tmp[(int64_t)t * c->dp + n] += L->bo[n];
  if (!L->post_attn_norm.w) {  /* the residual add of this thread's own columns: no barrier needed */
    for (int t = 0; t < T; t++)
      for (int n = n0; n < n1; n++) c->x[(int64_t)t * D->d + n] += c->tmp[(int64_t)t * c->dp + n] * D->residual_scale;
    pool_barrier(c->pool);
    return;
  }
  pool_barrier(c->pool);
  residual_rows(c, &L->post_attn_norm, c->tmp, (int)c->dp, (int)t0, (int)t1);
  pool_barrier(c->pool);
}
