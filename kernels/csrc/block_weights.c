// y[M, N] = x[M, K] (fp32) . W[N, K]^T + bias, accumulated in fp32, for W kept in GGUF's blocks, laid out a
// row at a time by kernels/gguf_blocks.py (the table there: per row, every block's quants, then the scales;
// nb = K/32 blocks, ns = K/256 super-blocks):
//   Q4_1: weight = d * q + m, q in 0..15: 16 bytes of q a block (byte i: weight i in its low nibble, weight
//         16 + i in its high one), then nb fp32 d, then nb fp32 m.
//   Q8_0: weight = d * q, q in -127..127: 32 bytes of q a block, then nb fp32 d.
//   Q4_0: weight = d * (q - 8): q as Q4_1's, then nb fp32 d.
//   Q4_K: weight = (d * sc) * q - (dmin * m): q as Q4_1's, then ns fp32 d, ns fp32 dmin, nb uint8 sc, nb
//         uint8 m (6-bit each, one a block of 32).
//   Q6_K: weight = (d * sc) * (q - 32), q = lo | hi << 4: lo as Q4_1's q, then 8 bytes of hi a block (byte
//         i: weight 8 j + i's two bits at bit 2 j), then ns fp32 d, then 2 nb int8 sc (one per 16 weights).
//   F16, BF16: the K 16-bit floats.
// Q4_1/Q8_0 are also what kernels/block_weights.py finds in a checkpoint dequantized from a GGUF file.
// The file's fp16 d and m are kept as fp32 here: broadcast straight from memory, they cost no shuffle (with
// fp16 ones the shuffle port bounded the kernel: 111 against 53 us on 3072 x 576, hot).
//
// A weight is widened exactly as the `gguf` package dequantizes it: d * q, d * sc and dmin * m are exact in
// fp32 (an 11-bit d times a 4- to 8-bit integer), and what is rounded -- Q4_1's + m, Q4_K's - dmin * m,
// Q6_K's (d * sc) * q -- is rounded once, by one fma or mul, as numpy rounds it. The products and sums are
// then those of an fp32 GEMM on those weights, in another order.
//
// One row of x (decode of one sequence): 8 rows of W at a time, widened in registers as they stream by
// (Q4_0 and Q8_0, one scale a block: a block's x . q, then its d times that -- the same products, the
// scale applied to their sum).
// Several rows: blocks of 4 rows of W widened into a per-thread buffer, as bf16_weights.c (widened_tiles.h).
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#include "kernels.h"

#include "bf16_round.h"
#include "widened_tiles.h"

#define QK 32
enum {  // kernels.h
  Q4_1 = HOTLORA_Q4_1,
  Q8_0 = HOTLORA_Q8_0,
  Q4_0 = HOTLORA_Q4_0,
  Q4_K = HOTLORA_Q4_K,
  Q6_K = HOTLORA_Q6_K,
  F16 = HOTLORA_F16,
  BF16 = HOTLORA_BF16,
  FORMATS = HOTLORA_BLOCK_FORMATS
};

// Bytes of a row of nb blocks.
AI int64_t row_bytes(int fmt, int64_t nb) {
  switch (fmt) {
    case Q4_1: return 24 * nb;
    case Q8_0: return 36 * nb;
    case Q4_0: return 20 * nb;
    case Q4_K: return 16 * nb + nb / 8 * 8 + 2 * nb;
    case Q6_K: return 24 * nb + nb / 8 * 4 + 2 * nb;
    default: return 64 * nb;  // F16, BF16
  }
}

typedef struct {
  const uint8_t* q;  // quants (Q6_K: the low nibbles); F16/BF16: the values
  const uint8_t* hi;  // Q6_K's two high bits
  const float* d;  // per block (Q4_K, Q6_K: per super-block)
  const float* m;  // Q4_1: per block; Q4_K: dmin per super-block
  const uint8_t* sc;  // Q4_K: uint8 per block; Q6_K: int8 per 16 weights
  const uint8_t* mn;  // Q4_K: uint8 per block
} Row;

AI Row row_at(const uint8_t* W, int64_t nb, int64_t n, int fmt) {
  const uint8_t* r = W + n * row_bytes(fmt, nb);
  int64_t ns = nb / 8;
  Row out = {r, NULL, NULL, NULL, NULL, NULL};
  switch (fmt) {
    case Q4_1:
      out.d = (const float*)(r + 16 * nb);
      out.m = (const float*)(r + 20 * nb);
      break;
    case Q8_0: out.d = (const float*)(r + 32 * nb); break;
    case Q4_0: out.d = (const float*)(r + 16 * nb); break;
    case Q4_K:
      out.d = (const float*)(r + 16 * nb);
      out.m = (const float*)(r + 16 * nb + 4 * ns);
      out.sc = r + 16 * nb + 8 * ns;
      out.mn = r + 16 * nb + 8 * ns + nb;
      break;
    case Q6_K:
      out.hi = r + 16 * nb;
      out.d = (const float*)(r + 24 * nb);
      out.sc = r + 24 * nb + 4 * ns;
      break;
  }
  return out;
}

