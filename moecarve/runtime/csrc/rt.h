/* moecarve's decode runtime: the data structures shared by its C files and mirrored, field for
 * field, by moecarve/runtime/native.py (ctypes). Change both together.
 *
 * A model is a pre-norm decoder stack in one canonical form that every family we run maps onto
 * (runtime/weights.py does the mapping):
 *   x = embed[token] * embed_scale (+ pos_embed[pos + pos_offset])
 *   per layer:  a = attn(in_norm(x)) ; x = x + post_attn_norm(a) * residual_scale
 *               f = ffn(ffn_norm(x)) ; x = x + post_ffn_norm(f) * residual_scale
 *   logits = softcap(lm_head(final_norm(x)) * logit_scale)
 * where any norm may be absent (OLMo-2 has no pre-norms, Gemma 2/3 have all four) and the FFN is
 * dense (gated or plain) or carved (shared neurons + routed experts picked by a router). A
 * parallel layer (Cohere) adds attn(in_norm(x)) and ffn(ffn_norm(x)) to the same x.
 *
 * Matrices [N, K] (N outputs, K inputs) are stored in one of three element types:
 *   RT_F32   float32
 *   RT_BF16  bfloat16
 *   RT_I8    int8 in blocks of 32 along K with one float16 scale per block (the Q8_0 scheme),
 *            stored offset by +128 as uint8 (so AVX-512 VNNI multiplies it, unsigned, by the signed
 *            int8 activations; the offset is removed with the activations' block sums)
 * and one of two layouts:
 *   RT_PANEL rows grouped in panels of 16: [N/16][K/kp][16][kp] with kp = 1 (f32), 2 (bf16) or
 *            4 (i8) consecutive k per output, the order the dot-product instructions consume, so
 *            a matrix-vector product is one broadcast and one fused multiply-add per 64 bytes.
 *            int8 scales: [N/16][K/32][16]. N is padded to 16 and K to 32 with zeros.
 *   RT_ROWS  row-major [N][K] (K padded to 32 with zeros), read a row at a time: the carved
 *            experts' rows, picked per token. An int8 row is its K codes followed by its K/32
 *            float16 scales, padded to a multiple of 64 bytes (rt_row_bytes): one contiguous run.
 */
#ifndef MOECARVE_RT_H
#define MOECARVE_RT_H

#include <stdint.h>

enum { RT_F32 = 0, RT_BF16 = 1, RT_I8 = 2 };
enum { RT_PANEL = 0, RT_ROWS = 1 };
enum { RT_NORM_RMS = 0, RT_NORM_LAYER = 1 };
enum { RT_FFN_NONE = 0, RT_FFN_DENSE = 1, RT_FFN_MOE = 2 };
/* activations: vecmath.h's ACT_* codes (kernels/vecmath.h) */
/* routers: how scores are made; selection: top-A of (score + bias) or of (softmax(score) + bias) */
enum { RT_ROUTER_SHADOW = 0, RT_ROUTER_ANALYTIC = 1, RT_ROUTER_LINEAR = 2, RT_ROUTER_FITTED = 3 };

#define RT_PANEL_ROWS 16
#define RT_BLOCK 32

typedef struct {
  const void* data;     /* the elements, in `layout` */
  const uint16_t* scales;  /* RT_I8: float16 block scales; else NULL */
  int32_t rows, cols;   /* N, K as the model has them (unpadded) */
  int32_t dtype, layout;
} rt_mat;

typedef struct {
  const float* w;       /* [d] (the (1 + w) of Gemma's norms already folded in) or NULL: no norm */
  const float* b;       /* [d] LayerNorm bias or NULL */
  float eps;
} rt_norm;

/* A dense MLP: gated, in_w holds gate and up rows interleaved by panel (gate panel p, then up
 * panel p: rows [32p, 32p+16) gate, [32p+16, 32p+32) up) so one thread computes act(g) * u of its
 * neurons; plain, in_w holds the n rows. out_w [d, n]. */
typedef struct {
  rt_mat in_w, out_w;
  const float* in_b;    /* [2n] in in_w's row order, or [n]; NULL: none */
  const float* out_b;   /* [d] or NULL */
  int32_t n;            /* neurons */
} rt_dense;

/* A carved layer (moecarve.modules.moe.CarvedMoE): y = shared(x) + sum_a w_a expert_{e_a}(x) + b.
 * Routed experts: E experts of m neurons. Every routed neuron (e, j), numbered n = e*m + j, owns P
 * consecutive rows of `neurons` (RT_ROWS): gated P = 3, its gate row, its up row and its output
 * column (the module's out_proj[e][:, j]); plain P = 2, its input row and its output column. A
 * picked neuron is then one contiguous run of memory, which the prefetchers stream once it starts
 * (the picks are scattered, so where each run starts cannot be predicted). */
