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


// ---------------------------------------------------------------------------------------------
// Argument preparation: checks with clear messages, then contiguous float32 / int64 / float64
// tensors the kernels read. B rows, K = γ+1 positions, V vocabulary.
struct GreedyArgs {
  at::Tensor logits, draft;  // [B,K,V] float32, [B,K-1] int64
  int64_t B, K, V;
};

inline GreedyArgs prepare_greedy(const char* op, const at::Tensor& target_logits, const at::Tensor& draft_tokens) {
  check_floating(op, "target_logits", target_logits, 3);
  const int64_t B = target_logits.size(0), K = target_logits.size(1), V = target_logits.size(2);
  TORCH_CHECK(K >= 1 && V >= 1, "fastspec.", op, ": target_logits must be [B, γ+1, V] with γ+1 >= 1, V >= 1");
  check_tokens(op, "draft_tokens", draft_tokens, B, K - 1);
  check_device(op, "draft_tokens", draft_tokens, target_logits.device());
  return {as_float32(target_logits), draft_tokens.contiguous(), B, K, V};
}

struct SampleArgs {
  at::Tensor p, q, draft, u;  // [B,K,V] f32, [B,K-1,V] f32 or undefined, [B,K-1] i64, [B,K] f64
  double p_tol, q_tol;
  int64_t B, K, V;
};

inline SampleArgs prepare_sample(const char* op, const at::Tensor& target_probs,
                                 const c10::optional<at::Tensor>& draft_probs, const at::Tensor& draft_tokens,
                                 const at::Tensor& uniforms) {
  check_floating(op, "target_probs", target_probs, 3);
  const int64_t B = target_probs.size(0), K = target_probs.size(1), V = target_probs.size(2);
  TORCH_CHECK(K >= 1 && V >= 1, "fastspec.", op, ": target_probs must be [B, γ+1, V] with γ+1 >= 1, V >= 1");
  check_tokens(op, "draft_tokens", draft_tokens, B, K - 1);
  check_device(op, "draft_tokens", draft_tokens, target_probs.device());
  const bool has_q = draft_probs.has_value() && draft_probs->defined();
  if (has_q) {
    check_floating(op, "draft_probs", *draft_probs, 3);
    TORCH_CHECK(draft_probs->size(0) == B && draft_probs->size(1) == K - 1 && draft_probs->size(2) == V, "fastspec.",
                op, ": draft_probs must have shape [", B, ", ", K - 1, ", ", V, "], got ", draft_probs->sizes());
    check_device(op, "draft_probs", *draft_probs, target_probs.device());
  }
  TORCH_CHECK(uniforms.dim() == 2 && uniforms.size(0) == B && uniforms.size(1) == K, "fastspec.", op,
              ": uniforms must have shape [", B, ", ", K, "], got ", uniforms.sizes());
  check_device(op, "uniforms", uniforms, target_probs.device());
  return {as_float32(target_probs),
          has_q ? as_float32(*draft_probs) : at::Tensor(),
          draft_tokens.contiguous(),
          uniforms.to(at::kDouble).contiguous(),
          sum_tolerance(target_probs.scalar_type()),
          has_q ? sum_tolerance(draft_probs->scalar_type()) : 0.0,
          B, K, V};
}

// Optional prev_tokens [B,L] -> contiguous int64 (or undefined).
inline at::Tensor prepare_prev(const char* op, const c10::optional<at::Tensor>& prev_tokens, int64_t B,
                               const at::Device& device) {
  if (!prev_tokens.has_value() || !prev_tokens->defined()) return at::Tensor();
  check_tokens(op, "prev_tokens", *prev_tokens, B, -1);
  check_device(op, "prev_tokens", *prev_tokens, device);
  return prev_tokens->contiguous();
}

struct ProcessArgs {
  at::Tensor logits, prev, draft;  // [B,K,V] f32, [B,L] i64 or undefined, [B,K-1] i64 or undefined
  ProcessParams params;
  int64_t B, K, V, L;
};

