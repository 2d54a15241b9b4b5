// Bytes the next kernel will read, asked for (prefetched into L2) while a compute-bound GEMM runs: a decode
// step's base product at many rows keeps the cores' FMA units busy and leaves the memory bus nearly idle, and
// the multi-LoRA update right after it is the other way round (32 rank-16 adapters: 21 MB of banks a site
// pair, 625 MB a step in fp32). Asked for during the product, the update finds them in L2/L3 (measured, 30
// layers x 4 sites at 32 rows: product 35.5 -> 39 ms, update 24 -> 10 ms). Included by widened_tiles.h;
// the bindings (bind_lora.cpp) build both structures, declared in kernels.h.
//
// What is read is a list of slots (the step's adapters, in the order the update reads them) times the
// regions of one site's banks: region g of slot s is `rank[s]` rows of row[g] bytes from base[g] + s *
// stride[g] (A's rows of one slice, or B's rank rows of a rank-major bank).
#pragma once
#include <immintrin.h>
#include <stdint.h>

#include "kernels.h"  // BankRegions, SlotsAhead

typedef struct {  // a thread's place in the list: slot i, region g, the line p of [p, end)
  const BankRegions* banks;
  const SlotsAhead* slots;
  int64_t i, g, left;  // left: bytes still to ask for in this tile
  const char *p, *end;
  int per;  // lines asked for at each step of the GEMM's inner loop
} Ahead;

static inline int64_t ahead_slot_bytes(const BankRegions* b, int64_t rank) {
  int64_t n = 0;
  for (int64_t g = 0; g < b->count; g++) n += rank * b->row[g];
  return n;
}

// Every byte the list names (0 when there is none).
static inline int64_t ahead_total(const BankRegions* b, const SlotsAhead* s) {
  if (!b || !s) return 0;
  int64_t n = 0;
  for (int64_t i = 0; i < s->count; i++) n += ahead_slot_bytes(b, s->rank[i]);
  return n;
}

static inline void ahead_region(Ahead* a) {  // [p, end) of region g of slot i, whole lines
  int64_t s = a->slots->slot[a->i], b = a->banks->row[a->g] * a->slots->rank[a->i];
  uintptr_t start = (uintptr_t)(a->banks->base[a->g] + s * a->banks->stride[a->g]);
  a->p = (const char*)(start & ~(uintptr_t)63);
  a->end = (const char*)(start + b);
}

// Tile t of `tiles` takes bytes [total * t / tiles, total * (t + 1) / tiles) of the list, over the `steps`
// steps of its inner loop (nothing when banks or slots is NULL).
static inline void ahead_tile(Ahead* a, const BankRegions* b, const SlotsAhead* s, int64_t total, int64_t t,
                              int64_t tiles, int64_t steps) {
  a->banks = b, a->slots = s, a->left = 0;
  int64_t from = total * t / tiles, bytes = total * (t + 1) / tiles - from;
  if (!b || !s || bytes <= 0) return;
  int64_t i = 0, g = 0;
  for (; i < s->count; i++) {
    int64_t n = ahead_slot_bytes(b, s->rank[i]);
    if (from < n) break;
    from -= n;
  }
  if (i == s->count) return;
  for (; g < b->count && from >= s->rank[i] * b->row[g]; g++) from -= s->rank[i] * b->row[g];
  a->i = i, a->g = g;
  ahead_region(a);
  a->p += from & ~(int64_t)63;
  a->left = bytes;
  int64_t lines = (bytes + 63) / 64;
  a->per = steps > 0 ? (int)((lines + steps - 1) / steps) : 1;
  if (a->per > 4) a->per = 4;  // more would hold the GEMM up on the line fill buffers: the rest is left
}

// The next line of the tile's share, or NULL when it is done.
static inline const char* ahead_next(Ahead* a) {
  if (a->left <= 0) return NULL;
  while (a->p >= a->end) {  // on to the next non-empty region
    if (++a->g == a->banks->count) {
      a->g = 0;
      if (++a->i == a->slots->count) {
        a->left = 0;
        return NULL;
      }
    }
    ahead_region(a);
  }
  const char* p = a->p;
  int64_t in_region = a->end - p;  // the region's last line may hold less of it
  a->p += 64;
  a->left -= in_region < 64 ? in_region : 64;
  return p;
}

// One step of the GEMM's inner loop: its share of lines, asked for into L2.
static inline __attribute__((always_inline)) void ahead_step(Ahead* a) {
  for (int n = 0; n < a->per; n++) {
    const char* p = ahead_next(a);
    if (!p) return;
    _mm_prefetch(p, _MM_HINT_T1);
  }
}
