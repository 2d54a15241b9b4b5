// RMSNorm, RoPE, the KV write and the MLP's activation of a decoder layer (decoder_ops.c).
#include "checks.h"

namespace hotlora {

// out [T, H] = LlamaRMSNorm(x) (fp32 rows x [T, H], any row stride)
static at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  CHECK_TENSOR(x, at::kFloat, 2);
  CHECK_ROWS(x);
  int64_t rows = x.size(0), h = x.size(1);
  CHECK_TENSOR(weight, at::kFloat, 1);
  CHECK_CONTIGUOUS(weight);
  CHECK_SIZE(weight, 0, h);
  at::Tensor out = at::empty({rows, h}, x.options());
  py::gil_scoped_release unlocked;
  hotlora_rms_norm(ptr<float>(x), rows, h, x.stride(0), ptr<float>(weight), static_cast<float>(eps),
                   ptr<float>(out), threads_for(rows * h));
  return out;
}

// x += y (in place), then out [T, H] = LlamaRMSNorm(x): a decoder layer's residual add and the norm after it
static at::Tensor add_rms_norm(at::Tensor& x, const at::Tensor& y, const at::Tensor& weight, double eps) {
  CHECK_TENSOR(x, at::kFloat, 2);
  CHECK_ROWS(x);
  CHECK_TENSOR(y, at::kFloat, 2);
  CHECK_ROWS(y);
  HOTLORA_CHECK(y.sizes() == x.sizes(), "y must be shaped as x ", x.sizes(), ", got ", y.sizes());
  int64_t rows = x.size(0), h = x.size(1);
  CHECK_TENSOR(weight, at::kFloat, 1);
  CHECK_CONTIGUOUS(weight);
  CHECK_SIZE(weight, 0, h);
  at::Tensor out = at::empty({rows, h}, x.options());
  py::gil_scoped_release unlocked;
  hotlora_add_rms_norm(ptr<float>(x), rows, h, x.stride(0), ptr<float>(y), y.stride(0), ptr<float>(weight),
                       static_cast<float>(eps), ptr<float>(out), threads_for(rows * h));
  return out;
}

// out [T, I] = silu(gate) * up for rows gate_up [T, 2 I] = [gate | up] (any row stride)
static at::Tensor silu_mul(const at::Tensor& gate_up) {
  CHECK_TENSOR(gate_up, at::kFloat, 2);
  CHECK_ROWS(gate_up);
  HOTLORA_CHECK(gate_up.size(1) % 2 == 0, "gate_up must have an even width [gate | up], got ", gate_up.sizes());
  int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  at::Tensor out = at::empty({rows, inter}, gate_up.options());
  py::gil_scoped_release unlocked;
  hotlora_silu_mul(ptr<float>(gate_up), rows, inter, gate_up.stride(0), ptr<float>(out), threads_for(rows * 2 * inter));
  return out;
}

// In place: RoPE on the first `heads` heads of each row of qkv [T, *]; cos, sin [positions, head_dim]
static void rope_(at::Tensor& qkv, int64_t heads, int64_t head_dim, const at::Tensor& cos, const at::Tensor& sin,
                  const at::Tensor& positions) {
  CHECK_TENSOR(qkv, at::kFloat, 2);
  CHECK_ROWS(qkv);
  HOTLORA_CHECK(head_dim > 0 && head_dim <= 512 && head_dim % 2 == 0, "head_dim must be even and at most 512, got ",
                head_dim);
  HOTLORA_CHECK(heads >= 0 && heads * head_dim <= qkv.size(1), heads, " heads of ", head_dim,
                " do not fit in qkv rows of ", qkv.size(1));
  for (const at::Tensor* t : {&cos, &sin}) {
    CHECK_TENSOR(*t, at::kFloat, 2);
    CHECK_CONTIGUOUS(*t);
    HOTLORA_CHECK(t->sizes() == cos.sizes() && t->size(1) == head_dim, "cos and sin must be [positions, ", head_dim,
                  "], got ", cos.sizes(), " and ", sin.sizes());
  }
  CHECK_TENSOR(positions, at::kLong, 1);
  CHECK_CONTIGUOUS(positions);
  CHECK_SIZE(positions, 0, qkv.size(0));
  check_range(positions, 0, cos.size(0), "positions");
  int64_t rows = qkv.size(0);
  py::gil_scoped_release unlocked;
  hotlora_rope(ptr<float>(qkv), rows, qkv.stride(0), heads, head_dim, ptr<float>(cos), ptr<float>(sin),
               ptr<int64_t>(positions), threads_for(rows * heads * head_dim));
}

// Layer `layer` of a KV pool [layers, 2, blocks, block_size, kv_heads, d]: rows `slots` of K (at [layer, 0])
// and V (at [layer, 1]) = k, v [T, kv_heads, d] (views of one qkv row each: one row stride)
static void kv_write(const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots, at::Tensor& pool,
                     int64_t layer) {
  CHECK_TENSOR(k, at::kFloat, 3);
  CHECK_TENSOR(v, at::kFloat, 3);
  int64_t rows = k.size(0), kv_heads = k.size(1), d = k.size(2);
  // one row stride for both (the C copy reads k[r * row], v[r * row]); a single row has none to share
  HOTLORA_CHECK(k.sizes() == v.sizes() && (rows <= 1 || k.stride(0) == v.stride(0)),
                "k and v must share shape and row stride, got ", k.sizes(), k.strides(), " and ", v.sizes(),
                v.strides());
  for (const at::Tensor* t : {&k, &v})
    HOTLORA_CHECK(t->stride(2) == 1 && t->stride(1) == d, "k's and v's rows must hold kv_heads x d contiguous ",
                  "values, got strides ", t->strides());
  CHECK_TENSOR(pool, at::kFloat, 6);
  CHECK_CONTIGUOUS(pool);
  HOTLORA_CHECK(pool.size(1) == 2 && pool.size(4) == kv_heads && pool.size(5) == d,
                "pool must be [layers, 2, blocks, block_size, ", kv_heads, ", ", d, "], got ", pool.sizes());
  HOTLORA_CHECK(layer >= 0 && layer < pool.size(0), "layer ", layer, " is not one of the pool's ", pool.size(0));
  CHECK_TENSOR(slots, at::kLong, 1);
  CHECK_CONTIGUOUS(slots);
  CHECK_SIZE(slots, 0, rows);
  check_range(slots, 0, pool.size(2) * pool.size(3), "slots");
  float* k_pool = ptr<float>(pool) + layer * pool.stride(0);
  py::gil_scoped_release unlocked;
  hotlora_kv_write(ptr<float>(k), ptr<float>(v), rows, k.stride(0), kv_heads * d, ptr<int64_t>(slots), k_pool,
                   k_pool + pool.stride(1));
}

void bind_decoder(py::module_& m) {
  m.def("rms_norm", &rms_norm, py::arg("x"), py::arg("weight"), py::arg("eps"));
  m.def("add_rms_norm", &add_rms_norm, py::arg("x"), py::arg("y"), py::arg("weight"), py::arg("eps"));
  m.def("silu_mul", &silu_mul, py::arg("gate_up"));
  m.def("rope_", &rope_, py::arg("qkv"), py::arg("heads"), py::arg("head_dim"), py::arg("cos"), py::arg("sin"),
        py::arg("positions"));
  m.def("kv_write", &kv_write, py::arg("k"), py::arg("v"), py::arg("slots"), py::arg("pool"), py::arg("layer"));
}

}  // namespace hotlora