inline ProcessArgs prepare_process(const char* op, const at::Tensor& logits,
                                   const c10::optional<at::Tensor>& prev_tokens,
                                   const c10::optional<at::Tensor>& draft_tokens, bool do_sample, double temperature,
                                   int64_t top_k, double top_p, double repetition_penalty) {
  check_floating(op, "logits", logits, 3);
  check_processing(op, do_sample, temperature, top_k, top_p, repetition_penalty);
  const int64_t B = logits.size(0), K = logits.size(1), V = logits.size(2);
  TORCH_CHECK(V >= 1, "fastspec.", op, ": V must be >= 1");
  at::Tensor prev = prepare_prev(op, prev_tokens, B, logits.device());
  at::Tensor draft;
  if (draft_tokens.has_value() && draft_tokens->defined()) {
    check_tokens(op, "draft_tokens", *draft_tokens, B, K - 1);
    check_device(op, "draft_tokens", *draft_tokens, logits.device());
    draft = draft_tokens->contiguous();
  }
  const int64_t L = prev.defined() ? prev.size(1) : 0;
  return {as_float32(logits), prev, draft, make_params(do_sample, temperature, top_k, top_p, repetition_penalty),
          B, K, V, L};
}

struct FusedArgs {
  at::Tensor logits, draft, q, prev, u;  // q, prev, u may be undefined
  ProcessParams params;
  double q_tol;
  int64_t B, K, V, L;
};

inline FusedArgs prepare_fused(const char* op, const at::Tensor& target_logits, const at::Tensor& draft_tokens,
                               const c10::optional<at::Tensor>& draft_probs,
                               const c10::optional<at::Tensor>& prev_tokens, const c10::optional<at::Tensor>& uniforms,
                               bool do_sample, double temperature, int64_t top_k, double top_p,
                               double repetition_penalty) {
  check_processing(op, do_sample, temperature, top_k, top_p, repetition_penalty);
  GreedyArgs g = prepare_greedy(op, target_logits, draft_tokens);
  const at::Device device = target_logits.device();
  const bool has_q = draft_probs.has_value() && draft_probs->defined();
  TORCH_CHECK(!has_q || do_sample, "fastspec.", op, ": draft_probs is only used when do_sample=True");
  if (has_q) {
    check_floating(op, "draft_probs", *draft_probs, 3);
    TORCH_CHECK(draft_probs->size(0) == g.B && draft_probs->size(1) == g.K - 1 && draft_probs->size(2) == g.V,
                "fastspec.", op, ": draft_probs must have shape [", g.B, ", ", g.K - 1, ", ", g.V, "], got ",
                draft_probs->sizes());
    check_device(op, "draft_probs", *draft_probs, device);
  }
  at::Tensor u;
  if (do_sample) {
    TORCH_CHECK(uniforms.has_value() && uniforms->defined(), "fastspec.", op,
                ": uniforms [B, γ+1] are required when do_sample=True");
    TORCH_CHECK(uniforms->dim() == 2 && uniforms->size(0) == g.B && uniforms->size(1) == g.K, "fastspec.", op,
                ": uniforms must have shape [", g.B, ", ", g.K, "], got ", uniforms->sizes());
    check_device(op, "uniforms", *uniforms, device);
    u = uniforms->to(at::kDouble).contiguous();
  }
  at::Tensor prev = prepare_prev(op, prev_tokens, g.B, device);
  const int64_t L = prev.defined() ? prev.size(1) : 0;
  return {g.logits, g.draft, has_q ? as_float32(*draft_probs) : at::Tensor(), prev, u,
          make_params(do_sample, temperature, top_k, top_p, repetition_penalty),
          has_q ? sum_tolerance(draft_probs->scalar_type()) : 0.0, g.B, g.K, g.V, L};
}

template <typename T>
inline const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace torch_ops
}  // namespace fastspec