// Block b's integers as floats, unscaled: Q8_0's q, Q4_0's q - 8 (weights 0..15 into *lo, 16..31 into *hi).
AI void block_quants(Row r, int64_t b, int fmt, __m512* lo, __m512* hi) {
  if (fmt == Q8_0) {
    const __m128i* q = (const __m128i*)(r.q + b * 32);
    *lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q)));
    *hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1)));
    return;
  }
  const __m512 table = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);  // q - 8
  __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(r.q + b * 16)));
  *lo = _mm512_permutexvar_ps(v, table);
  *hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
}

// Block b of a row, widened: weights 0..15 into *lo, 16..31 into *hi.
AI void widen_block(Row r, int64_t b, int fmt, __m512* lo, __m512* hi) {
  // vpermps reads the low 4 bits of each index lane: a 16-entry table turns a nibble into its float
  const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  if (fmt == Q8_0) {
    __m512 d = _mm512_set1_ps(r.d[b]);
    const __m128i* q = (const __m128i*)(r.q + b * 32);
    *lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q))), d);
    *hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1))), d);
    return;
  }
  if (fmt == F16) {
    const __m256i* q = (const __m256i*)(r.q + b * 64);
    *lo = _mm512_cvtph_ps(_mm256_loadu_si256(q));
    *hi = _mm512_cvtph_ps(_mm256_loadu_si256(q + 1));
    return;
  }
  if (fmt == BF16) {
    const __m256i* q = (const __m256i*)(r.q + b * 64);
    *lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(q)), 16));
    *hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(q + 1)), 16));
    return;
  }
  __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(r.q + b * 16)));
  if (fmt == Q6_K) {
    const __m512i low4 = _mm512_set1_epi32(0x0F), two = _mm512_set1_epi32(0x03), off = _mm512_set1_epi32(32);
    // the block's 8 bytes of high bits in both halves of 16 lanes; lanes 0-7 take bits 0-1 (weights 0-7),
    // lanes 8-15 bits 2-3 (8-15), and the high nibbles' lanes bits 4-5 and 6-7 (16-23, 24-31)
    __m512i h = _mm512_cvtepu8_epi32(_mm_set1_epi64x(*(const int64_t*)(r.hi + b * 8)));
    const __m512i shift_lo = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
    const __m512i shift_hi = _mm512_setr_epi32(4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6, 6, 6);
    __m512i q0 = _mm512_or_si512(_mm512_and_si512(v, low4),
                                 _mm512_slli_epi32(_mm512_and_si512(_mm512_srlv_epi32(h, shift_lo), two), 4));
    __m512i q1 = _mm512_or_si512(_mm512_srli_epi32(v, 4),
                                 _mm512_slli_epi32(_mm512_and_si512(_mm512_srlv_epi32(h, shift_hi), two), 4));
    const int8_t* sc = (const int8_t*)r.sc;
    float d = r.d[b >> 3];
    __m512 d0 = _mm512_set1_ps(d * (float)sc[2 * b]), d1 = _mm512_set1_ps(d * (float)sc[2 * b + 1]);
    *lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(q0, off)), d0);
    *hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(q1, off)), d1);
    return;
  }
  __m512 q0 = _mm512_permutexvar_ps(v, table), q1 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
  if (fmt == Q4_1) {
    __m512 d = _mm512_set1_ps(r.d[b]), m = _mm512_set1_ps(r.m[b]);
    *lo = _mm512_fmadd_ps(q0, d, m);
    *hi = _mm512_fmadd_ps(q1, d, m);
  } else if (fmt == Q4_0) {
    __m512 d = _mm512_set1_ps(r.d[b]);
    block_quants(r, b, Q4_0, &q0, &q1);  // q - 8 from its own table
    *lo = _mm512_mul_ps(q0, d);
    *hi = _mm512_mul_ps(q1, d);
  } else {  // Q4_K
    __m512 d = _mm512_set1_ps(r.d[b >> 3] * (float)r.sc[b]);
    __m512 m = _mm512_set1_ps(-(r.m[b >> 3] * (float)r.mn[b]));
    *lo = _mm512_fmadd_ps(q0, d, m);
    *hi = _mm512_fmadd_ps(q1, d, m);
  }
}

