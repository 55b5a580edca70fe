// torch.ops.fastspec.{verify_greedy, verify_sample, process_logits, fused_verify}: schemas and CPU
// kernels (rows in parallel over the CPU core in csrc/cpu/verify.cpp). CUDA: verify_ops_cuda.cpp.
// Python face and reference twins: fastspec/ops.py.
#include <ATen/Parallel.h>

#include "verify_common.h"

namespace fastspec {
namespace torch_ops {
namespace {

using at::Tensor;

VerifyWorkspace& thread_workspace() {
  static thread_local VerifyWorkspace ws;  // reused across calls: no per-call allocation
  return ws;
}

// target_logits [B,γ+1,V], draft_tokens [B,γ] -> (output_tokens [B,γ+1], num_accepted [B])
std::tuple<Tensor, Tensor> verify_greedy_cpu(const Tensor& target_logits, const Tensor& draft_tokens) {
  const char* op = "verify_greedy";
  check_floating(op, "target_logits", target_logits, 3);
  const int64_t B = target_logits.size(0), K = target_logits.size(1), V = target_logits.size(2);
  TORCH_CHECK(K >= 1 && V >= 1, "fastspec.", op, ": target_logits must be [B, γ+1, V] with γ+1 >= 1, V >= 1");
  check_tokens(op, "draft_tokens", draft_tokens, B, K - 1);
  check_device(op, "draft_tokens", draft_tokens, target_logits.device());
  const Tensor logits = as_float32(target_logits);
  const Tensor draft = draft_tokens.contiguous();
  Tensor out = at::empty({B, K}, draft.options());
  Tensor num_accepted = at::empty({B}, draft.options());
  Tensor status = at::zeros({B}, at::dtype(at::kInt));
  const float* x = logits.data_ptr<float>();
  const int64_t* d = draft.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  int64_t* n = num_accepted.data_ptr<int64_t>();
  int32_t* s = status.data_ptr<int32_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      s[b] = verify_greedy_row(x + b * K * V, d + b * (K - 1), K - 1, V, o + b * K, n + b);
  });
  raise_on_status(op, status);
  return {out, num_accepted};
}

// target_probs [B,γ+1,V], draft_probs [B,γ,V] or None, draft_tokens [B,γ], uniforms [B,γ+1]
std::tuple<Tensor, Tensor> verify_sample_cpu(const Tensor& target_probs, const c10::optional<Tensor>& draft_probs,
                                             const Tensor& draft_tokens, const Tensor& uniforms) {
  const char* op = "verify_sample";
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
  const double p_tol = sum_tolerance(target_probs.scalar_type());
  const double q_tol = has_q ? sum_tolerance(draft_probs->scalar_type()) : 0.0;
  const Tensor p = as_float32(target_probs);
  const Tensor q = has_q ? as_float32(*draft_probs) : Tensor();
  const Tensor u = uniforms.to(at::kDouble).contiguous();
  const Tensor draft = draft_tokens.contiguous();
  Tensor out = at::empty({B, K}, draft.options());
  Tensor num_accepted = at::empty({B}, draft.options());
  Tensor status = at::zeros({B}, at::dtype(at::kInt));
  const float* pp = p.data_ptr<float>();
  const float* qp = has_q ? q.data_ptr<float>() : nullptr;
  const double* up = u.data_ptr<double>();
  const int64_t* d = draft.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  int64_t* n = num_accepted.data_ptr<int64_t>();
  int32_t* s = status.data_ptr<int32_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      s[b] = verify_sample_row(pp + b * K * V, qp ? qp + b * (K - 1) * V : nullptr, d + b * (K - 1), up + b * K,
                               K - 1, V, p_tol, q_tol, o + b * K, n + b);
  });
  raise_on_status(op, status);
  return {out, num_accepted};
}

