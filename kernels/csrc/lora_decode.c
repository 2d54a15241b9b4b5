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

#include "kernels.h"

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

// The shrink of one piece (tokens t0..t1 on slot s of rank r) for slice i of the bank: columns i * r_max
// .. of the piece's rows of u (row stride rows_per_slot), zero past the slot's rank.
#define DEFINE_SHRINK_PIECE(NAME, T, DOT, DOT4)                                                               \
  AI void NAME(const float* x, int64_t x_row, const T* a, int64_t rows_per_slot, int64_t k, int64_t i,       \
               int64_t r_max, int64_t t0, int64_t t1, int64_t s, int64_t r, float* u) {                       \
    float* ui = u + i * r_max;                                                                                \
    for (int64_t t = t0; t < t1; t++)                                                                         \
      for (int64_t j = r; j < r_max; j++) ui[t * rows_per_slot + j] = 0.0f;                                   \
    for (int64_t j = 0; j < r; j++) {                                                                         \
      const T* row = a + (s * rows_per_slot + i * r_max + j) * k;                                             \
      if (j + PREFETCH_ROWS < r) prefetch_row(row + PREFETCH_ROWS * k, k * (int64_t)sizeof(T));               \
      int64_t t = t0;                                                                                         \
      for (; t + 4 <= t1; t += 4) DOT4(row, x + t * x_row, x_row, k, ui + t * rows_per_slot + j, rows_per_slot); \
      for (; t < t1; t++) ui[t * rows_per_slot + j] = DOT(row, x + t * x_row, k);                             \
    }                                                                                                         \
  }

// y[t, n0 + q] += scale * sum_j B[n0 + q, j] u[t, j] for the 16 outputs of a block (Q of them at the edge)
#define EXPAND_BLOCK(T, LOAD, Q)                                                                              \
  {                                                                                                           \
    __m512 acc[16];                                                                                           \
    for (int q = 0; q < 16; q++) acc[q] = _mm512_setzero_ps();                                                \
    for (int64_t j = 0; j < r; j += 16) {                                                                     \
      __mmask16 m = r - j >= 16 ? 0xFFFF : (__mmask16)((1u << (r - j)) - 1);                                  \
      __m512 uv = _mm512_maskz_loadu_ps(m, ut + j);                                                           \
      for (int q = 0; q < (Q); q++) acc[q] = _mm512_fmadd_ps(uv, LOAD(m, bs + (n0 + q) * r_max + j), acc[q]); \
    }                                                                                                         \
    __m512 sums = reduce16(acc);                                                                              \
    __m512 cur = _mm512_maskz_loadu_ps(out, yt + n0);                                                         \
    _mm512_mask_storeu_ps(yt + n0, out, _mm512_fmadd_ps(_mm512_set1_ps(scale), sums, cur));                   \
  }

// The expand of one piece into block blk of 16 outputs, B [S, n, R] contiguous; the block's B rows stay in
// L1 across the piece's tokens.
#define DEFINE_EXPAND_PIECE(NAME, T, LOAD)                                                                    \
  AI void NAME(const float* u, int64_t u_row, int64_t u_off, const T* b, int64_t n, int64_t r_max,           \
               int64_t blk, int64_t t0, int64_t t1, int64_t s, int64_t r, float scale, float* y,              \
               int64_t y_row) {                                                                               \
    int64_t n0 = blk * 16, nn = n - n0 < 16 ? n - n0 : 16;                                                    \
    const T* bs = b + s * n * r_max;                                                                          \
    __mmask16 out = nn == 16 ? 0xFFFF : (__mmask16)((1u << nn) - 1);                                          \
    for (int64_t t = t0; t < t1; t++) {                                                                       \
      const float* ut = u + t * u_row + u_off;                                                                \
      float* yt = y + t * y_row;                                                                              \
      if (nn == 16) EXPAND_BLOCK(T, LOAD, 16) else EXPAND_BLOCK(T, LOAD, nn)                                  \
    }                                                                                                         \
  }

