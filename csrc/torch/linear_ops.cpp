// torch.ops.fastspec.skinny_linear: y = x · wᵀ (+ bias) for few-row fp32 x on the CPU, output rows
// split across threads. Kernel and its summation order: csrc/cpu/skinny_linear.cpp. Python face and
// reference twin: fastspec/ops.py.
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include "fastspec/skinny_linear.h"

namespace fastspec {
namespace torch_ops {
namespace {

using at::Tensor;

void check_fp32_cpu_matrix(const char* name, const Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 2, "skinny_linear: ", name, " must be 2-D, got ", t.dim(), " dims");
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat, "skinny_linear: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), "skinny_linear: ", name, " must be on the CPU, got ", t.device());
}

// x [M,K], weight [N,K], bias [N] or None -> [M,N]
Tensor skinny_linear_cpu(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias) {
  check_fp32_cpu_matrix("x", x);
  check_fp32_cpu_matrix("weight", weight);
  TORCH_CHECK_VALUE(x.size(1) == weight.size(1), "skinny_linear: x is [", x.size(0), ",", x.size(1),
                    "] but weight is [", weight.size(0), ",", weight.size(1), "]; their last dims must match");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == at::kFloat &&
                          bias->device().is_cpu(),
                      "skinny_linear: bias must be a float32 CPU vector of ", weight.size(0), " entries");
  }
  const Tensor xc = x.contiguous(), wc = weight.contiguous();
  const Tensor bc = has_bias ? bias->contiguous() : Tensor();
  const int64_t m = xc.size(0), k = xc.size(1), n = wc.size(0);
  Tensor y = at::empty({m, n}, xc.options());
  if (m == 0 || n == 0) return y;
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  const float* bp = has_bias ? bc.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    fastspec::skinny_linear(xp, m, k, wp, bp, yp, n, begin, end);
  });
  return y;
}

}  // namespace
}  // namespace torch_ops
}  // namespace fastspec

TORCH_LIBRARY_FRAGMENT(fastspec, m) {
  m.def("skinny_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastspec, CPU, m) {
  m.impl("skinny_linear", &fastspec::torch_ops::skinny_linear_cpu);
}
