// Causal attention of a prefill chunk: L new query tokens (at positions context .. context + L - 1) against
// the chunk's keys and values and the context before them, fp32, grouped-query heads.
//
// torch's CPU flash kernel runs each query head on its own, 64 queries against up to 512 keys a call of small
// GEMMs (~35% of the cores' FMA peak at 512 tokens). Here the query heads that share a kv head are scored
// together (a task: 32 positions x the group's heads, 96 rows for SmolLM2), so each key and value read serves
// every head of the group, and the products are register tiles of 6 rows x 64 keys (scores) and 6 rows x 64
// dims (values) with nothing between the FMAs but broadcasts. K is transposed once per call, a block of 64
// keys at a time ([kv head][block][d][64]), so the score tile reads each dimension's 64 keys contiguously.
// The softmax is the online one (flash attention): per block of 64 keys, the running maximum, the sum of
// exps and the output rescaled when the maximum grows. Keys past a query's position (and, with a window,
// more than window - 1 behind it) get no weight.
//
// q: [L] rows of [heads, d] (row stride q_row, heads d apart); k, v: [context + L] rows of [kv_heads, d]
// (row strides k_row, v_row); out: [L, heads, d] contiguous. d a multiple of 64 (the caller checks).
//
// hotlora_prefill_attention_bf16: the same in bf16 arithmetic on a CPU with avx512_bf16, for --dtype auto's
// long prefill chunks (kernels/prefill_attention.py): q, k, v and the probabilities rounded to bf16, their
// products summed in fp32 by vdpbf16ps two at a time (half the instructions of the fp32 tiles); the scale,
// softmax and output stay fp32. K is laid out in pairs of dimensions ([kv head][block][d/2][64][2]) and V in
// pairs of keys ([kv head][block][32][d][2]), as the instruction takes them.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#include "bf16_round.h"
#include "exp16.h"

#define KB 64  // keys per block: one score tile's width
#define QB 32  // query positions per task
#define TR 6   // rows per register tile

// s[r][0..63] = q_r . keys j0..j0+63 for rows r < n (n <= TR); kt: [d][stride] transposed keys at j0.
static inline __attribute__((always_inline)) void score_tile(const float* qs, int64_t d, const float* kt,
                                                             int64_t stride, float* s, int n) {
  __m512 acc[TR][4];
  for (int r = 0; r < TR; r++)
    for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
  for (int64_t i = 0; i < d; i++) {
    const float* row = kt + i * stride;
    __m512 k0 = _mm512_loadu_ps(row), k1 = _mm512_loadu_ps(row + 16);
    __m512 k2 = _mm512_loadu_ps(row + 32), k3 = _mm512_loadu_ps(row + 48);
    for (int r = 0; r < TR; r++) {
      if (r >= n) break;
      __m512 b = _mm512_set1_ps(qs[r * d + i]);
      acc[r][0] = _mm512_fmadd_ps(b, k0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(b, k1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(b, k2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(b, k3, acc[r][3]);
    }
  }
  for (int r = 0; r < n; r++)
    for (int c = 0; c < 4; c++) _mm512_storeu_ps(s + r * KB + c * 16, acc[r][c]);
}

// o[r][c0..c0+63] += sum_j p[r][j] v_j[c0..] for rows r < n, keys j < kb.
static inline __attribute__((always_inline)) void value_tile(const float* p, const float* v, int64_t v_row,
                                                             int64_t kb, float* o, int64_t d, int n) {
  __m512 acc[TR][4];
  for (int r = 0; r < n; r++)
    for (int c = 0; c < 4; c++) acc[r][c] = _mm512_loadu_ps(o + r * d + c * 16);
  for (int64_t j = 0; j < kb; j++) {
    const float* vj = v + j * v_row;
    __m512 v0 = _mm512_loadu_ps(vj), v1 = _mm512_loadu_ps(vj + 16);
    __m512 v2 = _mm512_loadu_ps(vj + 32), v3 = _mm512_loadu_ps(vj + 48);
    for (int r = 0; r < TR; r++) {
      if (r >= n) break;
      __m512 b = _mm512_set1_ps(p[r * KB + j]);
      acc[r][0] = _mm512_fmadd_ps(b, v0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(b, v1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(b, v2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(b, v3, acc[r][3]);
    }
  }
  for (int r = 0; r < n; r++)
    for (int c = 0; c < 4; c++) _mm512_storeu_ps(o + r * d + c * 16, acc[r][c]);
}

#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"), noinline))

// score_tile in bf16: qs [n][d] bf16; kt: the block's [d/2][KB][2] bf16 keys. Called (not inlined) from the
// shared driver, so only these functions carry avx512_bf16 instructions.
BF16_TARGET static void score_tile_bf16(const uint16_t* qs, int64_t d, const uint16_t* kt, float* s, int n) {
  __m512 acc[TR][4];
  for (int r = 0; r < TR; r++)
    for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
  for (int64_t i = 0; i < d / 2; i++) {
    const uint16_t* row = kt + i * KB * 2;
    __m512bh k0 = (__m512bh)_mm512_loadu_si512(row), k1 = (__m512bh)_mm512_loadu_si512(row + 32);
    __m512bh k2 = (__m512bh)_mm512_loadu_si512(row + 64), k3 = (__m512bh)_mm512_loadu_si512(row + 96);
    for (int r = 0; r < TR; r++) {
      if (r >= n) break;
      int32_t pair;
      memcpy(&pair, qs + r * d + 2 * i, sizeof pair);
      __m512bh b = (__m512bh)_mm512_set1_epi32(pair);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], k0, b);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], k1, b);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], k2, b);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], k3, b);
    }
  }
  for (int r = 0; r < n; r++)
    for (int c = 0; c < 4; c++) _mm512_storeu_ps(s + r * KB + c * 16, acc[r][c]);
}

