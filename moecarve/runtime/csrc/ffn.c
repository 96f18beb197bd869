/* The feed-forward block: norm -> FFN -> residual, for a dense MLP or a carved MoE layer.
 *
 * Dense: one product for gate and up (panels interleaved, so each thread finishes act(g) * u of its
 * own neurons), one for down.
 * Carved: the router scores every routed expert (the shadow router: 4-bit codes against the int8
 * token), each token picks its experts, the picked (token, expert) slots are sorted by expert, and
 * only the picked neurons are computed: their gate/up rows dotted with the tokens that picked them
 * (each row read once per step), then y += h * down column, split across threads by output
 * feature. Each output is summed in the same order whatever the number of threads. */
#include <math.h>
#include <string.h>

#include "internal.h"
#include "vecmath.h"

/* the shares of the d output features, in whole blocks of 32 (int8 rows scale per block) */
static void feature_share(int d, int tid, int nth, int* k0, int* k1) {
  int64_t b0, b1;
  rt_share((d + RT_BLOCK - 1) / RT_BLOCK, tid, nth, &b0, &b1);
  *k0 = (int)RT_MIN(b0 * RT_BLOCK, d);
  *k1 = (int)RT_MIN(b1 * RT_BLOCK, d);
}

/* rows [r0, r1) of tmp, this thread's columns [n0, n1): + bias, then x += tmp * residual_scale, or
 * (a post-FFN norm needs whole rows) after a barrier, x += norm(tmp) for the thread's share of rows */
static void finish(rt_ctx* c, const rt_layer* L, const float* bias, int n0, int n1, int r0, int r1, int tid, int nth) {
  const rt_desc* D = &c->desc;
  const rt_norm* post = &L->post_ffn_norm;
  float* xr = residual_of(c, L);
  for (int t = r0; t < r1; t++) {
    float* y = c->tmp + (int64_t)t * c->dp;
    if (bias)
      for (int n = n0; n < n1; n++) y[n] += bias[n];
    if (!post->w)
      for (int n = n0; n < n1; n++) xr[(int64_t)t * D->d + n] += y[n] * D->residual_scale;
  }
  pool_barrier(c->pool);
  if (post->w) {
    int64_t t0, t1;
    rt_share(r1 - r0, tid, nth, &t0, &t1);
    residual_rows(c, xr, post, c->tmp, (int)c->dp, (int)(r0 + t0), (int)(r0 + t1));
    pool_barrier(c->pool);
  }
  prof_mark(c, tid, PROF_FFN);
}

/* the rows [r0, r0 + n) of an activation buffer, as one starting at row 0 (a thread-local view) */
static rt_act act_rows(const rt_act* a, int r0) {
  rt_act v = *a;
  const int64_t nb = a->ld / RT_BLOCK;
  v.f += (int64_t)r0 * a->ld;
  v.b += (int64_t)r0 * a->ld;
  v.q += (int64_t)r0 * a->ld;
  v.s += r0 * nb;
  v.sum += r0 * nb;
  return v;
}

/* ------------------------------------------------------------------ dense MLPs */

