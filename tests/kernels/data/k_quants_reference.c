// The reference side of make_k_quants_fixture.py: llama.cpp's quantize_row_q4_K_ref / _q6_K_ref over rows.
// usage: qref 4|6 in.f32 rows k out.bin
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
void quantize_row_q4_K_ref(const float * x, void * y, int64_t k);
void quantize_row_q6_K_ref(const float * x, void * y, int64_t k);
int main(int argc, char** argv) {
  // argv: kind in.f32 n k out
  int kind = atoi(argv[1]); long n = atol(argv[3]), k = atol(argv[4]);
  float* x = malloc(n*k*4); FILE* f = fopen(argv[2], "rb"); fread(x, 4, n*k, f); fclose(f);
  long bb = kind == 4 ? 144 : 210; uint8_t* y = malloc(n*(k/256)*bb);
  for (long r = 0; r < n; r++) {
    if (kind == 4) quantize_row_q4_K_ref(x + r*k, y + r*(k/256)*bb, k); else quantize_row_q6_K_ref(x + r*k, y + r*(k/256)*bb, k);
  }
  f = fopen(argv[5], "wb"); fwrite(y, 1, n*(k/256)*bb, f); fclose(f); return 0;
}
