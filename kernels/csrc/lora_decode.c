// The multi-LoRA update of batches of short segments (decode: every token its own adapter slot; a prefill
// of many short prompts): each slot's rows read from the banks in place (no gathered copies), each slot's
// own rank honoured.
//
//   shrink:  u[t, i*R + j] = A[s, i*R + j, :] . x[t]          for each slice i < slices, j < rank[s]
//   expand:  y[t, n]      += scale[s] * sum_j B[s, n, j] * u[t, off + j]      for j < rank[s]
// with s = slots[t] (-1: no adapter, skipped). A fused projection (q/k/v) shrinks once over its packed bank
// and expands once per slice. At decode these reads are the whole cost (32 rank-16 adapters hold more bytes
// than the base model), so the loops stream each adapter's rows once, per run of tokens on its slot. B comes
// in two layouts: [S, n, R] contiguous, whose per-output dot products of length R come out 16 at a time from
// one transposing add tree, and rank-major [S, R, n] (the CPU banks), summed along output rows.
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#include "sums16.h"

#define AI static inline __attribute__((always_inline))

// 16 bank values (m: which of them) as fp32, from an fp32 bank or a bf16 one (--weight-dtype bfloat16)
AI __m512 load_f32(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
AI __m512 load_bf16(__mmask16 m, const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// Two sums over alternate 16-element chunks: two chains of dependent adds instead of one, so the next
// loads are not held up behind the adds (a bf16 row streams at twice the elements per byte).
#define DEFINE_DOT(NAME, T, LOAD)                                                                          \
  AI float NAME(const T* a, const float* b, int64_t n) {                                                     \
    __m512 acc = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps();                                            \
    int64_t i = 0;                                                                                           \
    for (; i + 32 <= n; i += 32) {                                                                           \
      acc = _mm512_fmadd_ps(LOAD(0xFFFF, a + i), _mm512_loadu_ps(b + i), acc);                               \
      acc2 = _mm512_fmadd_ps(LOAD(0xFFFF, a + i + 16), _mm512_loadu_ps(b + i + 16), acc2);                   \
    }                                                                                                        \
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(LOAD(0xFFFF, a + i), _mm512_loadu_ps(b + i), acc);    \
    if (i < n) {                                                                                             \
      __mmask16 m = (__mmask16)((1u << (n - i)) - 1);                                                        \
      acc = _mm512_fmadd_ps(LOAD(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);                           \
    }                                                                                                        \
    return _mm512_reduce_add_ps(_mm512_add_ps(acc, acc2));                                                   \
  }
DEFINE_DOT(dot_f32, float, load_f32)
DEFINE_DOT(dot_bf16, uint16_t, load_bf16)

// One weight row against four tokens' x rows (stride xs): the row is read once for the four, and four
// independent sums keep the FMA units busy where one dependent chain would wait on each add.
#define DEFINE_DOT4(NAME, T, LOAD)                                                                         \
  AI void NAME(const T* a, const float* x, int64_t xs, int64_t n, float* out, int64_t os) {                  \
    __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;                                              \
    int64_t i = 0;                                                                                           \
    for (; i + 16 <= n; i += 16) {                                                                           \
      __m512 w = LOAD(0xFFFF, a + i);                                                                        \
      c0 = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + i), c0);                                                   \
      c1 = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + xs + i), c1);                                              \
      c2 = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + 2 * xs + i), c2);                                          \
      c3 = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + 3 * xs + i), c3);                                          \
    }                                                                                                        \
    if (i < n) {                                                                                             \
      __mmask16 m = (__mmask16)((1u << (n - i)) - 1);                                                        \
      __m512 w = LOAD(m, a + i);                                                                             \
      c0 = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(m, x + i), c0);                                          \
      c1 = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(m, x + xs + i), c1);                                     \
      c2 = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(m, x + 2 * xs + i), c2);                                 \
      c3 = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(m, x + 3 * xs + i), c3);                                 \
    }                                                                                                        \
    out[0] = _mm512_reduce_add_ps(c0);                                                                       \
    out[os] = _mm512_reduce_add_ps(c1);                                                                      \
    out[2 * os] = _mm512_reduce_add_ps(c2);                                                                  \
    out[3 * os] = _mm512_reduce_add_ps(c3);                                                                  \
  }
DEFINE_DOT4(dot4_f32, float, load_f32)
DEFINE_DOT4(dot4_bf16, uint16_t, load_bf16)

