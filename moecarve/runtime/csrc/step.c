#define _POSIX_C_SOURCE 200112L
/* The runtime's entry points: create a context for a model (thread pool, KV cache, buffers),
 * run one step (any mix of prompt tokens and decode tokens of several sequences), free it.
 * One step is one call from Python: every thread runs the whole forward (SPMD) and takes its
 * share of each phase, with a barrier between phases. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"

void* rt_alloc(size_t bytes) {
  const size_t n = (size_t)rt_pad((int64_t)(bytes ? bytes : 1), RT_ALIGN);
  void* p = aligned_alloc(RT_ALIGN, n);
  if (p) memset(p, 0, n);
  return p;
}

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

void prof_mark(rt_ctx* c, int tid, int phase) {
  if (!c->profiling || tid != 0) return;
  const double t = now_s();
  c->prof[phase] += t - c->prof_mark;
  c->prof_mark = t;
}

void panel_group(const rt_mat* W, int64_t g, const rt_act* X, int T, float* Y, int ldy, int* n0, int* n1) {
  const int p0 = (int)(g * PANEL_GROUP), p1 = (int)RT_MIN(p0 + PANEL_GROUP, panels_of(W));
  panel_matmul(W, p0, p1, X, T, Y, ldy);
  *n0 = p0 * RT_PANEL_ROWS;
  *n1 = RT_MIN(p1 * RT_PANEL_ROWS, W->rows);
}

/* normalise one row x [K] into row t of a->f (no norm: a copy), the padding zeroed */
static void norm_row(const rt_desc* D, const rt_norm* n, const float* x, rt_act* a, int K, int t) {
  float* f = a->f + (int64_t)t * a->ld;
  if (!n->w)
    memcpy(f, x, (size_t)K * sizeof(float));
  else if (D->norm_kind == RT_NORM_RMS)
    rms_norm(x, n->w, K, n->eps, f);
  else
    layer_norm(x, n->w, n->b, K, n->eps, f);
  memset(f + K, 0, (size_t)(a->ld - K) * sizeof(float));
}

void norm_token(const rt_ctx* c, const rt_norm* n, const float* x, int ldx, rt_act* a, int K, int dtype, int t) {
  norm_row(&c->desc, n, x + (int64_t)t * ldx, a, K, t);
  act_convert(a, K, dtype, t, t + 1);
}

void residual_token(rt_ctx* c, float* xr, const rt_norm* post, float* y, int ldy, int t) {
  const rt_desc* D = &c->desc;
  float* yt = y + (int64_t)t * ldy;  /* normalised in place */
  float* xt = xr + (int64_t)t * D->d;
  if (post->w) {
    if (D->norm_kind == RT_NORM_RMS)
      rms_norm(yt, post->w, D->d, post->eps, yt);
    else
      layer_norm(yt, post->w, post->b, D->d, post->eps, yt);
  }
  for (int k = 0; k < D->d; k++) xt[k] += yt[k] * D->residual_scale;
}

static int alloc_act(rt_act* a, int64_t T, int64_t ld) {
  a->ld = (int32_t)ld;
  a->f = (float*)rt_alloc((size_t)(T * ld) * sizeof(float));
  a->b = (uint16_t*)rt_alloc((size_t)(T * ld) * sizeof(uint16_t));
  a->q = (int8_t*)rt_alloc((size_t)(T * ld));
  a->s = (float*)rt_alloc((size_t)(T * ld / RT_BLOCK) * sizeof(float));
  a->sum = (int32_t*)rt_alloc((size_t)(T * ld / RT_BLOCK) * sizeof(int32_t));
  return a->f && a->b && a->q && a->s && a->sum ? 0 : -1;
}

static void free_act(rt_act* a) {
  free(a->f); free(a->b); free(a->q); free(a->s); free(a->sum);
}

