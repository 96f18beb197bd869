/* The feed-forward block: norm -> FFN -> residual, for a dense MLP or a carved MoE layer.
 *
 * Dense: one product for gate and up (panels interleaved, so each thread finishes act(g) * u of its
 * own neurons), one for down.
 * Carved: the router scores every routed expert (the shadow router: 4-bit codes against the int8
 * token), each token picks its experts, the picked (token, expert) slots are sorted by expert, and
 * only the picked neurons are computed: their gate/up rows dotted with the tokens that picked them
 * (each row read once per step), then y += h * down column, split across threads by output
 * feature. A layer with a tail (rt.h) also adds, per token, est * 4-bit output column of the routed
 * neurons outside its picks whose router estimate |est| passes the tail's threshold, scanned in
 * TAIL_ITEMS ranges beside the picked neurons' units. Each output is summed in the same order
 * whatever the number of threads. */
#include <math.h>
#include <string.h>

#include "internal.h"
#include "vecmath.h"

/* the output features of item k of a feature phase: blocks of 64 (whole int8 blocks) */
#define FEATURE_BLOCK 64
static inline int64_t feature_blocks(int d) { return (d + FEATURE_BLOCK - 1) / FEATURE_BLOCK; }

/* rows [r0, r1) of tmp, columns [n0, n1): + bias and, without a post-FFN norm, x += tmp * residual_scale */
static void add_columns(rt_ctx* c, const rt_layer* L, const float* bias, int n0, int n1, int r0, int r1) {
  const rt_desc* D = &c->desc;
  float* xr = residual_of(c, L);
  for (int t = r0; t < r1; t++) {
    float* y = c->tmp + (int64_t)t * c->dp;
    if (bias)
      for (int n = n0; n < n1; n++) y[n] += bias[n];
    if (!L->post_ffn_norm.w)
      for (int n = n0; n < n1; n++) xr[(int64_t)t * D->d + n] += y[n] * D->residual_scale;
  }
}

