// Registration of the drafter runtime ops: torch.ops.fastspec.{prompt_lookup_draft,
// cnn_draft, lstm_draft}. Python faces: fastspec/drafters/{prompt_lookup,cnn,lstm}.py.
#include <torch/library.h>

#include "../runtime/neural_drafters.h"
#include "fastspec/head_ids.h"
#include "fastspec/prompt_lookup.h"

namespace {

// source [B,S], generated [B,G] int64 CPU; source_len/gen_len [B] int64 valid lengths.
// Returns tokens [B,gamma] (-1 where nothing matched) and num_drafted [B].
std::tuple<at::Tensor, at::Tensor> prompt_lookup_draft_op(const at::Tensor& source, const at::Tensor& source_len,
                                                          const at::Tensor& generated, const at::Tensor& gen_len,
                                                          int64_t gamma, int64_t max_n, int64_t min_n,
                                                          bool source_is_prefix) {
  TORCH_CHECK(source.dim() == 2 && generated.dim() == 2, "prompt_lookup_draft: source and generated must be 2-D");
  const int64_t B = source.size(0);
  TORCH_CHECK(generated.size(0) == B, "prompt_lookup_draft: batch mismatch (source ", B, ", generated ",
              generated.size(0), ")");
  TORCH_CHECK(source_len.dim() == 1 && source_len.size(0) == B && gen_len.dim() == 1 && gen_len.size(0) == B,
              "prompt_lookup_draft: source_len and gen_len must be [B]");
  for (const at::Tensor* t : {&source, &generated, &source_len, &gen_len}) {
    TORCH_CHECK(t->scalar_type() == at::kLong, "prompt_lookup_draft: all inputs must be int64");
    TORCH_CHECK(t->device().is_cpu(), "prompt_lookup_draft: inputs must be CPU tensors (token ids are tiny)");
  }
  TORCH_CHECK(gamma >= 1 && gamma <= 1024, "prompt_lookup_draft: gamma must be in [1, 1024], got ", gamma);
  TORCH_CHECK(min_n >= 1 && max_n >= min_n && max_n <= 1024, "prompt_lookup_draft: need 1 <= min_n <= max_n <= 1024, got min_n=",
              min_n, " max_n=", max_n);
  at::Tensor src = source.contiguous(), gen = generated.contiguous();
  at::Tensor slen = source_len.contiguous(), glen = gen_len.contiguous();
  at::Tensor tokens = at::empty({B, gamma}, source.options());
  at::Tensor num = at::empty({B}, source.options());
  fastspec::PromptLookupParams p;
  p.gamma = static_cast<int32_t>(gamma);
  p.max_n = static_cast<int32_t>(max_n);
  p.min_n = static_cast<int32_t>(min_n);
  p.source_is_prefix = source_is_prefix;
  const int32_t rc = fastspec::prompt_lookup_draft(src.data_ptr<int64_t>(), slen.data_ptr<int64_t>(), src.size(1),
                                                   gen.data_ptr<int64_t>(), glen.data_ptr<int64_t>(), gen.size(1), B,
                                                   p, tokens.data_ptr<int64_t>(), num.data_ptr<int64_t>());
  TORCH_CHECK(rc == 0, "prompt_lookup_draft: a row length is negative or longer than its tensor");
  return {tokens, num};
}

using fastspec::runtime::TokenChoice;

// head_ids [N] int64 (a shortlisted head's row -> target id map; none = a full head): distinct ids
// in [0, vocab). The runtime checks shapes, dtype and device; the values are checked here, on a
// host copy (N ids), so a bad map raises instead of indexing out of bounds.
void check_head_ids_values(const std::optional<at::Tensor>& head_ids, int64_t vocab, const char* op) {
  if (!head_ids.has_value() || !head_ids->defined()) return;
  TORCH_CHECK(head_ids->dim() == 1 && head_ids->scalar_type() == at::kLong, op, ": head_ids must be [N] int64, got ",
              head_ids->scalar_type(), " with ", head_ids->dim(), " dims");
  at::Tensor ids = head_ids->to(at::kCPU).contiguous();
  int64_t bad = -1;
  const int32_t rc = fastspec::check_head_ids(ids.data_ptr<int64_t>(), ids.numel(), vocab, &bad);
  TORCH_CHECK_VALUE(rc != fastspec::kHeadIdsBadSize, op, ": head_ids must hold 1..", vocab, " ids, got ", ids.numel());
  TORCH_CHECK_VALUE(rc != fastspec::kHeadIdsOutOfRange, op, ": head_ids[", bad, "] = ", ids.data_ptr<int64_t>()[bad],
                    " is outside the vocabulary [0, ", vocab, ")");
  TORCH_CHECK_VALUE(rc != fastspec::kHeadIdsDuplicate, op, ": head_ids[", bad, "] = ", ids.data_ptr<int64_t>()[bad],
                    " appears twice (a head-id map must hold distinct target ids)");
}

TokenChoice make_choice(bool do_sample, double temperature, int64_t top_k, double top_p, double repetition_penalty,
                        const std::optional<at::Tensor>& prev_tokens, const std::optional<at::Generator>& generator,
                        const std::optional<at::Tensor>& head_ids) {
  TokenChoice c;
  c.head_ids = head_ids;
  c.do_sample = do_sample;
  c.temperature = temperature;
  c.top_k = top_k;
  c.top_p = top_p;
  c.repetition_penalty = repetition_penalty;
  c.prev_tokens = prev_tokens;
  c.generator = generator;
  return c;
}

std::tuple<at::Tensor, at::Tensor> cnn_draft_op(
    const at::Tensor& window, const at::Tensor& src_bias, const at::Tensor& embed,
    const std::optional<at::Tensor>& in_proj_w, const std::optional<at::Tensor>& in_proj_b,
    const std::vector<at::Tensor>& conv_w, const std::vector<at::Tensor>& conv_b, const at::Tensor& norm_w,
    const at::Tensor& norm_b, double norm_eps, const at::Tensor& head_w, const std::optional<at::Tensor>& head_b,
    int64_t gamma, bool do_sample, double temperature, int64_t top_k, double top_p, double repetition_penalty,
    const std::optional<at::Tensor>& prev_tokens, const std::optional<at::Generator>& generator,
    const std::optional<at::Tensor>& head_ids) {
  TORCH_CHECK(embed.dim() == 2, "cnn_draft: embed must be [V,E]");
  check_head_ids_values(head_ids, embed.size(0), "cnn_draft");
  return fastspec::runtime::cnn_draft(
      window, src_bias, embed, in_proj_w, in_proj_b, conv_w, conv_b, norm_w, norm_b, norm_eps, head_w, head_b, gamma,
      make_choice(do_sample, temperature, top_k, top_p, repetition_penalty, prev_tokens, generator, head_ids));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_draft_op(
    const at::Tensor& last, const at::Tensor& h, const at::Tensor& c, const at::Tensor& embed,
    const std::optional<at::Tensor>& in_proj_w, const std::optional<at::Tensor>& in_proj_b,
    const std::vector<at::Tensor>& w_ih, const std::vector<at::Tensor>& w_hh, const std::vector<at::Tensor>& b_ih,
    const std::vector<at::Tensor>& b_hh, const at::Tensor& head_w, const std::optional<at::Tensor>& head_b,
    int64_t gamma, bool do_sample, double temperature, int64_t top_k, double top_p, double repetition_penalty,
    const std::optional<at::Tensor>& prev_tokens, const std::optional<at::Generator>& generator,
    const std::optional<at::Tensor>& head_ids) {
  TORCH_CHECK(embed.dim() == 2, "lstm_draft: embed must be [V,E]");
  check_head_ids_values(head_ids, embed.size(0), "lstm_draft");
  return fastspec::runtime::lstm_draft(
      last, h, c, embed, in_proj_w, in_proj_b, w_ih, w_hh, b_ih, b_hh, head_w, head_b, gamma,
      make_choice(do_sample, temperature, top_k, top_p, repetition_penalty, prev_tokens, generator, head_ids));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastspec, m) {
  m.def(
      "prompt_lookup_draft(Tensor source, Tensor source_len, Tensor generated, Tensor gen_len, int gamma, "
      "int max_n, int min_n, bool source_is_prefix) -> (Tensor, Tensor)",
      &prompt_lookup_draft_op);
  // Sampling arguments (after gamma): the target's processing for q, prev_tokens [B,L] for the
  // repetition penalty, and the generator that at::multinomial draws from. head_ids [N]: the target
  // ids of a shortlisted head's rows (None = a full head over the vocabulary); tokens are target ids,
  // greedy returns the [B,γ,N] head logits, sampling q [B,γ,V] (zero outside the shortlist).
  m.def(
      "cnn_draft(Tensor window, Tensor src_bias, Tensor embed, Tensor? in_proj_w, Tensor? in_proj_b, "
      "Tensor[] conv_w, Tensor[] conv_b, Tensor norm_w, Tensor norm_b, float norm_eps, Tensor head_w, "
      "Tensor? head_b, int gamma, bool do_sample=False, float temperature=1.0, int top_k=0, float top_p=1.0, "
      "float repetition_penalty=1.0, Tensor? prev_tokens=None, Generator? generator=None, Tensor? head_ids=None) "
      "-> (Tensor, Tensor)",
      &cnn_draft_op);
  m.def(
      "lstm_draft(Tensor last, Tensor h, Tensor c, Tensor embed, Tensor? in_proj_w, Tensor? in_proj_b, "
      "Tensor[] w_ih, Tensor[] w_hh, Tensor[] b_ih, Tensor[] b_hh, Tensor head_w, Tensor? head_b, int gamma, "
      "bool do_sample=False, float temperature=1.0, int top_k=0, float top_p=1.0, float repetition_penalty=1.0, "
      "Tensor? prev_tokens=None, Generator? generator=None, Tensor? head_ids=None) -> (Tensor, Tensor, Tensor, Tensor)",
      &lstm_draft_op);
}
