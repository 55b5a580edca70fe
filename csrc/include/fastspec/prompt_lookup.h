// Prompt lookup drafting: copy the continuation of the longest earlier match of the
// output's last n tokens, searched in the source document and in the text so far.
// Framework-agnostic (no torch): raw pointers, one row per call.
#pragma once
#include <cstdint>

namespace fastspec {

struct PromptLookupParams {
  int32_t gamma = 5;   // tokens to draft
  int32_t max_n = 4;   // longest query tried first
  int32_t min_n = 1;   // shortest query tried
  // true (causal targets): the source is the prompt, i.e. the start of the text;
  // false (seq2seq): the source is the encoder input, searched separately first.
  bool source_is_prefix = false;
};

// Drafts up to params.gamma tokens for one row.
//   source[source_len]: the source document (no padding).
//   generated[gen_len]: the output so far (no padding).
//   out_tokens[gamma]: written with the draft, then -1 for positions without a match.
// Returns the number of drafted tokens (0..gamma).
//
// Rule, repeated until gamma tokens are drafted or nothing matches:
//   text = (source if source_is_prefix) + generated + drafts so far
//   for n = max_n .. min_n (n <= len(text)): query = last n tokens of text;
//     1. (seq2seq) the earliest occurrence of the query in the source with >= 1 token after it;
//     2. the earliest occurrence in text that ends before the text's end;
//   the first hit's continuation is copied (up to the tokens still needed).
int32_t prompt_lookup_draft_row(const int64_t* source, int64_t source_len, const int64_t* generated,
                                int64_t gen_len, const PromptLookupParams& params, int64_t* out_tokens);

// Batched: source[B, S] and generated[B, G] row-major; row b uses its first
// source_len[b] / gen_len[b] entries. out_tokens[B, gamma], num_drafted[B].
// Returns 0, or -1 if an argument is invalid (negative lengths, lengths > S/G, bad params).
int32_t prompt_lookup_draft(const int64_t* source, const int64_t* source_len, int64_t S,
                            const int64_t* generated, const int64_t* gen_len, int64_t G, int64_t batch,
                            const PromptLookupParams& params, int64_t* out_tokens, int64_t* num_drafted);

}  // namespace fastspec