static void free_ctx(rt_ctx* c) {
  if (!c) return;
  if (c->pool) pool_free(c->pool);
  free(c->k_cache); free(c->v_cache);
  if (c->ropes) {
    for (int l = 0; l < c->desc.n_layers; l++) {
      int shared = 0;
      for (int j = 0; j < l; j++) shared |= c->ropes[j].cs == c->ropes[l].cs;
      if (!shared) free(c->ropes[l].cs);
    }
    free(c->ropes);
  }
  free(c->x); free(c->x_par); free(c->tmp); free(c->qkv); free(c->hbuf); free(c->att_scratch); free(c->items);
  free_act(&c->a_in); free_act(&c->a_att); free_act(&c->a_h);
  rt_moe_scratch* S = &c->moe;
  free(S->scores); free(S->idx); free(S->w); free(S->start); free(S->slot); free(S->tok); free(S->h); free(S->part);
  free(S->sq); free(S->sqs); free(S->sqsum); free(S->feats); free(S->thr); free(S->est); free(S->picked); free(S->tpart);
  free(c);
}

/* ------------------------------------------------------------------ the public API */

void rt_free(rt_ctx* c) { free_ctx(c); }

int rt_threads(const rt_ctx* c) { return pool_size(c->pool); }

/* The CPU features this build uses ("avx512 bf16 vnni", or "portable"). */
const char* rt_features(void) {
#if defined(RT_AVX512BF16) && defined(RT_VNNI)
  return "avx512 bf16 vnni";
#elif defined(RT_VNNI)
  return "avx512 vnni";
#elif defined(RT_AVX512)
  return "avx512";
#else
  return "portable";
#endif
}

/* A context for the model `desc` (copied; the weights and the layers array it points to must
 * outlive the context) with n_threads threads. NULL when out of memory. */
