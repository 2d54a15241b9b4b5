// The small per-layer ops of a decoder step in fp32, one C call each instead of 5-10 torch ops: between the
// weight streams of a decode step every torch op pays ~10-40 us of cold dispatch, more than its arithmetic.
// Each op does the arithmetic transformers does, in its order, as separate roundings (built with
// -ffp-contract=off, so no multiply-add is fused behind our back).
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"

#include "exp16.h"

// out = w * (xr * rsqrt(mean(xr^2) + eps))   (LlamaRMSNorm of one row in fp32)
static inline void norm_row(const float* xr, int64_t h, const float* w, float eps, float* o) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= h; i += 16) {
    __m512 v = _mm512_loadu_ps(xr + i);
    acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
  }
  float sum = _mm512_reduce_add_ps(acc);
  for (; i < h; i++) sum += xr[i] * xr[i];
  float inv = 1.0f / sqrtf(sum / (float)h + eps);
  __m512 iv = _mm512_set1_ps(inv);
  for (i = 0; i + 16 <= h; i += 16)
    _mm512_storeu_ps(o + i, _mm512_mul_ps(_mm512_loadu_ps(w + i), _mm512_mul_ps(_mm512_loadu_ps(xr + i), iv)));
  for (; i < h; i++) o[i] = w[i] * (xr[i] * inv);
}

// out[r] = w * (x[r] * rsqrt(mean(x[r]^2) + eps))   (LlamaRMSNorm in fp32)
int hotlora_rms_norm(const float* x, int64_t rows, int64_t h, int64_t x_row, const float* w, float eps,
                     float* out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < rows; r++) norm_row(x + r * x_row, h, w, eps, out + r * h);
  return 0;
}

// The residual add and the next norm of a decoder layer in one pass: x[r] += y[r] (in place, the add torch
// does), then out[r] = the RMSNorm of the new x[r]. x: rows `x_row` apart, y: `y_row` apart.
int hotlora_add_rms_norm(float* x, int64_t rows, int64_t h, int64_t x_row, const float* y, int64_t y_row,
                         const float* w, float eps, float* out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < rows; r++) {
    float* xr = x + r * x_row;
    const float* yr = y + r * y_row;
    int64_t i = 0;
    for (; i + 16 <= h; i += 16)
      _mm512_storeu_ps(xr + i, _mm512_add_ps(_mm512_loadu_ps(xr + i), _mm512_loadu_ps(yr + i)));
    for (; i < h; i++) xr[i] += yr[i];
    norm_row(xr, h, w, eps, out + r * h);
  }
  return 0;
}

// RoPE in place on the first `heads` heads of each row (q's and k's): x * cos + rotate_half(x) * sin, with
// rotate_half(x) = cat(-x2, x1); cos/sin: [positions, d] tables.
int hotlora_rope(float* qkv, int64_t rows, int64_t row_stride, int64_t heads, int64_t d, const float* cos_t,
                 const float* sin_t, const int64_t* positions, int threads) {
  int64_t half = d / 2;
  if (d > 512) return -1;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < rows; r++) {
    const float* c = cos_t + positions[r] * d;
    const float* s = sin_t + positions[r] * d;
    for (int64_t hd = 0; hd < heads; hd++) {
      float* x = qkv + r * row_stride + hd * d;
      float tmp[512];
      for (int64_t j = 0; j < half; j++) {
        tmp[j] = x[j] * c[j] + (-x[j + half]) * s[j];
        tmp[j + half] = x[j + half] * c[j + half] + x[j] * s[j + half];
      }
      memcpy(x, tmp, (size_t)d * sizeof(float));
    }
  }
  return 0;
}

// pool[slots[r]] = src[r] for K and V: [rows] rows of `width` floats (kv_heads * d), src rows strided.
int hotlora_kv_write(const float* k, const float* v, int64_t rows, int64_t src_row, int64_t width,
                     const int64_t* slots, float* k_pool, float* v_pool) {
  for (int64_t r = 0; r < rows; r++) {
    memcpy(k_pool + slots[r] * width, k + r * src_row, (size_t)width * sizeof(float));
    memcpy(v_pool + slots[r] * width, v + r * src_row, (size_t)width * sizeof(float));
  }
  return 0;
}

// out[r] = silu(gate) * up with gate_up[r] = [gate | up] (`inter` floats each, rows `row` apart): the MLP's
// activation in one pass, where torch reads and writes the activation twice (silu, then the product).
// silu(x) = x / (1 + e^-x) as torch computes it, e^-x within ~2 ulp of torch's.
int hotlora_silu_mul(const float* gate_up, int64_t rows, int64_t inter, int64_t row, float* out, int threads) {
  const __m512 one = _mm512_set1_ps(1.0f);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < rows; r++) {
    const float* g = gate_up + r * row;
    const float* u = g + inter;
    float* o = out + r * inter;
    for (int64_t i = 0; i < inter; i += 16) {
      __mmask16 m = inter - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (inter - i)) - 1);
      __m512 x = _mm512_maskz_loadu_ps(m, g + i);
      __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
      __m512 silu = _mm512_div_ps(x, _mm512_add_ps(one, e));
      _mm512_mask_storeu_ps(o + i, m, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(m, u + i)));
    }
  }
  return 0;
}
