// GEMMs on weights kept narrower than fp32: GGUF blocks (block_weights.c) and bf16 (bf16_weights.c).
#include <algorithm>

#include "lora_banks.h"

namespace hotlora {

// The formats' names, for messages (HOTLORA_Q4_1, ... in kernels.h; kernels/gguf_blocks.py's Format)
static const char* const FORMAT_NAMES[HOTLORA_BLOCK_FORMATS] = {"Q4_1", "Q8_0", "Q4_0", "Q4_K",
                                                                "Q6_K", "F16",  "BF16"};

static void check_format(int64_t fmt) {
  HOTLORA_CHECK(fmt >= 0 && fmt < HOTLORA_BLOCK_FORMATS, "fmt ", fmt, " is not a block format (0-",
                HOTLORA_BLOCK_FORMATS - 1, ": Q4_1, Q8_0, Q4_0, Q4_K, Q6_K, F16, BF16)");
}

// K of a packed matrix [N, row bytes of K weights] (one byte type, contiguous): a row's bytes are linear in
// K (kernels/gguf_blocks.py's table), so K = bytes * 256 / (bytes of 256 weights), then checked exactly
static int64_t checked_in_features(const at::Tensor& packed, int64_t fmt) {
  check_format(fmt);
  HOTLORA_CHECK(packed.device().is_cpu() && packed.dim() == 2 && packed.element_size() == 1,
                "packed must be a 2-D CPU tensor of bytes (uint8/int8), got ", packed.dim(), "-D ",
                packed.scalar_type(), " on ", packed.device());
  CHECK_CONTIGUOUS(packed);
  int64_t per_256 = hotlora_block_row_bytes(static_cast<int>(fmt), 256);
  int64_t k = packed.size(1) * 256 / per_256;
  HOTLORA_CHECK(k > 0 && hotlora_block_row_bytes(static_cast<int>(fmt), k) == packed.size(1), "packed rows of ",
                packed.size(1), " bytes are not whole ", FORMAT_NAMES[fmt], " rows (", per_256,
                " bytes per 256 weights)");
  return k;
}

// x [..., K] as contiguous rows [M, K]: the runner's rows as they are (no reshape, ~1 us each)
static at::Tensor rows_of(const at::Tensor& x, int64_t k) {
  HOTLORA_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() >= 1,
                "x must be a float32 CPU tensor, got ", x.scalar_type(), " on ", x.device());
  HOTLORA_CHECK(x.size(-1) == k, "x must have ", k, " features (the matrix's K), got shape ", x.sizes());
  if (x.dim() == 2 && x.is_contiguous()) return x;
  return x.reshape({-1, k}).contiguous();
}

static void check_bias(const std::optional<at::Tensor>& bias, int64_t n) {
  if (!bias) return;
  CHECK_TENSOR(*bias, at::kFloat, 1);
  CHECK_CONTIGUOUS(*bias);
  CHECK_SIZE(*bias, 0, n);
}

// y [..., N] from y2 [M, N], shaped as x [..., K]
static at::Tensor shaped_like(const at::Tensor& y2, const at::Tensor& x) {
  if (x.dim() == 2) return y2;
  auto shape = x.sizes().vec();
  shape.back() = y2.size(1);
  return y2.view(shape);
}

// y = x · widen(W)ᵀ + bias; banks, slots: the rows a LoRA update reads next, asked for on the way
static at::Tensor linear_blocks(const at::Tensor& x, const at::Tensor& packed, int64_t fmt,
                                const std::optional<at::Tensor>& bias, const LoraBanks* banks,
                                const StepSlots* slots) {
  int64_t k = checked_in_features(packed, fmt), n = packed.size(0);
  at::Tensor x2 = rows_of(x, k);
  check_bias(bias, n);
  int64_t m = x2.size(0);
  at::Tensor y = at::empty({m, n}, x2.options());
  auto [regions, ahead] = ahead_of(banks, slots);
  int status;
  {
    py::gil_scoped_release unlocked;
    status = hotlora_linear_blocks(ptr<float>(x2), m, k, ptr<uint8_t>(packed), static_cast<int>(fmt), n,
                                   ptr<float>(y), ptr_or_null<float>(bias), threads_for(m * n * k), regions,
                                   ahead);
  }
  check_status(status, "linear_blocks");
  return shaped_like(y, x);
}

// y = x · W.float()ᵀ + bias for a bf16 W [N, K]
static at::Tensor linear_bf16w(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const LoraBanks* banks, const StepSlots* slots) {
  CHECK_TENSOR(weight, at::kBFloat16, 2);
  CHECK_CONTIGUOUS(weight);
  int64_t n = weight.size(0), k = weight.size(1);
  at::Tensor x2 = rows_of(x, k);
  check_bias(bias, n);
  int64_t m = x2.size(0);
  at::Tensor y = at::empty({m, n}, x2.options());
  auto [regions, ahead] = ahead_of(banks, slots);
  int status;
  {
    py::gil_scoped_release unlocked;
    status = hotlora_linear_bf16w(ptr<float>(x2), m, k, ptr<uint16_t>(weight), n, ptr<float>(y),
                                  ptr_or_null<float>(bias), threads_for(m * n * k), regions, ahead);
  }
  check_status(status, "linear_bf16w");
  return shaped_like(y, x);
}

