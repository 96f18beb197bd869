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

/* rotate v[0..rot) of one head at position p: pairs (i, i + rot/2) ("rotate half", Llama), or
 * (2i, 2i+1) when interleaved (GPT-J, Cohere, GLM), by the angle of frequency i */
static void rope_head(float* v, const rt_rope* r, int rot, int max_ctx, int p, int interleaved) {
  const int half = rot / 2;
  const float* cs = r->cs + (int64_t)p * half;
  const float* sn = r->cs + ((int64_t)max_ctx + p) * half;
  if (interleaved) {
    for (int i = 0; i < half; i++) {
      const float a = v[2 * i], b = v[2 * i + 1];
      v[2 * i] = a * cs[i] - b * sn[i];
      v[2 * i + 1] = b * cs[i] + a * sn[i];
    }
    return;
  }
#pragma omp simd
  for (int i = 0; i < half; i++) {
    const float a = v[i], b = v[i + half];
    v[i] = a * cs[i] - b * sn[i];
    v[i + half] = b * cs[i] + a * sn[i];
  }
}

/* ------------------------------------------------------------------ the KV cache
 * Per (layer, slot, kv head), ctx_p positions of hdp (head_dim padded to 32) elements each:
 *   keys    in panels of 16 positions, [ctx_p/16][hdp/kp][16][kp] (kp = 1 f32, 2 bf16): the layout of
 *           the weight panels, so q . K^T for 16 positions is one panel tile (rt.h);
 *   values  row-major [ctx_p][hdp], added up one position at a time. */

static inline int64_t kv_base(const rt_ctx* c, int l, int slot, int g) {
  const rt_desc* D = &c->desc;
  return (((int64_t)l * D->max_slots + slot) * D->Hkv + g) * c->ctx_p * c->hdp;
}

static void kv_store(rt_ctx* c, int l, int slot, int g, int p, const float* k, const float* v) {
  const rt_desc* D = &c->desc;
  const int64_t base = kv_base(c, l, slot, g), panel = base + (int64_t)(p / RT_PANEL_ROWS) * RT_PANEL_ROWS * c->hdp;
  const int j = p % RT_PANEL_ROWS, hd = D->hd;
  if (D->kv_dtype == RT_F32) {
    float* K = (float*)c->k_cache + panel;
    for (int i = 0; i < hd; i++) K[i * 16 + j] = k[i];
    memcpy((float*)c->v_cache + base + (int64_t)p * c->hdp, v, (size_t)hd * sizeof(float));
  } else {
    uint16_t* K = (uint16_t*)c->k_cache + panel;
    for (int i = 0; i < hd; i++) K[(i / 2) * 32 + j * 2 + i % 2] = f32_to_bf16(k[i]);
    uint16_t* V = (uint16_t*)c->v_cache + base + (int64_t)p * c->hdp;
    for (int i = 0; i < hd; i++) V[i] = f32_to_bf16(v[i]);
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
  if (L->q_norm && !L->qk_norm_after_rope) qk_norm(q, D->H, D->hd, L->q_norm, L->qk_norm_full, L->qk_eps);
  if (L->k_norm && !L->qk_norm_after_rope) qk_norm(k, D->Hkv, D->hd, L->k_norm, L->qk_norm_full, L->qk_eps);
  if (L->inv_freq) {
    for (int h = 0; h < D->H; h++) rope_head(q + (int64_t)h * D->hd, &c->ropes[l], D->rot, D->max_ctx, p, D->rope_interleaved);
    for (int h = 0; h < D->Hkv; h++) rope_head(k + (int64_t)h * D->hd, &c->ropes[l], D->rot, D->max_ctx, p, D->rope_interleaved);
  }
  if (L->q_norm && L->qk_norm_after_rope) qk_norm(q, D->H, D->hd, L->q_norm, L->qk_norm_full, L->qk_eps);
  if (L->k_norm && L->qk_norm_after_rope) qk_norm(k, D->Hkv, D->hd, L->k_norm, L->qk_norm_full, L->qk_eps);
  for (int g = 0; g < D->Hkv; g++) kv_store(c, l, s, g, p, k + (int64_t)g * D->hd, v + (int64_t)g * D->hd);
}

/* out_r[0..hd) = sum_j P_r[j] V[j] for r < nr rows and n value rows V [n][hdp] (f32 or bf16).
 * Each value row is read once for all rows; with AVX-512 the nr x 64 outputs of a 64-wide
 * slice stay in registers across j. */
#ifdef RT_AVX512
static inline __attribute__((always_inline)) void pv_slice(const void* V, int bf16, int64_t hdp, int i0,
                                                           const float* const* P, int n, float* const* out, const int NR) {
  __m512 acc[RT_ATT_ROWS][4];
  for (int r = 0; r < NR; r++)
    for (int k = 0; k < 4; k++) acc[r][k] = _mm512_setzero_ps();
  for (int j = 0; j < n; j++) {
    __m512 v[4];
    for (int k = 0; k < 4; k++) {
      const int64_t o = (int64_t)j * hdp + i0 + 16 * k;
      v[k] = bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)((const uint16_t*)V + o))), 16))
                  : _mm512_loadu_ps((const float*)V + o);
    }
    for (int r = 0; r < NR; r++) {
      const __m512 p = _mm512_set1_ps(P[r][j]);
      for (int k = 0; k < 4; k++) acc[r][k] = _mm512_fmadd_ps(p, v[k], acc[r][k]);
    }
  }
  for (int r = 0; r < NR; r++)
    for (int k = 0; k < 4; k++) _mm512_storeu_ps(out[r] + i0 + 16 * k, acc[r][k]);
}
#endif

