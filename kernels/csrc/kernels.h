// Every C kernel's entry point, declared once: each kernel source includes this (so the compiler holds its
// definition to it) and the bindings (bind_*.cpp) call through it. The bindings check every tensor before a
// call; the kernels trust their arguments. A kernel returning int: 0, or -1 when it could not get scratch
// memory (the bindings raise MemoryError), or -2 for arguments it does not take.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// ---- the rows a LoRA update reads next, for a weight kernel to prefetch (rows_ahead.h) ------------------
#define AHEAD_REGIONS 8

typedef struct {  // one site's banks (fixed while the banks live): region g of slot s is rank(s) rows of
                  // row[g] bytes from base[g] + s * stride[g]
  int64_t count;
  int64_t base[AHEAD_REGIONS], stride[AHEAD_REGIONS], row[AHEAD_REGIONS];
} BankRegions;

typedef struct {  // one step's slots, in the order the update reads them (shared by its sites)
  int64_t count;
  const int64_t* slot;
  const int64_t* rank;
} SlotsAhead;

// ---- GEMMs on weights kept narrower than fp32 (bf16_weights.c, block_weights.c) -------------------------
// y[M, N] = x[M, K] . W[N, K]^T + bias (bias: NULL or [N]); banks, slots: what to prefetch, or NULL.
int hotlora_linear_bf16w(const float* x, int64_t M, int64_t K, const uint16_t* W, int64_t N, float* y,
                         const float* bias, int threads, const BankRegions* banks, const SlotsAhead* slots);

// block formats of block_weights.c: GGUF's types in the row layouts of kernels/gguf_blocks.py (its Format)
enum {
  HOTLORA_Q4_1 = 0,
  HOTLORA_Q8_0 = 1,
  HOTLORA_Q4_0 = 2,
  HOTLORA_Q4_K = 3,  // rows of a multiple of 256 weights (super-blocks), as Q6_K
  HOTLORA_Q6_K = 4,
  HOTLORA_F16 = 5,
  HOTLORA_BF16 = 6,
  HOTLORA_BLOCK_FORMATS = 7
};
// bytes of a row of K weights in format fmt, or -1 for a fmt or K the kernel does not take
int64_t hotlora_block_row_bytes(int fmt, int64_t K);
int hotlora_linear_blocks(const float* x, int64_t M, int64_t K, const uint8_t* W, int fmt, int64_t N,
                          float* y, const float* bias, int threads, const BankRegions* banks,
                          const SlotsAhead* slots);
// out[i] = the fp32 row rows[i] of W (every row in order when rows is NULL)
int hotlora_widen_blocks(const uint8_t* W, int fmt, int64_t K, const int64_t* rows, int64_t n, float* out,
                         int threads);
int hotlora_widen_blocks_bf16(const uint8_t* W, int fmt, int64_t K, int64_t n, uint16_t* out, int threads);

// ---- GGUF's Q4_K / Q6_K blocks from fp32 rows, llama.cpp's reference quantizers (quantize_k.c) ---------
// x: rows x k fp32 (k a multiple of 256); out: rows x (k / 256) GGUF blocks (144 / 210 bytes each)
void hotlora_quantize_q4_k(const float* x, int64_t rows, int64_t k, uint8_t* out, int threads);
void hotlora_quantize_q6_k(const float* x, int64_t rows, int64_t k, uint8_t* out, int threads);
// for tests of rows_ahead.h: the lines `tiles` tiles of `steps` steps ask for (at most cap written)
int64_t hotlora_ahead_lines(const BankRegions* banks, const SlotsAhead* slots, int64_t tiles, int64_t steps,
                            int64_t* out, int64_t cap);

// ---- a decoder layer's small ops (decoder_ops.c) --------------------------------------------------------
int hotlora_rms_norm(const float* x, int64_t rows, int64_t h, int64_t x_row, const float* w, float eps,
                     float* out, int threads);
int hotlora_add_rms_norm(float* x, int64_t rows, int64_t h, int64_t x_row, const float* y, int64_t y_row,
                         const float* w, float eps, float* out, int threads);
int hotlora_rope(float* qkv, int64_t rows, int64_t row_stride, int64_t heads, int64_t d, const float* cos_t,
                 const float* sin_t, const int64_t* positions, int threads);
int hotlora_kv_write(const float* k, const float* v, int64_t rows, int64_t src_row, int64_t width,
                     const int64_t* slots, float* k_pool, float* v_pool);
int hotlora_silu_mul(const float* gate_up, int64_t rows, int64_t inter, int64_t row, float* out, int threads);

// ---- attention (paged_decode_attention.c, prefill_attention.c) ------------------------------------------
int hotlora_paged_decode_attention(const float* q, int64_t rows, int64_t heads, int64_t d, int64_t q_row,
                                   int64_t q_head, const float* k_pool, const float* v_pool, int64_t bs,
                                   int64_t kv_heads, const int64_t* tables, int64_t width, const int64_t* lens,
                                   int64_t window, float scale, float* out, int threads);
int hotlora_prefill_attention(const float* q, int64_t length, int64_t heads, int64_t d, int64_t q_row,
                              const float* k, int64_t k_row, const float* v, int64_t v_row,
                              int64_t kv_heads, int64_t context, int64_t window, float scale, float* out,
                              int threads);
int hotlora_prefill_attention_bf16(const float* q, int64_t length, int64_t heads, int64_t d, int64_t q_row,
                                   const float* k, int64_t k_row, const float* v, int64_t v_row,
                                   int64_t kv_heads, int64_t context, int64_t window, float scale, float* out,
                                   int threads);

// ---- the multi-LoRA update of short segments (lora_decode.c) --------------------------------------------
// A fused projection's update: the shrink over the packed bank a [S, slices * r_max, k], then slice i's
// expand from the bank at b_ptrs[i] ([S, outs[i], r_max] contiguous, or rank-major for the _t builds) into
// y's columns offsets[i]..; scales [slices, num_slots]; u: [tokens, slices * r_max] scratch.
#define HOTLORA_DECLARE_PACKED(NAME, T)                                                                    \
  int NAME(const float* x, int64_t tokens, int64_t x_row, const int64_t* slots, const T* a, int64_t k,      \
           int64_t slices, int64_t r_max, const int64_t* ranks, float* u, const int64_t* b_ptrs,            \
           const int64_t* outs, const int64_t* offsets, const float* scales, int64_t num_slots, float* y,   \
           int64_t y_row, int threads_shrink, int threads_expand);
HOTLORA_DECLARE_PACKED(hotlora_lora_packed, float)
HOTLORA_DECLARE_PACKED(hotlora_lora_packed_bf16, uint16_t)
HOTLORA_DECLARE_PACKED(hotlora_lora_packed_t, float)
HOTLORA_DECLARE_PACKED(hotlora_lora_packed_t_bf16, uint16_t)

#ifdef __cplusplus
}
#endif