// One row of x against NB rows of W read straight from memory; `next`..`end`: the next tile's bytes (its NB
// rows, contiguous), prefetched as this one streams (an nb-th of them per block).
AI void tile_stream(const float* x, const uint8_t* W, int64_t nb, int64_t n0, int NB, int fmt, float* y,
                    const float* bias, const char* next, const char* end) {
  __m512 acc[8];
  Row rows[8];
  for (int j = 0; j < NB; j++) {
    acc[j] = _mm512_setzero_ps();
    rows[j] = row_at(W, nb, n0 + j, fmt);
  }
  const int64_t share = NB * ((row_bytes(fmt, nb) + nb - 1) / nb);  // a block's share of the next tile
  for (int64_t b = 0; b < nb; b++) {
    __m512 x0 = _mm512_loadu_ps(x + b * QK), x1 = _mm512_loadu_ps(x + b * QK + 16);
    for (const char* ahead = next + b * share; ahead < next + (b + 1) * share; ahead += 64)
      if (ahead < end) _mm_prefetch(ahead, _MM_HINT_T0);
    for (int j = 0; j < NB; j++) {
      if (fmt == Q4_0 || fmt == Q8_0) {  // one scale a block: x . q, then d times it (3 FP ops, not 4-6)
        __m512 q0, q1;
        block_quants(rows[j], b, fmt, &q0, &q1);
        __m512 dot = _mm512_fmadd_ps(x1, q1, _mm512_mul_ps(x0, q0));
        acc[j] = _mm512_fmadd_ps(dot, _mm512_set1_ps(rows[j].d[b]), acc[j]);
        continue;
      }
      __m512 lo, hi;
      widen_block(rows[j], b, fmt, &lo, &hi);
      acc[j] = _mm512_fmadd_ps(x0, lo, acc[j]);
      acc[j] = _mm512_fmadd_ps(x1, hi, acc[j]);
    }
  }
  for (int j = 0; j < NB; j++) store_y(acc[j], y + n0 + j, bias, n0 + j);
}

