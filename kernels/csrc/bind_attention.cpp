// Attention: decode rows on the paged KV cache (paged_decode_attention.c), prefill chunks
// (prefill_attention.c).
#include "checks.h"

namespace hotlora {

// out [D, heads, d] (written) = each decode row's attention over its blocks of the pools
// [blocks, block_size, kv_heads, d]: q [D, heads, d] (d contiguous), tables [D, width] block ids, lens [D]
// keys each row sees (its own included); window: keys within `window` behind the row only (0: all)
static void paged_decode_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                                   const at::Tensor& tables, const at::Tensor& lens, double scale, int64_t window,
                                   at::Tensor& out) {
  CHECK_TENSOR(q, at::kFloat, 3);
  CHECK_ROWS(q);
  int64_t rows = q.size(0), heads = q.size(1), d = q.size(2);
  CHECK_TENSOR(k_pool, at::kFloat, 4);
  CHECK_CONTIGUOUS(k_pool);
  CHECK_TENSOR(v_pool, at::kFloat, 4);
  CHECK_CONTIGUOUS(v_pool);
  HOTLORA_CHECK(k_pool.sizes() == v_pool.sizes() && k_pool.size(3) == d,
                "k_pool and v_pool must both be [blocks, block_size, kv_heads, ", d, "], got ", k_pool.sizes(),
                " and ", v_pool.sizes());
  int64_t blocks = k_pool.size(0), bs = k_pool.size(1), kv_heads = k_pool.size(2);
  HOTLORA_CHECK(kv_heads > 0 && heads % kv_heads == 0, heads, " query heads do not share ", kv_heads, " kv heads");
  CHECK_TENSOR(tables, at::kLong, 2);
  CHECK_CONTIGUOUS(tables);
  CHECK_SIZE(tables, 0, rows);
  check_range(tables, 0, blocks, "tables");
  CHECK_TENSOR(lens, at::kLong, 1);
  CHECK_CONTIGUOUS(lens);
  CHECK_SIZE(lens, 0, rows);
  check_range(lens, 0, tables.size(1) * bs + 1, "lens");
  CHECK_TENSOR(out, at::kFloat, 3);
  CHECK_CONTIGUOUS(out);
  HOTLORA_CHECK(out.sizes() == q.sizes(), "out must be shaped as q ", q.sizes(), ", got ", out.sizes());
  HOTLORA_CHECK(window >= 0, "window must be >= 0 (0: none), got ", window);
  int status;
  {
    py::gil_scoped_release unlocked;
    status = hotlora_paged_decode_attention(ptr<float>(q), rows, heads, d, q.stride(0), q.stride(1),
                                            ptr<float>(k_pool), ptr<float>(v_pool), bs, kv_heads, ptr<int64_t>(tables),
                                            tables.size(1), ptr<int64_t>(lens), window, static_cast<float>(scale),
                                            ptr<float>(out), rows * kv_heads > 1 ? at::get_num_threads() : 1);
  }
  check_status(status, "paged_decode_attention");
}

// [L, heads, d] = causal attention of q [L, heads, d] (at positions context ..) over k, v
// [context + L, kv_heads, d] (the chunk's own last); each with d contiguous and heads d apart. `bf16`: in
// bf16 arithmetic (a CPU with avx512_bf16 only)
static at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t context,
                                    double scale, int64_t window, bool bf16) {
  CHECK_TENSOR(q, at::kFloat, 3);
  CHECK_TENSOR(k, at::kFloat, 3);
  CHECK_TENSOR(v, at::kFloat, 3);
  int64_t length = q.size(0), heads = q.size(1), d = q.size(2), kv_heads = k.size(1);
  HOTLORA_CHECK(d % 64 == 0, "prefill attention takes head sizes that are multiples of 64, got ", d);
  HOTLORA_CHECK(k.sizes() == v.sizes() && k.size(2) == d, "k and v must both be [keys, kv_heads, ", d, "], got ",
                k.sizes(), " and ", v.sizes());
  HOTLORA_CHECK(kv_heads > 0 && heads % kv_heads == 0, heads, " query heads do not share ", kv_heads, " kv heads");
  HOTLORA_CHECK(context >= 0 && k.size(0) == context + length, "prefill attention: ", k.size(0), " keys for ",
                context, " + ", length, " positions");
  for (const at::Tensor* t : {&q, &k, &v})
    HOTLORA_CHECK(t->stride(2) == 1 && t->stride(1) == d, "q, k and v must hold each head's d values contiguous ",
                  "and heads d apart, got strides ", t->strides());
  HOTLORA_CHECK(window >= 0, "window must be >= 0 (0: none), got ", window);
  HOTLORA_CHECK(!bf16 || __builtin_cpu_supports("avx512bf16"), "prefill attention in bf16 needs a CPU with avx512_bf16");
  at::Tensor out = at::empty({length, heads, d}, q.options());
  auto kernel = bf16 ? hotlora_prefill_attention_bf16 : hotlora_prefill_attention;
  int status;
  {
    py::gil_scoped_release unlocked;
    status = kernel(ptr<float>(q), length, heads, d, q.stride(0), ptr<float>(k), k.stride(0), ptr<float>(v),
                    v.stride(0), kv_heads, context, window, static_cast<float>(scale), ptr<float>(out),
                    at::get_num_threads());
  }
  check_status(status, "prefill_attention");
  return out;
}

void bind_attention(py::module_& m) {
  m.def("paged_decode_attention", &paged_decode_attention, py::arg("q"), py::arg("k_pool"), py::arg("v_pool"),
        py::arg("tables"), py::arg("lens"), py::arg("scale"), py::arg("window"), py::arg("out"));
  m.def("prefill_attention", &prefill_attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("context"),
        py::arg("scale"), py::arg("window"), py::arg("bf16") = false);
}

}  // namespace hotlora