// Optional prev_tokens [B,L] -> contiguous int64 (or undefined).
Tensor prev_or_empty(const char* op, const c10::optional<Tensor>& prev_tokens, int64_t B, const at::Device& device) {
  if (!prev_tokens.has_value() || !prev_tokens->defined()) return Tensor();
  check_tokens(op, "prev_tokens", *prev_tokens, B, -1);
  check_device(op, "prev_tokens", *prev_tokens, device);
  return prev_tokens->contiguous();
}

// logits [B,K,V], prev_tokens [B,L] or None, draft_tokens [B,K-1] or None -> [B,K,V] float32
Tensor process_logits_cpu(const Tensor& logits, const c10::optional<Tensor>& prev_tokens,
                          const c10::optional<Tensor>& draft_tokens, bool do_sample, double temperature, int64_t top_k,
                          double top_p, double repetition_penalty) {
  const char* op = "process_logits";
  check_floating(op, "logits", logits, 3);
  check_processing(op, do_sample, temperature, top_k, top_p, repetition_penalty);
  const int64_t B = logits.size(0), K = logits.size(1), V = logits.size(2);
  TORCH_CHECK(V >= 1, "fastspec.", op, ": V must be >= 1");
  const Tensor prev = prev_or_empty(op, prev_tokens, B, logits.device());
  Tensor draft;
  if (draft_tokens.has_value() && draft_tokens->defined()) {
    check_tokens(op, "draft_tokens", *draft_tokens, B, K - 1);
    check_device(op, "draft_tokens", *draft_tokens, logits.device());
    draft = draft_tokens->contiguous();
  }
  const Tensor x = as_float32(logits);
  Tensor out = at::empty({B, K, V}, x.options());
  Tensor status = at::zeros({B}, at::dtype(at::kInt));
  const ProcessParams params = make_params(do_sample, temperature, top_k, top_p, repetition_penalty);
  const float* xp = x.data_ptr<float>();
  const int64_t L = prev.defined() ? prev.size(1) : 0;
  const int64_t* pp = prev.defined() ? prev.data_ptr<int64_t>() : nullptr;
  const int64_t* dp = draft.defined() ? draft.data_ptr<int64_t>() : nullptr;
  float* op_out = out.data_ptr<float>();
  int32_t* s = status.data_ptr<int32_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    VerifyWorkspace& ws = thread_workspace();
    for (int64_t b = begin; b < end; ++b)
      s[b] = process_logits_row(xp + b * K * V, pp ? pp + b * L : nullptr, L, dp ? dp + b * (K - 1) : nullptr, K, V,
                                params, ws, op_out + b * K * V);
  });
  raise_on_status(op, status);
  return out;
}

