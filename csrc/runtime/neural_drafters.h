// C++ drafter runtime for the neural drafters: the whole γ-step drafting loop (greedy or sampled)
// in one native call, built from ATen ops (this is the one place outside csrc/torch/
// allowed to include torch). The Python twins: cnn_draft_reference / lstm_draft_reference.
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/Generator.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fastspec {
namespace runtime {

// How each drafted token is chosen. Greedy: argmax of the logits. Sampling: q from the
// registered op fastspec::process_logits (the target's processing: repetition penalty over
// prev_tokens + the drafts so far, temperature, top-k, top-p), then at::multinomial(q, 1) with
// the generator -- the same calls, in the same order, as the Python twins.
//
// A shortlisted head (head_ids = the [N] target ids of its rows, distinct; none = a full head,
// N = V) chooses among N ids: greedy takes the argmax over the N rows and maps it to its target
// id; sampling places the N logits on the full vocabulary (-inf elsewhere) before processing, so
// q is [B,V] with zeros outside the shortlist and the sampled token is a target id. The drafted
// token fed back as the next input is always the target id.
struct TokenChoice {
  bool do_sample = false;
  double temperature = 1.0;
  int64_t top_k = 0;
  double top_p = 1.0;
  double repetition_penalty = 1.0;
  std::optional<at::Tensor> prev_tokens;  // [B,L] int64, -1 = pad
  std::optional<at::Generator> generator;
  std::optional<at::Tensor> head_ids;  // [N] int64 on the weights' device, checked by the caller
};

// Causal CNN drafter (fastspec/drafters/cnn.py: CausalConvLM). The first step runs the window;
// later steps are incremental (per-layer histories of the last k-1 inputs), the same maths
// as the Python twin's window recompute up to float summation order.
//   window: [B,R] int64, the last R tokens of each row, left-padded with -1 (R = receptive field).
//   src_bias: [B,D] the per-request source summary added to every input position.
//   embed: [V,E]; in_proj_w/b: [D,E]/[D] or none (E == D); conv_w: L x [D,D,k]; conv_b: L x [D];
//   norm_w/b: [D]; head_w: [N,D]; head_b: [N] or none (N = V without head_ids).
// Returns tokens [B,γ] int64 (target ids) and per step the head logits (greedy) [B,γ,N] or q
// (sampling) [B,γ,V].
std::tuple<at::Tensor, at::Tensor> cnn_draft(
    const at::Tensor& window, const at::Tensor& src_bias, const at::Tensor& embed,
    const std::optional<at::Tensor>& in_proj_w, const std::optional<at::Tensor>& in_proj_b,
    const std::vector<at::Tensor>& conv_w, const std::vector<at::Tensor>& conv_b, const at::Tensor& norm_w,
    const at::Tensor& norm_b, double norm_eps, const at::Tensor& head_w, const std::optional<at::Tensor>& head_b,
    int64_t gamma, const TokenChoice& choice);

// Unidirectional LSTM drafter (fastspec/drafters/lstm.py: LSTMLM).
//   last: [B] int64, the last committed token of each row (not yet consumed by the state).
//   h, c: [L,B,H] state after all earlier tokens.
//   w_ih: L x [4H,in], w_hh: L x [4H,H], b_ih/b_hh: L x [4H] (PyTorch gate order i,f,g,o).
//   head_w: [N,H]; head_b: [N] or none (N = V without head_ids).
// Returns tokens [B,γ], logits [B,γ,N] (greedy) or q [B,γ,V] (sampling), h_all/c_all [γ+1,L,B,H]: the state after feeding
// last, d_1, ..., d_γ, so a commit with a accepted drafts rolls back to h_all[a].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_draft(
    const at::Tensor& last, const at::Tensor& h, const at::Tensor& c, const at::Tensor& embed,
    const std::optional<at::Tensor>& in_proj_w, const std::optional<at::Tensor>& in_proj_b,
    const std::vector<at::Tensor>& w_ih, const std::vector<at::Tensor>& w_hh, const std::vector<at::Tensor>& b_ih,
    const std::vector<at::Tensor>& b_hh, const at::Tensor& head_w, const std::optional<at::Tensor>& head_b,
    int64_t gamma, const TokenChoice& choice);

}  // namespace runtime
}  // namespace fastspec
