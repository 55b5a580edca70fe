#include "neural_drafters.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#include <limits>

namespace fastspec {
namespace runtime {
namespace {

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but the weights are on ", ref.device());
}

// Embedding lookup (+ optional projection): tokens [...] -> [..., D]. Pads (-1) read row 0;
// callers mask them.
at::Tensor embed_tokens(const at::Tensor& tokens, const at::Tensor& embed, const std::optional<at::Tensor>& w,
                        const std::optional<at::Tensor>& b) {
  at::Tensor x = at::embedding(embed, tokens.clamp_min(0));
  if (w.has_value() && w->defined()) x = at::linear(x, *w, b.has_value() ? *b : at::Tensor());
  return x;
}

at::Tensor head_logits(const at::Tensor& x, const at::Tensor& head_w, const std::optional<at::Tensor>& head_b) {
  return at::linear(x, head_w, head_b.has_value() ? *head_b : at::Tensor());
}

// Chooses the next token per row from logits [B,V]; returns (token [B], logits or q [B,V]).
// `prev` ([B,L], -1 padded) grows by the chosen tokens (repetition penalty of later steps).
// A shortlisted head (choice.head_ids) maps the greedy argmax to its target id, and places the
// logits on the full vocabulary (-inf elsewhere) before sampling: q [B,V], zero off the shortlist.
std::pair<at::Tensor, at::Tensor> choose(const at::Tensor& logits, const TokenChoice& choice,
                                         std::optional<at::Tensor>& prev, int64_t vocab) {
  const bool shortlisted = choice.head_ids.has_value() && choice.head_ids->defined();
  if (!choice.do_sample) {
    at::Tensor row = logits.argmax(-1);  // [B] head rows
    return {shortlisted ? choice.head_ids->index_select(0, row) : row, logits};
  }
  static auto process = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("fastspec::process_logits", "")
                            .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&,
                                              const std::optional<at::Tensor>&, bool, double, int64_t, double,
                                              double)>();
  at::Tensor full = logits.to(at::kFloat);
  if (shortlisted) {
    full = at::full({logits.size(0), vocab}, -std::numeric_limits<float>::infinity(), full.options())
               .index_copy_(1, *choice.head_ids, full);  // [B,V]
  }
  at::Tensor q = process.call(full.unsqueeze(1).contiguous(), prev, std::nullopt, true,
                              choice.temperature, choice.top_k, choice.top_p, choice.repetition_penalty)
                     .squeeze(1);  // [B,V]
  at::Tensor token = at::multinomial(q, 1, false, choice.generator).squeeze(1);  // [B]
  prev = prev.has_value() ? at::cat({*prev, token.unsqueeze(1)}, 1) : token.unsqueeze(1);
  return {token, q};
}

// head_w [N,*] against the vocabulary V and the head-id map (its values are checked by the binding).
void check_head(const TokenChoice& choice, const at::Tensor& head_w, int64_t vocab, const char* op) {
  TORCH_CHECK(head_w.dim() == 2, op, ": head_w must be 2-D [N,D]");
  if (!choice.head_ids.has_value() || !choice.head_ids->defined()) {
    TORCH_CHECK(head_w.size(0) == vocab, op, ": head_w has ", head_w.size(0), " rows but the vocabulary is ", vocab,
                " (pass head_ids for a shortlisted head)");
    return;
  }
  const at::Tensor& ids = *choice.head_ids;
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong, op, ": head_ids must be [N] int64");
  TORCH_CHECK(ids.size(0) == head_w.size(0), op, ": head_ids has ", ids.size(0), " ids for ", head_w.size(0),
              " head rows");
  check_same_device(ids, head_w, "head_ids");
}