/* h = act(gate) * up (gated) or act(h) of panels [p0, p1) of in_w into a_h.f, token rows [r0, r1) */
static void dense_up(rt_ctx* c, const rt_dense* F, int gated, int act, int p0, int p1, int r0, int r1) {
  const int64_t ldh = 2 * c->n_max;
  const rt_act x = act_rows(&c->a_in, r0);
  panel_matmul(&F->in_w, p0, p1, &x, r1 - r0, c->hbuf + (int64_t)r0 * ldh, (int)ldh);
  for (int t = r0; t < r1; t++) {
    const float* hb = c->hbuf + (int64_t)t * ldh;
    float* h = c->a_h.f + (int64_t)t * c->a_h.ld;
    if (gated) {  /* panels come in (gate, up) pairs of 16 neurons */
      for (int p = p0; p < p1; p += 2) {
        const int j0 = p / 2 * RT_PANEL_ROWS, nj = RT_MIN(RT_PANEL_ROWS, F->n - j0);
        float g[RT_PANEL_ROWS], u[RT_PANEL_ROWS];
        for (int j = 0; j < nj; j++) {
          g[j] = hb[(int64_t)p * RT_PANEL_ROWS + j] + (F->in_b ? F->in_b[(int64_t)p * RT_PANEL_ROWS + j] : 0.0f);
          u[j] = hb[(int64_t)(p + 1) * RT_PANEL_ROWS + j] + (F->in_b ? F->in_b[(int64_t)(p + 1) * RT_PANEL_ROWS + j] : 0.0f);
        }
        act_inplace(g, nj, act);
        for (int j = 0; j < nj; j++) h[j0 + j] = g[j] * u[j];
      }
    } else {
      const int n0 = p0 * RT_PANEL_ROWS, n1 = RT_MIN(p1 * RT_PANEL_ROWS, F->n);
      for (int n = n0; n < n1; n++) h[n] = hb[n] + (F->in_b ? F->in_b[n] : 0.0f);
      if (n1 > n0) act_inplace(h + n0, n1 - n0, act);
    }
  }
}

/* the shares of in_w's panels: whole (gate, up) pairs when gated */
static void up_share(const rt_dense* F, int gated, int tid, int nth, int* p0, int* p1) {
  const int64_t n = panels_of(&F->in_w) / (gated ? 2 : 1);
  int64_t a, b;
  rt_share(n, tid, nth, &a, &b);
  *p0 = (int)(a * (gated ? 2 : 1));
  *p1 = (int)(b * (gated ? 2 : 1));
}

/* h (a_h.f, already computed) -> a_h converted for out_w, rows [t0, t1), the padding zeroed */
static void convert_hidden(rt_ctx* c, const rt_dense* F, int t0, int t1) {
  const int n = F->n, np = (int)rt_pad(n, RT_BLOCK);
  for (int t = t0; t < t1; t++) memset(c->a_h.f + (int64_t)t * c->a_h.ld + n, 0, (size_t)(np - n) * sizeof(float));
  act_convert(&c->a_h, np, F->out_w.dtype, t0, t1);
}

/* a dense MLP F (a dense layer, or every expert of a carved one) on token rows [r0, r1) */
static void dense_block(rt_ctx* c, const rt_layer* L, const rt_dense* F, const float* out_bias, int r0, int r1, int tid,
                        int nth) {
  int p0, p1;
  int64_t t0, t1;
  rt_share(r1 - r0, tid, nth, &t0, &t1);
  up_share(F, L->gated, tid, nth, &p0, &p1);
  dense_up(c, F, L->gated, L->act, p0, p1, r0, r1);
  pool_barrier(c->pool);
  convert_hidden(c, F, (int)(r0 + t0), (int)(r0 + t1));
  pool_barrier(c->pool);
  panel_share(&F->out_w, tid, nth, &p0, &p1);
  const rt_act h = act_rows(&c->a_h, r0);
  panel_matmul(&F->out_w, p0, p1, &h, r1 - r0, c->tmp + (int64_t)r0 * c->dp, (int)c->dp);
  finish(c, L, out_bias, p0 * RT_PANEL_ROWS, RT_MIN(p1 * RT_PANEL_ROWS, c->desc.d), r0, r1, tid, nth);
}

/* ------------------------------------------------------------------ routers */

static float dot_f32(const float* a, const float* b, int n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int i = 0; i < n; i++) acc += a[i] * b[i];
  return acc;
}