static void weighted_values(const void* V, int dtype, int64_t hdp, int hd, const float* const* P, int n, int nr,
                            float* const* out) {
  int i0 = 0;
#ifdef RT_AVX512
  const int bf16 = dtype != RT_F32;
  for (; i0 + 64 <= hd; i0 += 64) {
    switch (nr) {
      case 1: pv_slice(V, bf16, hdp, i0, P, n, out, 1); break;
      case 2: pv_slice(V, bf16, hdp, i0, P, n, out, 2); break;
      case 3: pv_slice(V, bf16, hdp, i0, P, n, out, 3); break;
      case 4: pv_slice(V, bf16, hdp, i0, P, n, out, 4); break;
      case 5: pv_slice(V, bf16, hdp, i0, P, n, out, 5); break;
      default: pv_slice(V, bf16, hdp, i0, P, n, out, 6); break;
    }
  }
#endif
  for (int r = 0; r < nr; r++) memset(out[r] + i0, 0, (size_t)(hd - i0) * sizeof(float));
  for (int j = 0; j < n && i0 < hd; j++)
    for (int r = 0; r < nr; r++) {
      const float pr = P[r][j];
      for (int i = i0; i < hd; i++) {
        const int64_t o = (int64_t)j * hdp + i;
        out[r][i] += pr * (dtype == RT_F32 ? ((const float*)V)[o] : bf16_to_f32(((const uint16_t*)V)[o]));
      }
    }
}

/* One attention item: up to RT_ATT_ROWS query rows (token it->t0 + i, head it->h0 + j) of one
 * sequence and kv head, each over its own positions [lo_r, pos_r]: scores for every panel of 16
 * keys the rows need (one tile), masked per row, softmax, then out_r = sum_j p_rj v_j with each
 * value row read once for all rows. scratch: RT_ATT_ROWS * (ctx_p + hdp) floats. */