// The expand over a rank-major B (the CPU banks' layout: storage [S, R, n], row j holding every output's
// weight for rank j, seen by torch as a [S, n, R] view): d = sum_j u[t, j] * B[s, j, :], then y[t] +=
// scale * d, summed per output lane in j order (no horizontal sums). One piece, outputs TCHUNK * c .. of
// it: up to JG rows at a time are summed into TV * 16 outputs held in registers (a sum kept in memory paid
// a load and a store per row and 16 outputs), d carrying the sums from one group of rows to the next; a
// group's rows are read as JG streams at once, few enough for the hardware prefetcher to follow, each row's
// next block asked for as this one is read. The chunk's rows stay in cache for the piece's later tokens.
#define TV 8
#define JG 16
#define TCHUNK 512
#define EXPAND_T_BLOCK(T, LOAD, NV, LAST_MASK)                                                                \
  {                                                                                                           \
    __m512 acc[TV];                                                                                           \
    for (int v = 0; v < (NV); v++) acc[v] = j0 ? _mm512_load_ps(d + q0 + 16 * v) : _mm512_setzero_ps();       \
    for (int64_t j = j0; j < j1; j++) {                                                                       \
      __m512 uj = _mm512_set1_ps(ut[j]);                                                                      \
      const T* row = bs + j * n + q0;                                                                         \
      if (ahead)                                                                                              \
        for (int64_t o = 0; o < TV * 16 * (int64_t)sizeof(T); o += 64)                                        \
          _mm_prefetch((const char*)(row + TV * 16) + o, _MM_HINT_T0);                                        \
      for (int v = 0; v < (NV); v++)                                                                          \
        acc[v] = _mm512_fmadd_ps(uj, LOAD(v == (NV) - 1 ? (LAST_MASK) : 0xFFFF, row + 16 * v), acc[v]);       \
    }                                                                                                         \
    for (int v = 0; v < (NV); v++) {                                                                          \
      __mmask16 m = v == (NV) - 1 ? (LAST_MASK) : 0xFFFF;                                                     \
      float* o = yt + q0 + 16 * v;                                                                            \
      if (j1 < r) _mm512_store_ps(d + q0 + 16 * v, acc[v]);                                                   \
      else _mm512_mask_storeu_ps(o, m, _mm512_fmadd_ps(scale, acc[v], _mm512_maskz_loadu_ps(m, o)));          \
    }                                                                                                         \
  }
#define DEFINE_EXPAND_T_PIECE(NAME, T, LOAD)                                                                  \
  AI void NAME(const float* u, int64_t u_row, int64_t u_off, const T* b, int64_t n, int64_t r_max,           \
               int64_t c, int64_t t0, int64_t t1, int64_t s, int64_t r, float scale_, float* y,               \
               int64_t y_row) {                                                                               \
    int64_t n0 = c * TCHUNK, nn = n - n0 < TCHUNK ? n - n0 : TCHUNK;                                          \
    const T* bs = b + s * r_max * n + n0;                                                                     \
    __m512 scale = _mm512_set1_ps(scale_);                                                                    \
    float d[TCHUNK] __attribute__((aligned(64)));                                                             \
    for (int64_t t = t0; t < t1; t++) {                                                                       \
      const float* ut = u + t * u_row + u_off;                                                                \
      float* yt = y + t * y_row + n0;                                                                         \
      for (int64_t j0 = 0; j0 < r; j0 += JG) {                                                                \
        int64_t j1 = r - j0 < JG ? r : j0 + JG;                                                               \
        for (int64_t q0 = 0; q0 < nn; q0 += TV * 16) {                                                        \
          int64_t left = nn - q0;                                                                             \
          int nv = left >= TV * 16 ? TV : (int)((left + 15) / 16);                                            \
          __mmask16 last = left >= TV * 16 || left % 16 == 0 ? 0xFFFF : (__mmask16)((1u << (left % 16)) - 1); \
          int ahead = t == t0 && q0 + TV * 16 < nn;                                                           \
          switch (nv) { /* a constant count of registers per case */                                          \
            case 8: EXPAND_T_BLOCK(T, LOAD, 8, last) break;                                                   \
            case 7: EXPAND_T_BLOCK(T, LOAD, 7, last) break;                                                   \
            case 6: EXPAND_T_BLOCK(T, LOAD, 6, last) break;                                                   \
            case 5: EXPAND_T_BLOCK(T, LOAD, 5, last) break;                                                   \
            case 4: EXPAND_T_BLOCK(T, LOAD, 4, last) break;                                                   \
            case 3: EXPAND_T_BLOCK(T, LOAD, 3, last) break;                                                   \
            case 2: EXPAND_T_BLOCK(T, LOAD, 2, last) break;                                                   \
            default: EXPAND_T_BLOCK(T, LOAD, 1, last)                                                         \
          }                                                                                                   \
        }                                                                                                     \
      }                                                                                                       \
    }                                                                                                         \
  }

