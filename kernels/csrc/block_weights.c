// y[M, N] = x[M, K] (fp32) . W[N, K]^T + bias, accumulated in fp32, for W kept in blocks of 32 integers with
// a scale -- the values of GGUF's Q4_1 and Q8_0, repacked by kernels/block_weights.py only where a
// checkpoint's fp32 weights are exactly such values:
//   Q4_1: weight = d * q + m, q in 0..15; a row is its K/32 blocks' 16 bytes of q (byte i: q of weight i in
//         its low nibble, of weight 16 + i in its high one), then K/32 fp32 d, then K/32 fp32 m (24 bytes
//         per 32 weights: 0.19 of fp32's).
//   Q8_0: weight = d * q, q in -127..127; a row is its K/32 blocks' 32 bytes of q, then K/32 fp32 d (36
//         bytes per 32 weights: 0.28 of fp32's).
// d and m are fp16 numbers in the file, kept as fp32 here: broadcast straight from memory, they cost no
// shuffle (with fp16 ones the shuffle port bounded the kernel: 111 against 53 us on 3072 x 576, hot).
//
// A weight is widened exactly: d * q is exact in fp32 (an 11-bit d times a 4- or 8-bit q), and Q4_1's
// fma(q, d, m) rounds once, as the file's d * q + m did, so the fp32 value read is the checkpoint's, bit for
// bit. The products and sums are then those of an fp32 GEMM, in another order.
//
// One row of x (decode of one sequence): 8 rows of W at a time, widened in registers as they stream by.
// Several rows: blocks of 4 rows of W widened into a per-thread buffer, as bf16_weights.c (widened_tiles.h).
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#include "kernels.h"

#include "bf16_round.h"
#include "widened_tiles.h"

#define QK 32
enum { Q4_1 = HOTLORA_Q4_1, Q8_0 = HOTLORA_Q8_0 };  // kernels.h

AI int64_t block_bytes(int fmt) { return fmt == Q4_1 ? 24 : 36; }

typedef struct {
  const uint8_t* q;
  const float* d;
  const float* m;
} Row;

AI Row row_at(const uint8_t* W, int64_t nb, int64_t n, int fmt) {
  const uint8_t* r = W + n * nb * block_bytes(fmt);
  int64_t qb = fmt == Q4_1 ? 16 : 32;  // bytes of q per block
  Row out = {r, (const float*)(r + nb * qb), (const float*)(r + nb * (qb + 4))};
  return out;
}

// Block b of a row, widened: weights 0..15 into *lo, 16..31 into *hi.
AI void widen_block(Row r, int64_t b, int fmt, __m512* lo, __m512* hi) {
  __m512 d = _mm512_set1_ps(r.d[b]);
  if (fmt == Q4_1) {
    // vpermps reads the low 4 bits of each index lane: a 16-entry table turns a nibble into its float
    const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(r.q + b * 16)));
    __m512 m = _mm512_set1_ps(r.m[b]);
    *lo = _mm512_fmadd_ps(_mm512_permutexvar_ps(v, table), d, m);
    *hi = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table), d, m);
  } else {
    const __m128i* q = (const __m128i*)(r.q + b * 32);
    *lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q))), d);
    *hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1))), d);
  }
}

// One row of x against NB rows of W read straight from memory; `next`..`end`: the next tile's bytes (its NB
// rows, contiguous), prefetched as this one streams (NB blocks' bytes of them per block).
AI void tile_stream(const float* x, const uint8_t* W, int64_t nb, int64_t n0, int NB, int fmt, float* y,
                    const float* bias, const char* next, const char* end) {
  __m512 acc[8];
  Row rows[8];
  for (int j = 0; j < NB; j++) {
    acc[j] = _mm512_setzero_ps();
    rows[j] = row_at(W, nb, n0 + j, fmt);
  }
  for (int64_t b = 0; b < nb; b++) {
    __m512 x0 = _mm512_loadu_ps(x + b * QK), x1 = _mm512_loadu_ps(x + b * QK + 16);
    const char* ahead = next + b * NB * block_bytes(fmt);
    for (int o = 0; o < NB * block_bytes(fmt); o += 64)
      if (ahead + o < end) _mm_prefetch(ahead + o, _MM_HINT_T0);
    for (int j = 0; j < NB; j++) {
      __m512 lo, hi;
      widen_block(rows[j], b, fmt, &lo, &hi);
      acc[j] = _mm512_fmadd_ps(x0, lo, acc[j]);
      acc[j] = _mm512_fmadd_ps(x1, hi, acc[j]);
    }
  }
  for (int j = 0; j < NB; j++) store_y(acc[j], y + n0 + j, bias, n0 + j);
}

// `ahead`: a row read later (NULL: none), prefetched as this one is widened, one block's bytes a block
// (without it, 2 rows of x ran at half the bytes a second of 1 row: the loads wait on memory).
AI void widen_row(const uint8_t* W, int64_t nb, int64_t n, int fmt, float* out, const char* ahead) {
  Row r = row_at(W, nb, n, fmt);
  for (int64_t b = 0; b < nb; b++) {
    if (ahead) _mm_prefetch(ahead + b * block_bytes(fmt), _MM_HINT_T0);
    __m512 lo, hi;
    widen_block(r, b, fmt, &lo, &hi);
    _mm512_storeu_ps(out + b * QK, lo);
    _mm512_storeu_ps(out + b * QK + 16, hi);
  }
}