// Work is split into pieces: runs of consecutive tokens on one slot (a prefill chunk; a single token at
// decode), cut at PIECE tokens so a long run still spreads over the threads. A piece reads its adapter's
// rows once from memory; its other tokens find them in cache.
#define PIECE 16

// starts[0..n) the first token of each piece, starts[n] = tokens; starts holds tokens + 1 entries
static int64_t pieces_of(const int64_t* slots, int64_t tokens, int64_t* starts) {
  int64_t n = 0;
  for (int64_t t = 0; t < tokens; t++)
    if (t == 0 || slots[t] != slots[t - 1] || t - starts[n - 1] >= PIECE) starts[n++] = t;
  starts[n] = tokens;
  return n;
}

// Scratch for the piece table: on the stack for decode-sized batches, from the heap past that.
#define WITH_PIECES(slots, tokens, starts, n, ...)                                 \
  do {                                                                              \
    int64_t small_[257];                                                            \
    int64_t* starts = (tokens) < 257 ? small_ : malloc(((tokens) + 1) * sizeof(int64_t)); \
    if (!starts) return -1;                                                         \
    int64_t n = pieces_of(slots, tokens, starts);                                   \
    __VA_ARGS__;                                                                    \
    if (starts != small_) free(starts);                                             \
  } while (0)

// Rows this far ahead are asked for while one is summed: a row of a bf16 bank is summed twice as fast per
// byte as it streams, and the hardware prefetcher alone left one thread at 10 GB/s of its 14.
#define PREFETCH_ROWS 2
AI void prefetch_row(const void* p, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch((const char*)p + off, _MM_HINT_T0);
}

#define DEFINE_SHRINK(NAME, T, DOT, DOT4) \
int NAME(const float* x, int64_t tokens, int64_t x_row, const int64_t* slots, const T* a,                             \
                        int64_t rows_per_slot, int64_t k, int64_t slices, int64_t r_max, const int64_t* ranks,        \
                        float* u, int threads) {                                                                      \
  WITH_PIECES(slots, tokens, starts, pieces, {                                                                        \
_Pragma("omp parallel for schedule(static) collapse(2) num_threads(threads)")                                         \
  for (int64_t p = 0; p < pieces; p++)                                                                                \
    for (int64_t i = 0; i < slices; i++) {                                                                            \
      int64_t t0 = starts[p], t1 = starts[p + 1], s = slots[t0];                                                      \
      int64_t r = s < 0 ? 0 : ranks[s];                                                                               \
      float* ui = u + i * r_max;                                                                                      \
      for (int64_t t = t0; t < t1; t++)                                                                               \
        for (int64_t j = r; j < r_max; j++) ui[t * rows_per_slot + j] = 0.0f;                                         \
      for (int64_t j = 0; j < r; j++) {                                                                               \
        const T* row = a + (s * rows_per_slot + i * r_max + j) * k;                                                   \
        if (j + PREFETCH_ROWS < r) prefetch_row(row + PREFETCH_ROWS * k, k * (int64_t)sizeof(T));                     \
        int64_t t = t0;                                                                                               \
        for (; t + 4 <= t1; t += 4) DOT4(row, x + t * x_row, x_row, k, ui + t * rows_per_slot + j, rows_per_slot);    \
        for (; t < t1; t++) ui[t * rows_per_slot + j] = DOT(row, x + t * x_row, k);                                   \
      }                                                                                                               \
    }                                                                                                                 \
  });                                                                                                                 \
  return 0;                                                                                                           \
}

// y[t, n0 + q] += scale * sum_j B[n0 + q, j] u[t, j] for the 16 outputs of a block (Q of them at the edge)
#define EXPAND_BLOCK(T, LOAD, Q)                                                                                      \
  {                                                                                                                   \
    __m512 acc[16];                                                                                                   \
    for (int q = 0; q < 16; q++) acc[q] = _mm512_setzero_ps();                                                        \
    for (int64_t j = 0; j < r; j += 16) {                                                                             \
      __mmask16 m = r - j >= 16 ? 0xFFFF : (__mmask16)((1u << (r - j)) - 1);                                          \
      __m512 uv = _mm512_maskz_loadu_ps(m, ut + j);                                                                   \
      for (int q = 0; q < (Q); q++) acc[q] = _mm512_fmadd_ps(uv, LOAD(m, bs + (n0 + q) * r_max + j), acc[q]);         \
    }                                                                                                                 \
    __m512 sums = reduce16(acc);                                                                                      \
    __m512 cur = _mm512_maskz_loadu_ps(out, yt + n0);                                                                 \
    _mm512_mask_storeu_ps(yt + n0, out, _mm512_fmadd_ps(_mm512_set1_ps(scale), sums, cur));                           \
  }

