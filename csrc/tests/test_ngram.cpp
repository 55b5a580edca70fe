// Unit tests of the framework-agnostic n-gram table (csrc/cpu/ngram.cpp) and of the
// flat upload format's lookup (ngram_flat.h, the code the CUDA kernel runs).
#include <gtest/gtest.h>

#include <cstdio>
#include <map>
#include <random>
#include <stdexcept>
#include <vector>

#include "fastspec/ngram.h"

using fastspec::NgramTable;

namespace {

using Seqs = std::vector<std::vector<int64_t>>;

void fit(NgramTable& t, const Seqs& seqs, bool incremental = false) {
  std::vector<int64_t> flat, offsets{0};
  for (const auto& s : seqs) {
    flat.insert(flat.end(), s.begin(), s.end());
    offsets.push_back(static_cast<int64_t>(flat.size()));
  }
  if (incremental)
    t.update(flat.data(), offsets.data(), static_cast<int64_t>(seqs.size()));
  else
    t.fit(flat.data(), offsets.data(), static_cast<int64_t>(seqs.size()));
}

std::vector<float> next_probs(const NgramTable& t, const std::vector<int64_t>& ctx) {
  std::vector<float> p(t.vocab_size());
  t.next_probs(ctx.data(), 1, static_cast<int64_t>(ctx.size()), nullptr, p.data());
  return p;
}

std::vector<int64_t> draft(const NgramTable& t, const std::vector<int64_t>& ctx, int gamma) {
  std::vector<int64_t> out(gamma);
  t.draft(ctx.data(), 1, static_cast<int64_t>(ctx.size()), nullptr, gamma, out.data(), nullptr);
  return out;
}

// A deliberately naive model with the documented semantics: map of context -> counts.
struct BruteForce {
  int n;
  int64_t V;
  double s;
  std::map<std::vector<int64_t>, std::map<int64_t, uint64_t>> counts;
  void add(const Seqs& seqs) {
    for (const auto& seq : seqs) {
      for (size_t i = 0; i < seq.size(); ++i) {
        if (seq[i] < 0) continue;
        for (int c = 0; c < n; ++c) {
          if (c > static_cast<int>(i)) break;
          bool broken = false;
          for (int k = 1; k <= c; ++k) broken |= seq[i - k] < 0;
          if (broken) break;
          std::vector<int64_t> ctx(seq.begin() + (i - c), seq.begin() + i);
          counts[ctx][seq[i]] += 1;
        }
      }
    }
  }
  std::vector<float> probs(const std::vector<int64_t>& context) const {
    std::vector<float> p(V, static_cast<float>(1.0 / V));
    const int longest = std::min<int>(n - 1, static_cast<int>(context.size()));
    for (int k = longest; k >= 0; --k) {
      std::vector<int64_t> ctx(context.end() - k, context.end());
      auto it = counts.find(ctx);
      if (it == counts.end()) continue;
      uint64_t total = 0;
      for (const auto& kv : it->second) total += kv.second;
      const double den = static_cast<double>(total) + s * static_cast<double>(V);
      for (int64_t w = 0; w < V; ++w) {
        auto c = it->second.find(w);
        const double cnt = c == it->second.end() ? 0.0 : static_cast<double>(c->second);
        p[w] = static_cast<float>((cnt + s) / den);
      }
      return p;
    }
    return p;
  }
  int64_t argmax(const std::vector<int64_t>& context) const {
    const auto p = probs(context);
    return std::max_element(p.begin(), p.end()) - p.begin();  // first maximal index
  }
};

Seqs random_corpus(std::mt19937& rng, int64_t V, int num_seqs, int max_len, bool with_padding) {
  // Zipf-ish skew so that long contexts repeat and backoff happens at every order.
  std::vector<double> weights(V);
  for (int64_t i = 0; i < V; ++i) weights[i] = 1.0 / (1.0 + i);
  std::discrete_distribution<int64_t> zipf(weights.begin(), weights.end());
  Seqs seqs;
  std::uniform_int_distribution<int> len(0, max_len);
  std::uniform_real_distribution<double> u(0, 1);
  for (int i = 0; i < num_seqs; ++i) {
    std::vector<int64_t> s(len(rng));
    for (auto& t : s) t = (with_padding && u(rng) < 0.05) ? -1 : zipf(rng);
    seqs.push_back(s);
  }
  return seqs;
}

}  // namespace