// out [n, K] fp32 = rows `rows` of widen(W) (every row when rows is None), into `out` when given
static at::Tensor widen_blocks(const at::Tensor& packed, int64_t fmt, const std::optional<at::Tensor>& rows,
                               std::optional<at::Tensor> out) {
  int64_t k = checked_in_features(packed, fmt), n = packed.size(0);
  if (rows) {
    CHECK_TENSOR(*rows, at::kLong, 1);
    CHECK_CONTIGUOUS(*rows);
    check_range(*rows, 0, packed.size(0), "rows");
    n = rows->size(0);
  }
  if (out) {
    CHECK_TENSOR(*out, at::kFloat, 2);
    CHECK_CONTIGUOUS(*out);
    HOTLORA_CHECK(out->size(0) == n && out->size(1) == k, "out must be [", n, ", ", k, "], got ", out->sizes());
  } else {
    out = at::empty({n, k}, at::TensorOptions().dtype(at::kFloat));
  }
  int status;
  {
    py::gil_scoped_release unlocked;
    status = hotlora_widen_blocks(ptr<uint8_t>(packed), static_cast<int>(fmt), k, ptr_or_null<int64_t>(rows), n,
                                  ptr<float>(*out), threads_for(n * k));
  }
  check_status(status, "widen_blocks");
  return *out;
}

// out [N, K] bf16 = widen(W) rounded to bf16 (ties to even), into `out` when given
static at::Tensor widen_blocks_bf16(const at::Tensor& packed, int64_t fmt, std::optional<at::Tensor> out) {
  int64_t k = checked_in_features(packed, fmt), n = packed.size(0);
  if (out) {
    CHECK_TENSOR(*out, at::kBFloat16, 2);
    CHECK_CONTIGUOUS(*out);
    HOTLORA_CHECK(out->size(0) == n && out->size(1) == k, "out must be [", n, ", ", k, "], got ", out->sizes());
  } else {
    out = at::empty({n, k}, at::TensorOptions().dtype(at::kBFloat16));
  }
  int status;
  {
    py::gil_scoped_release unlocked;
    status = hotlora_widen_blocks_bf16(ptr<uint8_t>(packed), static_cast<int>(fmt), k, n, ptr<uint16_t>(*out),
                                       threads_for(n * k));
  }
  check_status(status, "widen_blocks_bf16");
  return *out;
}

// out [N, K / 256 * block bytes] = x [N, K] (fp32, K a multiple of 256) in GGUF's Q4_K (144 bytes a block)
// or Q6_K (210) blocks, as llama.cpp's reference quantizer makes them (quantize_k.c)
static at::Tensor quantize_k(const at::Tensor& x, int64_t fmt) {
  CHECK_TENSOR(x, at::kFloat, 2);
  CHECK_CONTIGUOUS(x);
  HOTLORA_CHECK(fmt == HOTLORA_Q4_K || fmt == HOTLORA_Q6_K, "fmt must be Q4_K (", HOTLORA_Q4_K, ") or Q6_K (",
                HOTLORA_Q6_K, "), got ", fmt);
  int64_t n = x.size(0), k = x.size(1);
  HOTLORA_CHECK(k % 256 == 0, "x's rows must hold a multiple of 256 values, got shape ", x.sizes());
  at::Tensor out = at::empty({n, k / 256 * (fmt == HOTLORA_Q4_K ? 144 : 210)}, x.options().dtype(at::kByte));
  {
    py::gil_scoped_release unlocked;
    int threads = threads_for(n * k * 64);  // ~20 passes over each value: heavy per element
    if (fmt == HOTLORA_Q4_K) hotlora_quantize_q4_k(ptr<float>(x), n, k, ptr<uint8_t>(out), threads);
    else hotlora_quantize_q6_k(ptr<float>(x), n, k, ptr<uint8_t>(out), threads);
  }
  return out;
}

// For tests of rows_ahead.h: the addresses of the lines a weight kernel's tiles ask for, and how many
static std::pair<at::Tensor, int64_t> ahead_lines(const LoraBanks& banks, const StepSlots& slots, int64_t tiles,
                                                  int64_t steps, int64_t cap) {
  at::Tensor out = at::empty({cap}, at::TensorOptions().dtype(at::kLong));
  int64_t n = hotlora_ahead_lines(&banks.regions, &slots.ahead, tiles, steps, ptr<int64_t>(out), cap);
  return {out.narrow(0, 0, std::min(n, cap)), n};
}

void bind_weights(py::module_& m) {
  m.def("linear_blocks", &linear_blocks, py::arg("x"), py::arg("packed"), py::arg("fmt"), py::arg("bias").none(true),
        py::arg("banks").none(true) = nullptr, py::arg("slots").none(true) = nullptr);
  m.def("linear_bf16w", &linear_bf16w, py::arg("x"), py::arg("weight"), py::arg("bias").none(true),
        py::arg("banks").none(true) = nullptr, py::arg("slots").none(true) = nullptr);
  m.def("widen_blocks", &widen_blocks, py::arg("packed"), py::arg("fmt"), py::arg("rows").none(true) = py::none(),
        py::arg("out").none(true) = py::none());
  m.def("widen_blocks_bf16", &widen_blocks_bf16, py::arg("packed"), py::arg("fmt"),
        py::arg("out").none(true) = py::none());
  m.def("quantize_k", &quantize_k, py::arg("x"), py::arg("fmt"));
  m.def("ahead_lines", &ahead_lines, py::arg("banks"), py::arg("slots"), py::arg("tiles"), py::arg("steps"),
        py::arg("cap"));
}

}  // namespace hotlora