#define DEFINE_EXPAND(NAME, T, LOAD) \
int NAME(const float* u, int64_t tokens, int64_t u_row, int64_t u_off, const int64_t* slots,                          \
                        const T* b, int64_t n, int64_t r_max, const int64_t* ranks, const float* scales,              \
                        float* y, int64_t y_row, int threads) {                                                       \
  int64_t blocks = (n + 15) / 16;                                                                                     \
  WITH_PIECES(slots, tokens, starts, pieces, {                                                                        \
_Pragma("omp parallel for schedule(static) collapse(2) num_threads(threads)")                                         \
  for (int64_t p = 0; p < pieces; p++)                                                                                \
    for (int64_t blk = 0; blk < blocks; blk++) {                                                                      \
      int64_t t0 = starts[p], t1 = starts[p + 1], s = slots[t0];                                                      \
      if (s < 0 || ranks[s] == 0) continue;                                                                           \
      int64_t r = ranks[s], n0 = blk * 16, nn = n - n0 < 16 ? n - n0 : 16;                                            \
      const T* bs = b + s * n * r_max;                                                                                \
      float scale = scales[s];                                                                                        \
      __mmask16 out = nn == 16 ? 0xFFFF : (__mmask16)((1u << nn) - 1);                                                \
      for (int64_t t = t0; t < t1; t++) { /* the block's B rows stay in L1 across the piece's tokens */               \
        const float* ut = u + t * u_row + u_off;                                                                      \
        float* yt = y + t * y_row;                                                                                    \
        if (nn == 16) EXPAND_BLOCK(T, LOAD, 16) else EXPAND_BLOCK(T, LOAD, nn)                                        \
      }                                                                                                               \
    }                                                                                                                 \
  });                                                                                                                 \
  return 0;                                                                                                           \
}

// The expand over a rank-major B (the CPU banks' layout: storage [S, R, n], row j holding every output's
// weight for rank j, seen by torch as a [S, n, R] view): d = sum_j u[t, j] * B[s, j, :], then y[t] +=
// scale * d. Summed per output lane in j order, so no horizontal sums; a slot's rows are read in storage
// order, one stream, for up to TCHUNK outputs at a time (d sits on the stack, in L1).
#define TCHUNK 2048
#define DEFINE_EXPAND_T(NAME, T, LOAD) \
int NAME(const float* u, int64_t tokens, int64_t u_row, int64_t u_off, const int64_t* slots,                          \
                        const T* b, int64_t n, int64_t r_max, const int64_t* ranks, const float* scales,              \
                        float* y, int64_t y_row, int threads) {                                                       \
  int64_t chunks = (n + TCHUNK - 1) / TCHUNK;                                                                         \
  WITH_PIECES(slots, tokens, starts, pieces, {                                                                        \
_Pragma("omp parallel for schedule(static) collapse(2) num_threads(threads)")                                         \
  for (int64_t p = 0; p < pieces; p++)                                                                                \
    for (int64_t c = 0; c < chunks; c++) {                                                                            \
      int64_t t0 = starts[p], t1 = starts[p + 1], s = slots[t0];                                                      \
      if (s < 0 || ranks[s] == 0) continue;                                                                           \
      int64_t r = ranks[s], n0 = c * TCHUNK, nn = n - n0 < TCHUNK ? n - n0 : TCHUNK;                                  \
      const T* bs = b + s * r_max * n + n0;                                                                           \
      __m512 scale = _mm512_set1_ps(scales[s]);                                                                       \
      float d[TCHUNK] __attribute__((aligned(64)));                                                                   \
      for (int64_t t = t0; t < t1; t++) { /* a piece's later tokens find the slot's rows in cache */                  \
        const float* ut = u + t * u_row + u_off;                                                                      \
        float* yt = y + t * y_row + n0;                                                                               \
        for (int64_t j = 0; j < r; j++) {                                                                             \
          __m512 uj = _mm512_set1_ps(ut[j]);                                                                          \
          const T* row = bs + j * n;                                                                                  \
          int64_t q = 0;                                                                                              \
          const char* ahead = j + PREFETCH_ROWS < r ? (const char*)(row + PREFETCH_ROWS * n) : NULL;                  \
          for (; q + 16 <= nn; q += 16) {                                                                             \
            if (ahead) _mm_prefetch(ahead + q * (int64_t)sizeof(T), _MM_HINT_T0);                                     \
            __m512 acc = j ? _mm512_load_ps(d + q) : _mm512_setzero_ps();                                             \
            _mm512_store_ps(d + q, _mm512_fmadd_ps(uj, LOAD(0xFFFF, row + q), acc));                                  \
          }                                                                                                           \
          if (q < nn) {                                                                                               \
            __mmask16 m = (__mmask16)((1u << (nn - q)) - 1);                                                          \
            __m512 acc = j ? _mm512_load_ps(d + q) : _mm512_setzero_ps();                                             \
            _mm512_store_ps(d + q, _mm512_fmadd_ps(uj, LOAD(m, row + q), acc));                                       \
          }                                                                                                           \
        }                                                                                                             \
        for (int64_t q = 0; q < nn; q += 16) {                                                                        \
          __mmask16 m = nn - q >= 16 ? 0xFFFF : (__mmask16)((1u << (nn - q)) - 1);                                    \
          _mm512_mask_storeu_ps(yt + q, m, _mm512_fmadd_ps(scale, _mm512_load_ps(d + q), _mm512_maskz_loadu_ps(m, yt + q))); \
        }                                                                                                             \
      }                                                                                                               \
    }                                                                                                                 \
  });                                                                                                                 \
  return 0;                                                                                                           \
}