void check_choice(const TokenChoice& choice, const at::Tensor& ref, int64_t batch, const char* op) {
  if (!choice.prev_tokens.has_value()) return;
  const at::Tensor& prev = *choice.prev_tokens;
  TORCH_CHECK(prev.dim() == 2 && prev.size(0) == batch && prev.scalar_type() == at::kLong, op,
              ": prev_tokens must be [B,L] int64 with B=", batch);
  check_same_device(prev, ref, "prev_tokens");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cnn_draft(
    const at::Tensor& window, const at::Tensor& src_bias, const at::Tensor& embed,
    const std::optional<at::Tensor>& in_proj_w, const std::optional<at::Tensor>& in_proj_b,
    const std::vector<at::Tensor>& conv_w, const std::vector<at::Tensor>& conv_b, const at::Tensor& norm_w,
    const at::Tensor& norm_b, double norm_eps, const at::Tensor& head_w, const std::optional<at::Tensor>& head_b,
    int64_t gamma, const TokenChoice& choice) {
  TORCH_CHECK(gamma >= 1, "cnn_draft: gamma must be >= 1, got ", gamma);
  TORCH_CHECK(window.dim() == 2 && window.scalar_type() == at::kLong, "cnn_draft: window must be [B,R] int64");
  TORCH_CHECK(window.size(1) >= 1, "cnn_draft: window must hold at least one position");
  TORCH_CHECK(embed.dim() == 2, "cnn_draft: embed must be [V,E]");
  TORCH_CHECK(conv_w.size() == conv_b.size() && !conv_w.empty(), "cnn_draft: need L >= 1 conv weights and biases");
  TORCH_CHECK(src_bias.dim() == 2 && src_bias.size(0) == window.size(0), "cnn_draft: src_bias must be [B,D]");
  check_head(choice, head_w, embed.size(0), "cnn_draft");
  check_same_device(window, embed, "window");
  check_same_device(src_bias, embed, "src_bias");
  const int64_t V = embed.size(0);
  const int64_t B = window.size(0);
  TORCH_CHECK(window.numel() == 0 || window.max().item<int64_t>() < V, "cnn_draft: token id >= vocab size ", V);
  check_choice(choice, embed, B, "cnn_draft");
  c10::NoGradGuard no_grad;
  std::optional<at::Tensor> prev;
  if (choice.prev_tokens.has_value()) prev = choice.prev_tokens->contiguous();

  // Step 1 runs the stack over the whole window; later steps are incremental: each layer keeps
  // its last k-1 inputs (exact: they lie inside the receptive field of the window's last
  // position), so a step costs one conv position per layer instead of R.
  std::vector<at::Tensor> history(conv_w.size());  // layer l: [B,k-1,D] inputs before the new position
  at::Tensor tokens = at::empty({B, gamma}, window.options());
  std::vector<at::Tensor> step_logits;
  step_logits.reserve(gamma);
  at::Tensor last;  // [B,D] top-layer output at the newest position
  {
    at::Tensor mask = window.ge(0).unsqueeze(-1).to(src_bias.scalar_type());  // [B,R,1]
    at::Tensor x = (embed_tokens(window, embed, in_proj_w, in_proj_b) + src_bias.unsqueeze(1)) * mask;  // [B,R,D]
    for (size_t l = 0; l < conv_w.size(); ++l) {
      const int64_t k = conv_w[l].size(2);
      at::Tensor padded = at::constant_pad_nd(x.transpose(1, 2), {k - 1, 0});  // [B,D,R+k-1]
      history[l] = padded.narrow(2, padded.size(2) - (k - 1), k - 1).transpose(1, 2);  // [B,k-1,D]
      at::Tensor y = at::conv1d(padded, conv_w[l], conv_b[l]);  // [B,D,R]
      x = (x + at::gelu(y.transpose(1, 2))) * mask;
    }
    last = x.select(1, x.size(1) - 1);
  }
  for (int64_t s = 0; s < gamma; ++s) {
    at::Tensor normed = at::layer_norm(last, {last.size(-1)}, norm_w, norm_b, norm_eps);
    auto [next, scores] = choose(head_logits(normed, head_w, head_b), choice, prev, V);  // [B], [B,N|V]
    tokens.select(1, s).copy_(next);
    step_logits.push_back(scores);
    if (s + 1 == gamma) break;
    at::Tensor x = (embed_tokens(next, embed, in_proj_w, in_proj_b) + src_bias).unsqueeze(1);  // [B,1,D]
    for (size_t l = 0; l < conv_w.size(); ++l) {
      at::Tensor inputs = at::cat({history[l], x}, 1);  // [B,k,D]
      history[l] = inputs.narrow(1, 1, inputs.size(1) - 1);
      at::Tensor y = at::conv1d(inputs.transpose(1, 2), conv_w[l], conv_b[l]);  // [B,D,1]
      x = x + at::gelu(y.transpose(1, 2));
    }
    last = x.select(1, 0);
  }
  return {tokens, at::stack(step_logits, 1)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_draft(
    const at::Tensor& last, const at::Tensor& h, const at::Tensor& c, const at::Tensor& embed,
    const std::optional<at::Tensor>& in_proj_w, const std::optional<at::Tensor>& in_proj_b,
    const std::vector<at::Tensor>& w_ih, const std::vector<at::Tensor>& w_hh, const std::vector<at::Tensor>& b_ih,
    const std::vector<at::Tensor>& b_hh, const at::Tensor& head_w, const std::optional<at::Tensor>& head_b,
    int64_t gamma, const TokenChoice& choice) {
  TORCH_CHECK(gamma >= 1, "lstm_draft: gamma must be >= 1, got ", gamma);
  TORCH_CHECK(last.dim() == 1 && last.scalar_type() == at::kLong, "lstm_draft: last must be [B] int64");
  TORCH_CHECK(embed.dim() == 2, "lstm_draft: embed must be [V,E]");
  const int64_t L = static_cast<int64_t>(w_ih.size());
  TORCH_CHECK(L >= 1 && (int64_t)w_hh.size() == L && (int64_t)b_ih.size() == L && (int64_t)b_hh.size() == L,
              "lstm_draft: need L >= 1 of each of w_ih, w_hh, b_ih, b_hh");
  TORCH_CHECK(h.dim() == 3 && h.sizes() == c.sizes() && h.size(0) == L && h.size(1) == last.size(0),
              "lstm_draft: h and c must both be [L,B,H] with L=", L, " B=", last.size(0));
  check_head(choice, head_w, embed.size(0), "lstm_draft");
  check_same_device(last, embed, "last");
  check_same_device(h, embed, "h");
  check_same_device(c, embed, "c");
  const int64_t V = embed.size(0);
  TORCH_CHECK(last.numel() == 0 || (last.min().item<int64_t>() >= 0 && last.max().item<int64_t>() < V),
              "lstm_draft: token ids must be in [0, ", V, ")");
  check_choice(choice, embed, last.size(0), "lstm_draft");
  c10::NoGradGuard no_grad;
  std::optional<at::Tensor> prev;
  if (choice.prev_tokens.has_value()) prev = choice.prev_tokens->contiguous();

  const int64_t B = last.size(0);
  std::vector<at::Tensor> hs(h.unbind(0)), cs(c.unbind(0));  // L x [B,H]
  at::Tensor tokens = at::empty({B, gamma}, last.options());
  std::vector<at::Tensor> step_logits, h_all, c_all;
  at::Tensor feed = last;
  for (int64_t s = 0; s <= gamma; ++s) {
    at::Tensor x = embed_tokens(feed, embed, in_proj_w, in_proj_b);  // [B,D]
    for (int64_t l = 0; l < L; ++l) {
      at::Tensor gates = at::linear(x, w_ih[l], b_ih[l]) + at::linear(hs[l], w_hh[l], b_hh[l]);  // [B,4H]
      auto g = gates.chunk(4, 1);
      cs[l] = at::sigmoid(g[1]) * cs[l] + at::sigmoid(g[0]) * at::tanh(g[2]);
      hs[l] = at::sigmoid(g[3]) * at::tanh(cs[l]);
      x = hs[l];
    }
    h_all.push_back(at::stack(hs, 0));
    c_all.push_back(at::stack(cs, 0));
    if (s == gamma) break;  // the last feed only advances the state (for a full accept)
    auto [next, scores] = choose(head_logits(x, head_w, head_b), choice, prev, V);  // [B], [B,N|V]
    feed = next;
    tokens.select(1, s).copy_(feed);
    step_logits.push_back(scores);
  }
  return {tokens, at::stack(step_logits, 1), at::stack(h_all, 0), at::stack(c_all, 0)};
}

}  // namespace runtime
}  // namespace fastspec
