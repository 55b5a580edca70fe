// Unit tests of the framework-agnostic verification core (csrc/cpu/verify.cpp).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "fastspec/verify.h"

using namespace fastspec;

namespace {

struct Result {
  std::vector<int64_t> out;
  int64_t accepted = -1;
  int32_t status = -1;
};

Result greedy(const std::vector<float>& logits, const std::vector<int64_t>& draft, int64_t vocab) {
  Result r;
  const int64_t gamma = int64_t(draft.size());
  r.out.assign(gamma + 1, -7);
  r.status = verify_greedy_row(logits.data(), draft.data(), gamma, vocab, r.out.data(), &r.accepted);
  return r;
}

Result sample(const std::vector<float>& p, const std::vector<float>* q, const std::vector<int64_t>& draft,
              const std::vector<double>& u, int64_t vocab) {
  Result r;
  const int64_t gamma = int64_t(draft.size());
  r.out.assign(gamma + 1, -7);
  r.status = verify_sample_row(p.data(), q ? q->data() : nullptr, draft.data(), u.data(), gamma, vocab, 1e-3, 1e-3,
                               r.out.data(), &r.accepted);
  return r;
}

Result fused(const std::vector<float>& logits, const std::vector<int64_t>& draft, const std::vector<float>* q,
             const std::vector<int64_t>& prev, const std::vector<double>* u, int64_t vocab, const ProcessParams& params) {
  Result r;
  VerifyWorkspace ws;
  const int64_t gamma = int64_t(draft.size());
  r.out.assign(gamma + 1, -7);
  r.status = fused_verify_row(logits.data(), draft.data(), q ? q->data() : nullptr, prev.data(), int64_t(prev.size()),
                              u ? u->data() : nullptr, gamma, vocab, params, 1e-3, ws, r.out.data(), &r.accepted);
  return r;
}

std::vector<float> process(const std::vector<float>& logits, int64_t positions, int64_t vocab,
                           const ProcessParams& params, const std::vector<int64_t>& prev = {},
                           const std::vector<int64_t>* draft = nullptr, int32_t* status = nullptr) {
  VerifyWorkspace ws;
  std::vector<float> out(size_t(positions * vocab));
  const int32_t s = process_logits_row(logits.data(), prev.data(), int64_t(prev.size()),
                                       draft ? draft->data() : nullptr, positions, vocab, params, ws, out.data());
  if (status) *status = s;
  return out;
}

}  // namespace

TEST(VerifyGreedy, AcceptsMatchingPrefixThenRecovers) {
  // argmax per position: 1, 0, 2. Drafts 1 (match), 2 (mismatch): recovered 0.
  const std::vector<float> logits = {0, 5, 1, 4, 0, 0, 0, 0, 3};
  Result r = greedy(logits, {1, 2}, 3);
  EXPECT_EQ(r.status, kStatusOk);
  EXPECT_EQ(r.accepted, 1);
  EXPECT_EQ(r.out, (std::vector<int64_t>{1, 0, -1}));
}

TEST(VerifyGreedy, AllAcceptedGivesBonus) {
  const std::vector<float> logits = {0, 5, 1, 4, 0, 0, 0, 0, 3};
  Result r = greedy(logits, {1, 0}, 3);
  EXPECT_EQ(r.accepted, 2);
  EXPECT_EQ(r.out, (std::vector<int64_t>{1, 0, 2}));
}

TEST(VerifyGreedy, TiesPickFirstIndexLikeTorchArgmax) {
  const std::vector<float> logits = {2, 2, 1, 0, 0, 0};
  Result r = greedy(logits, {1}, 3);
  EXPECT_EQ(r.accepted, 0);
  EXPECT_EQ(r.out, (std::vector<int64_t>{0, -1}));
  // all -inf: index 0, as torch.argmax
  const float ninf = -std::numeric_limits<float>::infinity();
  Result s = greedy({ninf, ninf, ninf}, {}, 3);
  EXPECT_EQ(s.out, (std::vector<int64_t>{0}));
}

TEST(VerifyGreedy, LongVocabArgmaxMatchesScalarScan) {
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  const int64_t V = 32128;
  std::vector<float> logits(V);
  for (auto& x : logits) x = normal(rng);
  logits[V - 3] = 10.0f;  // in the scalar tail after the vector lanes
  Result r = greedy(logits, {}, V);
  EXPECT_EQ(r.out[0], V - 3);
}

TEST(VerifyGreedy, BadInputsReportStatus) {
  const std::vector<float> logits = {0, 1, 2, 0, 1, 2};
  EXPECT_EQ(greedy(logits, {3}, 3).status, kBadDraftToken);
  EXPECT_EQ(greedy(logits, {-1}, 3).status, kBadDraftToken);
  std::vector<float> nan = logits;
  nan[1] = std::nanf("");
  EXPECT_EQ(greedy(nan, {2}, 3).status, kNanLogits);
}