// value_tile in bf16: o[r][0..63] (rows d apart) += the probabilities p [n][KB] bf16 times the block's
// values vt [KB/2][d][2] bf16 at dimensions c0.., over key pairs j2 < pairs.
BF16_TARGET static void value_tile_bf16(const uint16_t* p, const uint16_t* vt, int64_t pairs, float* o,
                                        int64_t d, int64_t c0, int n) {
  __m512 acc[TR][4];
  for (int r = 0; r < n; r++)
    for (int c = 0; c < 4; c++) acc[r][c] = _mm512_loadu_ps(o + r * d + c * 16);
  for (int64_t j = 0; j < pairs; j++) {
    const uint16_t* row = vt + (j * d + c0) * 2;
    __m512bh v0 = (__m512bh)_mm512_loadu_si512(row), v1 = (__m512bh)_mm512_loadu_si512(row + 32);
    __m512bh v2 = (__m512bh)_mm512_loadu_si512(row + 64), v3 = (__m512bh)_mm512_loadu_si512(row + 96);
    for (int r = 0; r < TR; r++) {
      if (r >= n) break;
      int32_t pair;
      memcpy(&pair, p + r * KB + 2 * j, sizeof pair);
      __m512bh b = (__m512bh)_mm512_set1_epi32(pair);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], v0, b);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], v1, b);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], v2, b);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], v3, b);
    }
  }
  for (int r = 0; r < n; r++)
    for (int c = 0; c < 4; c++) _mm512_storeu_ps(o + r * d + c * 16, acc[r][c]);
}

// d values rounded to bf16 (d a multiple of 16).
static inline void round_row(const float* x, int64_t d, uint16_t* out) {
  for (int64_t i = 0; i < d; i += 16)
    _mm256_storeu_si256((__m256i*)(out + i), round_to_bf16(_mm512_loadu_ps(x + i)));
}

// One block of 64 keys (from j0; past `keys`: zeros) of kv head g laid out for the bf16 tiles:
// kt [d/2][KB][2] (pairs of dimensions), vt [KB/2][d][2] (pairs of keys). `row`: scratch for one row.
static void block_bf16(const float* k, int64_t k_row, const float* v, int64_t v_row, int64_t g, int64_t d,
                       int64_t j0, int64_t keys, uint16_t* kt, uint16_t* vt, uint16_t* row) {
  for (int64_t jj = 0; jj < KB; jj++) {
    if (j0 + jj < keys) round_row(k + (j0 + jj) * k_row + g * d, d, row);
    else memset(row, 0, (size_t)d * sizeof(uint16_t));
    for (int64_t i = 0; i < d / 2; i++) memcpy(kt + (i * KB + jj) * 2, row + 2 * i, 2 * sizeof(uint16_t));
    if (j0 + jj < keys) round_row(v + (j0 + jj) * v_row + g * d, d, row);
    else memset(row, 0, (size_t)d * sizeof(uint16_t));
    uint16_t* dst = vt + (jj / 2 * d) * 2 + jj % 2;
    for (int64_t c = 0; c < d; c++) dst[c * 2] = row[c];
  }
}

// Lanes [lo, hi) of the 16 starting at `first`.
static inline __mmask16 lanes_between(int64_t lo, int64_t hi, int64_t first) {
  int64_t a = lo - first, b = hi - first;
  a = a < 0 ? 0 : a > 16 ? 16 : a;
  b = b < 0 ? 0 : b > 16 ? 16 : b;
  if (b <= a) return 0;
  uint32_t upto_b = b == 16 ? 0xFFFFu : ((1u << b) - 1), below_a = (1u << a) - 1;
  return (__mmask16)(upto_b & ~below_a);
}