TEST(NgramTable, RejectsBadArguments) {
  EXPECT_THROW(NgramTable(0, 10), std::invalid_argument);
  EXPECT_THROW(NgramTable(17, 10), std::invalid_argument);
  EXPECT_THROW(NgramTable(3, 0), std::invalid_argument);
  EXPECT_THROW(NgramTable(3, 10, -1.0), std::invalid_argument);
  EXPECT_THROW(NgramTable(3, 10, std::nan("")), std::invalid_argument);
  EXPECT_NO_THROW(NgramTable(16, 1, 0.0));
}

TEST(NgramTable, UnfittedTableIsUniformAndDraftsTokenZero) {
  NgramTable t(3, 7);
  for (float p : next_probs(t, {1, 2})) EXPECT_EQ(p, static_cast<float>(1.0 / 7));
  EXPECT_EQ(draft(t, {1, 2}, 3), (std::vector<int64_t>{0, 0, 0}));
  EXPECT_EQ(t.num_entries(), 0u);
}

TEST(NgramTable, HandWorkedTrigram) {
  // Corpus 1 2 3 1 2 4 with n = 3, V = 5, s = 1.
  NgramTable t(3, 5, 1.0);
  fit(t, {{1, 2, 3, 1, 2, 4}});
  // Full context (1,2) was seen, followed by 3 once and 4 once: (1+1)/(2+5) each.
  auto p = next_probs(t, {1, 2});
  EXPECT_FLOAT_EQ(p[3], 2.0f / 7);
  EXPECT_FLOAT_EQ(p[4], 2.0f / 7);
  EXPECT_FLOAT_EQ(p[0], 1.0f / 7);
  // Tie between 3 and 4: the smaller id wins; then (2,3) -> 1, (3,1) -> 2, (1,2) -> 3.
  EXPECT_EQ(draft(t, {1, 2}, 4), (std::vector<int64_t>{3, 1, 2, 3}));
  // (4,2) was never seen: back off to the bigram context (2), also {3:1, 4:1}.
  EXPECT_EQ(next_probs(t, {4, 2}), p);
  // 0 never occurred at all: back off to the unigram: counts 1:2 2:2 3:1 4:1, total 6.
  auto u = next_probs(t, {0});
  EXPECT_FLOAT_EQ(u[1], 3.0f / 11);
  EXPECT_FLOAT_EQ(u[0], 1.0f / 11);
  EXPECT_EQ(draft(t, {0}, 1), (std::vector<int64_t>{1}));
  // 4 ends the corpus, so context (4) was never followed by anything: unigram too.
  EXPECT_EQ(next_probs(t, {4}), u);
  // distinct n-grams: 4 unigrams + 4 bigrams (12 23 31 24) + 4 trigrams (123 231 312 124)
  EXPECT_EQ(t.num_entries(), 12u);
  EXPECT_EQ(t.num_tokens(), 6u);
}

TEST(NgramTable, MinusOneBreaksSequencesAndLeftPadsContexts) {
  NgramTable t(2, 4, 0.0);
  fit(t, {{1, -1, 2, 3}});
  // No bigram spans the -1: context (1) is unseen, so the unigram is used.
  EXPECT_EQ(t.count(0, 2), 1u);
  EXPECT_EQ(t.longest_seen_context(std::vector<int64_t>{1}.data(), 1), 0u);
  // Left padding is ignored.
  EXPECT_EQ(next_probs(t, {-1, -1, 2}), next_probs(t, {2}));
  // -1 after a real token in a context is refused (right padding needs lengths).
  std::vector<int64_t> ctx{2, -1}, out(1);
  EXPECT_THROW(t.draft(ctx.data(), 1, 2, nullptr, 1, out.data(), nullptr), std::invalid_argument);
  const int64_t len = 1;
  t.draft(ctx.data(), 1, 2, &len, 1, out.data(), nullptr);
  EXPECT_EQ(out[0], 3);
}

TEST(NgramTable, RejectsOutOfRangeIdsWithoutChangingCounts) {
  NgramTable t(2, 4);
  fit(t, {{1, 2}});
  const uint64_t before = t.num_entries();
  EXPECT_THROW(fit(t, {{1, 4}}), std::invalid_argument);
  EXPECT_THROW(fit(t, {{1, -2}}), std::invalid_argument);
  // update is all or nothing: the valid first sequence is not counted either.
  EXPECT_THROW(fit(t, {{0, 1}, {1, 9}}, /*incremental=*/true), std::invalid_argument);
  EXPECT_EQ(t.num_entries(), before);
  std::vector<int64_t> ctx{4}, out(1);
  EXPECT_THROW(t.draft(ctx.data(), 1, 1, nullptr, 1, out.data(), nullptr), std::invalid_argument);
  const int64_t bad_len = 2;
  EXPECT_THROW(t.draft(ctx.data(), 1, 1, &bad_len, 1, out.data(), nullptr), std::invalid_argument);
}