rt_ctx* rt_create(const rt_desc* desc, int n_threads) {
  rt_ctx* c = (rt_ctx*)calloc(1, sizeof(rt_ctx));
  if (!c) return NULL;
  c->desc = *desc;
  const rt_desc* D = &c->desc;
  const int64_t T = D->max_tokens, L = D->n_layers;
  c->pool = pool_create(n_threads, 16 + PHASES_PER_LAYER * (int)L);
  const int nth = c->pool ? pool_size(c->pool) : 1;
  c->dp = rt_pad(D->d, RT_BLOCK);
  c->qkv_n = rt_pad((int64_t)(D->H + 2 * D->Hkv) * D->hd, RT_BLOCK);
  c->att_n = rt_pad((int64_t)D->H * D->hd, RT_BLOCK);
  c->n_max = RT_BLOCK;
  c->E_max = c->A_max = c->m_max = 1;
  c->feats_max = D->d;
  c->tail_max = 0;
  for (int l = 0; l < L; l++) {
    const rt_layer* Ly = &D->layers[l];
    c->n_max = RT_MAX(c->n_max, rt_pad(Ly->dense.n, RT_BLOCK));
    c->n_max = RT_MAX(c->n_max, rt_pad(Ly->moe.shared.n, RT_BLOCK));
    c->n_max = RT_MAX(c->n_max, rt_pad(Ly->moe.all.n, RT_BLOCK));
    if (Ly->ffn_kind == RT_FFN_MOE) {
      c->E_max = RT_MAX(c->E_max, Ly->moe.E);
      c->A_max = RT_MAX(c->A_max, Ly->moe.A);
      c->m_max = RT_MAX(c->m_max, Ly->moe.m);
      c->feats_max = RT_MAX(c->feats_max, D->d + Ly->moe.probes);
      if (Ly->moe.tail_codes) c->tail_max = RT_MAX(c->tail_max, (int64_t)Ly->moe.E * Ly->moe.m);
    }
  }
  c->hdp = rt_pad(D->hd, RT_BLOCK);
  c->ctx_p = rt_pad(D->max_ctx, RT_PANEL_ROWS);
  const size_t kv = (size_t)(L * D->max_slots * D->Hkv) * c->ctx_p * c->hdp * (D->kv_dtype == RT_F32 ? 4 : 2);
  c->k_cache = rt_alloc(kv);
  c->v_cache = rt_alloc(kv);
  c->ropes = (rt_rope*)calloc((size_t)L, sizeof(rt_rope));
  c->x = (float*)rt_alloc((size_t)(T * D->d) * sizeof(float));
  c->x_par = (float*)rt_alloc((size_t)(T * D->d) * sizeof(float));
  c->tmp = (float*)rt_alloc((size_t)(T * c->dp) * sizeof(float));
  c->qkv = (float*)rt_alloc((size_t)(T * c->qkv_n) * sizeof(float));
  c->hbuf = (float*)rt_alloc((size_t)(T * 2 * c->n_max) * sizeof(float));
  c->att_scratch_len = RT_ATT_ROWS * (c->ctx_p + c->hdp);
  c->att_scratch = (float*)rt_alloc((size_t)(nth * c->att_scratch_len) * sizeof(float));
  c->items = (rt_att_item*)rt_alloc((size_t)(T * D->H) * sizeof(rt_att_item));
  rt_moe_scratch* S = &c->moe;
  S->scores = (float*)rt_alloc((size_t)(T * c->E_max) * sizeof(float));
  S->idx = (int32_t*)rt_alloc((size_t)(T * c->A_max) * sizeof(int32_t));
  S->w = (float*)rt_alloc((size_t)(T * c->A_max) * sizeof(float));
  S->start = (int32_t*)rt_alloc((size_t)(c->E_max + 1) * sizeof(int32_t));
  S->slot = (int32_t*)rt_alloc((size_t)(T * c->A_max) * sizeof(int32_t));
  S->tok = (int32_t*)rt_alloc((size_t)(T * c->A_max) * sizeof(int32_t));
  S->h = (float*)rt_alloc((size_t)(T * c->A_max * c->m_max) * sizeof(float));
  const int64_t units = (c->A_max * c->m_max + NEURON_CHUNK - 1) / NEURON_CHUNK;
  S->part = (float*)rt_alloc((size_t)(T * units * c->dp) * sizeof(float));
  S->sq = (int8_t*)rt_alloc((size_t)(T * c->dp) + 64);
  S->sqs = (float*)rt_alloc((size_t)T * sizeof(float));
  S->sqsum = (int32_t*)rt_alloc((size_t)T * sizeof(int32_t));
  S->feats = (float*)rt_alloc((size_t)(T * c->feats_max) * sizeof(float));
  if (c->tail_max) {
    S->est = (float*)rt_alloc((size_t)(T * c->tail_max) * sizeof(float));
    S->picked = (uint64_t*)rt_alloc((size_t)(T * ((c->E_max + 63) / 64)) * sizeof(uint64_t));
    S->tpart = (float*)rt_alloc((size_t)(T * TAIL_ITEMS * c->dp) * sizeof(float));
  }
  /* per thread: selection [2E], or gate/up values [2T] + four tokens' int8 spreads, or one token's */
  S->thr_len = rt_pad(RT_MAX(2 * c->E_max, 2 * T + 4 * (c->dp / 4 + c->dp / RT_BLOCK)) + 16, 16);
  S->thr = (float*)rt_alloc((size_t)(nth * S->thr_len) * sizeof(float));
  if (!c->pool || !c->k_cache || !c->v_cache || !c->ropes || !c->x || !c->x_par || !c->tmp || !c->qkv || !c->hbuf ||
      !c->att_scratch || !c->items || D->hd > RT_MAX_HD || alloc_act(&c->a_in, T, c->dp) || alloc_act(&c->a_att, T, c->att_n) ||
      alloc_act(&c->a_h, T, c->n_max) || !S->scores || !S->idx || !S->w || !S->start || !S->slot || !S->tok || !S->h || !S->part ||
      !S->sq || !S->sqs || !S->sqsum || !S->feats || !S->thr || (c->tail_max && (!S->est || !S->picked || !S->tpart)) ||
      rope_tables(c)) {
    free_ctx(c);
    return NULL;
  }
  return c;
}