DEFINE_SHRINK_PIECE(shrink_piece, float, dot_f32, dot4_f32)
DEFINE_SHRINK_PIECE(shrink_piece_bf16, uint16_t, dot_bf16, dot4_bf16)
DEFINE_EXPAND_PIECE(expand_piece, float, load_f32)
DEFINE_EXPAND_PIECE(expand_piece_bf16, uint16_t, load_bf16)
DEFINE_EXPAND_T_PIECE(expand_t_piece, float, load_f32)
DEFINE_EXPAND_T_PIECE(expand_t_piece_bf16, uint16_t, load_bf16)
#define BLOCK_expand_piece 16
#define BLOCK_expand_piece_bf16 16
#define BLOCK_expand_t_piece TCHUNK
#define BLOCK_expand_t_piece_bf16 TCHUNK

// Every piece's shrink (SHRINK_PIECE for each slice), then each slice's expand (EXPAND_PIECE for each
// block of outputs), where t1 - t0 = the piece's tokens.
#define FOR_PIECE(SHRINK_PIECE, EXPAND_PIECE, T, P)                                                            \
  {                                                                                                           \
    int64_t p_ = (P), t0 = starts[p_], t1 = starts[p_ + 1], s = slots[t0], r = s < 0 ? 0 : ranks[s];          \
    for (int64_t i = 0; i < slices; i++) SHRINK_PIECE(x, x_row, a, rows, k, i, r_max, t0, t1, s, r, u);       \
    if (r > 0)                                                                                                \
      for (int64_t i = 0; i < slices; i++) {                                                                  \
        const T* b = (const T*)(intptr_t)b_ptrs[i];                                                           \
        for (int64_t blk = 0; blk * BLOCK_##EXPAND_PIECE < outs[i]; blk++)                                    \
          EXPAND_PIECE(u, rows, i * r_max, b, outs[i], r_max, blk, t0, t1, s, r, scales[i * num_slots + s],   \
                       y + offsets[i], y_row);                                                                \
      }                                                                                                       \
  }

// The pieces in the order of their slots (ties in token order), as (slot + 1) << 32 | piece: a thread's
// share of consecutive slots then reads each bank as one stream, as slots sit one after another in it
// (the hardware prefetcher follows a long stream; each jump to another slot's rows started a new one).
// NULL when the heap cannot hold it.
static int by_key(const void* a, const void* b) {
  int64_t x = *(const int64_t*)a, y = *(const int64_t*)b;
  return (x > y) - (x < y);
}
static int64_t* slot_order(const int64_t* slots, const int64_t* starts, int64_t pieces) {
  int64_t* order = malloc((pieces ? pieces : 1) * sizeof(int64_t));  // malloc(0) may give NULL
  if (!order) return NULL;
  for (int64_t p = 0; p < pieces; p++) order[p] = (slots[starts[p]] + 1) << 32 | p;
  qsort(order, pieces, sizeof(int64_t), by_key);
  return order;
}

// shrink and expand alone (the packed update's split below): every piece and slice (block of outputs)
// statically over the threads.
#define DEFINE_SHRINK(NAME, T, SHRINK_PIECE)                                                                  \
  static int NAME(const float* x, int64_t tokens, int64_t x_row, const int64_t* slots, const T* a,            \
           int64_t rows_per_slot, int64_t k, int64_t slices, int64_t r_max, const int64_t* ranks, float* u,   \
           int threads) {                                                                                     \
    WITH_PIECES(slots, tokens, starts, pieces, {                                                              \
_Pragma("omp parallel for schedule(static) collapse(2) num_threads(threads)")                                 \
      for (int64_t p = 0; p < pieces; p++)                                                                    \
        for (int64_t i = 0; i < slices; i++) {                                                                \
          int64_t s = slots[starts[p]];                                                                       \
          SHRINK_PIECE(x, x_row, a, rows_per_slot, k, i, r_max, starts[p], starts[p + 1], s,                  \
                       s < 0 ? 0 : ranks[s], u);                                                              \
        }                                                                                                     \
    });                                                                                                       \
    return 0;                                                                                                 \
  }
#define DEFINE_EXPAND(NAME, T, EXPAND_PIECE)                                                                  \
  static int NAME(const float* u, int64_t tokens, int64_t u_row, int64_t u_off, const int64_t* slots, const T* b, \
           int64_t n, int64_t r_max, const int64_t* ranks, const float* scales, float* y, int64_t y_row,      \
           int threads) {                                                                                     \
    int64_t blocks = (n + BLOCK_##EXPAND_PIECE - 1) / BLOCK_##EXPAND_PIECE;                                   \
    WITH_PIECES(slots, tokens, starts, pieces, {                                                              \
_Pragma("omp parallel for schedule(static) collapse(2) num_threads(threads)")                                 \
      for (int64_t p = 0; p < pieces; p++)                                                                    \
        for (int64_t blk = 0; blk < blocks; blk++) {                                                          \
          int64_t t0 = starts[p], s = slots[t0];                                                              \
          if (s < 0 || ranks[s] == 0) continue;                                                               \
          EXPAND_PIECE(u, u_row, u_off, b, n, r_max, blk, t0, starts[p + 1], s, ranks[s], scales[s], y, y_row); \
        }                                                                                                     \
    });                                                                                                       \
    return 0;                                                                                                 \
  }
DEFINE_SHRINK(hotlora_lora_shrink, float, shrink_piece)
DEFINE_SHRINK(hotlora_lora_shrink_bf16, uint16_t, shrink_piece_bf16)
DEFINE_EXPAND(hotlora_lora_expand, float, expand_piece)
DEFINE_EXPAND(hotlora_lora_expand_bf16, uint16_t, expand_piece_bf16)
DEFINE_EXPAND(hotlora_lora_expand_t, float, expand_t_piece)
DEFINE_EXPAND(hotlora_lora_expand_t_bf16, uint16_t, expand_t_piece_bf16)

// A fused projection's whole update in one call: the shrink over the packed bank (slices * R rows a slot),
// then one expand per slice (slice i: bank b_ptrs[i] [S, outs[i], R] into y's columns offsets[i]..; scales
// row i of [slices, S]). u: [T, slices * R] scratch. One C call, not 1 + slices, keeps the per-call cost
// (a Python call and its checks) off each of a decode step's ~120 sites.
//
// With at least two pieces a thread (decode: a token a piece), the threads take whole pieces, each piece's
// shrink then its expands, in the order of their slots (slot_order), a contiguous share a thread: one
// parallel region a call, where the split below pays 1 + slices. Fewer pieces (a prefill on a few
// adapters) split each piece's rows and outputs over the threads instead.
#define DEFINE_PACKED(NAME, T, SHRINK, EXPAND, SHRINK_PIECE, EXPAND_PIECE)                                    \
  int NAME(const float* x, int64_t tokens, int64_t x_row, const int64_t* slots, const T* a, int64_t k,        \
           int64_t slices, int64_t r_max, const int64_t* ranks, float* u, const int64_t* b_ptrs,              \
           const int64_t* outs, const int64_t* offsets, const float* scales, int64_t num_slots, float* y,     \
           int64_t y_row, int threads_shrink, int threads_expand) {                                           \
    int threads = threads_shrink > threads_expand ? threads_shrink : threads_expand, whole = 0;               \
    int64_t rows = slices * r_max;                                                                            \
    WITH_PIECES(slots, tokens, starts, pieces, {                                                              \
      whole = threads == 1 || pieces >= 2 * threads;                                                          \
      int64_t* order = whole ? slot_order(slots, starts, pieces) : NULL;                                      \
      if (whole && !order) whole = -1;                                                                        \
      if (whole > 0) {                                                                                        \
_Pragma("omp parallel for schedule(static) num_threads(threads)")                                             \
        for (int64_t q = 0; q < pieces; q++) FOR_PIECE(SHRINK_PIECE, EXPAND_PIECE, T, (order[q] & 0xFFFFFFFF)) \
      }                                                                                                       \
      free(order);                                                                                            \
    });                                                                                                       \
    if (whole) return whole > 0 ? 0 : -1;                                                                     \
    if (SHRINK(x, tokens, x_row, slots, a, rows, k, slices, r_max, ranks, u, threads_shrink)) return -1;      \
    for (int64_t i = 0; i < slices; i++)                                                                      \
      if (EXPAND(u, tokens, rows, i * r_max, slots, (const T*)(intptr_t)b_ptrs[i], outs[i], r_max, ranks,     \
                 scales + i * num_slots, y + offsets[i], y_row, threads_expand))                              \
        return -1;                                                                                            \
    return 0;                                                                                                 \
  }
DEFINE_PACKED(hotlora_lora_packed, float, hotlora_lora_shrink, hotlora_lora_expand, shrink_piece, expand_piece)
DEFINE_PACKED(hotlora_lora_packed_bf16, uint16_t, hotlora_lora_shrink_bf16, hotlora_lora_expand_bf16,
              shrink_piece_bf16, expand_piece_bf16)
DEFINE_PACKED(hotlora_lora_packed_t, float, hotlora_lora_shrink, hotlora_lora_expand_t, shrink_piece,
              expand_t_piece)
DEFINE_PACKED(hotlora_lora_packed_t_bf16, uint16_t, hotlora_lora_shrink_bf16, hotlora_lora_expand_t_bf16,
              shrink_piece_bf16, expand_t_piece_bf16)
