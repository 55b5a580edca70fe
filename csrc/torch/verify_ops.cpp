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
  const GreedyArgs a = prepare_greedy(op, target_logits, draft_tokens);
  const int64_t K = a.K, V = a.V;
  Tensor out = at::empty({a.B, K}, a.draft.options());
  Tensor num_accepted = at::empty({a.B}, a.draft.options());
  Tensor status = at::zeros({a.B}, at::dtype(at::kInt));
  const float* x = a.logits.data_ptr<float>();
  const int64_t* d = a.draft.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  int64_t* n = num_accepted.data_ptr<int64_t>();
  int32_t* s = status.data_ptr<int32_t>();
  at::parallel_for(0, a.B, 1, [&](int64_t begin, int64_t end) {
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
  const SampleArgs a = prepare_sample(op, target_probs, draft_probs, draft_tokens, uniforms);
  const int64_t K = a.K, V = a.V;
  Tensor out = at::empty({a.B, K}, a.draft.options());
  Tensor num_accepted = at::empty({a.B}, a.draft.options());
  Tensor status = at::zeros({a.B}, at::dtype(at::kInt));
  const float* pp = a.p.data_ptr<float>();
  const float* qp = ptr_or_null<float>(a.q);
  const double* up = a.u.data_ptr<double>();
  const int64_t* d = a.draft.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  int64_t* n = num_accepted.data_ptr<int64_t>();
  int32_t* s = status.data_ptr<int32_t>();
  at::parallel_for(0, a.B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      s[b] = verify_sample_row(pp + b * K * V, qp ? qp + b * (K - 1) * V : nullptr, d + b * (K - 1), up + b * K,
                               K - 1, V, a.p_tol, a.q_tol, o + b * K, n + b);
  });
  raise_on_status(op, status);
  return {out, num_accepted};
}

// logits [B,K,V], prev_tokens [B,L] or None, draft_tokens [B,K-1] or None -> [B,K,V] float32
Tensor process_logits_cpu(const Tensor& logits, const c10::optional<Tensor>& prev_tokens,
                          const c10::optional<Tensor>& draft_tokens, bool do_sample, double temperature, int64_t top_k,
                          double top_p, double repetition_penalty) {
  const char* op = "process_logits";
  const ProcessArgs a =
      prepare_process(op, logits, prev_tokens, draft_tokens, do_sample, temperature, top_k, top_p, repetition_penalty);
  const int64_t K = a.K, V = a.V, L = a.L;
  Tensor out = at::empty({a.B, K, V}, a.logits.options());
  Tensor status = at::zeros({a.B}, at::dtype(at::kInt));
  const float* xp = a.logits.data_ptr<float>();
  const int64_t* pp = ptr_or_null<int64_t>(a.prev);
  const int64_t* dp = ptr_or_null<int64_t>(a.draft);
  float* op_out = out.data_ptr<float>();
  int32_t* s = status.data_ptr<int32_t>();
  at::parallel_for(0, a.B, 1, [&](int64_t begin, int64_t end) {
    VerifyWorkspace& ws = thread_workspace();
    for (int64_t b = begin; b < end; ++b)
      s[b] = process_logits_row(xp + b * K * V, pp ? pp + b * L : nullptr, L, dp ? dp + b * (K - 1) : nullptr, K, V,
                                a.params, ws, op_out + b * K * V);
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
  const FusedArgs a = prepare_fused(op, target_logits, draft_tokens, draft_probs, prev_tokens, uniforms, do_sample,
                                    temperature, top_k, top_p, repetition_penalty);
  const int64_t K = a.K, V = a.V, L = a.L;
  Tensor out = at::empty({a.B, K}, a.draft.options());
  Tensor num_accepted = at::empty({a.B}, a.draft.options());
  Tensor status = at::zeros({a.B}, at::dtype(at::kInt));
  const float* xp = a.logits.data_ptr<float>();
  const float* qp = ptr_or_null<float>(a.q);
  const double* up = ptr_or_null<double>(a.u);
  const int64_t* pp = ptr_or_null<int64_t>(a.prev);
  const int64_t* d = a.draft.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  int64_t* n = num_accepted.data_ptr<int64_t>();
  int32_t* s = status.data_ptr<int32_t>();
  at::parallel_for(0, a.B, 1, [&](int64_t begin, int64_t end) {
    VerifyWorkspace& ws = thread_workspace();
    for (int64_t b = begin; b < end; ++b)
      s[b] = fused_verify_row(xp + b * K * V, d + b * (K - 1), qp ? qp + b * (K - 1) * V : nullptr,
                              pp ? pp + b * L : nullptr, L, up ? up + b * K : nullptr, K - 1, V, a.params, a.q_tol, ws,
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