TEST(VerifySample, HandWorkedAcceptanceAndResidual) {
  // d = 1, p(d) = 0.25, q(d) = 0.5: accept iff u0 < 0.5; residual [0.375, 0, 0.125, 0] / 0.5.
  const std::vector<float> p = {0.5f, 0.25f, 0.125f, 0.125f, 0, 0, 0, 1};
  const std::vector<float> q = {0.125f, 0.5f, 0, 0.375f};
  Result accept = sample(p, &q, {1}, {0.49, 0.3}, 4);
  EXPECT_EQ(accept.accepted, 1);
  EXPECT_EQ(accept.out, (std::vector<int64_t>{1, 3}));
  Result low = sample(p, &q, {1}, {0.5, 0.74}, 4);  // rejected; u1 * 0.5 < 0.375 -> token 0
  EXPECT_EQ(low.out, (std::vector<int64_t>{0, -1}));
  Result high = sample(p, &q, {1}, {0.9, 0.76}, 4);  // rejected; past 0.375 -> token 2
  EXPECT_EQ(high.out, (std::vector<int64_t>{2, -1}));
}

TEST(VerifySample, DeterministicDrafterAcceptsWithProbabilityPOfDraft) {
  const std::vector<float> p = {0.1f, 0.2f, 0.3f, 0.4f, 0.25f, 0.25f, 0.25f, 0.25f};
  EXPECT_EQ(sample(p, nullptr, {2}, {0.29, 0.0}, 4).accepted, 1);
  Result r = sample(p, nullptr, {2}, {0.31, 0.0}, 4);
  EXPECT_EQ(r.accepted, 0);
  EXPECT_EQ(r.out[0], 0);  // residual = p without the draft token: first positive index for u = 0
}

TEST(VerifySample, UniformNearOneTakesLastPositiveToken) {
  const std::vector<float> p = {0.5f, 0.5f, 0.0f, 0.0f};
  Result r = sample(p, nullptr, {}, {std::nextafter(1.0, 0.0)}, 4);
  EXPECT_EQ(r.out, (std::vector<int64_t>{1}));
}

TEST(VerifySample, OneHotTargetIsExact) {
  const std::vector<float> p = {0, 1, 0, 1, 0, 0, 0, 0, 1};  // target path 1, 0, 2
  const std::vector<float> q = {0.3f, 0.3f, 0.4f, 0.2f, 0.5f, 0.3f};
  for (double u0 : {0.0, 0.5, 0.999})
    for (double u2 : {0.0, 0.5, 0.999}) {
      EXPECT_EQ(sample(p, &q, {1, 1}, {u0, u0, u2}, 3).out, (std::vector<int64_t>{1, 0, -1}));
      EXPECT_EQ(sample(p, &q, {1, 0}, {u0, u0, u2}, 3).out, (std::vector<int64_t>{1, 0, 2}));
    }
}

TEST(VerifySample, BadProbabilitiesReportStatus) {
  const std::vector<float> good = {0.5f, 0.5f, 0.5f, 0.5f};
  const std::vector<double> u = {0.1, 0.1};
  std::vector<float> bad = good;
  bad[0] = -0.1f;
  bad[1] = 1.1f;
  EXPECT_EQ(sample(bad, nullptr, {0}, u, 2).status, kBadTargetProbs);
  bad = good;
  bad[2] = std::numeric_limits<float>::infinity();
  EXPECT_EQ(sample(bad, nullptr, {0}, u, 2).status, kBadTargetProbs);
  bad = good;
  bad[3] = 0.6f;
  EXPECT_EQ(sample(bad, nullptr, {0}, u, 2).status, kTargetNotNormalized);
  std::vector<float> q = {0.7f, 0.7f};
  EXPECT_EQ(sample(good, &q, {0}, u, 2).status, kDraftNotNormalized);
  q = {std::nanf(""), 1.0f};
  EXPECT_EQ(sample(good, &q, {0}, u, 2).status, kBadDraftProbs);
  EXPECT_EQ(sample(good, nullptr, {2}, u, 2).status, kBadDraftToken);
}

TEST(ProcessLogits, TopKKeepsTies) {
  ProcessParams params;
  params.do_sample = true;
  params.top_k = 2;
  std::vector<float> probs = process({3, 2, 2, 2, 1}, 1, 5, params);
  EXPECT_GT(probs[3], 0.0f);
  EXPECT_EQ(probs[4], 0.0f);
  EXPECT_NEAR(std::accumulate(probs.begin(), probs.end(), 0.0), 1.0, 1e-6);
}