// fp32 banks, and bf16 banks (the weights stored in bf16) widened as they are read
DEFINE_SHRINK(hotlora_lora_shrink, float, dot_f32, dot4_f32)
DEFINE_EXPAND(hotlora_lora_expand, float, load_f32)
DEFINE_SHRINK(hotlora_lora_shrink_bf16, uint16_t, dot_bf16, dot4_bf16)
DEFINE_EXPAND(hotlora_lora_expand_bf16, uint16_t, load_bf16)
DEFINE_EXPAND_T(hotlora_lora_expand_t, float, load_f32)
DEFINE_EXPAND_T(hotlora_lora_expand_t_bf16, uint16_t, load_bf16)

// A fused projection's whole update in one call: the shrink over the packed bank, then one expand per slice
// (slice i: bank bs[i] [S, outs[i], R] into y's columns offsets[i]..; scales row i of [slices, S]). u: [T,
// slices * R] scratch. One call instead of 1 + slices keeps the per-call cost (~7 us through ctypes) off
// each of a decode step's ~120 sites.
#define DEFINE_PACKED(NAME, T, SHRINK, EXPAND)                                                               \
  int NAME(const float* x, int64_t tokens, int64_t x_row, const int64_t* slots, const T* a, int64_t k,       \
           int64_t slices, int64_t r_max, const int64_t* ranks, float* u, const int64_t* b_ptrs,             \
           const int64_t* outs, const int64_t* offsets, const float* scales, int64_t num_slots, float* y,    \
           int64_t y_row, int threads_shrink, int threads_expand) {                                          \
    if (SHRINK(x, tokens, x_row, slots, a, slices * r_max, k, slices, r_max, ranks, u, threads_shrink))     \
      return -1;                                                                                             \
    for (int64_t i = 0; i < slices; i++)                                                                     \
      if (EXPAND(u, tokens, slices * r_max, i * r_max, slots, (const T*)(intptr_t)b_ptrs[i], outs[i], r_max, \
                 ranks, scales + i * num_slots, y + offsets[i], y_row, threads_expand))                      \
        return -1;                                                                                           \
    return 0;                                                                                                \
  }
DEFINE_PACKED(hotlora_lora_packed, float, hotlora_lora_shrink, hotlora_lora_expand)
DEFINE_PACKED(hotlora_lora_packed_bf16, uint16_t, hotlora_lora_shrink_bf16, hotlora_lora_expand_bf16)
DEFINE_PACKED(hotlora_lora_packed_t, float, hotlora_lora_shrink, hotlora_lora_expand_t)
DEFINE_PACKED(hotlora_lora_packed_t_bf16, uint16_t, hotlora_lora_shrink_bf16, hotlora_lora_expand_t_bf16)
