#include <gtest/gtest.h>

#include <vector>

#include "fastspec/prompt_lookup.h"

using fastspec::PromptLookupParams;
using fastspec::prompt_lookup_draft;
using fastspec::prompt_lookup_draft_row;

namespace {
std::vector<int64_t> draft_row(const std::vector<int64_t>& src, const std::vector<int64_t>& gen,
                               PromptLookupParams p, int32_t* n_out = nullptr) {
  std::vector<int64_t> out(p.gamma, 7777);
  int32_t n = prompt_lookup_draft_row(src.data(), (int64_t)src.size(), gen.data(), (int64_t)gen.size(), p, out.data());
  if (n_out) *n_out = n;
  return out;
}
}  // namespace

TEST(PromptLookup, CopiesSourceContinuation) {
  PromptLookupParams p;
  p.gamma = 3;
  p.max_n = 2;
  p.min_n = 1;
  int32_t n = 0;
  auto out = draft_row({10, 11, 12, 13, 14, 15}, {5, 11, 12}, p, &n);
  EXPECT_EQ(n, 3);
  EXPECT_EQ(out, (std::vector<int64_t>{13, 14, 15}));
}

TEST(PromptLookup, LongestMatchWins) {
  PromptLookupParams p;
  p.gamma = 1;
  p.max_n = 3;
  p.min_n = 1;
  // "2" alone first matches at position 0 (-> 9); "1 2" matches at position 3 (-> 4).
  auto out = draft_row({2, 9, 0, 1, 2, 4}, {1, 2}, p);
  EXPECT_EQ(out[0], 4);
}

TEST(PromptLookup, ContinuesPastSourceEndByRematching) {
  PromptLookupParams p;
  p.gamma = 4;
  p.max_n = 1;
  p.min_n = 1;
  int32_t n = 0;
  // 3 -> 4 (end of source), then 4 matches nothing with a continuation in the source,
  // but the text [.., 3, 4] has no earlier 4 either -> stop after 1 token.
  auto out = draft_row({1, 3, 4}, {3}, p, &n);
  EXPECT_EQ(n, 1);
  EXPECT_EQ(out, (std::vector<int64_t>{4, -1, -1, -1}));
}

TEST(PromptLookup, SearchesGeneratedText) {
  PromptLookupParams p;
  p.gamma = 2;
  p.max_n = 2;
  p.min_n = 2;
  int32_t n = 0;
  auto out = draft_row({100, 101}, {1, 2, 3, 4, 1, 2}, p, &n);
  EXPECT_EQ(n, 2);
  EXPECT_EQ(out, (std::vector<int64_t>{3, 4}));
}

TEST(PromptLookup, SourceIsPrefixForCausal) {
  PromptLookupParams p;
  p.gamma = 2;
  p.max_n = 2;
  p.min_n = 1;
  p.source_is_prefix = true;
  // query [8, 9] spans prompt and generated; found in the prompt.
  auto out = draft_row({8, 9, 20, 21, 8}, {9}, p);
  EXPECT_EQ(out, (std::vector<int64_t>{20, 21}));
}

TEST(PromptLookup, NoMatchAndEmptyInputs) {
  PromptLookupParams p;
  p.gamma = 3;
  int32_t n = 5;
  auto out = draft_row({}, {}, p, &n);
  EXPECT_EQ(n, 0);
  EXPECT_EQ(out, (std::vector<int64_t>{-1, -1, -1}));
  out = draft_row({1, 2, 3}, {9}, p, &n);
  EXPECT_EQ(n, 0);
}

TEST(PromptLookup, SelfOverlappingRunFillsGamma) {
  PromptLookupParams p;
  p.gamma = 5;
  p.max_n = 2;
  p.min_n = 1;
  p.source_is_prefix = true;
  int32_t n = 0;
  auto out = draft_row({}, {7, 7, 7}, p, &n);
  EXPECT_EQ(n, 5);
  EXPECT_EQ(out, (std::vector<int64_t>(5, 7)));
}

TEST(PromptLookup, BatchedMatchesRowsAndRejectsBadArgs) {
  PromptLookupParams p;
  p.gamma = 2;
  p.max_n = 2;
  p.min_n = 1;
  const int64_t S = 4, G = 3, B = 2;
  std::vector<int64_t> src = {1, 2, 3, 4, 5, 6, -1, -1};
  std::vector<int64_t> gen = {2, -1, -1, 9, 5, -1};
  std::vector<int64_t> slen = {4, 2}, glen = {1, 2};
  std::vector<int64_t> out(B * p.gamma), nd(B);
  ASSERT_EQ(prompt_lookup_draft(src.data(), slen.data(), S, gen.data(), glen.data(), G, B, p, out.data(), nd.data()), 0);
  EXPECT_EQ(out, (std::vector<int64_t>{3, 4, 6, -1}));
  EXPECT_EQ(nd, (std::vector<int64_t>{2, 1}));
  slen[1] = 5;  // longer than S
  EXPECT_EQ(prompt_lookup_draft(src.data(), slen.data(), S, gen.data(), glen.data(), G, B, p, out.data(), nd.data()), -1);
  slen[1] = 2;
  p.min_n = 0;
  EXPECT_EQ(prompt_lookup_draft(src.data(), slen.data(), S, gen.data(), glen.data(), G, B, p, out.data(), nd.data()), -1);
}
