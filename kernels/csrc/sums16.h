// Sixteen horizontal sums at once, for hotlora's C kernels (included by them; kernels/native.py hashes it
// with each source). Lane i of reduce16(v) is the sum of the 16 lanes of v[i]: adds of pairs at each level of
// a tree that halves the vectors while it transposes them (15 adds and 30 shuffles for 16 sums, against ~4
// shuffles and 4 adds per sum one by one).
#pragma once
#include <immintrin.h>

static inline __m512 pair_sum(__m512 a, __m512 b) {  // per 128-bit quarter: [a0+a2, b0+b2, a1+a3, b1+b3]
  return _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
}
static inline __m512 quad_sum(__m512 ab, __m512 cd) {  // per quarter: [a, b, c, d] partial sums
  __m512d x = _mm512_castps_pd(ab), y = _mm512_castps_pd(cd);
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
}
static inline __m512 reduce16(const __m512* v) {
  // each quarter q of r0 holds the quarter-q partial sums of v[0..3], and so on
  __m512 r0 = quad_sum(pair_sum(v[0], v[1]), pair_sum(v[2], v[3]));
  __m512 r1 = quad_sum(pair_sum(v[4], v[5]), pair_sum(v[6], v[7]));
  __m512 r2 = quad_sum(pair_sum(v[8], v[9]), pair_sum(v[10], v[11]));
  __m512 r3 = quad_sum(pair_sum(v[12], v[13]), pair_sum(v[14], v[15]));
  // add the four quarters: bring quarter q of every r into one vector per q, then add
  __m512 t0 = _mm512_shuffle_f32x4(r0, r1, 0x44), t1 = _mm512_shuffle_f32x4(r0, r1, 0xEE);
  __m512 t2 = _mm512_shuffle_f32x4(r2, r3, 0x44), t3 = _mm512_shuffle_f32x4(r2, r3, 0xEE);
  __m512 u0 = _mm512_add_ps(t0, t1), u1 = _mm512_add_ps(t2, t3);
  __m512 w0 = _mm512_shuffle_f32x4(u0, u1, 0x88), w1 = _mm512_shuffle_f32x4(u0, u1, 0xDD);
  return _mm512_add_ps(w0, w1);  // quarters: r0, r1, r2, r3 totals -> v[0..15] in lane order
}