TEST(ProcessLogits, TopPHandWorkedAndTiesByIndex) {
  ProcessParams params;
  params.do_sample = true;
  params.top_p = 0.75;
  std::vector<float> probs = process({std::log(0.5f), std::log(0.25f), std::log(0.125f), std::log(0.125f)}, 1, 4, params);
  EXPECT_NEAR(probs[0], 2.0 / 3, 1e-6);
  EXPECT_NEAR(probs[1], 1.0 / 3, 1e-6);
  EXPECT_EQ(probs[2], 0.0f);
  EXPECT_EQ(probs[3], 0.0f);
  params.top_p = 0.5;  // four equal logits: the two highest indices stay (HF's stable ascending sort)
  EXPECT_EQ(process({0, 0, 0, 0}, 1, 4, params), (std::vector<float>{0, 0, 0.5f, 0.5f}));
  std::vector<float> signed_zero = process({-0.0f, 0.0f, -0.0f, 0.0f}, 1, 4, params);  // -0 ties +0
  EXPECT_EQ(signed_zero, (std::vector<float>{0, 0, 0.5f, 0.5f}));
}

TEST(ProcessLogits, RepetitionPenaltyAndDraftHistory) {
  ProcessParams params;
  params.repetition_penalty = 2.0f;
  // prev = {0, 1, -1, 7}: 0 (2 -> 1) and 1 (-1 -> -2) penalised, -1 and 7 ignored; position 1
  // also sees draft token 2 (0.5 -> 0.25).
  std::vector<int64_t> draft = {2};
  std::vector<float> out = process({2, -1, 0.5f, 2, -1, 0.5f}, 2, 3, params, {0, 1, -1, 7}, &draft);
  EXPECT_EQ(out, (std::vector<float>{1, -2, 0.5f, 1, -2, 0.25f}));
}

TEST(ProcessLogits, BadLogitsReportStatus) {
  ProcessParams params;
  params.do_sample = true;
  int32_t status = 0;
  process({0, std::nanf(""), 1}, 1, 3, params, {}, nullptr, &status);
  EXPECT_EQ(status, kNanLogits);
  process({0, std::numeric_limits<float>::infinity(), 1}, 1, 3, params, {}, nullptr, &status);
  EXPECT_EQ(status, kPosInfLogits);
  const float ninf = -std::numeric_limits<float>::infinity();
  process({ninf, ninf}, 1, 2, params, {}, nullptr, &status);
  EXPECT_EQ(status, kNoFiniteLogits);
}

TEST(FusedVerify, GreedyUsesPenalisedArgmaxWithDraftHistory) {
  // Position 1 sees draft token 1 and divides its logit 4 by 4 -> 1 < 2: target token 2.
  ProcessParams params;
  params.repetition_penalty = 4.0f;
  const std::vector<float> logits = {1, 4, 2, 1, 4, 2};
  Result r = fused(logits, {1}, nullptr, {}, nullptr, 3, params);
  EXPECT_EQ(r.status, kStatusOk);
  EXPECT_EQ(r.out, (std::vector<int64_t>{1, 2}));
}

TEST(FusedVerify, SampleEqualsProcessThenVerify) {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<double> uniform;
  const int64_t V = 1000, gamma = 4;
  ProcessParams params;
  params.do_sample = true;
  params.temperature = 0.8f;
  params.top_k = 100;
  params.top_p = 0.9;
  params.repetition_penalty = 1.2f;
  for (int trial = 0; trial < 20; ++trial) {
    std::vector<float> logits((gamma + 1) * V);
    for (auto& x : logits) x = normal(rng) * 2;
    std::vector<float> q_logits(logits.begin(), logits.begin() + gamma * V);
    for (auto& x : q_logits) x += normal(rng) * 0.3f;
    const std::vector<int64_t> prev = {5, 17, 999};
    std::vector<float> q = process(q_logits, gamma, V, params, prev);
    std::vector<int64_t> draft(gamma);
    for (int64_t i = 0; i < gamma; ++i) {  // sample the drafts from q
      double c = 0, target = uniform(rng);
      draft[i] = V - 1;
      for (int64_t v = 0; v < V; ++v)
        if ((c += q[i * V + v]) > target) {
          draft[i] = v;
          break;
        }
    }
    std::vector<float> p = process(logits, gamma + 1, V, params, prev, &draft);
    std::vector<double> u(gamma + 1);
    for (auto& x : u) x = uniform(rng);
    Result f = fused(logits, draft, &q, prev, &u, V, params);
    Result s = sample(p, &q, draft, u, V);
    ASSERT_EQ(f.status, kStatusOk);
    EXPECT_EQ(f.out, s.out);
    EXPECT_EQ(f.accepted, s.accepted);
  }
}

TEST(FusedVerify, GammaZeroIsOneAutoregressiveToken) {
  ProcessParams params;
  Result r = fused({0.1f, 3.0f, -1.0f}, {}, nullptr, {}, nullptr, 3, params);
  EXPECT_EQ(r.out, (std::vector<int64_t>{1}));
  EXPECT_EQ(r.accepted, 0);
  params.do_sample = true;
  params.top_k = 1;
  std::vector<double> u = {0.99};
  EXPECT_EQ(fused({0.1f, 3.0f, -1.0f}, {}, nullptr, {}, &u, 3, params).out, (std::vector<int64_t>{1}));
}
