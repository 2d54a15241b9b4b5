// Decode attention on the paged KV cache: one new query token per row, read straight from the pool's blocks.
//
// torch needs ~10 ops a layer for this (gather each row's blocks into a padded copy, mask, SDPA with grouped
// query heads, copy out); between the weight streams of a decode step each op pays ~10-30 us of cold
// dispatch, which at one row is more than the arithmetic. Here it is one call a layer, parallel over rows;
// each task scores every query head of its row against its keys, takes the softmax (max subtracted, as SDPA
// does) and sums the values. Fewer rows than ~2 a thread are cut into spans of keys whose softmaxes are then
// merged by their maxima and sums (as flash-decoding does), so one long row keeps every core busy.
// fp32 throughout.
//
// What keeps it at the memory's pace (it was ~2x under it at 8-32 rows): a position's keys of every kv head
// are read together (a task per kv head read a third of each position, a stride that streams poorly), the
// blocks are walked with a cursor (no division per key), sixteen scores are summed at once (sums16.h), exp
// runs sixteen lanes at a time, and the values are summed a tile of 16 positions at a time with each head's
// output in registers, divided by the softmax's sum once at the end.
//
// q: [D] rows with strides (q_row, q_head) over [heads, d] (d contiguous); pools: [blocks, bs, kvh, d]
// contiguous; tables: [D, width] block ids; lens: [D] tokens each row sees (its own included); window: keys
// at or after lens - window only (0: no window); out: [D, heads, d] contiguous.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "kernels.h"

#include "exp16.h"
#include "sums16.h"

// The fewest keys a span of a split row holds: shorter, the merge costs more than the balance gains.
#define MIN_SPAN 64

static inline __mmask16 tail_mask(int64_t n) {  // the first min(n, 16) lanes
  return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
}

// The sixteen lanes of a . b before they are added (d contiguous floats each).
static inline __m512 dot_lanes(const float* a, const float* b, int64_t d) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  if (i < d) {
    __mmask16 m = tail_mask(d - i);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
  }
  return acc;
}

static inline void axpy(float a, const float* x, float* y, int64_t d) {  // y += a x
  __m512 av = _mm512_set1_ps(a);
  int64_t i = 0;
  for (; i + 16 <= d; i += 16)
    _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  if (i < d) {
    __mmask16 m = tail_mask(d - i);
    __m512 sum = _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i));
    _mm512_mask_storeu_ps(y + i, m, sum);
  }
}

// The pool as one row's task reads it.
typedef struct {
  const float *k, *v;  // [blocks, bs, kv_heads, d]
  const int64_t* table;  // the row's block ids
  int64_t bs, kv_heads, group;  // group: query heads per kv head
} row_keys;

// A walk over one row's positions, block by block: no division per key.
typedef struct {
  int64_t block, slot;  // index into the row's table, position in that block
} cursor;

static inline cursor cursor_at(int64_t position, int64_t bs) {
  return (cursor){position / bs, position % bs};
}

// The offsets in `pool` (K's or V's: the same places in both) of the next `count` positions; the cursor
// moves past them. `token`: floats a position holds (kv_heads * d).
static inline void next_tile(cursor* c, const float* pool, row_keys keys, int64_t token, int64_t count,
                             const float** at) {
  for (int64_t j = 0; j < count; j++) {
    at[j] = pool + (keys.table[c->block] * keys.bs + c->slot) * token;
    if (++c->slot == keys.bs) c->slot = 0, c->block++;
  }
}

// One task: keys [lo, hi) of one row, every query head (q: the row, heads q_head apart). Leaves each head's
// maximum score in top[h], its sum of exp(score - top) in sum[h] and the values weighted by those exps in
// o[h * d ..]. scores: room for heads * (hi - lo) floats. Inlined into a call per common d (see below).
static inline __attribute__((always_inline)) void attend_span(
    const float* q, int64_t q_head, int64_t heads, int64_t d, row_keys keys, int64_t lo, int64_t hi,
    float scale, float* scores, float* top, float* sum, float* o) {
  int64_t n = hi - lo, group = keys.group, token = keys.kv_heads * d;
  const float* at[16];  // a tile's positions in the pool
  cursor c = cursor_at(lo, keys.bs);
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    int64_t count = n - j0 < 16 ? n - j0 : 16;
    next_tile(&c, keys.k, keys, token, count, at);
    for (int64_t h = 0; h < heads; h++) {
      const float* qh = q + h * q_head;
      int64_t kv = (h / group) * d;
      __m512 lanes[16];
      for (int64_t j = 0; j < 16; j++)
        lanes[j] = j < count ? dot_lanes(qh, at[j] + kv, d) : _mm512_setzero_ps();
      __m512 s = _mm512_mul_ps(reduce16(lanes), _mm512_set1_ps(scale));
      _mm512_mask_storeu_ps(scores + h * n + j0, tail_mask(count), s);
    }
  }
  for (int64_t h = 0; h < heads; h++) {
    float* s = scores + h * n;
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < n; j += 16)
      m = _mm512_max_ps(m, _mm512_mask_loadu_ps(m, tail_mask(n - j), s + j));
    float t = _mm512_reduce_max_ps(m);
    __m512 tv = _mm512_set1_ps(t), acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      __mmask16 k = tail_mask(n - j);
      __m512 e = _mm512_maskz_mov_ps(k, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), tv)));
      _mm512_mask_storeu_ps(s + j, k, e);
      acc = _mm512_add_ps(acc, e);
    }
    top[h] = t;
    sum[h] = _mm512_reduce_add_ps(acc);
  }
  // values a tile at a time: each 16-float piece of a head's output stays in a register over the tile
  c = cursor_at(lo, keys.bs);
  for (int64_t i = 0; i < heads * d; i++) o[i] = 0.0f;
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    int64_t count = n - j0 < 16 ? n - j0 : 16;
    next_tile(&c, keys.v, keys, token, count, at);
    for (int64_t h = 0; h < heads; h++) {
      const float* p = scores + h * n + j0;
      int64_t kv = (h / group) * d;
      for (int64_t i = 0; i < d; i += 16) {
        __mmask16 k = tail_mask(d - i);
        __m512 acc = _mm512_maskz_loadu_ps(k, o + h * d + i);
        for (int64_t j = 0; j < count; j++)
          acc = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), _mm512_maskz_loadu_ps(k, at[j] + kv + i), acc);
        _mm512_mask_storeu_ps(o + h * d + i, k, acc);
      }
    }
  }
}