/* scores [T, E] of experts [e0, e1) (fitted: its probe features must be ready) */
static void route_scores(rt_ctx* c, const rt_layer* L, int T, int e0, int e1) {
  const rt_moe* M = &L->moe;
  const int d = c->desc.d, E = M->E, R = L->gated ? 2 * M->m : M->m;
  float* S = c->moe.scores;
  if (e1 <= e0) return;
  if (M->router == RT_ROUTER_SHADOW) {
    const int64_t row_bytes = M->sh_bits == 4 ? d / 2 : d;
    int rc = shadow_scores_q(c->moe.sq, c->moe.sqs, c->moe.sqsum, T, d, M->sh_codes + (int64_t)e0 * R * row_bytes,
                             M->sh_bits == 4 ? 4 : 8, M->sh_scale + (int64_t)e0 * R,
                             M->sh_bias ? M->sh_bias + (int64_t)e0 * R : NULL, e1 - e0, M->m, L->gated, L->act, S + e0, E);
    if (rc) atomic_store(&c->status, rc);
    return;
  }
  for (int t = 0; t < T; t++) {
    const float* x = c->a_in.f + (int64_t)t * c->a_in.ld;
    for (int e = e0; e < e1; e++) {
      float s;
      if (M->router == RT_ROUTER_LINEAR) {
        s = dot_f32(M->r_w + (int64_t)e * d, x, d);
      } else if (M->router == RT_ROUTER_ANALYTIC) {
        float g = dot_f32(M->r_w + (int64_t)e * d, x, d);
        act_inplace(&g, 1, L->act);
        s = fabsf(L->gated ? g * dot_f32(M->r_w + (int64_t)(E + e) * d, x, d) : g);
      } else {  /* fitted */
        const int nf = d + M->probes;
        s = dot_f32(M->r_w + (int64_t)e * nf, c->moe.feats + (int64_t)t * nf, nf) + M->r_b[e];
      }
      S[(int64_t)t * E + e] = s;
    }
  }
}

/* fitted router: feats[t] = [x ; |h_P(x)|] for probes [r0, r1) (and x itself by thread 0) */
static void probe_features(rt_ctx* c, const rt_layer* L, int T, int r0, int r1, int copy_x) {
  const rt_moe* M = &L->moe;
  const int d = c->desc.d, P = M->probes, nf = d + P;
  for (int t = 0; t < T; t++) {
    const float* x = c->a_in.f + (int64_t)t * c->a_in.ld;
    float* f = c->moe.feats + (int64_t)t * nf;
    if (copy_x) memcpy(f, x, (size_t)d * sizeof(float));
    for (int r = r0; r < r1; r++) {
      float g = dot_f32(M->probe_w + (int64_t)r * d, x, d) + (M->probe_b ? M->probe_b[r] : 0.0f);
      act_inplace(&g, 1, L->act);
      if (L->gated) g *= dot_f32(M->probe_w + (int64_t)(P + r) * d, x, d) + (M->probe_b ? M->probe_b[P + r] : 0.0f);
      f[d + r] = fabsf(g);
    }
  }
}

/* token t's picks: top-A of (score + bias) or of (softmax(score) + bias), or with a finite
 * threshold every expert above it (at most A, the rest -1); combine weights by weight_mode.
 * v [E], ids [E] scratch. Ties go to the lower expert index (as torch.topk on CPU and native.c). */
static void select_token(const rt_moe* M, const float* s, float* v, int32_t* ids, int32_t* idx, float* w) {
  const int E = M->E, A = M->A;
  int any_scale = 0;
  for (int e = 0; e < E; e++) any_scale |= M->r_scale[e] != 0.0f;
  const int need_p = M->rank_softmax || M->weight_mode != 0 || any_scale;
  float mx = -INFINITY, inv = 0.0f;
  if (need_p) {  /* v = softmax(s) */
    for (int e = 0; e < E; e++) mx = s[e] > mx ? s[e] : mx;
    float sum = 0.0f;
    for (int e = 0; e < E; e++) sum += (v[e] = exp_fast(s[e] - mx));
    inv = 1.0f / sum;
  }
  for (int e = 0; e < E; e++) v[e] = (M->rank_softmax ? v[e] * inv : s[e]) + M->r_bias[e];
  int n = 0;
  if (isfinite(M->threshold)) {
    for (int e = 0; e < E; e++)
      if (v[e] > M->threshold) ids[n++] = e;
  } else {
    for (int e = 0; e < E; e++) ids[e] = e;
    n = E;
  }
  if (n > A) {
    select_top(v, ids, n, A);
    n = A;
  }
  /* the picks in ascending order (a bitmap over E, reusing v): the rows are then read in address
   * order, which the memory system streams far better than a scattered order */
  uint64_t* bits = (uint64_t*)v;
  memset(bits, 0, (size_t)(E + 63) / 64 * sizeof(uint64_t));
  for (int a = 0; a < n; a++) bits[ids[a] >> 6] |= 1ull << (ids[a] & 63);
  int k = 0;
  for (int word = 0; word < (E + 63) / 64; word++)
    for (uint64_t b = bits[word]; b; b &= b - 1) ids[k++] = word * 64 + __builtin_ctzll(b);
  float psum = 0.0f;
  for (int a = 0; a < A; a++) {
    if (a >= n) {
      idx[a] = -1;
      w[a] = 0.0f;
      continue;
    }
    const int e = ids[a];
    const float p = need_p ? exp_fast(s[e] - mx) * inv : 0.0f;
    idx[a] = e;
    w[a] = M->weight_mode == 0 ? 1.0f + p * M->r_scale[e] : p;
    psum += p;
  }
  if (M->weight_mode != 0)
    for (int a = 0; a < n; a++) w[a] = (M->weight_mode == 2 ? w[a] / psum : w[a]) * (1.0f + M->r_scale[idx[a]]);
}

