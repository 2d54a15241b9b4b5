// The multi-LoRA update of short segments (lora_decode.c), its banks and a step's slots.
#include <algorithm>

#include "lora_banks.h"

namespace hotlora {

LoraBanks::LoraBanks(at::Tensor lora_a, std::vector<at::Tensor> lora_bs, at::Tensor scales_,
                     std::vector<int64_t> offsets_)
    : a(std::move(lora_a)), scales(std::move(scales_)), bs(std::move(lora_bs)), offsets(std::move(offsets_)) {
  slices = static_cast<int64_t>(bs.size());
  HOTLORA_CHECK(slices >= 1, "lora_bs must hold at least one B bank");
  HOTLORA_CHECK(static_cast<int64_t>(offsets.size()) == slices, "one output offset per B bank: got ",
                offsets.size(), " offsets for ", slices, " banks");
  bf16 = a.scalar_type() == at::kBFloat16;
  CHECK_TENSOR(a, bf16 ? at::kBFloat16 : at::kFloat, 3);
  CHECK_CONTIGUOUS(a);
  HOTLORA_CHECK(a.size(1) % slices == 0, "lora_a ", a.sizes(), " does not hold ", slices,
                " equal slices of rank rows");
  num_slots = a.size(0);
  r_max = a.size(1) / slices;
  in_features = a.size(2);
  CHECK_TENSOR(scales, at::kFloat, 2);
  CHECK_CONTIGUOUS(scales);
  HOTLORA_CHECK(scales.size(0) == slices && scales.size(1) == num_slots, "scales must be [", slices, ", ",
                num_slots, "], got ", scales.sizes());
  out_features = total_out = 0;
  for (int64_t i = 0; i < slices; i++) {
    const at::Tensor& b = bs[i];
    CHECK_TENSOR(b, a.scalar_type(), 3);
    int64_t out = b.size(1);
    HOTLORA_CHECK(b.size(0) == num_slots && b.size(2) == r_max, "lora_bs[", i, "] must be [", num_slots,
                  ", out, ", r_max, "], got ", b.sizes());
    bool major = b.stride(0) == out * r_max && b.stride(1) == 1 && b.stride(2) == out;
    bool plain = b.stride(0) == out * r_max && b.stride(1) == r_max && b.stride(2) == 1;
    HOTLORA_CHECK(major || plain, "lora_bs[", i, "] must be contiguous [S, out, R] or the transposed view of a ",
                  "contiguous [S, R, out], got strides ", b.strides());
    if (i == 0) rank_major = major && !plain;
    HOTLORA_CHECK(rank_major ? major : plain, "every B bank must have one layout; lora_bs[", i,
                  "] has strides ", b.strides());
    HOTLORA_CHECK(offsets[i] >= 0, "offsets must be >= 0, got ", offsets[i]);
    b_ptrs.push_back(reinterpret_cast<int64_t>(b.data_ptr()));
    outs.push_back(out);
    out_features = std::max(out_features, offsets[i] + out);
    total_out += out;
  }

  // the rows the update reads for a slot: each slice's rank rows of A, then each rank-major B's (a B of
  // the other layout is read along its whole [out, R] block whatever the rank: left out)
  int64_t size = a.element_size(), n = 0;
  regions = BankRegions{};
  auto add = [&](int64_t base, int64_t stride, int64_t row) {
    if (n == AHEAD_REGIONS) return;
    regions.base[n] = base, regions.stride[n] = stride, regions.row[n] = row, n++;
  };
  auto a_base = reinterpret_cast<int64_t>(a.data_ptr());
  for (int64_t i = 0; i < slices; i++) add(a_base + i * r_max * in_features * size, a.stride(0) * size, in_features * size);
  if (rank_major)
    for (int64_t i = 0; i < slices; i++) add(b_ptrs[i], bs[i].stride(0) * size, outs[i] * size);
  regions.count = n;
}

StepSlots::StepSlots(const at::Tensor& token_slots, const at::Tensor& slot_ranks) {
  CHECK_TENSOR(token_slots, at::kLong, 1);
  CHECK_CONTIGUOUS(token_slots);
  CHECK_TENSOR(slot_ranks, at::kLong, 1);
  CHECK_CONTIGUOUS(slot_ranks);
  int64_t num_slots = slot_ranks.size(0);
  check_range(token_slots, -1, num_slots, "token_slots");
  const int64_t *s = ptr<int64_t>(token_slots), *r = ptr<int64_t>(slot_ranks);
  for (int64_t t = 0; t < token_slots.size(0); t++)
    if (s[t] >= 0 && r[s[t]] > 0) slot.push_back(s[t]);
  std::sort(slot.begin(), slot.end());
  slot.erase(std::unique(slot.begin(), slot.end()), slot.end());
  for (int64_t x : slot) rank.push_back(r[x]);
  ahead = SlotsAhead{static_cast<int64_t>(slot.size()), slot.data(), rank.data()};
}

// y[t, off_i:off_i+out_i] += scales[i, s] · B_i[s, :, :r_s] · (A[s, iR:iR+r_s] · x[t]) for s = slots[t] != -1
static void lora_packed(at::Tensor& y, const at::Tensor& x, const at::Tensor& slots, const at::Tensor& ranks,
                        const LoraBanks& banks) {
  CHECK_TENSOR(x, at::kFloat, 2);
  CHECK_ROWS(x);
  CHECK_SIZE(x, 1, banks.in_features);
  int64_t tokens = x.size(0);
  CHECK_TENSOR(y, at::kFloat, 2);
  CHECK_ROWS(y);
  CHECK_SIZE(y, 0, tokens);
  HOTLORA_CHECK(y.size(1) >= banks.out_features, "y must have at least ", banks.out_features,
                " columns, got shape ", y.sizes());
  CHECK_TENSOR(slots, at::kLong, 1);
  CHECK_CONTIGUOUS(slots);
  CHECK_SIZE(slots, 0, tokens);
  CHECK_TENSOR(ranks, at::kLong, 1);
  CHECK_CONTIGUOUS(ranks);
  HOTLORA_CHECK(ranks.size(0) == banks.num_slots, "ranks must hold one rank for each of the banks' ", banks.num_slots,
                " slots, got shape ", ranks.sizes());
  check_range(slots, -1, banks.num_slots, "slots");
  check_range(ranks, 0, banks.r_max + 1, "ranks");
  int64_t n = banks.slices, r = banks.r_max;
  at::Tensor u = at::empty({tokens, n * r}, x.options());
  auto run = [&](auto kernel, const auto* a) {
    py::gil_scoped_release unlocked;
    return kernel(ptr<float>(x), tokens, x.stride(0), ptr<int64_t>(slots), a, banks.in_features, n, r,
                  ptr<int64_t>(ranks), ptr<float>(u), banks.b_ptrs.data(), banks.outs.data(), banks.offsets.data(),
                  ptr<float>(banks.scales), banks.num_slots, ptr<float>(y), y.stride(0),
                  threads_for(tokens * n * r * banks.in_features), threads_for(tokens * banks.total_out * r));
  };
  // the build for the banks' dtype and B's layout
  int status = banks.bf16 ? (banks.rank_major ? run(hotlora_lora_packed_t_bf16, ptr<uint16_t>(banks.a))
                                              : run(hotlora_lora_packed_bf16, ptr<uint16_t>(banks.a)))
                          : (banks.rank_major ? run(hotlora_lora_packed_t, ptr<float>(banks.a))
                                              : run(hotlora_lora_packed, ptr<float>(banks.a)));
  check_status(status, "lora_packed");
}

void bind_lora(py::module_& m) {
  py::class_<LoraBanks>(m, "LoraBanks", "One fused projection's adapter banks, checked once (lora_packed's).")
      .def(py::init<at::Tensor, std::vector<at::Tensor>, at::Tensor, std::vector<int64_t>>(), py::arg("lora_a"),
           py::arg("lora_bs"), py::arg("scales"), py::arg("offsets"))
      .def_readonly("num_slots", &LoraBanks::num_slots)
      .def_readonly("r_max", &LoraBanks::r_max)
      .def_readonly("in_features", &LoraBanks::in_features)
      .def_readonly("out_features", &LoraBanks::out_features);
  py::class_<StepSlots>(m, "StepSlots", "The slots a step's LoRA update reads, for the weight kernels' prefetch.")
      .def(py::init<const at::Tensor&, const at::Tensor&>(), py::arg("token_slots"), py::arg("slot_ranks"))
      .def_property_readonly("count", [](const StepSlots& s) { return s.ahead.count; })
      .def_readonly("slots", &StepSlots::slot)
      .def_readonly("ranks", &StepSlots::rank);
  m.def("lora_packed", &lora_packed, py::arg("y"), py::arg("x"), py::arg("slots"), py::arg("ranks"),
        py::arg("banks"));
}

}  // namespace hotlora