TEST(NgramTable, UpdateEqualsFitOnConcatenation) {
  std::mt19937 rng(1);
  const Seqs a = random_corpus(rng, 20, 30, 40, true), b = random_corpus(rng, 20, 30, 40, true);
  NgramTable once(4, 20), twice(4, 20);
  Seqs both = a;
  both.insert(both.end(), b.begin(), b.end());
  fit(once, both);
  fit(twice, a);
  fit(twice, b, /*incremental=*/true);
  EXPECT_EQ(once.num_entries(), twice.num_entries());
  EXPECT_EQ(once.num_contexts(), twice.num_contexts());
  EXPECT_EQ(once.num_tokens(), twice.num_tokens());
  // The in-memory ids may differ, but the canonical file is the same.
  EXPECT_EQ(once.serialize(), twice.serialize());
  // Ids may be assigned in another order, so compare what the tables say.
  for (int trial = 0; trial < 200; ++trial) {
    const auto ctx = random_corpus(rng, 20, 1, 6, false)[0];
    ASSERT_EQ(next_probs(once, ctx), next_probs(twice, ctx));
    ASSERT_EQ(draft(once, ctx, 4), draft(twice, ctx, 4));
  }
}

TEST(NgramTable, MatchesBruteForceOnRandomCorpora) {
  std::mt19937 rng(7);
  for (int n = 1; n <= 5; ++n) {
    for (int64_t V : {3, 50}) {
      const double s = n % 2 ? 1.0 : 0.5;
      NgramTable t(n, V, s);
      BruteForce ref{n, V, s, {}};
      const Seqs corpus = random_corpus(rng, V, 40, 60, true);
      fit(t, corpus);
      ref.add(corpus);
      uint64_t distinct = 0;
      for (const auto& kv : ref.counts) distinct += kv.second.size();
      EXPECT_EQ(t.num_entries(), distinct);
      for (int trial = 0; trial < 40; ++trial) {
        std::vector<int64_t> ctx = random_corpus(rng, V, 1, 8, false)[0];
        EXPECT_EQ(next_probs(t, ctx), ref.probs(ctx)) << "n=" << n << " V=" << V;
        // Greedy drafting = repeated argmax of the reference, extending the context.
        const auto drafted = draft(t, ctx, 6);
        std::vector<int64_t> grow = ctx;
        for (int j = 0; j < 6; ++j) {
          const int64_t expect = ref.argmax(grow);
          ASSERT_EQ(drafted[j], expect) << "n=" << n << " V=" << V << " step " << j;
          grow.push_back(expect);
        }
      }
    }
  }
}

TEST(NgramTable, BatchedDraftWithProbsEqualsRowByRow) {
  std::mt19937 rng(3);
  NgramTable t(4, 30, 1.0);
  fit(t, random_corpus(rng, 30, 50, 50, false));
  const int64_t B = 3, L = 6, gamma = 5, V = 30;
  std::vector<int64_t> ctx = {-1, -1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, -1, -1, -1, -1, -1, -1};
  std::vector<int64_t> tokens(B * gamma);
  std::vector<float> probs(B * gamma * V);
  t.draft(ctx.data(), B, L, nullptr, gamma, tokens.data(), probs.data());
  for (int64_t b = 0; b < B; ++b) {
    std::vector<int64_t> row;
    for (int64_t i = 0; i < L; ++i)
      if (ctx[b * L + i] >= 0) row.push_back(ctx[b * L + i]);
    for (int64_t j = 0; j < gamma; ++j) {
      const auto p = next_probs(t, row);
      const std::vector<float> got(probs.begin() + (b * gamma + j) * V, probs.begin() + (b * gamma + j + 1) * V);
      EXPECT_EQ(got, p);
      const int64_t argmax = std::max_element(p.begin(), p.end()) - p.begin();
      EXPECT_EQ(tokens[b * gamma + j], argmax);
      row.push_back(argmax);
    }
  }
}