static void step_job(void* arg, int tid, int nth) {
  rt_ctx* c = (rt_ctx*)arg;
  const rt_desc* D = &c->desc;
  rt_th th_ = {c, c->pool, tid, nth, 0}, *th = &th_;
  FOR_ITEMS(th, t, c->T + 1) {  /* embeddings (and learned positions); the last item: the attention items */
    if (t == c->T) {
      attention_items(c);
      continue;
    }
    float* x = c->x + t * D->d;
    mat_row(&D->embed, c->tokens[t], x);
    for (int k = 0; k < D->d; k++) x[k] *= D->embed_scale;
    if (D->pos_embed.data) {
      float* pe = c->tmp + t * c->dp;
      mat_row(&D->pos_embed, c->pos[t] + D->pos_offset, pe);
      for (int k = 0; k < D->d; k++) x[k] += pe[k];
    }
  }
  phase_end(th, c->T + 1);
  prof_mark(c, tid, PROF_EMBED);
  for (int l = 0; l < D->n_layers; l++) {
    const rt_layer* L = &D->layers[l];
    if (L->parallel) {  /* both blocks add to x_par, a copy of x, and read x itself */
      FOR_ITEMS(th, t, c->T) memcpy(c->x_par + t * D->d, c->x + t * D->d, (size_t)D->d * sizeof(float));
      phase_end(th, c->T);
    }
    attention_block(th, L, l);
    ffn_block(th, L);
    if (L->parallel) {
      FOR_ITEMS(th, t, c->T) memcpy(c->x + t * D->d, c->x_par + t * D->d, (size_t)D->d * sizeof(float));
      phase_end(th, c->T);
    }
  }
  /* the final norm of the rows that want logits, then the lm_head */
  FOR_ITEMS(th, i, c->n_out) {
    norm_row(D, &D->final_norm, c->x + (int64_t)c->out_rows[i] * D->d, &c->a_in, D->d, (int)i);
    act_convert(&c->a_in, D->d, D->lm_head.dtype, (int)i, (int)i + 1);
  }
  phase_end(th, c->n_out);
  prof_mark(c, tid, PROF_FFN);  /* the final norm */
  const int64_t groups = panel_groups(panels_of(&D->lm_head));
  FOR_ITEMS(th, g, groups) {
    int n0, n1;
    panel_group(&D->lm_head, g, &c->a_in, c->n_out, c->logits, (int)c->ld_logits, &n0, &n1);
    for (int i = 0; i < c->n_out; i++) {
      float* z = c->logits + (int64_t)i * c->ld_logits;
      for (int n = n0; n < n1; n++) {
        float v = (z[n] + (D->lm_bias ? D->lm_bias[n] : 0.0f)) * D->logit_scale;
        if (D->final_softcap > 0.0f) v = tanhf(v / D->final_softcap) * D->final_softcap;
        z[n] = v;
      }
    }
  }
  phase_end(th, groups);
}

/* One step over T tokens: tokens[i] at position pos[i] of sequence slot[i]; logits [n_out, ld]
 * (ld >= vocab rounded up to 16) for the token rows out_rows[0..n_out). Carved layers route the
 * first n_sparse tokens and run the others through every expert at once (where the layer has them
 * packed; else they are routed too). Positions must be below max_ctx, slots below max_slots,
 * T <= max_tokens (the Python side checks). Returns 0, or a negative code (-1: out of memory). */
int rt_step(rt_ctx* c, int T, const int32_t* tokens, const int32_t* pos, const int32_t* slot, int n_sparse, int n_out,
            const int32_t* out_rows, float* logits, int64_t ld_logits) {
  c->T = T;
  c->n_sparse = RT_MAX(0, RT_MIN(n_sparse, T));
  c->tokens = tokens;
  c->pos = pos;
  c->slot = slot;
  c->n_out = n_out;
  c->out_rows = out_rows;
  c->logits = logits;
  c->ld_logits = ld_logits;
  atomic_store(&c->status, 0);
  if (c->profiling) c->prof_mark = now_s();
  pool_run(c->pool, step_job, c);
  prof_mark(c, 0, PROF_LM_HEAD);
  return atomic_load(&c->status);
}

/* Profiling on (1) or off (0); out (if not NULL) receives the seconds per phase summed since the
 * last call (embed, qkv, attention, wo, ffn norm, router, ffn, lm_head), which are then reset. */
void rt_profile(rt_ctx* c, int on, double* out) {
  if (out) memcpy(out, c->prof, sizeof(c->prof));
  memset(c->prof, 0, sizeof(c->prof));
  c->profiling = on;
}
