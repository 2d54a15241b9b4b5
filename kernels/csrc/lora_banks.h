// The two objects the LoRA kernel and the prefetching weight kernels share (bind_lora.cpp builds them):
// one site's banks, checked once when the site is made, and one step's slots, worked out once a step.
#pragma once
#include <vector>

#include "checks.h"

namespace hotlora {

// A fused projection's adapter banks: A packed [S, n·R, in] (fp32 or bf16, contiguous), n B slices
// [S, out_i, R] of one layout (contiguous, or rank-major: storage [S, R, out_i] seen transposed), scales
// [n, S] fp32, slice i written into y's columns offsets[i]... The tensors are held (the kernel reads them
// in place: a slot is written into them, never reallocated).
struct LoraBanks {
  LoraBanks(at::Tensor lora_a, std::vector<at::Tensor> lora_bs, at::Tensor scales, std::vector<int64_t> offsets);
  LoraBanks(const LoraBanks&) = delete;  // regions' and b_ptrs' addresses point into this object

  at::Tensor a, scales;
  std::vector<at::Tensor> bs;
  int64_t slices, r_max, num_slots, in_features, out_features, total_out;
  bool rank_major, bf16;
  std::vector<int64_t> b_ptrs, outs, offsets;
  BankRegions regions;  // what the update reads per slot, for the weight kernel before it to prefetch
};

// The slots a step's update reads (ascending, those of rank 0 and base rows left out), for the weight
// kernels' prefetch.
struct StepSlots {
  StepSlots(const at::Tensor& token_slots, const at::Tensor& slot_ranks);
  StepSlots(const StepSlots&) = delete;  // ahead points into slot and rank

  std::vector<int64_t> slot, rank;
  SlotsAhead ahead;
};

// The prefetch list of a weight kernel: both, or neither (NULL, NULL)
inline std::pair<const BankRegions*, const SlotsAhead*> ahead_of(const LoraBanks* banks, const StepSlots* slots) {
  if (!banks || !slots) return {nullptr, nullptr};
  return {&banks->regions, &slots->ahead};
}

}  // namespace hotlora
