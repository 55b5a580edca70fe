// The Python module fastspec._C. Ops register themselves with TORCH_LIBRARY_FRAGMENT
// in their own files (namespace "fastspec"); importing this module runs those
// static registrations, after which they live under torch.ops.fastspec.*.
#include <torch/extension.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastspec native ops (see fastspec/ops.py for the Python face)";
#ifdef FASTSPEC_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