// target_logits [B,γ+1,V], draft_tokens [B,γ], draft_probs [B,γ,V] or None, prev_tokens [B,L] or
// None, uniforms [B,γ+1] (sampling) -> (output_tokens [B,γ+1], num_accepted [B])
std::tuple<Tensor, Tensor> fused_verify_cpu(const Tensor& target_logits, const Tensor& draft_tokens,
                                            const c10::optional<Tensor>& draft_probs,
                                            const c10::optional<Tensor>& prev_tokens,
                                            const c10::optional<Tensor>& uniforms, bool do_sample, double temperature,
                                            int64_t top_k, double top_p, double repetition_penalty) {
  const char* op = "fused_verify";
  check_floating(op, "target_logits", target_logits, 3);
  check_processing(op, do_sample, temperature, top_k, top_p, repetition_penalty);
  const int64_t B = target_logits.size(0), K = target_logits.size(1), V = target_logits.size(2);
  TORCH_CHECK(K >= 1 && V >= 1, "fastspec.", op, ": target_logits must be [B, γ+1, V] with γ+1 >= 1, V >= 1");
  const at::Device device = target_logits.device();
  check_tokens(op, "draft_tokens", draft_tokens, B, K - 1);
  check_device(op, "draft_tokens", draft_tokens, device);
  const bool has_q = draft_probs.has_value() && draft_probs->defined();
  TORCH_CHECK(!has_q || do_sample, "fastspec.", op, ": draft_probs is only used when do_sample=True");
  if (has_q) {
    check_floating(op, "draft_probs", *draft_probs, 3);
    TORCH_CHECK(draft_probs->size(0) == B && draft_probs->size(1) == K - 1 && draft_probs->size(2) == V, "fastspec.",
                op, ": draft_probs must have shape [", B, ", ", K - 1, ", ", V, "], got ", draft_probs->sizes());
    check_device(op, "draft_probs", *draft_probs, device);
  }
  const bool has_u = uniforms.has_value() && uniforms->defined();
  TORCH_CHECK(!do_sample || has_u, "fastspec.", op, ": uniforms [B, γ+1] are required when do_sample=True");
  Tensor u;
  if (do_sample) {
    TORCH_CHECK(uniforms->dim() == 2 && uniforms->size(0) == B && uniforms->size(1) == K, "fastspec.", op,
                ": uniforms must have shape [", B, ", ", K, "], got ", uniforms->sizes());
    check_device(op, "uniforms", *uniforms, device);
    u = uniforms->to(at::kDouble).contiguous();
  }
  const Tensor prev = prev_or_empty(op, prev_tokens, B, device);
  const double q_tol = has_q ? sum_tolerance(draft_probs->scalar_type()) : 0.0;
  const Tensor x = as_float32(target_logits);
  const Tensor q = has_q ? as_float32(*draft_probs) : Tensor();
  const Tensor draft = draft_tokens.contiguous();
  Tensor out = at::empty({B, K}, draft.options());
  Tensor num_accepted = at::empty({B}, draft.options());
  Tensor status = at::zeros({B}, at::dtype(at::kInt));
  const ProcessParams params = make_params(do_sample, temperature, top_k, top_p, repetition_penalty);
  const float* xp = x.data_ptr<float>();
  const float* qp = has_q ? q.data_ptr<float>() : nullptr;
  const double* up = do_sample ? u.data_ptr<double>() : nullptr;
  const int64_t L = prev.defined() ? prev.size(1) : 0;
  const int64_t* pp = prev.defined() ? prev.data_ptr<int64_t>() : nullptr;
  const int64_t* d = draft.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  int64_t* n = num_accepted.data_ptr<int64_t>();
  int32_t* s = status.data_ptr<int32_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    VerifyWorkspace& ws = thread_workspace();
    for (int64_t b = begin; b < end; ++b)
      s[b] = fused_verify_row(xp + b * K * V, d + b * (K - 1), qp ? qp + b * (K - 1) * V : nullptr,
                              pp ? pp + b * L : nullptr, L, up ? up + b * K : nullptr, K - 1, V, params, q_tol, ws,
                              o + b * K, n + b);
  });
  raise_on_status(op, status);
  return {out, num_accepted};
}

}  // namespace
}  // namespace torch_ops
}  // namespace fastspec

TORCH_LIBRARY_FRAGMENT(fastspec, m) {
  m.def("verify_greedy(Tensor target_logits, Tensor draft_tokens) -> (Tensor, Tensor)");
  m.def("verify_sample(Tensor target_probs, Tensor? draft_probs, Tensor draft_tokens, Tensor uniforms) -> (Tensor, Tensor)");
  m.def(
      "process_logits(Tensor logits, Tensor? prev_tokens, Tensor? draft_tokens, bool do_sample, float temperature, "
      "int top_k, float top_p, float repetition_penalty) -> Tensor");
  m.def(
      "fused_verify(Tensor target_logits, Tensor draft_tokens, Tensor? draft_probs, Tensor? prev_tokens, "
      "Tensor? uniforms, bool do_sample, float temperature, int top_k, float top_p, float repetition_penalty) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastspec, CPU, m) {
  m.impl("verify_greedy", &fastspec::torch_ops::verify_greedy_cpu);
  m.impl("verify_sample", &fastspec::torch_ops::verify_sample_cpu);
  m.impl("process_logits", &fastspec::torch_ops::process_logits_cpu);
  m.impl("fused_verify", &fastspec::torch_ops::fused_verify_cpu);
}
