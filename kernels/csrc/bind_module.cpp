// The extension module every C kernel is reached through (kernels/native.py builds and loads it): one
// binding a kernel, taking tensors, checking them (checks.h) and calling the C function declared in
// kernels.h. The GIL is released while a kernel runs.
#include "checks.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hotlora's C kernels for the CPU (kernels/csrc)";
  pybind11::register_exception<hotlora::OutOfMemory>(m, "KernelOutOfMemory", PyExc_MemoryError);
  hotlora::bind_weights(m);
  hotlora::bind_lora(m);
  hotlora::bind_decoder(m);
  hotlora::bind_attention(m);
}
