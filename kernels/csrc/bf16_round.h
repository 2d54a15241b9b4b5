// fp32 -> bf16 with AVX-512F alone (no avx512_bf16 needed), for the kernels that hand bf16 operands to a GEMM
// or to avx512_bf16's dot products (included by their sources; kernels/native.py hashes it with each).
#pragma once
#include <immintrin.h>
#include <stdint.h>

// 16 fp32 values rounded to bf16, to nearest with ties to even: torch's .to(torch.bfloat16) for finite
// values (the inputs here are finite: widened weights, attention's queries, keys, values and probabilities).
static inline __m256i round_to_bf16(__m512 v) {
  __m512i bits = _mm512_castps_si512(v);
  __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16));
}
