// y[M, N] = x[M, K] (fp32) . W[N, K]^T (bf16, row-major as stored) + bias, accumulated in fp32.
//
// For CPUs with AVX-512 but without avx512_bf16, where oneDNN emulates bf16 and is slower than fp32: the
// weights stay bf16 in memory (half the bytes a decode step reads) and are widened in registers.
//
// A 64-byte load holds 32 bf16 weights. Shifting each 32-bit lane left by 16 gives the even-indexed ones as
// fp32 and masking off the low half gives the odd-indexed ones, with no shuffle; x is split once per call
// into its even and odd elements (xd, 32-element chunks: 16 even then 16 odd) to match.
//
// One row of x (decode of one sequence): 8 rows of W at a time, widened in registers as they stream by.
// Several rows: each block of 4 rows of W is widened once into a per-thread fp32 buffer (L1/L2) and every
// block of 4 rows of x runs on it, so the widening is paid once per weight, not once per x block.
// Threads: OpenMP, which resolves to the libgomp torch has already loaded (one thread pool, not two).
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#include "kernels.h"

#include "widened_tiles.h"

AI void load_w(const uint16_t* row, int64_t k, int64_t K, __m512* we, __m512* wo) {
  __m512i v;
  if (k + 32 <= K) v = _mm512_loadu_si512((const void*)(row + k));
  else v = _mm512_maskz_loadu_epi16((__mmask32)((1ull << (K - k)) - 1), row + k);
  *we = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  *wo = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000)));
}

// One row of x against NB rows of W read straight from memory. `next`..`end`: the bytes the thread reads
// after this tile (the next tile's rows, contiguous), prefetched as this one streams: eight interleaved rows
// of ~1 KiB each are short streams the hardware prefetcher picks up late (measured: 1.4x on 3072 x 576).
AI void tile_stream(const float* xd, const uint16_t* W, int64_t K, int64_t n0, int NB, float* y,
                    const float* bias, const char* next, const char* end) {
  __m512 acc[8];
  for (int j = 0; j < NB; j++) acc[j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512 xe = _mm512_load_ps(xd + k), xo = _mm512_load_ps(xd + k + 16);
    // NB rows of K bf16 are NB * K / 32 cache lines: NB lines per step of k covers the next tile
    for (int j = 0; j < NB; j++) {
      const char* line = next + ((k / 32) * NB + j) * 64;
      if (line < end) _mm_prefetch(line, _MM_HINT_T0);
    }
    for (int j = 0; j < NB; j++) {
      __m512 we, wo;
      load_w(W + (n0 + j) * K, k, K, &we, &wo);
      acc[j] = _mm512_fmadd_ps(xe, we, acc[j]);
      acc[j] = _mm512_fmadd_ps(xo, wo, acc[j]);
    }
  }
  for (int j = 0; j < NB; j++) store_y(acc[j], y + n0 + j, bias, n0 + j);
}

static void block_one_row(const float* xd, const uint16_t* W, int64_t K, int64_t n0, int64_t nn, float* y,
                          const float* bias, const char* end) {
  const char* next = (const char*)(W + (n0 + nn) * K);
  if (nn == 8) {
    tile_stream(xd, W, K, n0, 8, y, bias, next, end);
    return;
  }
  for (int64_t j = 0; j < nn; j++) tile_stream(xd, W, K, n0 + j, 1, y, bias, next, next);
}

static void block_rows(const float* xd, int64_t Kp, const uint16_t* W, int64_t K, int64_t n_start,
                       int64_t nn, int64_t M, float* y, int64_t N, const float* bias, float* wb,
                       const char* end, Ahead* ahead) {
  for (int64_t j0 = 0; j0 < nn; j0 += 4) {
    int64_t nb = nn - j0 < 4 ? nn - j0 : 4, n0 = n_start + j0;
    const char* next = (const char*)(W + (n0 + nb) * K);  // the next block's rows, as in tile_stream
    for (int64_t j = 0; j < nb; j++)
      for (int64_t k = 0; k < K; k += 32) {
        const char* line = next + (j * ((K + 31) / 32) + k / 32) * 64;
        if (line < end) _mm_prefetch(line, _MM_HINT_T0);
        __m512 we, wo;
        load_w(W + (n0 + j) * K, k, K, &we, &wo);
        _mm512_store_ps(wb + j * Kp + k, we);
        _mm512_store_ps(wb + j * Kp + k + 16, wo);
      }
    rows_on_widened(xd, Kp, wb, n0, nb, M, y, N, bias, ahead);
  }
}

typedef struct {
  const float* xd;
  int64_t Kp;
  const uint16_t* W;
  int64_t K, M, N;
  float* y;
  const float* bias;
} Call;

static void tile(int64_t t, float* wb, Ahead* ahead, const void* ctx) {
  const Call* c = ctx;
  int64_t n0 = t * 8, nn = c->N - n0 < 8 ? c->N - n0 : 8;
  const char* end = (const char*)(c->W + c->N * c->K);
  if (c->M == 1) block_one_row(c->xd, c->W, c->K, n0, nn, c->y, c->bias, end);
  else block_rows(c->xd, c->Kp, c->W, c->K, n0, nn, c->M, c->y, c->N, c->bias, wb, end, ahead);
}

// banks, slots: the bytes to ask for on the way (rows_ahead.h), or NULL. Returns 0, or -1 when scratch
// memory could not be had (y is then undefined).
int hotlora_linear_bf16w(const float* x, int64_t M, int64_t K, const uint16_t* W, int64_t N, float* y,
                         const float* bias, int threads, const BankRegions* banks, const SlotsAhead* slots) {
  int64_t Kp = (K + 31) / 32 * 32;
  float* xd = aligned_alloc(64, (size_t)(M * Kp) * sizeof(float));
  if (!xd) return -1;
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int64_t m = 0; m < M; m++)
    for (int64_t k = 0; k < K; k += 32) {
      const float* xr = x + m * K + k;
      int64_t left = K - k;  // zeros past K: the masked weight loads are zero there too
      __mmask16 m1 = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
      __mmask16 m2 = left >= 32 ? 0xFFFF : left <= 16 ? 0 : (__mmask16)((1u << (left - 16)) - 1);
      __m512 a = _mm512_maskz_loadu_ps(m1, xr), b = _mm512_maskz_loadu_ps(m2, xr + 16);
      _mm512_store_ps(xd + m * Kp + k, _mm512_permutex2var_ps(a, even, b));
      _mm512_store_ps(xd + m * Kp + k + 16, _mm512_permutex2var_ps(a, odd, b));
    }
  Call call = {xd, Kp, W, K, M, N, y, bias};
  int status = over_tiles((N + 7) / 8, M, Kp, threads, tile, &call, banks, slots);
  free(xd);
  return status;
}
