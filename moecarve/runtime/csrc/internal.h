/* What the runtime's C files share with each other (not with Python): the thread pool, the
 * prepared activations of a matrix product, the kernels and the model context. */
#ifndef MOECARVE_RT_INTERNAL_H
#define MOECARVE_RT_INTERNAL_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "rt.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define RT_AVX512 1
#if defined(__AVX512BF16__)
#define RT_AVX512BF16 1
#endif
#if defined(__AVX512VNNI__)
#define RT_VNNI 1
#endif
#endif

#define RT_ALIGN 64
#define RT_MIN(a, b) ((a) < (b) ? (a) : (b))
#define RT_MAX(a, b) ((a) > (b) ? (a) : (b))

static inline int64_t rt_pad(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

/* RT_ROWS int8 rows: Kp codes, then Kp/32 float16 scales, padded to 64 bytes (rt.h) */
static inline int64_t rt_row_bytes(int64_t Kp) { return rt_pad(Kp + 2 * (Kp / 32), 64); }

/* ------------------------------------------------------------------ thread pool (pool.c) */

typedef struct rt_pool rt_pool;
typedef void (*rt_job)(void* arg, int tid, int nth);

rt_pool* pool_create(int n_threads, int max_phases);
void pool_free(rt_pool* p);
int pool_size(const rt_pool* p);
/* Runs job(arg, tid, n) on every thread of the pool (the caller is thread 0); returns when all are done. */
void pool_run(rt_pool* p, rt_job job, void* arg);
/* Every thread of the running job waits here until all have arrived. */
void pool_barrier(rt_pool* p);
/* phases of the running job (pool.c): claim an item (-1: none left), mark one done, wait for all n */
int64_t pool_claim(rt_pool* p, int phase, int64_t n);
void pool_done(rt_pool* p, int phase, int64_t n);
void pool_wait(rt_pool* p, int phase, int64_t n);

/* [lo, hi) of n items for thread tid of nth, in contiguous, near-equal shares */
static inline void rt_share(int64_t n, int tid, int nth, int64_t* lo, int64_t* hi) {
  *lo = n * tid / nth;
  *hi = n * (tid + 1) / nth;
}

/* A thread's place in a step: every thread runs the same phases in the same order; a phase is n
 * independent items that any thread may take (FOR_ITEMS), and phase_end waits until all are done.
 * Which thread computes an item never changes what it computes. */
typedef struct rt_ctx rt_ctx;
typedef struct {
  rt_ctx* c;
  rt_pool* pool;
  int tid, nth, phase;
} rt_th;

#define FOR_ITEMS(th, i, n) \
  for (int64_t i = pool_claim((th)->pool, (th)->phase, (n)); i >= 0; \
       pool_done((th)->pool, (th)->phase, (n)), i = pool_claim((th)->pool, (th)->phase, (n)))

static inline void phase_end(rt_th* th, int64_t n) {
  pool_wait(th->pool, th->phase, n);
  th->phase++;
}

/* items of a panel product: groups of up to 4 panels (one tile's width) */
#define PANEL_GROUP 4
static inline int64_t panel_groups(int64_t panels) { return (panels + PANEL_GROUP - 1) / PANEL_GROUP; }

/* ------------------------------------------------------------------ numbers (math.c) */

static inline float bf16_to_f32(uint16_t b) {
  union { uint32_t u; float f; } v = {.u = (uint32_t)b << 16};
  return v.f;
}
static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even (NaN kept NaN) */
  union { float f; uint32_t u; } v = {.f = f};
  if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);
  return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}
static inline float f16_to_f32(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  union { uint32_t u; float f; } v;
  if (exp == 0) {  /* zero or subnormal: man * 2^-24 */
    v.f = (float)man * 5.9604644775390625e-8f;
    v.u |= sign;
    return v.f;
  }
  v.u = exp == 31 ? sign | 0x7f800000u | (man << 13) : sign | ((exp + 112u) << 23) | (man << 13);
  return v.f;
#endif
}

void act_inplace(float* v, int n, int act);
void rms_norm(const float* x, const float* w, int n, float eps, float* out);
void layer_norm(const float* x, const float* w, const float* b, int n, float eps, float* out);
/* softmax over v[0..n) in place; returns nothing, v sums to 1 */
void softmax_inplace(float* v, int n);

/* ------------------------------------------------------------------ activations of a product */

/* The input rows of a matrix product, converted once for whatever weight dtype reads them:
 * f [T, ld] float32 (always), b [T, ld] bfloat16, q [T, ld] int8 with s / sum [T, ld/32] block
 * scales and block sums of q. ld = K padded to 32; the padding is zero. */