// `ahead`: a row read later (NULL: none), prefetched as this one is widened, an nb-th of it a block
// (without it, 2 rows of x ran at half the bytes a second of 1 row: the loads wait on memory).
AI void widen_row(const uint8_t* W, int64_t nb, int64_t n, int fmt, float* out, const char* ahead) {
  Row r = row_at(W, nb, n, fmt);
  const int64_t share = (row_bytes(fmt, nb) + nb - 1) / nb;  // a block's share of the row ahead
  for (int64_t b = 0; b < nb; b++) {
    if (ahead)
      for (const char* p = ahead + b * share; p < ahead + (b + 1) * share; p += 64)
        _mm_prefetch(p, _MM_HINT_T0);
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
    const char* next = (const char*)(W + (n0 + nn) * row_bytes(fmt, nb));
    const char* end = (const char*)(W + N * row_bytes(fmt, nb));
    if (nn == 8) tile_stream(x, W, nb, n0, 8, fmt, y, bias, next, end);
    else
      for (int64_t j = 0; j < nn; j++) tile_stream(x, W, nb, n0 + j, 1, fmt, y, bias, next, next);
    return;
  }
  for (int64_t j0 = 0; j0 < nn; j0 += 4) {
    int64_t rows = nn - j0 < 4 ? nn - j0 : 4;
    for (int64_t j = 0; j < rows; j++) {
      int64_t later = n0 + j0 + j + 4;  // the same row of the next block of 4 (this thread's, or the next's)
      const char* ahead = later < N ? (const char*)(W + later * row_bytes(fmt, nb)) : NULL;
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

// One tile function per format, so that each format's widening is compiled with its constant fmt.
#define TILE(FMT)                                                                      \
  static void tile_##FMT(int64_t t, float* wb, Ahead* ahead, const void* ctx) {        \
    const Call* c = ctx;                                                               \
    row_block(c->x, c->xd, c->M, c->K, c->W, c->N, t * 8, FMT, c->y, c->bias, wb, ahead); \
  }
TILE(Q4_1)
TILE(Q8_0)
TILE(Q4_0)
TILE(Q4_K)
TILE(Q6_K)
TILE(F16)
TILE(BF16)
static const tile_fn TILES[FORMATS] = {tile_Q4_1, tile_Q8_0, tile_Q4_0, tile_Q4_K,
                                       tile_Q6_K, tile_F16,  tile_BF16};

// Whether the kernel takes rows of K weights in format fmt (the K types: super-blocks of 256).
AI int takes(int fmt, int64_t K) {
  return fmt >= 0 && fmt < FORMATS && K > 0 && K % ((fmt == Q4_K || fmt == Q6_K) ? 256 : QK) == 0;
}

int64_t hotlora_block_row_bytes(int fmt, int64_t K) { return takes(fmt, K) ? row_bytes(fmt, K / QK) : -1; }

// The row widened into out, with fmt a constant in each branch.
AI void widen_row_as(const uint8_t* W, int64_t nb, int64_t n, int fmt, float* out) {
  switch (fmt) {
    case Q4_1: widen_row(W, nb, n, Q4_1, out, NULL); break;
    case Q8_0: widen_row(W, nb, n, Q8_0, out, NULL); break;
    case Q4_0: widen_row(W, nb, n, Q4_0, out, NULL); break;
    case Q4_K: widen_row(W, nb, n, Q4_K, out, NULL); break;
    case Q6_K: widen_row(W, nb, n, Q6_K, out, NULL); break;
    case F16: widen_row(W, nb, n, F16, out, NULL); break;
    default: widen_row(W, nb, n, BF16, out, NULL);
  }
}

// fmt: one of the formats above; K: a multiple of its block (32, 256 for Q4_K and Q6_K); banks, slots: the
// bytes to ask for on the way (rows_ahead.h), or NULL. Returns 0, -1 when scratch memory could not be had (y
// is then undefined), -2 for a K or fmt it does not take.
int hotlora_linear_blocks(const float* x, int64_t M, int64_t K, const uint8_t* W, int fmt, int64_t N,
                          float* y, const float* bias, int threads, const BankRegions* banks,
                          const SlotsAhead* slots) {
  if (!takes(fmt, K)) return -2;
  float* xd = NULL;  // several rows: x copied to 64-byte-aligned rows for widened_tiles' aligned loads
  if (M > 1) {
    xd = aligned_alloc(64, (size_t)(M * K) * sizeof(float));
    if (!xd) return -1;
    for (int64_t i = 0; i < M * K; i++) xd[i] = x[i];
  }
  Call call = {x, xd, M, K, W, N, y, bias};
  int status = over_tiles((N + 7) / 8, M, K, threads, TILES[fmt], &call, banks, slots);
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

// out[i, K] = the fp32 row rows[i] of W (all n rows from the first in order when rows is NULL): torch's GEMM
// on long prefill chunks and training widen the matrix a band of rows at a time; an embedding lookup widens
// its tokens' rows. Returns -2 for a K or fmt it does not take, else 0.
int hotlora_widen_blocks(const uint8_t* W, int fmt, int64_t K, const int64_t* rows, int64_t n, float* out,
                         int threads) {
  if (!takes(fmt, K)) return -2;
  int64_t nb = K / QK;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < n; i++) widen_row_as(W, nb, rows ? rows[i] : i, fmt, out + i * K);
  return 0;
}

// out[N, K] (bf16) = W rounded to bf16 in one pass: the weight a long prefill chunk's bf16 GEMM reads
// (block_weights.long_product_bf16), without an fp32 copy written and read again (a third of the bytes).
AI void widen_row_bf16(const uint8_t* W, int64_t nb, int64_t i, int fmt, uint16_t* o) {
  Row r = row_at(W, nb, i, fmt);
  for (int64_t b = 0; b < nb; b++) {
    __m512 lo, hi;
    widen_block(r, b, fmt, &lo, &hi);
    _mm256_storeu_si256((__m256i*)(o + b * QK), round_to_bf16(lo));
    _mm256_storeu_si256((__m256i*)(o + b * QK + 16), round_to_bf16(hi));
  }
}

int hotlora_widen_blocks_bf16(const uint8_t* W, int fmt, int64_t K, int64_t n, uint16_t* out, int threads) {
  if (!takes(fmt, K)) return -2;
  int64_t nb = K / QK;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < n; i++) {
    switch (fmt) {
      case Q4_1: widen_row_bf16(W, nb, i, Q4_1, out + i * K); break;
      case Q8_0: widen_row_bf16(W, nb, i, Q8_0, out + i * K); break;
      case Q4_0: widen_row_bf16(W, nb, i, Q4_0, out + i * K); break;
      case Q4_K: widen_row_bf16(W, nb, i, Q4_K, out + i * K); break;
      case Q6_K: widen_row_bf16(W, nb, i, Q6_K, out + i * K); break;
      case F16: widen_row_bf16(W, nb, i, F16, out + i * K); break;
      default: widen_row_bf16(W, nb, i, BF16, out + i * K);
    }
  }
  return 0;
}