typedef struct {
  int32_t E, m, A;       /* routed experts, neurons per expert, experts picked per token */
  rt_mat neurons;        /* [E * m * P, d] rows */
  int32_t per;           /* P: 3 (gated) or 2 */
  const float* bias;     /* [E * m][2]: each neuron's gate and up biases (plain: its input bias, then 0), or NULL */
  rt_dense shared;       /* shared neurons (n == 0: none) */
  const float* out_bias; /* [d] or NULL */
  rt_dense all;          /* every neuron, shared and routed, as one dense MLP with combine weight 1 (what
                            the layer computes with every expert picked), or n == 0: not packed. Tokens
                            a step does not route (rt_step's n_sparse) take it. */
  /* router */
  int32_t router, rank_softmax, weight_mode;  /* weight_mode 0: 1 + p*scale; 1: p*(1 + scale); 2: normalised p*(1+scale) */
  const float* r_bias;   /* [E] load-balancing bias */
  const float* r_scale;  /* [E] combine scale */
  float threshold;       /* shadow "threshold" selection: pick score + bias > threshold (<= A); +inf: top-A */
  /* shadow router: codes [E * R, d/2] uint8 nibbles (bits 4) or [E * R, d] int8 (bits 8) */
  const uint8_t* sh_codes;
  int32_t sh_bits;
  const float* sh_scale;    /* [E * R] */
  const float* sh_bias;     /* [E * R] or NULL */
  /* analytic / linear / fitted routers: float32 row-major matrices */
  const float* r_w;      /* analytic: [2E, d] gate rows then up rows (or [E, d] plain); linear: [E, d];
                            fitted: [E, d + P] */
  const float* r_b;      /* fitted: [E] score bias; else NULL */
  const float* probe_w;  /* fitted: [P * (2 or 1), d] probe gate rows then up rows */
  const float* probe_b;  /* fitted: probe bias or NULL */
  int32_t probes;        /* fitted: P */
  /* the tail (moecarve.modules.moe.TailNeurons; shadow router only): each routed neuron n outside
   * the token's picked experts whose signed estimate est_n (the router's act(g~) * u~) has
   * |est_n| > tail_threshold adds est_n * tail_scale[n] * (code - 8) over its output column */
  const uint8_t* tail_codes;  /* [E * m, ceil(d/2)] 4-bit codes + 8, element k low nibble, k + ceil(d/2) high; NULL: no tail */
  const float* tail_scale;    /* [E * m] */
  float tail_threshold;
} rt_moe;

typedef struct {
  rt_norm in_norm, post_attn_norm, ffn_norm, post_ffn_norm;
  rt_mat wqkv;           /* [(H + 2 Hkv) * hd, d]: q rows, k rows, v rows */
  const float* bqkv;     /* or NULL */
  const float* q_norm;   /* [hd] per-head RMSNorm of q and k (Qwen3, Gemma 3, OLMo-2 style) or NULL */
  const float* k_norm;
  int32_t qk_norm_full;  /* 1: q_norm/k_norm span all heads ([H*hd], [Hkv*hd]: OLMo-2) */
  int32_t qk_norm_after_rope;  /* 1: the q/k norms follow RoPE (HunYuan) */
  float qk_eps;
  int32_t parallel;      /* 1: attention and FFN both read this layer's input (Cohere, GPT-J style) */
  rt_mat wo;             /* [d, H * hd] */
  const float* bo;
  int32_t window;        /* sliding window in positions (0: global) */
  const float* inv_freq; /* [rot/2] this layer's RoPE frequencies, NULL: no RoPE */
  float rope_scale;      /* cos/sin multiplier (YaRN / LongRoPE attention scaling), 1 otherwise */
  int32_t ffn_kind;
  int32_t act, gated;
  rt_dense dense;
  rt_moe moe;
} rt_layer;

typedef struct {
  int32_t n_layers, d, H, Hkv, hd, rot, vocab;
  int32_t max_ctx, max_slots, max_tokens;  /* cache positions per slot, slots, tokens per step */
  int32_t norm_kind;
  float norm_eps;
  float embed_scale, residual_scale, attn_scale, attn_softcap, final_softcap, logit_scale;
  int32_t pos_offset;    /* learned positions: row pos + pos_offset (OPT: 2) */
  int32_t rope_interleaved;  /* RoPE rotates pairs (2i, 2i+1) (GPT-J / Cohere / GLM) instead of (i, i + rot/2) */
  int32_t kv_dtype;      /* RT_F32 or RT_BF16 */
  rt_mat embed;          /* [V, d] any layout (rows are gathered) */
  rt_mat pos_embed;      /* [P, d] or data NULL */
  rt_norm final_norm;
  rt_mat lm_head;        /* [V, d] panels */
  const float* lm_bias;  /* [V] or NULL */
  const rt_layer* layers;
} rt_desc;

#endif