int hotlora_paged_decode_attention(const float* q, int64_t rows, int64_t heads, int64_t d, int64_t q_row,
                                   int64_t q_head, const float* k_pool, const float* v_pool, int64_t bs,
                                   int64_t kv_heads, const int64_t* tables, int64_t width, const int64_t* lens,
                                   int64_t window, float scale, float* out, int threads) {
  if (rows <= 0) return 0;
  int64_t group = heads / kv_heads, longest = 1;
  for (int64_t r = 0; r < rows; r++) {
    int64_t n = window > 0 && lens[r] > window ? window : lens[r];
    longest = n > longest ? n : longest;
  }
  // Split rows into spans of keys only while there are fewer rows than ~2 per thread.
  int64_t spans = 1;
  if (threads > 1 && rows < 2 * threads) {
    spans = (2 * threads + rows - 1) / rows;
    int64_t most = (longest + MIN_SPAN - 1) / MIN_SPAN;
    spans = spans < most ? spans : most;
  }
  int64_t span = (longest + spans - 1) / spans, tasks = rows * spans, part_floats = heads * (d + 2);
  // per task: each head's maximum, sum and weighted values (kept apart only when rows are split)
  float* parts = spans > 1 ? malloc((size_t)(tasks * part_floats) * sizeof(float)) : NULL;
  if (spans > 1 && !parts) return -1;
  int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t task = 0; task < tasks; task++) {
    int64_t r = task / spans, part = task % spans;
    int64_t len = lens[r], first = window > 0 && len > window ? len - window : 0;
    int64_t lo = first + part * span, hi = lo + span < len ? lo + span : len;
    float* part_top = parts ? parts + task * part_floats : NULL;
    float* part_sum = parts ? part_top + heads : NULL;
    float* o = parts ? part_sum + heads : out + r * heads * d;
    if (lo >= hi) {  // a span past the end of a shorter row; or a row of no keys, which gets zeros
      if (parts)
        for (int64_t h = 0; h < heads; h++) part_top[h] = -INFINITY, part_sum[h] = 0.0f;
      else
        for (int64_t i = 0; i < heads * d; i++) o[i] = 0.0f;
      continue;
    }
    // the span's scores, then each head's maximum and sum
    float* scores = malloc((size_t)(heads * (hi - lo + 2)) * sizeof(float));
    if (!scores) {
#pragma omp atomic write
      failed = 1;
      continue;
    }
    float *top = scores + heads * (hi - lo), *sum = top + heads;
    const float* qr = q + r * q_row;
    row_keys keys = {k_pool, v_pool, tables + r * width, bs, kv_heads, group};
    // the common head sizes compiled apart: with d known the compiler unrolls the 16-float pieces (1.7x)
    if (d == 64)
      attend_span(qr, q_head, heads, 64, keys, lo, hi, scale, scores, top, sum, o);
    else if (d == 128)
      attend_span(qr, q_head, heads, 128, keys, lo, hi, scale, scores, top, sum, o);
    else
      attend_span(qr, q_head, heads, d, keys, lo, hi, scale, scores, top, sum, o);
    for (int64_t h = 0; h < heads; h++) {
      if (parts) {
        part_top[h] = top[h], part_sum[h] = sum[h];
      } else {
        float inv = 1.0f / sum[h];
        for (int64_t i = 0; i < d; i++) o[h * d + i] *= inv;
      }
    }
    free(scores);
  }
  if (parts && !failed) {
    // merge a row's spans: rescale each to the largest maximum, add, divide by the rescaled sums
#pragma omp parallel for num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
      for (int64_t h = 0; h < heads; h++) {
        float* o = out + (r * heads + h) * d;
        float t = -INFINITY, total = 0.0f;
        for (int64_t p = 0; p < spans; p++) {
          float pt = parts[(r * spans + p) * part_floats + h];
          t = pt > t ? pt : t;
        }
        for (int64_t i = 0; i < d; i++) o[i] = 0.0f;
        for (int64_t p = 0; p < spans; p++) {
          const float* base = parts + (r * spans + p) * part_floats;
          if (base[heads + h] == 0.0f) continue;  // an empty span
          float w = expf(base[h] - t);
          total += w * base[heads + h];
          axpy(w, base + 2 * heads + h * d, o, d);
        }
        float inv = total > 0.0f ? 1.0f / total : 0.0f;  // 0: a row of no keys
        for (int64_t i = 0; i < d; i++) o[i] *= inv;
      }
    }
  }
  free(parts);
  return failed ? -1 : 0;
}