/* slots (t * A + a) sorted by expert: counting sort, stable (token order within an expert) */
static void sort_slots(rt_ctx* c, const rt_moe* M, int T) {
  rt_moe_scratch* S = &c->moe;
  const int E = M->E, A = M->A, n = T * A;
  memset(S->start, 0, (size_t)(E + 1) * sizeof(int32_t));
  for (int i = 0; i < n; i++)
    if (S->idx[i] >= 0) S->start[S->idx[i] + 1]++;
  for (int e = 0; e < E; e++) S->start[e + 1] += S->start[e];
  int32_t* fill = (int32_t*)S->thr;  /* thread 0's scratch: [E] */
  memcpy(fill, S->start, (size_t)E * sizeof(int32_t));
  for (int i = 0; i < n; i++)
    if (S->idx[i] >= 0) {
      const int k = fill[S->idx[i]]++;
      S->slot[k] = i;
      S->tok[k] = i / A;
    }
  S->n_slots = S->start[E];
}

/* token t's picked neuron i (0 <= i < A m): its number e m + j and its combine weight; -1 for none */
static inline int64_t picked_neuron(const rt_moe_scratch* S, const rt_moe* M, int t, int i, float* w) {
  const int64_t sl = (int64_t)t * M->A + i / M->m;
  const int e = S->idx[sl];
  if (e < 0) return -1;
  *w = S->w[sl];
  return (int64_t)e * M->m + i % M->m;
}

/* up to 8 neurons of token t: h = act(gate + b) * (up + b) * w. The gate rows of all n neurons are
 * dotted in one pass (n runs of memory in flight), then the up rows, which by then the prefetchers
 * have streamed in behind the gate rows (and the output columns behind them). */
static void neuron_group(rt_ctx* c, const rt_layer* L, int t, const int64_t* ids, const float* wv, int n, float* h,
                         const float* spread, const float* corr) {
  const rt_moe* M = &L->moe;
  const int P = M->per, gated = L->gated;
  int64_t rows[16];
  float out[16];
  for (int k = 0; k < n; k++) {
    rows[k] = ids[k] * P;
    rows[n + k] = ids[k] * P + 1;
  }
  rows_dot(&M->neurons, rows, gated ? 2 * n : n, &c->a_in, t, spread, corr, out);
  for (int k = 0; k < n; k++) h[k] = out[k] + (M->bias ? M->bias[2 * ids[k]] : 0.0f);
  act_inplace(h, n, L->act);
  for (int k = 0; k < n; k++) {
    const float up = gated ? out[n + k] + (M->bias ? M->bias[2 * ids[k] + 1] : 0.0f) : 1.0f;
    h[k] *= up * wv[k];
  }
}

/* the output of one unit of a token's picks: part [d] = sum of h * output column over the unit's
 * neurons, in order; h from `hs` (computed already, prefill) or here (decode: hs NULL) */
