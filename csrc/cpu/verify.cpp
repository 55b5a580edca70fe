// Verification and logits processing, CPU core (see csrc/include/fastspec/verify.h). No torch.
#include "fastspec/verify.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>

namespace fastspec {

namespace {

constexpr int64_t kTopPBins = 2560;         // top-p mass histogram: 40 nats below the max ...
constexpr double kTopPBinsPerNat = 64.0;     // ... in bins of 1/64 nat (the last bin takes the rest)
constexpr size_t kHeapTopK = 256;  // top-k: a size-k heap up to here, nth_element beyond

inline uint64_t value_index_key(float x, int64_t index) {
  return (uint64_t(float_order_key(x)) << 32) | uint64_t(uint32_t(index));
}

// Hot loops are compiled for AVX-512 / AVX2+FMA / baseline and picked at load time (GCC ifunc);
// vector ISAs may fuse multiply-adds, which changes probabilities by an ulp or so, never tokens
// except at exact float64 ties.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define FASTSPEC_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTSPEC_MULTIVERSION
#endif

// exp(x) for x <= 0 in float64, branch-free so the loops around it vectorise. Range reduction
// x = n ln2 + r, |r| <= ln2/2, then a degree-13 Taylor polynomial: relative error ~1e-16,
// i.e. equal to libm/Sleef up to a few ulps. x < -708 gives 0 (subnormal results dropped).
inline double exp_nonpositive(double x) {
  const double kLog2e = 1.4426950408889634;
  const double kLn2Hi = 6.93147180369123816490e-01;
  const double kLn2Lo = 1.90821492927058770002e-10;
  const double kRound = 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to an integer
  const bool underflow = x < -708.0;
  x = underflow ? 0.0 : x;
  double shifted = x * kLog2e + kRound;
  double n = shifted - kRound;
  double r = (x - n * kLn2Hi) - n * kLn2Lo;
  double poly = 1.0 / 6227020800.0;  // 1/13!
  poly = poly * r + 1.0 / 479001600.0;
  poly = poly * r + 1.0 / 39916800.0;
  poly = poly * r + 1.0 / 3628800.0;
  poly = poly * r + 1.0 / 362880.0;
  poly = poly * r + 1.0 / 40320.0;
  poly = poly * r + 1.0 / 5040.0;
  poly = poly * r + 1.0 / 720.0;
  poly = poly * r + 1.0 / 120.0;
  poly = poly * r + 1.0 / 24.0;
  poly = poly * r + 1.0 / 6.0;
  poly = poly * r + 0.5;
  poly = poly * r + 1.0;
  poly = poly * r + 1.0;
  int64_t n_bits;
  std::memcpy(&n_bits, &shifted, sizeof(n_bits));
  int64_t scale_bits = (n_bits - int64_t(0x4338000000000000LL) + 1023) << 52;  // 2^n
  double scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  return underflow ? 0.0 : poly * scale;
}

// y = x / temperature (float32, as HF); the penalty is applied afterwards at the seen ids.
FASTSPEC_MULTIVERSION
void scale_values(const float* x, float temperature, int64_t n, float* y) {
  if (temperature != 1.0f) {
    for (int64_t v = 0; v < n; ++v) y[v] = x[v] / temperature;
  } else if (y != x) {
    std::memcpy(y, x, size_t(n) * sizeof(float));
  }
}

// max of y with NaN / +inf flags; independent lanes so the loop vectorises.
FASTSPEC_MULTIVERSION
float max_and_flags(const float* y, int64_t n, int* nan, int* posinf) {
  constexpr int kLanes = 16;
  const float inf = std::numeric_limits<float>::infinity();
  float lane_max[kLanes];
  int lane_nan[kLanes], lane_inf[kLanes];
  for (int l = 0; l < kLanes; ++l) lane_max[l] = -inf, lane_nan[l] = 0, lane_inf[l] = 0;
  int64_t v = 0;
  for (; v + kLanes <= n; v += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float a = y[v + l];
      lane_nan[l] |= a != a;
      lane_inf[l] |= a == inf;
      lane_max[l] = a > lane_max[l] ? a : lane_max[l];
    }
  float best = -inf;
  int any_nan = 0, any_inf = 0;
  for (int l = 0; l < kLanes; ++l) {
    best = lane_max[l] > best ? lane_max[l] : best;
    any_nan |= lane_nan[l];
    any_inf |= lane_inf[l];
  }
  for (; v < n; ++v) {
    any_nan |= y[v] != y[v];
    any_inf |= y[v] == inf;
    best = y[v] > best ? y[v] : best;
  }
  *nan = any_nan;
  *posinf = any_inf;
  return best;
}

// w = exp(y - max) in float64, returns Σw (independent lanes: vectorises).
FASTSPEC_MULTIVERSION
double exp_weights(const float* y, int64_t n, double max_value, double* w) {
  for (int64_t v = 0; v < n; ++v) w[v] = exp_nonpositive(double(y[v]) - max_value);
  constexpr int kLanes = 8;
  double lane[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t v = 0;
  for (; v + kLanes <= n; v += kLanes)
    for (int l = 0; l < kLanes; ++l) lane[l] += w[v + l];
  double sum = 0.0;
  for (int l = 0; l < kLanes; ++l) sum += lane[l];
  for (; v < n; ++v) sum += w[v];
  return sum;
}

inline void write_output(const int64_t* draft, int64_t gamma, int64_t accepted, int64_t final_token, int64_t* out,
                         int64_t* num_accepted) {
  for (int64_t i = 0; i < accepted; ++i) out[i] = draft[i];
  out[accepted] = final_token;
  for (int64_t i = accepted + 1; i <= gamma; ++i) out[i] = -1;
  *num_accepted = accepted;
}

inline int32_t check_draft_tokens(const int64_t* draft, int64_t gamma, int64_t vocab) {
  for (int64_t i = 0; i < gamma; ++i)
    if (draft[i] < 0 || draft[i] >= vocab) return kBadDraftToken;
  return kStatusOk;
}

// A probability row: finite, >= 0, sums to 1 within tolerance (independent lanes: vectorises).
FASTSPEC_MULTIVERSION
int32_t check_prob_row(const float* row, int64_t vocab, double tolerance, int32_t bad_bit, int32_t sum_bit) {
  constexpr int kLanes = 8;
  const float largest = std::numeric_limits<float>::max();
  double lane_sum[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int lane_bad[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t v = 0;
  for (; v + kLanes <= vocab; v += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float x = row[v + l];
      lane_bad[l] |= !(x >= 0.0f && x <= largest);  // NaN, inf, negative
      lane_sum[l] += double(x);
    }
  double sum = 0.0;
  int bad = 0;
  for (int l = 0; l < kLanes; ++l) sum += lane_sum[l], bad |= lane_bad[l];
  for (; v < vocab; ++v) {
    bad |= !(row[v] >= 0.0f && row[v] <= largest);
    sum += double(row[v]);
  }
  if (bad) return bad_bit;
  if (std::fabs(sum - 1.0) > tolerance) return sum_bit;
  return kStatusOk;
}

// w /= norm (the probabilities of the processed position).
FASTSPEC_MULTIVERSION
void normalize(double* w, int64_t n, double norm) {
  for (int64_t v = 0; v < n; ++v) w[v] = w[v] / norm;
}

// First index whose float64 running sum (index order) exceeds u * total; -1 if total is 0.
// u * total may round up to total for u within 2^-53 of 1: then the last positive weight.
// One sequential pass stores the running sums; a binary search then finds the index.
template <class Weight>
int64_t inverse_cdf(int64_t vocab, double u, const Weight& weight) {
  static thread_local std::vector<double> cdf;
  if (int64_t(cdf.size()) < vocab) cdf.resize(size_t(vocab));
  double running = 0.0;
  int64_t last_positive = -1;
  for (int64_t v = 0; v < vocab; ++v) {
    const double w = weight(v);
    if (w > 0.0) last_positive = v;
    running += w;
    cdf[v] = running;
  }
  if (!(running > 0.0)) return -1;
  const double target = u * running;
  const int64_t index = std::upper_bound(cdf.begin(), cdf.begin() + vocab, target) - cdf.begin();
  return index < vocab ? index : last_positive;
}

// The recovered/bonus token: norm(max(0, p - q)) with p = prob(v), q = draft_prob(v), falling
// back to p when the residual has no mass.
template <class Prob, class DraftProb>
int64_t sample_residual(int64_t vocab, double u, const Prob& prob, const DraftProb& draft_prob) {
  int64_t token = inverse_cdf(vocab, u, [&](int64_t v) {
    double r = prob(v) - draft_prob(v);
    return r > 0.0 ? r : 0.0;
  });
  if (token < 0) token = inverse_cdf(vocab, u, prob);
  return token < 0 ? 0 : token;
}

// The token after `accepted` drafts: the bonus from p when all γ were accepted, else the
// recovered token from norm(max(0, p - q)) with q one-hot at the draft (q == nullptr) or q's row.
template <class Prob>
int64_t sample_after_accepted(int64_t accepted, int64_t gamma, int64_t vocab, double u, const Prob& prob,
                              const int64_t* draft, const float* q) {
  if (accepted == gamma) return sample_residual(vocab, u, prob, [](int64_t) { return 0.0; });
  if (q == nullptr) {
    const int64_t d = draft[accepted];
    return sample_residual(vocab, u, prob, [d](int64_t v) { return v == d ? 1.0 : 0.0; });
  }
  const float* q_row = q + accepted * vocab;
  return sample_residual(vocab, u, prob, [q_row](int64_t v) { return double(q_row[v]); });
}

inline float penalize(float x, float penalty) { return x < 0.0f ? x * penalty : x / penalty; }

// The ids a position has seen for the repetition penalty: prev (ids outside [0,V) ignored) and
// the drafts before it. Penalising y[t] from the raw logit is idempotent, so repeats are harmless
// and no V-sized membership table is needed.
struct SeenTokens {
  const int64_t* prev = nullptr;
  int64_t prev_len = 0;
  const int64_t* draft = nullptr;
  int64_t num_draft = 0;
  float penalty = 1.0f;
  bool active() const { return penalty != 1.0f; }

  // y[t] = penalize(x[t]) / temperature at every seen id t.
  void apply(const float* x, float temperature, int64_t vocab, float* y) const {
    auto one = [&](int64_t t) {
      const float p = penalize(x[t], penalty);
      y[t] = temperature != 1.0f ? p / temperature : p;
    };
    for (int64_t j = 0; j < prev_len; ++j)
      if (prev[j] >= 0 && prev[j] < vocab) one(prev[j]);
    for (int64_t j = 0; j < num_draft; ++j) one(draft[j]);
  }
};

// Greedy target token of one position: first maximal index of the penalised logits.
int32_t greedy_position(const float* logits, const SeenTokens& seen, int64_t vocab, VerifyWorkspace& ws,
                        int64_t* token) {
  const float* x = logits;
  if (seen.active()) {
    float* y = ws.values.data();
    std::memcpy(y, logits, size_t(vocab) * sizeof(float));
    seen.apply(logits, 1.0f, vocab, y);
    x = y;
  }
  int nan = 0, posinf = 0;
  const float best = max_and_flags(x, vocab, &nan, &posinf);
  if (nan) return kNanLogits;
  // The first index holding the max (all -inf: index 0, as torch.argmax).
  *token = 0;
  for (int64_t v = 0; v < vocab; ++v)
    if (x[v] == best) {
      *token = v;
      break;
    }
  return kStatusOk;
}

// k-th largest of values[0..vocab) (counting ties), 1 <= k < vocab.
float kth_largest(const float* values, int64_t vocab, int64_t k, VerifyWorkspace& ws) {
  std::vector<float>& s = ws.select;
  if (size_t(k) <= kHeapTopK) {
    // min-heap of the k largest seen so far; its top is the k-th largest.
    s.assign(values, values + k);
    std::make_heap(s.begin(), s.end(), std::greater<float>());
    float top = s.front();
    for (int64_t v = k; v < vocab; ++v) {
      if (values[v] > top) {
        std::pop_heap(s.begin(), s.end(), std::greater<float>());
        s.back() = values[v];
        std::push_heap(s.begin(), s.end(), std::greater<float>());
        top = s.front();
      }
    }
    return top;
  }
  s.assign(values, values + vocab);
  std::nth_element(s.begin(), s.begin() + (k - 1), s.end(), std::greater<float>());
  return s[k - 1];
}

// Processed probabilities of one position, unnormalised: fills ws.values with the processed
// logits and ws.weights with exp(x - max) of the kept tokens (0 elsewhere); *norm = Σ weights.
int32_t sample_position(const float* logits, const SeenTokens& seen, int64_t vocab, const ProcessParams& params,
                        VerifyWorkspace& ws, double* norm) {
  float* y = ws.values.data();
  double* w = ws.weights.data();
  const float inf = std::numeric_limits<float>::infinity();
  // Pass 1: penalty, temperature (float32, as HF); max, NaN / +inf flags.
  scale_values(logits, params.temperature, vocab, y);
  if (seen.active()) seen.apply(logits, params.temperature, vocab, y);
  int nan = 0, posinf = 0;
  const float best = max_and_flags(y, vocab, &nan, &posinf);
  if (nan) return kNanLogits;
  if (posinf) return kPosInfLogits;
  if (best == -inf) return kNoFiniteLogits;
  // Pass 2: float64 weights exp(y - max) of the tokens kept by top-k (ties with the k-th kept).
  const double max_value = best;
  double sum = 0.0;
  if (params.top_k > 0 && params.top_k < vocab) {
    const float kth = kth_largest(y, vocab, params.top_k, ws);
    for (int64_t v = 0; v < vocab; ++v) {  // few survive: exp only for them
      const double e = y[v] >= kth ? exp_nonpositive(double(y[v]) - max_value) : 0.0;
      w[v] = e;
      sum += e;
    }
  } else {
    sum = exp_weights(y, vocab, max_value, w);
  }
  if (params.top_p < 1.0) {
    // Keep a token iff the mass of the tokens above it in (value, index) order is < top_p * Σ.
    // A mass histogram over value bins 1/64 nat wide below the max finds the boundary bin
    // (bins are monotone in the value, so whole bins lie above or below the boundary); its few
    // members are then sorted by (value, index) and walked.
    const double target = params.top_p * sum;
    auto bin_of = [max_value](float x) {
      const double distance = (max_value - double(x)) * kTopPBinsPerNat;
      return distance < double(kTopPBins - 1) ? int64_t(distance) : int64_t(kTopPBins - 1);
    };
    std::vector<double>& hist = ws.histogram;
    std::fill(hist.begin(), hist.end(), 0.0);
    for (int64_t v = 0; v < vocab; ++v)
      if (w[v] > 0.0) hist[bin_of(y[v])] += w[v];
    double above = 0.0;
    int64_t boundary = -1;
    for (int64_t b = 0; b < kTopPBins; ++b) {
      if (hist[b] > 0.0 && above + hist[b] >= target) {
        boundary = b;
        break;
      }
      above += hist[b];
    }
    if (boundary >= 0) {
      auto& bucket = ws.bucket;
      bucket.clear();
      for (int64_t v = 0; v < vocab; ++v)
        if (w[v] > 0.0 && bin_of(y[v]) == boundary) bucket.emplace_back(value_index_key(y[v], v), w[v]);
      std::sort(bucket.begin(), bucket.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
      uint64_t threshold = bucket.back().first;
      for (const auto& member : bucket) {
        if (above + member.second >= target) {
          threshold = member.first;
          break;
        }
        above += member.second;
      }
      const int64_t threshold_index = int64_t(threshold & 0xffffffffu);
      const float threshold_value = y[threshold_index];
      sum = 0.0;
      for (int64_t v = 0; v < vocab; ++v) {
        const bool keep = y[v] > threshold_value || (y[v] == threshold_value && v >= threshold_index);
        w[v] = keep ? w[v] : 0.0;
        sum += w[v];
      }
    }
  }
  *norm = sum;
  return kStatusOk;
}

}  // namespace

void VerifyWorkspace::ensure(int64_t vocab) {
  if (int64_t(values.size()) < vocab) {
    values.resize(vocab);
    weights.resize(vocab);
  }
  histogram.resize(size_t(kTopPBins));
}

const char* describe_status(int32_t status) {
  if (status == kStatusOk) return "ok";
  if (status & kBadDraftToken) return "draft token id outside [0, V)";
  if (status & kBadTargetProbs) return "target probabilities hold NaN, inf or negative values";
  if (status & kTargetNotNormalized) return "target probability rows must sum to 1";
  if (status & kBadDraftProbs) return "draft probabilities hold NaN, inf or negative values";
  if (status & kDraftNotNormalized) return "draft probability rows must sum to 1";
  if (status & kNanLogits) return "logits hold NaN";
  if (status & kPosInfLogits) return "logits hold +inf, which has no probability under softmax";
  if (status & kNoFiniteLogits) return "a row of logits is entirely -inf";
  return "unknown error";
}

int32_t verify_greedy_row(const float* logits, const int64_t* draft, int64_t gamma, int64_t vocab, int64_t* out,
                          int64_t* num_accepted) {
  if (int32_t s = check_draft_tokens(draft, gamma, vocab)) return s;
  VerifyWorkspace unused;  // greedy without penalty needs no scratch
  int64_t i = 0, token = 0;
  for (;; ++i) {
    if (int32_t s = greedy_position(logits + i * vocab, SeenTokens(), vocab, unused, &token)) return s;
    if (i == gamma || token != draft[i]) break;
  }
  write_output(draft, gamma, i, token, out, num_accepted);
  return kStatusOk;
}

int32_t verify_sample_row(const float* p, const float* q, const int64_t* draft, const double* u, int64_t gamma,
                          int64_t vocab, double p_sum_tolerance, double q_sum_tolerance, int64_t* out,
                          int64_t* num_accepted) {
  if (int32_t s = check_draft_tokens(draft, gamma, vocab)) return s;
  for (int64_t i = 0; i <= gamma; ++i)
    if (int32_t s = check_prob_row(p + i * vocab, vocab, p_sum_tolerance, kBadTargetProbs, kTargetNotNormalized))
      return s;
  if (q != nullptr)
    for (int64_t i = 0; i < gamma; ++i)
      if (int32_t s = check_prob_row(q + i * vocab, vocab, q_sum_tolerance, kBadDraftProbs, kDraftNotNormalized))
        return s;
  int64_t accepted = 0;
  for (; accepted < gamma; ++accepted) {
    const int64_t d = draft[accepted];
    const double p_d = p[accepted * vocab + d];
    const double q_d = q == nullptr ? 1.0 : double(q[accepted * vocab + d]);
    if (!(u[accepted] * q_d < p_d)) break;
  }
  const float* p_row = p + accepted * vocab;
  auto prob = [&](int64_t v) { return double(p_row[v]); };
  const int64_t token = sample_after_accepted(accepted, gamma, vocab, u[gamma], prob, draft, q);
  write_output(draft, gamma, accepted, token, out, num_accepted);
  return kStatusOk;
}

int32_t process_logits_row(const float* logits, const int64_t* prev, int64_t prev_len, const int64_t* draft,
                           int64_t positions, int64_t vocab, const ProcessParams& params, VerifyWorkspace& ws,
                           float* out) {
  ws.ensure(vocab);
  if (draft != nullptr)
    if (int32_t s = check_draft_tokens(draft, positions - 1, vocab)) return s;
  SeenTokens seen{prev, prev_len, draft, 0, params.repetition_penalty};
  for (int64_t i = 0; i < positions; ++i) {
    seen.num_draft = draft != nullptr ? i : 0;  // position i also sees draft[0..i)
    const float* x = logits + i * vocab;
    float* o = out + i * vocab;
    if (!params.do_sample) {
      std::memcpy(o, x, size_t(vocab) * sizeof(float));
      if (seen.active()) seen.apply(x, 1.0f, vocab, o);
      int nan = 0, posinf = 0;
      max_and_flags(o, vocab, &nan, &posinf);
      if (nan) return kNanLogits;
      continue;
    }
    double norm = 0.0;
    if (int32_t s = sample_position(x, seen, vocab, params, ws, &norm)) return s;
    const double* w = ws.weights.data();
    for (int64_t v = 0; v < vocab; ++v) o[v] = float(w[v] / norm);
  }
  return kStatusOk;
}

int32_t fused_verify_row(const float* logits, const int64_t* draft, const float* q, const int64_t* prev,
                         int64_t prev_len, const double* u, int64_t gamma, int64_t vocab,
                         const ProcessParams& params, double q_sum_tolerance, VerifyWorkspace& ws, int64_t* out,
                         int64_t* num_accepted) {
  ws.ensure(vocab);
  if (int32_t s = check_draft_tokens(draft, gamma, vocab)) return s;
  SeenTokens seen{prev, prev_len, draft, 0, params.repetition_penalty};
  if (!params.do_sample) {
    int64_t i = 0, token = 0;
    for (;; ++i) {
      seen.num_draft = i;  // position i also sees draft[0..i)
      if (int32_t s = greedy_position(logits + i * vocab, seen, vocab, ws, &token)) return s;
      if (i == gamma || token != draft[i]) break;
    }
    write_output(draft, gamma, i, token, out, num_accepted);
    return kStatusOk;
  }
  int64_t accepted = 0;
  double norm = 0.0;
  for (;; ++accepted) {
    seen.num_draft = accepted;
    if (int32_t s = sample_position(logits + accepted * vocab, seen, vocab, params, ws, &norm)) return s;
    if (accepted == gamma) break;
    const int64_t d = draft[accepted];
    const double p_d = ws.weights[d] / norm;
    double q_d = 1.0;
    if (q != nullptr) {
      const float q_value = q[accepted * vocab + d];
      if (!(q_value >= 0.0f && q_value <= std::numeric_limits<float>::max())) return kBadDraftProbs;
      q_d = q_value;
    }
    if (!(u[accepted] * q_d < p_d)) break;
  }
  double* w = ws.weights.data();
  normalize(w, vocab, norm);
  auto prob = [w](int64_t v) { return w[v]; };
  if (accepted < gamma && q != nullptr) {  // the rejected position's q is read in full: check it first
    if (int32_t s = check_prob_row(q + accepted * vocab, vocab, q_sum_tolerance, kBadDraftProbs, kDraftNotNormalized))
      return s;
  }
  const int64_t token = sample_after_accepted(accepted, gamma, vocab, u[gamma], prob, draft, q);
  write_output(draft, gamma, accepted, token, out, num_accepted);
  return kStatusOk;
}

}  // namespace fastspec
