// Decode attention on the paged KV cache: one new query token per row, read straight from the pool's blocks.
//
// torch needs ~10 ops a layer for this (gather each row's blocks into a padded copy, mask, SDPA with grouped
// query heads, copy out); between the weight streams of a decode step each op pays ~10-30 us of cold
// dispatch, which at one row is more than the arithmetic. Here it is one call a layer, parallel over
// (row, kv head) pairs; each pair scores its group of query heads against the row's keys, takes the softmax
// (max subtracted, as SDPA does) and sums the values. fp32 throughout.
//
// q: [D] rows with strides (q_row, q_head) over [heads, d] (d contiguous); pools: [blocks, bs, kvh, d]
// contiguous; tables: [D, width] block ids; lens: [D] tokens each row sees (its own included); window: keys
// at or after lens - window only (0: no window); out: [D, heads, d] contiguous.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

static inline float dot(const float* a, const float* b, int64_t d) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  if (i < d) {
    __mmask16 m = (__mmask16)((1u << (d - i)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

static inline void axpy(float a, const float* x, float* y, int64_t d) {  // y += a x
  __m512 av = _mm512_set1_ps(a);
  int64_t i = 0;
  for (; i + 16 <= d; i += 16)
    _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  if (i < d) {
    __mmask16 m = (__mmask16)((1u << (d - i)) - 1);
    _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i)));
  }
}

int hotlora_paged_decode_attention(const float* q, int64_t rows, int64_t heads, int64_t d, int64_t q_row,
                                   int64_t q_head, const float* k_pool, const float* v_pool, int64_t bs,
                                   int64_t kv_heads, const int64_t* tables, int64_t width, const int64_t* lens,
                                   int64_t window, float scale, float* out, int threads) {
  int64_t group = heads / kv_heads, tasks = rows * kv_heads;
  int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t task = 0; task < tasks; task++) {
    int64_t r = task / kv_heads, g = task % kv_heads;
    int64_t len = lens[r], first = window > 0 && len > window ? len - window : 0, n = len - first;
    float* scores = malloc((size_t)(group * (n > 0 ? n : 1)) * sizeof(float));
    if (!scores) {
#pragma omp atomic write
      failed = 1;
      continue;
    }
    const int64_t* table = tables + r * width;
    for (int64_t j = 0; j < n; j++) {
      int64_t pos = first + j;
      const float* key = k_pool + ((table[pos / bs] * bs + pos % bs) * kv_heads + g) * d;
      for (int64_t h = 0; h < group; h++) {
        const float* qh = q + r * q_row + (g * group + h) * q_head;
        scores[h * n + j] = dot(qh, key, d) * scale;
      }
    }
    for (int64_t h = 0; h < group; h++) {
      float* s = scores + h * n;
      float top = -INFINITY, sum = 0.0f;
      for (int64_t j = 0; j < n; j++) top = s[j] > top ? s[j] : top;
      for (int64_t j = 0; j < n; j++) {
        s[j] = expf(s[j] - top);
        sum += s[j];
      }
      float* o = out + (r * heads + g * group + h) * d;
      for (int64_t i = 0; i < d; i++) o[i] = 0.0f;
      for (int64_t j = 0; j < n; j++) {
        int64_t pos = first + j;
        const float* value = v_pool + ((table[pos / bs] * bs + pos % bs) * kv_heads + g) * d;
        axpy(s[j] / sum, value, o, d);
      }
    }
    free(scores);
  }
  return failed ? -1 : 0;
}