typedef struct {
  float* f;
  uint16_t* b;
  int8_t* q;
  float* s;
  int32_t* sum;
  int32_t ld;
} rt_act;

/* rows [t0, t1) of x [T, K] (row stride ldx) into a (for dtype's needs; f always) */
void act_prepare(const float* x, int ldx, int K, int dtype, rt_act* a, int t0, int t1);
/* only the conversion from a->f (already written) into a's dtype view, rows [t0, t1) */
void act_convert(rt_act* a, int K, int dtype, int t0, int t1);

/* ------------------------------------------------------------------ matrix products (matmul.c) */

/* Y[t, n] = W[n, :] . X[t, :] for panels [p0, p1) (outputs 16 p0 .. 16 p1) and tokens [0, T),
 * W in RT_PANEL layout; Y row stride ldy. */
void panel_matmul(const rt_mat* W, int p0, int p1, const rt_act* X, int T, float* Y, int ldy);
void panel_tile(int dtype, const void* W, int64_t ps, int Kp, const void* X, int ldx, float* Y, int ldy, int np, int nt);
/* y[0..k1-k0) += s * W[row, k0:k1] for a RT_ROWS matrix (k0, k1 multiples of 32 or k1 = cols) */
void row_axpy(const rt_mat* W, int64_t row, float s, int k0, int k1, float* y);
/* neurons.c: the picked neurons' rows (RT_ROWS) */
void token_spread(const rt_act* X, int64_t t, int64_t Kp, float* spread, float* corr);
void rows_dot(const rt_mat* W, const int64_t* rows, int n, const rt_act* X, int64_t t, const float* spread,
              const float* corr, float* out);
void rows_axpy(const rt_mat* W, const int64_t* rows, const float* h, int n, int k0, int k1, float* y);
void unit_down(const rt_mat* W, const int64_t* rows, const float* h, int n, int d, float* part);
/* scratch: 4 * (Kp / 4 + Kp / 32) floats (int8 rows) */
void rows2_dot_tokens(const rt_mat* W, int64_t ra, int64_t rb, const rt_act* X, const int32_t* tokens, int n,
                      float* oa, float* ob, float* scratch);
/* row n of any matrix as float32 [cols] (embeddings: gathered, not multiplied) */
void mat_row(const rt_mat* W, int64_t n, float* out);
int64_t panels_of(const rt_mat* W);

/* ------------------------------------------------------------------ from kernels/native.c */

float quantize_token(const float* x, int d, int8_t* q, int32_t* sum);
int shadow_scores_q(const int8_t* q, const float* qs, const int32_t* qsum, int T, int d, const void* codes, int layout,
                    const float* row_scale, const float* in_bias, int E, int m, int gated, int act, float* scores,
                    int lds, float* est, int64_t lde);
void select_top(const float* v, int32_t* ids, int n, int k);

/* ------------------------------------------------------------------ the model context (step.c) */

typedef struct {
  const float* inv_freq;  /* the frequencies this table was made from (layers sharing them share it) */
  float scale;
  float* cs;              /* [max_ctx][rot/2] cos, then [max_ctx][rot/2] sin, times scale */
} rt_rope;

/* Below this many tokens a step computes each token's picked neurons in turn (decode: their rows
 * are read once per token, from memory or cache); from it on, each picked neuron in turn for all
 * the tokens that picked it (prefill: the rows stay in cache while the tokens stream). */
#define EXPERT_MAJOR_T 16
/* token-major work comes in units of this many of a token's picked neurons, each summing into its
 * own partial output; the partials are added in unit order, so the result does not depend on how
 * units are shared among threads */
#define NEURON_CHUNK 32
/* a token's tail (the routed neurons outside its picks with |estimate| above the tail's threshold)
 * is scanned in this many ranges of neurons, each summing into its own partial output */
#define TAIL_ITEMS 8

/* what a carved layer's step keeps between its phases (sized for max_tokens) */
typedef struct {
  float* scores;          /* [T, E] */
  int32_t* idx;           /* [T, A] picked experts (-1: none) */
  float* w;               /* [T, A] combine weights */
  int32_t* start;         /* [E + 1] the sorted slots of expert e: start[e] .. start[e+1] */
  int32_t* slot;          /* [T * A] slot ids (t * A + a) sorted by expert */
  int32_t* tok;           /* [T * A] the token of each sorted slot */
  float* h;               /* [T * A, m] hidden activations of each slot, weighted (expert-major) */
  float* part;            /* [T * units, dp] token-major partial outputs (ffn.c: NEURON_CHUNK) */
  int32_t n_slots;        /* valid entries of slot */
  int8_t* sq;             /* [T, d] the shadow router's int8 tokens, their scales and sums */
  float* sqs;
  int32_t* sqsum;
  float* feats;           /* fitted router: [T, d + P] */
  float* est;             /* tail: [T, N] the shadow router's signed estimates of the N = E m routed neurons */
  uint64_t* picked;       /* tail: [T, ceil(E / 64)] bitmap of each token's picked experts */
  float* tpart;           /* tail: [T * TAIL_ITEMS, dp] partial outputs (ffn.c) */
  float* thr;             /* [threads][thr_len] per-thread scratch (selection, gate/up values) */
  int64_t thr_len;
} rt_moe_scratch;