// The driver of both: `bf16` is a constant at each call, so each entry point keeps only its own tiles.
static inline __attribute__((always_inline)) int attention(
    const float* q, int64_t length, int64_t heads, int64_t d, int64_t q_row, const float* k, int64_t k_row,
    const float* v, int64_t v_row, int64_t kv_heads, int64_t context, int64_t window, float scale, float* out,
    int threads, const int bf16) {
  if (length <= 0) return 0;
  if (d % 64 || heads % kv_heads) return -2;
  int64_t group = heads / kv_heads, keys = context + length;
  int64_t blocks = (keys + KB - 1) / KB;
  // K transposed a block of keys at a time: kt[g][b][i][jj] = k[b * KB + jj][g][i], the last block padded
  // with zeros (a block's 64 keys x d dims are contiguous: the score tile walks them without set conflicts);
  // in bf16, K and V in the pairs the dot products take (block_bf16), a block of each d * KB values apart
  size_t block_values = (size_t)(kv_heads * blocks * d * KB);
  float* kt = aligned_alloc(64, block_values * sizeof(float));  // bf16: K's and V's halves
  if (!kt) return -1;
  uint16_t *kt16 = (uint16_t*)kt, *vt16 = kt16 + block_values;
  int64_t qblocks = (length + QB - 1) / QB, tasks = kv_heads * qblocks, rows_max = QB * group;
  int failed = 0;
#pragma omp parallel num_threads(threads)
  {
    uint16_t row16[d];
#pragma omp for schedule(static)
    for (int64_t gb = 0; gb < kv_heads * blocks; gb++) {
      int64_t g = gb / blocks, j0 = gb % blocks * KB;
      if (bf16) {
        block_bf16(k, k_row, v, v_row, g, d, j0, keys, kt16 + gb * d * KB, vt16 + gb * d * KB, row16);
        continue;
      }
      float* dst = kt + gb * d * KB;
      for (int64_t jj = 0; jj < KB; jj++) {
        const float* src = k + (j0 + jj) * k_row + g * d;
        if (j0 + jj < keys)
          for (int64_t i = 0; i < d; i++) dst[i * KB + jj] = src[i];
        else
          for (int64_t i = 0; i < d; i++) dst[i * KB + jj] = 0.0f;
      }
    }
    // per thread: the task's queries, scores, outputs, running maxima and sums (in bf16, the queries in
    // their first half, and the probabilities after the sums)
    float* work = malloc((size_t)(rows_max * (2 * d + KB + 2 + KB / 2)) * sizeof(float));
    if (!work) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp barrier
    if (work && !failed) {
      float *qs = work, *s = qs + rows_max * d, *o = s + rows_max * KB, *top = o + rows_max * d;
      float* sum = top + rows_max;
      uint16_t *qs16 = (uint16_t*)qs, *ps16 = (uint16_t*)(sum + rows_max);
      // the longest tasks (last query blocks, most keys) first
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < tasks; t++) {
        int64_t b = qblocks - 1 - t / kv_heads, g = t % kv_heads;
        int64_t p0 = b * QB, p1 = p0 + QB < length ? p0 + QB : length, rows = (p1 - p0) * group;
        for (int64_t r = 0; r < rows; r++) {
          int64_t p = p0 + r / group, h = g * group + r % group;
          if (bf16) round_row(q + p * q_row + h * d, d, qs16 + r * d);
          else memcpy(qs + r * d, q + p * q_row + h * d, (size_t)d * sizeof(float));
          top[r] = -INFINITY, sum[r] = 0.0f;
        }
        memset(o, 0, (size_t)(rows * d) * sizeof(float));
        int64_t last = context + p1 - 1;  // the furthest key any row sees
        int64_t first = window > 0 && context + p0 - window + 1 > 0 ? context + p0 - window + 1 : 0;
        first = first / KB * KB;
        const float* ktg = kt + g * blocks * d * KB;
        for (int64_t j0 = first; j0 <= last; j0 += KB) {
          int64_t kb = last + 1 - j0 < KB ? last + 1 - j0 : KB;
          for (int64_t r0 = 0; r0 < rows; r0 += TR) {
            int n = rows - r0 < TR ? (int)(rows - r0) : TR;
            if (bf16)
              score_tile_bf16(qs16 + r0 * d, d, kt16 + (g * blocks + j0 / KB) * d * KB, s + r0 * KB, n);
            else if (d == 64)
              score_tile(qs + r0 * 64, 64, ktg + j0 * 64, KB, s + r0 * KB, n);
            else
              score_tile(qs + r0 * d, d, ktg + j0 * d, KB, s + r0 * KB, n);
          }
          // online softmax: rescale each row's past by its new maximum, exps of this block into s
          for (int64_t r = 0; r < rows; r++) {
            int64_t pos = context + p0 + r / group;
            int64_t lo = window > 0 ? pos - window + 1 : 0, hi = pos + 1;  // visible keys [lo, hi)
            float* sr = s + r * KB;
            __mmask16 vis[4];
            __m512 mx = _mm512_set1_ps(-INFINITY);
            for (int c = 0; c < 4; c++) {
              vis[c] = c * 16 < kb ? lanes_between(lo, hi < j0 + kb ? hi : j0 + kb, j0 + c * 16) : 0;
              __m512 x = _mm512_mul_ps(_mm512_loadu_ps(sr + c * 16), _mm512_set1_ps(scale));
              _mm512_storeu_ps(sr + c * 16, x);
              mx = _mm512_mask_max_ps(mx, vis[c], mx, x);
            }
            if (!(vis[0] | vis[1] | vis[2] | vis[3])) {
              memset(sr, 0, KB * sizeof(float));
              continue;
            }
            float m_block = _mm512_reduce_max_ps(mx), m_new = m_block > top[r] ? m_block : top[r];
            __m512 mv = _mm512_set1_ps(m_new), acc = _mm512_setzero_ps();
            for (int c = 0; c < 4; c++) {
              __m512 e = _mm512_maskz_mov_ps(vis[c], exp16(_mm512_sub_ps(_mm512_loadu_ps(sr + c * 16), mv)));
              _mm512_storeu_ps(sr + c * 16, e);
              acc = _mm512_add_ps(acc, e);
            }
            if (m_new > top[r] && top[r] != -INFINITY) {
              float corr = expf(top[r] - m_new);
              sum[r] *= corr;
              __m512 cv = _mm512_set1_ps(corr);
              for (int64_t i = 0; i < d; i += 16)
                _mm512_storeu_ps(o + r * d + i, _mm512_mul_ps(_mm512_loadu_ps(o + r * d + i), cv));
            }
            top[r] = m_new;
            sum[r] += _mm512_reduce_add_ps(acc);
          }
          const float* vg = v + j0 * v_row + g * d;
          if (bf16)  // the probabilities (0 past the block's visible keys) in bf16 pairs
            for (int64_t r = 0; r < rows; r++)
              for (int c = 0; c < 4; c++)
                _mm256_storeu_si256((__m256i*)(ps16 + r * KB + c * 16),
                                    round_to_bf16(_mm512_loadu_ps(s + r * KB + c * 16)));
          for (int64_t r0 = 0; r0 < rows; r0 += TR) {
            int n = rows - r0 < TR ? (int)(rows - r0) : TR;
            for (int64_t c0 = 0; c0 < d; c0 += 64) {
              if (bf16)
                value_tile_bf16(ps16 + r0 * KB, vt16 + (g * blocks + j0 / KB) * d * KB, (kb + 1) / 2,
                                o + r0 * d + c0, d, c0, n);
              else if (d == 64)
                value_tile(s + r0 * KB, vg, v_row, kb, o + r0 * 64, 64, n);
              else
                value_tile(s + r0 * KB, vg + c0, v_row, kb, o + r0 * d + c0, d, n);
            }
          }
        }
        for (int64_t r = 0; r < rows; r++) {
          int64_t p = p0 + r / group, h = g * group + r % group;
          float inv = sum[r] > 0.0f ? 1.0f / sum[r] : 0.0f;  // 0: a row that sees no key
          __m512 iv = _mm512_set1_ps(inv);
          float* dst = out + (p * heads + h) * d;
          for (int64_t i = 0; i < d; i += 16)
            _mm512_storeu_ps(dst + i, _mm512_mul_ps(_mm512_loadu_ps(o + r * d + i), iv));
        }
      }
    }
    free(work);
  }
  free(kt);
  return failed ? -1 : 0;
}

int hotlora_prefill_attention(const float* q, int64_t length, int64_t heads, int64_t d, int64_t q_row,
                              const float* k, int64_t k_row, const float* v, int64_t v_row,
                              int64_t kv_heads, int64_t context, int64_t window, float scale, float* out,
                              int threads) {
  return attention(q, length, heads, d, q_row, k, k_row, v, v_row, kv_heads, context, window, scale, out,
                   threads, 0);
}

// Only on a CPU with avx512_bf16 (the caller checks).
int hotlora_prefill_attention_bf16(const float* q, int64_t length, int64_t heads, int64_t d, int64_t q_row,
                                   const float* k, int64_t k_row, const float* v, int64_t v_row,
                                   int64_t kv_heads, int64_t context, int64_t window, float scale, float* out,
                                   int threads) {
  return attention(q, length, heads, d, q_row, k, k_row, v, v_row, kv_heads, context, window, scale, out,
                   threads, 1);
}