TEST(NgramFlat, HostLookupOfUploadFormatMatchesTable) {
  // The GPU kernel runs ngram::longest_seen_context on this flat format.
  std::mt19937 rng(11);
  for (int n : {1, 2, 4, 16}) {
    NgramTable t(n, 40, 1.0);
    fit(t, random_corpus(rng, 40, 60, 80, true));
    const fastspec::NgramFlat flat = t.build_flat();
    const auto view = flat.view();
    ASSERT_EQ(view.num_contexts, t.num_contexts());
    ASSERT_EQ(flat.cont_tokens.size(), t.num_entries());
    for (int trial = 0; trial < 200; ++trial) {
      std::vector<int64_t> ctx = random_corpus(rng, 40, 1, 20, false)[0];
      std::vector<uint32_t> recent;
      for (auto it = ctx.rbegin(); it != ctx.rend() && static_cast<int>(recent.size()) < n - 1; ++it)
        recent.push_back(static_cast<uint32_t>(*it));
      const uint32_t got = fastspec::ngram::longest_seen_context(view, recent.data(), static_cast<int>(recent.size()));
      const uint32_t want = t.longest_seen_context(ctx.data(), static_cast<int64_t>(ctx.size()));
      ASSERT_EQ(got, want);
      EXPECT_EQ(view.ctx_total[got], t.context_total(want));
      EXPECT_EQ(view.ctx_best[got], t.context_best(want));
      uint64_t sum = 0;
      for (uint32_t e = view.cont_offsets[got]; e < view.cont_offsets[got + 1]; ++e) {
        EXPECT_EQ(view.cont_counts[e], t.count(want, view.cont_tokens[e]));
        if (e > view.cont_offsets[got]) {
          EXPECT_LT(view.cont_tokens[e - 1], view.cont_tokens[e]);
        }
        sum += view.cont_counts[e];
      }
      EXPECT_EQ(sum, t.context_total(want));
    }
  }
}

TEST(NgramTable, SerializeRoundTripIsIdentical) {
  std::mt19937 rng(5);
  NgramTable t(5, 100, 0.25);
  fit(t, random_corpus(rng, 100, 40, 100, true));
  const auto bytes = t.serialize();
  NgramTable u = NgramTable::deserialize(bytes.data(), bytes.size());
  EXPECT_EQ(u.order(), 5);
  EXPECT_EQ(u.vocab_size(), 100);
  EXPECT_EQ(u.smoothing(), 0.25);
  EXPECT_EQ(u.num_entries(), t.num_entries());
  EXPECT_EQ(u.serialize(), bytes);
  for (int trial = 0; trial < 20; ++trial) {
    auto ctx = random_corpus(rng, 100, 1, 10, false)[0];
    EXPECT_EQ(draft(u, ctx, 8), draft(t, ctx, 8));
    EXPECT_EQ(next_probs(u, ctx), next_probs(t, ctx));
  }
  const std::string path = ::testing::TempDir() + "fastspec_ngram_roundtrip.bin";
  t.save(path);
  EXPECT_EQ(NgramTable::load(path).serialize(), bytes);
  std::remove(path.c_str());
  EXPECT_THROW(NgramTable::load(path), std::runtime_error);  // missing file
}

TEST(NgramTable, CorruptFilesThrowAndNeverCrash) {
  std::mt19937 rng(9);
  NgramTable t(3, 10, 1.0);
  fit(t, random_corpus(rng, 10, 5, 12, false));
  const auto bytes = t.serialize();
  // Every truncation.
  for (size_t len = 0; len < bytes.size(); ++len)
    EXPECT_THROW(NgramTable::deserialize(bytes.data(), len), std::runtime_error) << len;
  // Every single-bit flip.
  for (size_t i = 0; i < bytes.size(); ++i) {
    for (int bit = 0; bit < 8; ++bit) {
      auto bad = bytes;
      bad[i] ^= static_cast<uint8_t>(1u << bit);
      EXPECT_THROW(NgramTable::deserialize(bad.data(), bad.size()), std::runtime_error) << i << ":" << bit;
    }
  }
  // Trailing garbage and a foreign file.
  auto longer = bytes;
  longer.push_back(0);
  EXPECT_THROW(NgramTable::deserialize(longer.data(), longer.size()), std::runtime_error);
  std::vector<uint8_t> foreign(200, 'x');
  EXPECT_THROW(NgramTable::deserialize(foreign.data(), foreign.size()), std::runtime_error);
  // Adversarial payloads with a *valid* checksum: the record checks must catch them
  // (this is where the sanitizer build earns its keep).
  std::uniform_int_distribution<size_t> pos(64, bytes.size() - 1);
  std::uniform_int_distribution<int> byte(0, 255);
  int loaded = 0;
  for (int trial = 0; trial < 2000; ++trial) {
    auto bad = bytes;
    for (int k = 0; k < 1 + trial % 4; ++k) bad[pos(rng)] = static_cast<uint8_t>(byte(rng));
    uint64_t h = fastspec::fnv1a64(bad.data() + 8, 48);
    h = fastspec::fnv1a64(bad.data() + 64, bad.size() - 64, h);
    for (int i = 0; i < 8; ++i) bad[56 + i] = static_cast<uint8_t>(h >> (8 * i));
    try {
      NgramTable u = NgramTable::deserialize(bad.data(), bad.size());
      auto ctx = std::vector<int64_t>{1, 2};
      (void)draft(u, ctx, 3);
      ++loaded;
    } catch (const std::runtime_error&) {
    }
  }
  SUCCEED() << loaded << " mutated-but-consistent files loaded";
}

