// What every binding (bind_*.cpp) checks before it calls a C kernel, as punica's bindings do: a failed
// check raises ValueError naming the argument, what it must be and what it was, and the kernel never runs.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/StringUtil.h>
#include <torch/csrc/utils/pybind.h>

#include <stdexcept>

#include "kernels.h"

namespace hotlora {

namespace py = pybind11;

// A kernel that could not get its scratch memory (status -1): MemoryError in Python (bind_module.cpp).
struct OutOfMemory : std::runtime_error {
  using std::runtime_error::runtime_error;
};

#define HOTLORA_CHECK(cond, ...) \
  if (!(cond)) throw ::pybind11::value_error(::c10::str(__VA_ARGS__))

// t is a CPU float32 (or `dtype`) tensor of `dims` dimensions
#define CHECK_TENSOR(t, dtype, dims)                                                                      \
  HOTLORA_CHECK((t).device().is_cpu() && (t).scalar_type() == (dtype) && (t).dim() == (dims), #t " must be a ", \
                (dims), "-D ", ::c10::toString(dtype), " CPU tensor, got ", (t).dim(), "-D ",                 \
                (t).scalar_type(), " on ", (t).device())
#define CHECK_CONTIGUOUS(t) HOTLORA_CHECK((t).is_contiguous(), #t " must be contiguous, got strides ", (t).strides())
// rows of contiguous values (any row stride): what a kernel walking x[t * x_row + i] reads
#define CHECK_ROWS(t) HOTLORA_CHECK((t).stride(-1) == 1, #t " must have contiguous rows (last stride 1), got strides ", (t).strides())
#define CHECK_SIZE(t, d, n) \
  HOTLORA_CHECK((t).size(d) == (n), #t ".shape[" #d "] must be ", (n), ", got shape ", (t).sizes())

// A kernel's status: -1 when it had no scratch memory, -2 when it refused its arguments.
inline void check_status(int status, const char* kernel) {
  if (status == -1) throw OutOfMemory(c10::str(kernel, ": no scratch memory"));
  HOTLORA_CHECK(status == 0, kernel, " refused its arguments (status ", status, ")");
}

// One thread below this many multiply-adds: waking a second costs more than it saves.
inline int threads_for(int64_t work) { return work >= (1 << 16) ? at::get_num_threads() : 1; }

// Every value of the int64 tensor t in [lo, hi)
inline void check_range(const at::Tensor& t, int64_t lo, int64_t hi, const char* what) {
  const int64_t* p = t.data_ptr<int64_t>();
  for (int64_t i = 0, n = t.numel(); i < n; i++)
    HOTLORA_CHECK(p[i] >= lo && p[i] < hi, what, " must lie in [", lo, ", ", hi, "), got ", p[i], " at ", i);
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}
template <typename T>
T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t ? static_cast<T*>(t->data_ptr()) : nullptr;
}

// The bindings of each family, registered by bind_module.cpp
void bind_weights(py::module_& m);
void bind_lora(py::module_& m);
void bind_decoder(py::module_& m);
void bind_attention(py::module_& m);

}  // namespace hotlora