/* with a post-FFN norm (whole rows): x += norm(tmp) * residual_scale, rows [r0, r1) */
static void post_norm_phase(rt_th* th, const rt_layer* L, int r0, int r1) {
  if (!L->post_ffn_norm.w) return;
  FOR_ITEMS(th, i, r1 - r0) residual_token(th->c, residual_of(th->c, L), &L->post_ffn_norm, th->c->tmp, (int)th->c->dp, (int)(r0 + i));
  phase_end(th, r1 - r0);
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

/* items of in_w's product: groups of panels, whole (gate, up) pairs when gated */
static inline int64_t up_groups(const rt_dense* F) { return panel_groups(panels_of(&F->in_w)); }

/* h = act(gate) * up (gated) or act(h) of panel group g of in_w into a_h.f, token rows [r0, r1)
 * (PANEL_GROUP is even: a group holds whole pairs) */
static void dense_up(rt_ctx* c, const rt_dense* F, int gated, int act, int64_t g, int r0, int r1) {
  const int64_t ldh = 2 * c->n_max;
  const rt_act x = act_rows(&c->a_in, r0);
  const int p0 = (int)(g * PANEL_GROUP), p1 = (int)RT_MIN(p0 + PANEL_GROUP, panels_of(&F->in_w));
  panel_matmul(&F->in_w, p0, p1, &x, r1 - r0, c->hbuf + (int64_t)r0 * ldh, (int)ldh);
  for (int t = r0; t < r1; t++) {
    const float* hb = c->hbuf + (int64_t)t * ldh;
    float* h = c->a_h.f + (int64_t)t * c->a_h.ld;
    if (gated) {  /* panels come in (gate, up) pairs of 16 neurons */
      for (int p = p0; p < p1; p += 2) {
        const int j0 = p / 2 * RT_PANEL_ROWS, nj = RT_MIN(RT_PANEL_ROWS, F->n - j0);
        float gv[RT_PANEL_ROWS], u[RT_PANEL_ROWS];
        for (int j = 0; j < nj; j++) {
          gv[j] = hb[(int64_t)p * RT_PANEL_ROWS + j] + (F->in_b ? F->in_b[(int64_t)p * RT_PANEL_ROWS + j] : 0.0f);
          u[j] = hb[(int64_t)(p + 1) * RT_PANEL_ROWS + j] + (F->in_b ? F->in_b[(int64_t)(p + 1) * RT_PANEL_ROWS + j] : 0.0f);
        }
        act_inplace(gv, nj, act);
        for (int j = 0; j < nj; j++) h[j0 + j] = gv[j] * u[j];
      }
    } else {
      const int n0 = p0 * RT_PANEL_ROWS, n1 = RT_MIN(p1 * RT_PANEL_ROWS, F->n);
      for (int n = n0; n < n1; n++) h[n] = hb[n] + (F->in_b ? F->in_b[n] : 0.0f);
      if (n1 > n0) act_inplace(h + n0, n1 - n0, act);
    }
  }
}

/* h (a_h.f, already computed) of token t -> a_h converted for out_w, the padding zeroed */
static void convert_hidden(rt_ctx* c, const rt_dense* F, int t) {
  const int n = F->n, np = (int)rt_pad(n, RT_BLOCK);
  memset(c->a_h.f + (int64_t)t * c->a_h.ld + n, 0, (size_t)(np - n) * sizeof(float));
  act_convert(&c->a_h, np, F->out_w.dtype, t, t + 1);
}

/* a dense MLP F (a dense layer, or every expert of a carved one) on token rows [r0, r1) */
static void dense_block(rt_th* th, const rt_layer* L, const rt_dense* F, const float* out_bias, int r0, int r1) {
  rt_ctx* c = th->c;
  int64_t groups = up_groups(F);
  FOR_ITEMS(th, g, groups) dense_up(c, F, L->gated, L->act, g, r0, r1);
  phase_end(th, groups);
  FOR_ITEMS(th, t, r1 - r0) convert_hidden(c, F, (int)(r0 + t));
  phase_end(th, r1 - r0);
  const rt_act h = act_rows(&c->a_h, r0);
  groups = panel_groups(panels_of(&F->out_w));
  FOR_ITEMS(th, g, groups) {
    int n0, n1;
    panel_group(&F->out_w, g, &h, r1 - r0, c->tmp + (int64_t)r0 * c->dp, (int)c->dp, &n0, &n1);
    add_columns(c, L, out_bias, n0, n1, r0, r1);
  }
  phase_end(th, groups);
  post_norm_phase(th, L, r0, r1);
  prof_mark(c, th->tid, PROF_FFN);
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
                             M->sh_bias ? M->sh_bias + (int64_t)e0 * R : NULL, e1 - e0, M->m, L->gated, L->act, S + e0, E,
                             M->tail_codes ? c->moe.est + (int64_t)e0 * M->m : NULL, c->tail_max);
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
 * v [E], ids [E] scratch; picked (or NULL): the picks as a bitmap [ceil(E / 64)] (the tail skips them).
 * Ties go to the lower expert index (as torch.topk on CPU and native.c). */
static void select_token(const rt_moe* M, const float* s, float* v, int32_t* ids, int32_t* idx, float* w, uint64_t* picked) {
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
  if (picked) memcpy(picked, bits, (size_t)(E + 63) / 64 * sizeof(uint64_t));
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

/* tail item k of token t: part [dp] = the sum, in neuron order, of est * scale * column over the
 * neurons of range k (of TAIL_ITEMS) that are outside the token's picked experts and whose
 * |estimate| exceeds the tail's threshold (rt.h) */
static void tail_item(rt_ctx* c, const rt_layer* L, int t, int k, float* part) {
  const rt_moe* M = &L->moe;
  const int N = M->E * M->m, m = M->m, half = (c->desc.d + 1) / 2;
  const int n0 = (int)((int64_t)k * N / TAIL_ITEMS), n1 = (int)((int64_t)(k + 1) * N / TAIL_ITEMS);
  const float* est = c->moe.est + (int64_t)t * c->tail_max;
  const uint64_t* picked = c->moe.picked + (int64_t)t * ((c->E_max + 63) / 64);
  memset(part, 0, (size_t)(2 * half) * sizeof(float));
  /* 256 neurons at a time: those passing first, then their columns with the one 4 ahead requested
   * (a column's first lines are a cache miss, which then overlaps the columns before it) */
  int32_t pass[256];
  for (int b0 = n0; b0 < n1; b0 += 256) {
    int np = 0;
    for (int n = b0; n < RT_MIN(b0 + 256, n1); n++) {
      const int e = n / m;
      if (fabsf(est[n]) > M->tail_threshold && !((picked[e >> 6] >> (e & 63)) & 1)) pass[np++] = n;
    }
    for (int i = 0; i < np; i++) {
      if (i + 4 < np) {
        const uintptr_t q = (uintptr_t)(M->tail_codes + (int64_t)pass[i + 4] * half);
        for (uintptr_t a = q & ~(uintptr_t)63; a < q + (uintptr_t)half; a += 64) __builtin_prefetch((const void*)a, 0, 3);
      }
      tail_column(M->tail_codes + (int64_t)pass[i] * half, est[pass[i]] * M->tail_scale[pass[i]], half, part);
    }
  }
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

/* items of the router's scores: experts per item; of a prompt chunk's hidden activations: ranges
 * of whole experts, HIDDEN_ITEMS of them (one expert each where E is smaller). Every phase's item
 * count is fixed by the layer and the step, never read from scratch a later phase rewrites: a
 * thread descheduled for a while catches up through phases the others finished (pool.c), and the
 * count it computes on arrival must be theirs. (Counted in slots, from n_slots, a late thread read
 * the next layer's count, claimed an item past this layer's last and wrote another layer's hidden
 * activations: about one routed prompt in ten on two threads.) */
#define ROUTER_BLOCK 256
#define HIDDEN_ITEMS 64

/* a carved layer routed, on token rows [0, T) */
static void moe_block(rt_th* th, const rt_layer* L, int T) {
  rt_ctx* c = th->c;
  const rt_moe* M = &L->moe;
  rt_moe_scratch* S = &c->moe;
  const int d = c->desc.d, A = M->A, m = M->m;
  const int expert_major = T >= EXPERT_MAJOR_T;
  float* thr = S->thr + (int64_t)th->tid * S->thr_len;

  if (M->router == RT_ROUTER_SHADOW) {  /* the shadow router's own int8 tokens (one scale per token) */
    FOR_ITEMS(th, t, T) S->sqs[t] = quantize_token(c->a_in.f + t * c->a_in.ld, d, S->sq + t * d, S->sqsum + t);
    phase_end(th, T);
  } else if (M->router == RT_ROUTER_FITTED) {  /* probe features: item 0 also copies x */
    FOR_ITEMS(th, r, M->probes + 1) probe_features(c, L, T, r == 0 ? 0 : (int)r - 1, r == 0 ? 0 : (int)r, r == 0);
    phase_end(th, M->probes + 1);
  }

  const int64_t eb = (M->E + ROUTER_BLOCK - 1) / ROUTER_BLOCK;  /* experts scored per item */
  FOR_ITEMS(th, i, eb) route_scores(c, L, T, (int)(i * ROUTER_BLOCK), (int)RT_MIN((i + 1) * ROUTER_BLOCK, M->E));
  phase_end(th, eb);

  const int tail = M->tail_codes != NULL;
  const int64_t words = (c->E_max + 63) / 64;
  FOR_ITEMS(th, t, T)
    select_token(M, S->scores + t * M->E, thr, (int32_t*)(thr + M->E), S->idx + t * A, S->w + t * A,
                 tail ? S->picked + t * words : NULL);
  phase_end(th, T);
  if (expert_major) {
    FOR_ITEMS(th, i, 1) sort_slots(c, M, T);
    phase_end(th, 1);
  }
  prof_mark(c, th->tid, PROF_ROUTER);

  /* the shared neurons' up product, and each neuron's tokens at once for a prompt chunk */
  const rt_dense* Sh = &M->shared;
  const int64_t ups = Sh->n > 0 ? up_groups(Sh) : 0;
  const int64_t sb = expert_major ? RT_MIN(M->E, HIDDEN_ITEMS) : 0;
  FOR_ITEMS(th, i, ups + sb) {
    if (i < ups)
      dense_up(c, Sh, L->gated, L->act, i, 0, T);
    else
      hidden_expert_major(c, L, S->start[(i - ups) * M->E / sb], S->start[(i - ups + 1) * M->E / sb], thr);
  }
  phase_end(th, ups + sb);

  /* every unit's output (decode: with its neurons' h, computed here), then the tail's items */
  const int nch = (A * m + NEURON_CHUNK - 1) / NEURON_CHUNK;
  const int64_t units = (int64_t)T * nch, tails = tail ? (int64_t)T * TAIL_ITEMS : 0;
  FOR_ITEMS(th, u, units + tails) {
    if (u < units)
      neuron_unit(c, L, (int)(u / nch), (int)(u % nch), expert_major ? S->h : NULL, S->part + u * c->dp, thr);
    else
      tail_item(c, L, (int)((u - units) / TAIL_ITEMS), (int)((u - units) % TAIL_ITEMS), S->tpart + (u - units) * c->dp);
  }
  phase_end(th, units + tails);

  if (Sh->n > 0) {
    FOR_ITEMS(th, t, T) convert_hidden(c, Sh, (int)t);
    phase_end(th, T);
    const int64_t groups = panel_groups(panels_of(&Sh->out_w));
    FOR_ITEMS(th, g, groups) {
      int n0, n1;
      panel_group(&Sh->out_w, g, &c->a_h, T, c->tmp, (int)c->dp, &n0, &n1);
    }
    phase_end(th, groups);
  }
  const int64_t fb = feature_blocks(d);
  FOR_ITEMS(th, f, fb) {  /* y[t, k0:k1] (+)= the token's unit outputs, in unit order; bias; residual */
    const int k0 = (int)(f * FEATURE_BLOCK), k1 = (int)RT_MIN(k0 + FEATURE_BLOCK, d);
    for (int t = 0; t < T; t++) {
      float* y = c->tmp + (int64_t)t * c->dp;
      if (Sh->n == 0) memset(y + k0, 0, (size_t)(k1 - k0) * sizeof(float));
      for (int u = 0; u < nch; u++) {
        const float* pu = S->part + ((int64_t)t * nch + u) * c->dp;
#pragma omp simd
        for (int k = k0; k < k1; k++) y[k] += pu[k];
      }
      for (int u = 0; u < (tail ? TAIL_ITEMS : 0); u++) {
        const float* pu = S->tpart + ((int64_t)t * TAIL_ITEMS + u) * c->dp;
#pragma omp simd
        for (int k = k0; k < k1; k++) y[k] += pu[k];
      }
    }
    add_columns(c, L, M->out_bias, k0, k1, 0, T);
  }
  phase_end(th, fb);
  post_norm_phase(th, L, 0, T);
  prof_mark(c, th->tid, PROF_FFN);
}

void ffn_block(rt_th* th, const rt_layer* L) {
  if (L->ffn_kind == RT_FFN_NONE) return;
  rt_ctx* c = th->c;
  const rt_desc* D = &c->desc;
  const int dtype = L->ffn_kind == RT_FFN_DENSE ? L->dense.in_w.dtype : L->moe.neurons.dtype;
  FOR_ITEMS(th, t, c->T) norm_token(c, &L->ffn_norm, c->x, D->d, &c->a_in, D->d, dtype, (int)t);
  phase_end(th, c->T);
  prof_mark(c, th->tid, PROF_FFN_NORM);
  if (L->ffn_kind == RT_FFN_DENSE) {
    dense_block(th, L, &L->dense, L->dense.out_b, 0, c->T);
    return;
  }
  /* a carved layer: the step's first n_sparse tokens routed, the rest through all its experts at
   * once where it has them packed (prompts, large batches: faster as one dense product) */
  const int routed = L->moe.all.n > 0 ? c->n_sparse : c->T;
  if (routed > 0) moe_block(th, L, routed);
  if (routed < c->T) dense_block(th, L, &L->moe.all, L->moe.out_bias, routed, c->T);
}