// Host emulation of the CUDA kernels (csrc/cuda/ngram.cu) over the flat format: the
// tokens kernel is ngram::draft_row per row; each probability block rebuilds its step's
// history, writes floor_prob over its chunk and scatters the continuations in it. Checks the upload format and the shared
// device code against the table; only the block-parallel writes are GPU-only.
TEST(NgramFlat, HostEmulationOfCudaKernelsMatchesTable) {
  std::mt19937 rng(13);
  for (int n : {1, 2, 3, 5, 16}) {
    for (double s : {0.0, 1.0}) {
      const int64_t V = 37;
      NgramTable t(n, V, s);
      fit(t, random_corpus(rng, V, 50, 60, true));
      const fastspec::NgramFlat flat = t.build_flat();
      const auto view = flat.view();
      const int64_t B = 6, L = 9, gamma = 7;
      std::vector<int64_t> ctx(B * L, -1);
      for (int64_t b = 0; b < B; ++b) {
        const auto row = random_corpus(rng, V, 1, L, false)[0];
        std::copy(row.begin(), row.end(), ctx.begin() + (b + 1) * L - row.size());
      }
      std::vector<int64_t> want_tokens(B * gamma), got_tokens(B * gamma);
      std::vector<float> want_probs(B * gamma * V), got_probs(B * gamma * V);
      t.draft(ctx.data(), B, L, nullptr, gamma, want_tokens.data(), want_probs.data());
      for (int64_t b = 0; b < B; ++b)
        fastspec::ngram::draft_row(view, ctx.data() + b * L, L, gamma, got_tokens.data() + b * gamma);
      // The probability kernel: every (row, step, chunk) independently, in reverse order
      // to make sure no block depends on another; chunk 8 so chunks cut continuation lists.
      const int64_t chunk = 8, num_chunks = (V + chunk - 1) / chunk;
      for (int64_t block = B * gamma * num_chunks - 1; block >= 0; --block) {
        const int64_t row_step = block / num_chunks, lo = (block % num_chunks) * chunk;
        const int64_t hi = std::min(V, lo + chunk), b = row_step / gamma, j = row_step % gamma;
        uint32_t hist[fastspec::ngram::kMaxOrder];
        const int count = fastspec::ngram::history_at_step(ctx.data() + b * L, L, got_tokens.data() + b * gamma, j,
                                                           n - 1, hist);
        const uint32_t c = fastspec::ngram::longest_seen_context(view, hist, count);
        const uint32_t first = fastspec::ngram::lower_bound_token(view.cont_tokens, view.cont_offsets[c],
                                                                  view.cont_offsets[c + 1], lo);
        const uint32_t last = fastspec::ngram::lower_bound_token(view.cont_tokens, view.cont_offsets[c],
                                                                 view.cont_offsets[c + 1], hi);
        float* row = got_probs.data() + row_step * V;
        std::fill(row + lo, row + hi, fastspec::ngram::floor_prob(view, c));
        for (uint32_t e = first; e < last; ++e)
          row[view.cont_tokens[e]] = fastspec::ngram::smoothed_prob(view.cont_counts[e], view.ctx_total[c],
                                                                    view.smoothing, view.smoothing_times_vocab);
      }
      EXPECT_EQ(got_tokens, want_tokens) << "n=" << n;
      EXPECT_EQ(got_probs, want_probs) << "n=" << n;
    }
  }
  // An empty table uploads too: uniform, token 0.
  NgramTable empty(3, 5);
  const auto flat = empty.build_flat();
  std::vector<int64_t> row{1, 2}, out(2);
  fastspec::ngram::draft_row(flat.view(), row.data(), 2, 2, out.data());
  EXPECT_EQ(out, (std::vector<int64_t>{0, 0}));
  EXPECT_EQ(fastspec::ngram::floor_prob(flat.view(), 0), 0.2f);
}
