// Argument checks shared by the CPU (verify_ops.cpp) and CUDA (verify_ops_cuda.cpp) bindings of
// torch.ops.fastspec.{verify_greedy, verify_sample, process_logits, fused_verify}.
// Shapes follow fastspec/ops.py: B rows, γ drafts, K = γ+1 positions, V vocabulary.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include "fastspec/verify.h"

namespace fastspec {
namespace torch_ops {

// |Σp − 1| allowed for a probability row, by the caller's dtype (16-bit rounding of ~50k entries).
inline double sum_tolerance(at::ScalarType dtype) {
  return dtype == at::kFloat ? 1e-3 : dtype == at::kDouble ? 1e-6 : 2e-2;
}

inline void check_floating(const char* op, const char* name, const at::Tensor& t, int64_t rank) {
  TORCH_CHECK(t.dim() == rank, "fastspec.", op, ": ", name, " must have rank ", rank, ", got shape ", t.sizes());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble, "fastspec.", op, ": ",
              name, " must be float32, bfloat16 or float16, got ", dt);
}

inline void check_tokens(const char* op, const char* name, const at::Tensor& t, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.dim() == 2, "fastspec.", op, ": ", name, " must have rank 2, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kLong, "fastspec.", op, ": ", name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.size(0) == rows && (cols < 0 || t.size(1) == cols), "fastspec.", op, ": ", name,
              " must have shape [", rows, ", ", cols < 0 ? "L" : std::to_string(cols), "], got ", t.sizes());
}

inline void check_device(const char* op, const char* name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.device() == device, "fastspec.", op, ": ", name, " is on ", t.device(), " but target is on ",
              device, "; move all inputs to one device");
}

// float32, contiguous (16-bit inputs are upcast exactly).
inline at::Tensor as_float32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

inline void check_processing(const char* op, bool do_sample, double temperature, int64_t top_k, double top_p,
                             double repetition_penalty) {
  TORCH_CHECK(top_k >= 0, "fastspec.", op, ": top_k must be >= 0 (0 disables it), got ", top_k);
  TORCH_CHECK(top_p > 0.0 && top_p <= 1.0, "fastspec.", op, ": top_p must be in (0, 1], got ", top_p);
  TORCH_CHECK(repetition_penalty > 0.0 && std::isfinite(repetition_penalty), "fastspec.", op,
              ": repetition_penalty must be a finite number > 0, got ", repetition_penalty);
  TORCH_CHECK(!do_sample || (temperature > 0.0 && std::isfinite(temperature)), "fastspec.", op,
              ": temperature must be a finite number > 0 when sampling, got ", temperature);
}

inline ProcessParams make_params(bool do_sample, double temperature, int64_t top_k, double top_p,
                                 double repetition_penalty) {
  ProcessParams p;
  p.do_sample = do_sample;
  p.temperature = float(temperature);
  p.top_k = top_k;
  p.top_p = top_p;
  p.repetition_penalty = float(repetition_penalty);
  return p;
}

// status [B] int32 on CPU: raise for the first failing row.
inline void raise_on_status(const char* op, const at::Tensor& status) {
  const int32_t* s = status.data_ptr<int32_t>();
  for (int64_t b = 0; b < status.numel(); ++b)
    TORCH_CHECK(s[b] == kStatusOk, "fastspec.", op, ": row ", b, ": ", describe_status(s[b]));
}

}  // namespace torch_ops
}  // namespace fastspec