/* one unit of attention work: rows (token t0 + i, head h0 + j), i < nt, j < nh, of kv head g */
#define RT_ATT_ROWS 6
#define RT_MAX_HD 512
typedef struct {
  int32_t t0, nt, g, h0, nh;
} rt_att_item;

/* where a step's time goes (thread 0's wall time between the barriers that end each phase) */
enum { PROF_EMBED, PROF_QKV, PROF_ATTENTION, PROF_WO, PROF_FFN_NORM, PROF_ROUTER, PROF_FFN, PROF_LM_HEAD, PROF_N };

struct rt_ctx {
  rt_desc desc;
  rt_pool* pool;
  int64_t dp, qkv_n, att_n, n_max, E_max, A_max, m_max, feats_max, tail_max;  /* scratch widths (padded; tail_max: E m of tailed layers, 0: none) */
  int64_t hdp, ctx_p;     /* head_dim padded to 32, max_ctx padded to 16 */
  /* KV cache: [L][slots][Hkv] blocks of ctx_p positions x hdp, kv_dtype elements (attention.c) */
  void* k_cache;
  void* v_cache;
  rt_rope* ropes;         /* [n_layers]; cs shared between layers with the same frequencies */
  /* step buffers, [max_tokens] rows each */
  float* x;               /* [T, d] residual stream */
  float* x_par;           /* [T, d] a parallel layer's sum (attention and FFN both read x) */
  float* tmp;             /* [T, dp] a block's output before the residual add */
  float* qkv;             /* [T, qkv_n] */
  rt_act a_in;            /* [T, dp] normed input of the block's first product */
  rt_act a_att;           /* [T, att_n] attention output, the input of wo */
  rt_act a_h;             /* [T, n_max] FFN hidden activations, the input of the down product */
  float* hbuf;            /* [T, 2 * n_max] gate/up outputs before the activation */
  rt_moe_scratch moe;
  float* att_scratch;     /* [threads][att_scratch_len]: scores and queries of an attention item */
  int64_t att_scratch_len;
  rt_att_item* items;     /* [max_tokens * H] this step's attention items */
  int n_items;
  /* the step being run */
  int T, n_out;
  int n_sparse;           /* its first n_sparse tokens are routed in carved layers, the rest take `all` */
  const int32_t *tokens, *pos, *slot, *out_rows;
  float* logits;          /* [n_out, ld_logits] */
  int64_t ld_logits;
  _Atomic int status;     /* 0, or a negative error code set by any thread */
  int profiling;
  double prof[PROF_N];    /* seconds per phase, summed over steps */
  double prof_mark;       /* when the running phase started */
};

/* thread 0, when profiling: the time since the last mark goes to `phase` */
void prof_mark(rt_ctx* c, int tid, int phase);
/* phases of a layer at most (for the pool's phase counters) */
#define PHASES_PER_LAYER 48

void* rt_alloc(size_t bytes);  /* 64-byte aligned, zeroed; NULL when out of memory */
/* normalise token row t of x into a->f (norm absent: a copy) and convert it for dtype */
void norm_token(const rt_ctx* c, const rt_norm* n, const float* x, int ldx, rt_act* a, int K, int dtype, int t);
/* xr[t] += post(y[t]) * residual_scale for token row t (post absent: y itself) */
void residual_token(rt_ctx* c, float* xr, const rt_norm* post, float* y, int ldy, int t);
/* the panel product of group g (panels [4g, 4g + 4)): Y = W X for T token rows; its first and last outputs */
void panel_group(const rt_mat* W, int64_t g, const rt_act* X, int T, float* Y, int ldy, int* n0, int* n1);
/* where a block adds its output: x, or x_par in a parallel layer */
static inline float* residual_of(rt_ctx* c, const rt_layer* L) { return L->parallel ? c->x_par : c->x; }

/* attention.c */
int rope_tables(rt_ctx* c);
int attention_items(rt_ctx* c);
void attention_block(rt_th* th, const rt_layer* L, int l);
/* ffn.c */
void ffn_block(rt_th* th, const rt_layer* L);

#endif