// The 8 (or fewer, at the end) rows of W from n0, against every row of x.
AI void row_block(const float* x, const float* xd, int64_t M, int64_t K, const uint8_t* W, int64_t N,
                  int64_t n0, int fmt, float* y, const float* bias, float* wb, Ahead* ahead) {
  int64_t nb = K / QK, nn = N - n0 < 8 ? N - n0 : 8;
  if (M == 1) {
    const char* next = (const char*)(W + (n0 + nn) * nb * block_bytes(fmt));
    const char* end = (const char*)(W + N * nb * block_bytes(fmt));
    if (nn == 8) tile_stream(x, W, nb, n0, 8, fmt, y, bias, next, end);
    else
      for (int64_t j = 0; j < nn; j++) tile_stream(x, W, nb, n0 + j, 1, fmt, y, bias, next, next);
    return;
  }
  for (int64_t j0 = 0; j0 < nn; j0 += 4) {
    int64_t rows = nn - j0 < 4 ? nn - j0 : 4;
    for (int64_t j = 0; j < rows; j++) {
      int64_t later = n0 + j0 + j + 4;  // the same row of the next block of 4 (this thread's, or the next's)
      const char* ahead = later < N ? (const char*)(W + later * nb * block_bytes(fmt)) : NULL;
      widen_row(W, nb, n0 + j0 + j, fmt, wb + j * K, ahead);
    }
    rows_on_widened(xd, K, wb, n0 + j0, rows, M, y, N, bias, ahead);
  }
}

typedef struct {
  const float *x, *xd;
  int64_t M, K;
  const uint8_t* W;
  int64_t N;
  float* y;
  const float* bias;
} Call;

static void tile_q4_1(int64_t t, float* wb, Ahead* ahead, const void* ctx) {
  const Call* c = ctx;
  row_block(c->x, c->xd, c->M, c->K, c->W, c->N, t * 8, Q4_1, c->y, c->bias, wb, ahead);
}

static void tile_q8_0(int64_t t, float* wb, Ahead* ahead, const void* ctx) {
  const Call* c = ctx;
  row_block(c->x, c->xd, c->M, c->K, c->W, c->N, t * 8, Q8_0, c->y, c->bias, wb, ahead);
}

// fmt: Q4_1 or Q8_0; K: a multiple of 32; banks, slots: the bytes to ask for on the way (rows_ahead.h), or
// NULL. Returns 0, -1 when scratch memory could not be had (y is then undefined), -2 for a K or fmt it does
// not take.
int hotlora_linear_blocks(const float* x, int64_t M, int64_t K, const uint8_t* W, int fmt, int64_t N,
                          float* y, const float* bias, int threads, const BankRegions* banks,
                          const SlotsAhead* slots) {
  if (K % QK || (fmt != Q4_1 && fmt != Q8_0)) return -2;
  float* xd = NULL;  // several rows: x copied to 64-byte-aligned rows for widened_tiles' aligned loads
  if (M > 1) {
    xd = aligned_alloc(64, (size_t)(M * K) * sizeof(float));
    if (!xd) return -1;
    for (int64_t i = 0; i < M * K; i++) xd[i] = x[i];
  }
  Call call = {x, xd, M, K, W, N, y, bias};
  int status = over_tiles((N + 7) / 8, M, K, threads, fmt == Q4_1 ? tile_q4_1 : tile_q8_0, &call, banks, slots);
  free(xd);
  return status;
}

// For tests of rows_ahead.h: the addresses of the lines `tiles` tiles of `steps` inner steps each ask for,
// tile by tile, as over_tiles' tiles do; at most cap written to out. Returns how many there were.
int64_t hotlora_ahead_lines(const BankRegions* banks, const SlotsAhead* slots, int64_t tiles, int64_t steps,
                            int64_t* out, int64_t cap) {
  int64_t n = 0, total = ahead_total(banks, slots);
  for (int64_t t = 0; t < tiles; t++) {
    Ahead a = {0};
    ahead_tile(&a, banks, slots, total, t, tiles, steps);
    for (int64_t k = 0; k < steps; k++)
      for (int j = 0; j < a.per; j++) {
        const char* p = ahead_next(&a);
        if (p && n < cap) out[n] = (int64_t)(intptr_t)p;
        n += p != NULL;
      }
  }
  return n;
}

// out[i, K] = the fp32 row rows[i] of W (all N rows in order when rows is NULL): torch's GEMM on long
// prefill chunks and autograd's backward widen the whole matrix; an embedding lookup widens its tokens' rows.
void hotlora_widen_blocks(const uint8_t* W, int fmt, int64_t K, const int64_t* rows, int64_t n, float* out,
                          int threads) {
  int64_t nb = K / QK;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < n; i++) {
    int64_t r = rows ? rows[i] : i;
    if (fmt == Q4_1) widen_row(W, nb, r, Q4_1, out + i * K, NULL);
    else widen_row(W, nb, r, Q8_0, out + i * K, NULL);
  }
}

// out[N, K] (bf16) = W rounded to bf16 in one pass: the weight a long prefill chunk's bf16 GEMM reads
// (block_weights.long_product_bf16), without an fp32 copy written and read again (a third of the bytes).
void hotlora_widen_blocks_bf16(const uint8_t* W, int fmt, int64_t K, int64_t n, uint16_t* out, int threads) {
  int64_t nb = K / QK;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < n; i++) {
    Row r = row_at(W, nb, i, fmt);
    uint16_t* o = out + i * K;
    for (int64_t b = 0; b < nb; b++) {
      __m512 lo, hi;
      if (fmt == Q4_1) widen_block(r, b, Q4_1, &lo, &hi);
      else widen_block(r, b, Q8_0, &lo, &hi);
      _mm256_storeu_si256((__m256i*)(o + b * QK), round_to_bf16(lo));
      _mm256_storeu_si256((__m256i*)(o + b * QK + 16), round_to_bf16(hi));
    }
  }
}