static void neuron_unit(rt_ctx* c, const rt_layer* L, int t, int ch, const float* hs, float* part, float* scratch) {
  const rt_moe* M = &L->moe;
  const int N = M->A * M->m, i1 = RT_MIN(N, (ch + 1) * NEURON_CHUNK), m = M->m;
  const int64_t Kp = rt_pad(c->desc.d, RT_BLOCK);
  int64_t ids[NEURON_CHUNK];
  float wv[NEURON_CHUNK], h[NEURON_CHUNK];
  int n = 0;
  for (int i = ch * NEURON_CHUNK; i < i1; i++) {
    const int64_t id = picked_neuron(&c->moe, M, t, i, &wv[n]);
    if (id < 0) continue;
    if (hs) h[n] = hs[((int64_t)t * M->A + i / m) * m + i % m];
    ids[n++] = id;
  }
  if (!hs) {
    float* spread = scratch;       /* [Kp / 4] */
    float* corr = spread + Kp / 4; /* [Kp / 32] */
    if (M->neurons.dtype == RT_I8) token_spread(&c->a_in, t, Kp, spread, corr);
    for (int g = 0; g < n; g += 8) neuron_group(c, L, t, ids + g, wv + g, RT_MIN(8, n - g), h + g, spread, corr);
  }
  for (int k = 0; k < n; k++) ids[k] = ids[k] * M->per + M->per - 1;  /* the output columns */
  unit_down(&M->neurons, ids, h, n, c->desc.d, part);
}

/* Expert-major hidden activations of sorted slots [s0, s1): a run of slots of one expert shares its
 * neurons' rows, dotted with all the run's tokens at once; h [slot * m + j]. */
static void hidden_expert_major(rt_ctx* c, const rt_layer* L, int s0, int s1, float* gbuf) {
  const rt_moe* M = &L->moe;
  rt_moe_scratch* S = &c->moe;
  const int m = M->m, P = M->per;
  float* ubuf = gbuf + c->desc.max_tokens;
  int s = s0;
  while (s < s1) {
    const int e = S->idx[S->slot[s]];
    int s_end = s + 1;
    while (s_end < s1 && S->idx[S->slot[s_end]] == e) s_end++;
    const int n = s_end - s;
    for (int j = 0; j < m; j++) {  /* the arithmetic of neuron_group, so prefill and decode agree bit for bit */
      const int64_t id = (int64_t)e * m + j;
      rows2_dot_tokens(&M->neurons, id * P, L->gated ? id * P + 1 : id * P, &c->a_in, S->tok + s, n, gbuf, ubuf,
                       ubuf + c->desc.max_tokens);
      for (int i = 0; i < n; i++) {
        float g = gbuf[i] + (M->bias ? M->bias[2 * id] : 0.0f);
        act_inplace(&g, 1, L->act);
        const int sl = S->slot[s + i];
        const float up = L->gated ? ubuf[i] + (M->bias ? M->bias[2 * id + 1] : 0.0f) : 1.0f;
        S->h[(int64_t)sl * m + j] = g * (up * S->w[sl]);
      }
    }
    s = s_end;
  }
}