static void attend(rt_ctx* c, const rt_layer* L, int l, const rt_att_item* it, float* scratch) {
  const rt_desc* D = &c->desc;
  const int hd = D->hd, hdp = (int)c->hdp, nr = it->nt * it->nh, slot = c->slot[it->t0];
  const int64_t ctx_p = c->ctx_p, base = kv_base(c, l, slot, it->g);
  float* S = scratch;                          /* [nr][ctx_p] */
  float* Q = scratch + RT_ATT_ROWS * ctx_p;    /* [nr][hdp] f32, or bf16 in its first half */
  int lo[RT_ATT_ROWS], hi[RT_ATT_ROWS], lo_all = INT32_MAX, hi_all = 0;
  for (int r = 0; r < nr; r++) {
    const int t = it->t0 + r / it->nh, h = it->h0 + r % it->nh, p = c->pos[t];
    const float* q = c->qkv + (int64_t)t * c->qkv_n + (int64_t)h * hd;
    hi[r] = p;
    lo[r] = L->window > 0 && p - L->window + 1 > 0 ? p - L->window + 1 : 0;
    lo_all = RT_MIN(lo_all, lo[r]);
    hi_all = RT_MAX(hi_all, hi[r]);
    if (D->kv_dtype == RT_F32) {
      memcpy(Q + (int64_t)r * hdp, q, (size_t)hd * sizeof(float));
      memset(Q + (int64_t)r * hdp + hd, 0, (size_t)(hdp - hd) * sizeof(float));
    } else {
      uint16_t* qb = (uint16_t*)Q + (int64_t)r * hdp;
      for (int i = 0; i < hdp; i++) qb[i] = i < hd ? f32_to_bf16(q[i]) : 0;
    }
  }
  const int p0 = lo_all / RT_PANEL_ROWS, p1 = hi_all / RT_PANEL_ROWS;  /* key panels, inclusive */
  const int64_t ps = (int64_t)RT_PANEL_ROWS * hdp;
  const void* K = D->kv_dtype == RT_F32 ? (const void*)((const float*)c->k_cache + base)
                                        : (const void*)((const uint16_t*)c->k_cache + base);
  for (int p = p0; p <= p1; p += 4) {
    const int np = RT_MIN(4, p1 - p + 1);
    const void* Kp = D->kv_dtype == RT_F32 ? (const void*)((const float*)K + p * ps) : (const void*)((const uint16_t*)K + p * ps);
    panel_tile(D->kv_dtype, Kp, ps, hdp, Q, hdp, S + (int64_t)(p - p0) * RT_PANEL_ROWS, (int)ctx_p, np, nr);
  }
  const int off = p0 * RT_PANEL_ROWS, n_all = hi_all - lo_all + 1;
  float* P[RT_ATT_ROWS];  /* row r's probabilities for positions lo_all .. hi_all (0 outside its own range) */
  for (int r = 0; r < nr; r++) {
    P[r] = S + (int64_t)r * ctx_p + (lo_all - off);
    float* s = S + (int64_t)r * ctx_p + (lo[r] - off);
    const int n = hi[r] - lo[r] + 1;
    if (D->attn_softcap > 0.0f) {
      for (int j = 0; j < n; j++) s[j] = tanhf(s[j] * D->attn_scale / D->attn_softcap) * D->attn_softcap;
    } else {
#pragma omp simd
      for (int j = 0; j < n; j++) s[j] *= D->attn_scale;
    }
    softmax_inplace(s, n);
    for (int j = lo_all; j < lo[r]; j++) P[r][j - lo_all] = 0.0f;
    for (int j = hi[r] + 1; j <= hi_all; j++) P[r][j - lo_all] = 0.0f;
  }
  float* out[RT_ATT_ROWS];
  for (int r = 0; r < nr; r++) {
    const int t = it->t0 + r / it->nh, h = it->h0 + r % it->nh;
    out[r] = c->a_att.f + (int64_t)t * c->a_att.ld + (int64_t)h * hd;
  }
  const void* V = D->kv_dtype == RT_F32 ? (const void*)((const float*)c->v_cache + base + (int64_t)lo_all * hdp)
                                        : (const void*)((const uint16_t*)c->v_cache + base + (int64_t)lo_all * hdp);
  weighted_values(V, D->kv_dtype, hdp, hd, (const float* const*)P, n_all, nr, out);
}

