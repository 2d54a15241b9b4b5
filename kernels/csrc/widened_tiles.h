// The several-rows half of hotlora's narrow-weight GEMMs (bf16_weights.c, block_weights.c; included by them,
// hashed with each source by kernels/native.py): a block of up to 4 rows of W, already widened to fp32 into
// a per-thread buffer wb (L1/L2), against every block of 4 rows of x, so the widening is paid once per
// weight and not once per x block. x and wb share one layout along K (Kp elements a row, 64-byte aligned).
#pragma once
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#include "rows_ahead.h"
#include "sums16.h"

#define AI static inline __attribute__((always_inline))

AI void store_y(__m512 acc, float* y, const float* bias, int64_t n) {
  *y = _mm512_reduce_add_ps(acc) + (bias ? bias[n] : 0.0f);
}

// MB rows of x against NB rows of W already widened into wb; `ahead`'s lines asked for on the way.
AI void tile_widened(const float* xd, int64_t Kp, const float* wb, int64_t n0, int64_t m0, int MB, int NB,
                     float* y, int64_t N, const float* bias, Ahead* ahead) {
  __m512 acc[4][4];
  for (int i = 0; i < MB; i++)
    for (int j = 0; j < NB; j++) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < Kp; k += 16) {
    __m512 xv[4];
    for (int i = 0; i < MB; i++) xv[i] = _mm512_load_ps(xd + (m0 + i) * Kp + k);
    if (ahead->left > 0) ahead_step(ahead);
    for (int j = 0; j < NB; j++) {
      __m512 w = _mm512_load_ps(wb + j * Kp + k);
      for (int i = 0; i < MB; i++) acc[i][j] = _mm512_fmadd_ps(xv[i], w, acc[i][j]);
    }
  }
  if (MB == 4 && NB == 4) {  // the common tile: its 16 sums in one transposing tree, no scalar reductions
    __m512 sums = reduce16(&acc[0][0]);  // acc[i][j] in row-major order: lane 4 i + j
    float out[16];
    _mm512_storeu_ps(out, sums);
    for (int i = 0; i < 4; i++)
      for (int j = 0; j < 4; j++) y[(m0 + i) * N + n0 + j] = out[i * 4 + j] + (bias ? bias[n0 + j] : 0.0f);
    return;
  }
  for (int i = 0; i < MB; i++)
    for (int j = 0; j < NB; j++) store_y(acc[i][j], y + (m0 + i) * N + n0 + j, bias, n0 + j);
}

// The constant MB/NB arguments let the compiler keep each variant's accumulators in registers.
#define WIDENED(MB, NB, WB, N0) tile_widened(xd, Kp, WB, N0, m0, MB, NB, y, N, bias, ahead)
#define BY_MB(NB, WB, N0)                                                                                   \
  switch (mb) {                                                                                             \
    case 4: WIDENED(4, NB, WB, N0); break;                                                                  \
    case 3: WIDENED(3, NB, WB, N0); break;                                                                  \
    case 2: WIDENED(2, NB, WB, N0); break;                                                                  \
    default: WIDENED(1, NB, WB, N0);                                                                        \
  }

// All M rows of x against the nb (<= 4) rows of W from n0 widened into wb.
AI void rows_on_widened(const float* xd, int64_t Kp, const float* wb, int64_t n0, int64_t nb, int64_t M,
                        float* y, int64_t N, const float* bias, Ahead* ahead) {
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    int64_t mb = M - m0 < 4 ? M - m0 : 4;
    if (nb == 4) {
      BY_MB(4, wb, n0)
    } else {
      for (int64_t j = 0; j < nb; j++) {
        BY_MB(1, wb + j * Kp, n0 + j)
      }
    }
  }
}

// The threads' share of a GEMM: tile(t, wb, ahead, ctx) for every t < tiles (8 rows of W each) on `threads`
// OpenMP threads (libgomp, the pool torch has loaded), statically, so each thread's tiles are contiguous and
// a tile's prefetches of the next one read what the same thread uses next. With several rows of x (M > 1)
// each thread has its own buffer wb of 4 * Kp floats, and tile t asks for its share of the bytes `banks` x
// `slots` name (rows_ahead.h; none when either is NULL): the tiles in order, so a thread's share is what the
// same thread reads in the update after (the update takes its slots in the same order, a contiguous share a
// thread). Returns 0, or -1 when a buffer could not be had (y is then undefined).
typedef void (*tile_fn)(int64_t t, float* wb, Ahead* ahead, const void* ctx);
AI int over_tiles(int64_t tiles, int64_t M, int64_t Kp, int threads, tile_fn tile, const void* ctx,
                  const BankRegions* banks, const SlotsAhead* slots) {
  int failed = 0;
  int64_t total = M > 1 ? ahead_total(banks, slots) : 0;
  int64_t steps = 2 * ((M + 3) / 4) * (Kp / 16);  // tile_widened's k steps in a tile of 8 rows of W
#pragma omp parallel num_threads(threads)
  {
    float* wb = M > 1 ? aligned_alloc(64, (size_t)(4 * Kp) * sizeof(float)) : NULL;
    if (M > 1 && !wb) {
#pragma omp atomic write
      failed = 1;
    }
    Ahead ahead = {0};
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; t++)
      if (M == 1 || wb) {
        ahead_tile(&ahead, banks, slots, total, t, tiles, steps);
        tile(t, wb, &ahead, ctx);
      }
    free(wb);
  }
  return failed ? -1 : 0;
}