/* a carved layer routed, on token rows [0, T) */
static void moe_block(rt_ctx* c, const rt_layer* L, int T, int tid, int nth) {
  const rt_moe* M = &L->moe;
  rt_moe_scratch* S = &c->moe;
  const int d = c->desc.d, A = M->A, m = M->m;
  const int expert_major = T >= EXPERT_MAJOR_T;
  float* thr = S->thr + (int64_t)tid * S->thr_len;
  int64_t a, b, t0, t1;
  rt_share(T, tid, nth, &t0, &t1);

  if (M->router == RT_ROUTER_SHADOW)  /* the shadow router's own int8 tokens (one scale per token) */
    for (int t = t0; t < t1; t++)
      S->sqs[t] = quantize_token(c->a_in.f + (int64_t)t * c->a_in.ld, d, S->sq + (int64_t)t * d, S->sqsum + t);
  if (M->router == RT_ROUTER_FITTED) {
    rt_share(M->probes, tid, nth, &a, &b);
    probe_features(c, L, T, (int)a, (int)b, tid == 0);
  }
  pool_barrier(c->pool);

  rt_share(M->E, tid, nth, &a, &b);
  route_scores(c, L, T, (int)a, (int)b);
  pool_barrier(c->pool);

  for (int t = t0; t < t1; t++)
    select_token(M, S->scores + (int64_t)t * M->E, thr, (int32_t*)(thr + M->E), S->idx + (int64_t)t * A,
                 S->w + (int64_t)t * A);
  pool_barrier(c->pool);
  if (expert_major) {
    if (tid == 0) sort_slots(c, M, T);
    pool_barrier(c->pool);
  }
  prof_mark(c, tid, PROF_ROUTER);

  /* shared neurons' up product and the routed neurons' hidden activations, in one phase */
  const rt_dense* Sh = &M->shared;
  int p0 = 0, p1 = 0;
  if (Sh->n > 0) {
    up_share(Sh, L->gated, tid, nth, &p0, &p1);
    dense_up(c, Sh, L->gated, L->act, p0, p1, 0, T);
  }
  const int nch = (A * m + NEURON_CHUNK - 1) / NEURON_CHUNK;  /* token-major units per token */
  if (expert_major) {  /* each neuron's tokens at once, then the units' outputs from those h */
    rt_share(S->n_slots, tid, nth, &a, &b);
    hidden_expert_major(c, L, (int)a, (int)b, thr);
    pool_barrier(c->pool);
  }
  rt_share((int64_t)T * nch, tid, nth, &a, &b);
  for (int64_t u = a; u < b; u++)
    neuron_unit(c, L, (int)(u / nch), (int)(u % nch), expert_major ? S->h : NULL, S->part + u * c->dp, thr);
  pool_barrier(c->pool);

  int k0, k1;
  feature_share(d, tid, nth, &k0, &k1);
  if (Sh->n > 0) {
    convert_hidden(c, Sh, (int)t0, (int)t1);
    pool_barrier(c->pool);
    panel_share(&Sh->out_w, tid, nth, &p0, &p1);
    panel_matmul(&Sh->out_w, p0, p1, &c->a_h, T, c->tmp, (int)c->dp);
    pool_barrier(c->pool);
  } else {
    for (int t = 0; t < T; t++) memset(c->tmp + (int64_t)t * c->dp + k0, 0, (size_t)(k1 - k0) * sizeof(float));
  }
  for (int t = 0; t < T; t++) {  /* y[t, k0:k1] += the token's unit outputs, in unit order */
    float* y = c->tmp + (int64_t)t * c->dp;
    for (int u = 0; u < nch; u++) {
      const float* pu = S->part + ((int64_t)t * nch + u) * c->dp;
#pragma omp simd
      for (int k = k0; k < k1; k++) y[k] += pu[k];
    }
  }
  finish(c, L, M->out_bias, k0, k1, 0, T, tid, nth);
}

void ffn_block(rt_ctx* c, const rt_layer* L, int tid, int nth) {
  if (L->ffn_kind == RT_FFN_NONE) return;
  const rt_desc* D = &c->desc;
  int64_t t0, t1;
  rt_share(c->T, tid, nth, &t0, &t1);
  const int dtype = L->ffn_kind == RT_FFN_DENSE ? L->dense.in_w.dtype : L->moe.neurons.dtype;
  norm_rows(c, &L->ffn_norm, c->x, D->d, &c->a_in, D->d, dtype, (int)t0, (int)t1);
  pool_barrier(c->pool);
  prof_mark(c, tid, PROF_FFN_NORM);
  if (L->ffn_kind == RT_FFN_DENSE) {
    dense_block(c, L, &L->dense, L->dense.out_b, 0, c->T, tid, nth);
    return;
  }
  /* a carved layer: the step's first n_sparse tokens routed, the rest through all its experts at
   * once where it has them packed (prompts, large batches: faster as one dense product) */
  const int routed = L->moe.all.n > 0 ? c->n_sparse : c->T;
  if (routed > 0) moe_block(c, L, routed, tid, nth);
  if (routed < c->T) dense_block(c, L, &L->moe.all, L->moe.out_bias, routed, c->T, tid, nth);
}