/* The step's attention items (the same for every layer): runs of consecutive tokens of one
 * sequence, split per kv head into groups of at most RT_ATT_ROWS (token, head) rows. */
int attention_items(rt_ctx* c) {
  const rt_desc* D = &c->desc;
  const int grp = D->H / D->Hkv, nh = RT_MIN(grp, RT_ATT_ROWS), per = RT_MAX(1, RT_ATT_ROWS / nh);
  int n = 0;
  for (int t = 0; t < c->T;) {
    int e = t + 1;  /* tokens [t, e) of one slot at consecutive positions */
    while (e < c->T && c->slot[e] == c->slot[t] && c->pos[e] == c->pos[e - 1] + 1) e++;
    for (int g = 0; g < D->Hkv; g++)
      for (int t0 = t; t0 < e; t0 += per)
        for (int h0 = 0; h0 < grp; h0 += nh) {
          rt_att_item* it = &c->items[n++];
          it->t0 = t0;
          it->nt = RT_MIN(per, e - t0);
          it->g = g;
          it->h0 = g * grp + h0;
          it->nh = RT_MIN(nh, grp - h0);
        }
    t = e;
  }
  c->n_items = n;
  return n;
}

void attention_block(rt_th* th, const rt_layer* L, int l) {
  rt_ctx* c = th->c;
  const rt_desc* D = &c->desc;
  const int T = c->T;

  FOR_ITEMS(th, t, T) norm_token(c, &L->in_norm, c->x, D->d, &c->a_in, D->d, L->wqkv.dtype, (int)t);
  phase_end(th, T);

  int64_t groups = panel_groups(panels_of(&L->wqkv));
  FOR_ITEMS(th, g, groups) {
    int n0, n1;
    panel_group(&L->wqkv, g, &c->a_in, T, c->qkv, (int)c->qkv_n, &n0, &n1);
    if (L->bqkv)
      for (int t = 0; t < T; t++)
        for (int n = n0; n < n1; n++) c->qkv[(int64_t)t * c->qkv_n + n] += L->bqkv[n];
  }
  phase_end(th, groups);
  prof_mark(c, th->tid, PROF_QKV);

  FOR_ITEMS(th, t, T) place_token(c, L, l, (int)t);
  phase_end(th, T);

  float* scratch = c->att_scratch + (int64_t)th->tid * c->att_scratch_len;
  FOR_ITEMS(th, i, c->n_items) attend(c, L, l, &c->items[i], scratch);
  phase_end(th, c->n_items);

  FOR_ITEMS(th, t, T) act_convert(&c->a_att, (int)c->att_n, L->wo.dtype, (int)t, (int)t + 1);
  phase_end(th, T);
  prof_mark(c, th->tid, PROF_ATTENTION);

  float* xr = residual_of(c, L);
  groups = panel_groups(panels_of(&L->wo));
  FOR_ITEMS(th, g, groups) {
    int n0, n1;
    panel_group(&L->wo, g, &c->a_att, T, c->tmp, (int)c->dp, &n0, &n1);
    for (int t = 0; t < T; t++) {
      float* y = c->tmp + (int64_t)t * c->dp;
      if (L->bo)
        for (int n = n0; n < n1; n++) y[n] += L->bo[n];
      if (!L->post_attn_norm.w)  /* the residual add of this item's own columns */
        for (int n = n0; n < n1; n++) xr[(int64_t)t * D->d + n] += y[n] * D->residual_scale;
    }
  }
  phase_end(th, groups);
  if (L->post_attn_norm.w) {
    FOR_ITEMS(th, t, T) residual_token(c, xr, &L->post_attn_norm, c->tmp, (int)c->dp, (int)t);
    phase_end(th, T);
  }
  prof_mark(c, th->tid, PROF_WO);
}
