// Speculative-decoding verification and logits processing: framework-agnostic CPU core.
//
// Raw-pointer, row-at-a-time functions (the caller parallelises over rows). Every row function
// returns a status bit set (0 = ok) instead of throwing, so bad input never crashes the process;
// the torch layer (csrc/torch/verify_ops.cpp) turns it into an error with describe_status().
//
// The maths (Leviathan et al. 2023), for draft i with target p_i and draft q_i:
//   accept d_i  iff  u_i * q_i(d_i) < p_i(d_i)          i.e. with probability min(1, p/q)
//   first rejection at i: recovered ~ norm(max(0, p_i - q_i));  all accepted: bonus ~ p_γ
// u[γ] draws that token by an inverse-CDF scan in index order with a float64 running sum
// (first index whose running sum exceeds u * total); zero residual mass falls back to p.
//
// Processing (HF order): repetition penalty -> temperature -> top-k -> top-p -> softmax.
//   penalty (float32, seen ids only): x < 0 ? x * penalty : x / penalty
//   temperature (float32): x / temperature
//   top-k: drop x < (k-th largest x), ties with the k-th kept
//   top-p: order tokens ascending by (x, index); drop a token when the mass of the tokens after
//          it is >= top_p (HF: ascending cumsum <= 1 - top_p); the largest token is always kept.
//   probabilities in float64: exp(x - max) / sum over the kept tokens.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace fastspec {

// Per-row status bits (0 = ok).
enum VerifyStatus : int32_t {
  kStatusOk = 0,
  kBadDraftToken = 1 << 0,        // a draft token id outside [0, V)
  kBadTargetProbs = 1 << 1,       // NaN, inf or negative target probability
  kTargetNotNormalized = 1 << 2,  // a target probability row does not sum to 1
  kBadDraftProbs = 1 << 3,        // NaN, inf or negative draft probability
  kDraftNotNormalized = 1 << 4,   // a draft probability row does not sum to 1
  kNanLogits = 1 << 5,            // NaN logit
  kPosInfLogits = 1 << 6,         // +inf logit while sampling
  kNoFiniteLogits = 1 << 7,       // every logit of a row is -inf while sampling
};

// Human-readable description of the lowest set bit of `status` ("ok" for 0).
const char* describe_status(int32_t status);

struct ProcessParams {
  bool do_sample = false;
  float temperature = 1.0f;        // > 0 when do_sample; ignored for greedy
  int64_t top_k = 0;               // 0 or >= V: off
  double top_p = 1.0;              // (0, 1]; 1: off
  float repetition_penalty = 1.0f; // > 0; 1: off
};

// Scratch buffers for one worker; reuse across rows (ensure() only grows them).
struct VerifyWorkspace {
  std::vector<float> values;      // [V] processed logits of the current position
  std::vector<double> weights;    // [V] exp(x - max) of the kept tokens, 0 elsewhere
  std::vector<float> select;      // top-k selection scratch
  std::vector<double> histogram;  // top-p mass histogram
  std::vector<std::pair<uint64_t, double>> bucket;  // top-p boundary bucket
  void ensure(int64_t vocab);
};

// Order-preserving keys: float -> uint32, and (value, index) -> uint64 (HF's stable ascending order).
inline uint32_t float_order_key(float x) {
  x = x == 0.0f ? 0.0f : x;  // -0 == +0, as torch.sort compares them
  uint32_t bits;
  static_assert(sizeof(bits) == sizeof(x), "float must be 32-bit");
  __builtin_memcpy(&bits, &x, sizeof(bits));
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Greedy verification of one row: target token = first maximal index of logits[i].
//   logits [γ+1, V], draft [γ] -> out [γ+1] (−1 padded), *num_accepted.
// Reads positions 0..num_accepted only (early exit at the first mismatch).
int32_t verify_greedy_row(const float* logits, const int64_t* draft, int64_t gamma, int64_t vocab, int64_t* out,
                          int64_t* num_accepted);

// Speculative-sampling verification of one row.
//   p [γ+1, V], q [γ, V] or nullptr (deterministic drafter: one-hot at the draft), draft [γ],
//   u [γ+1] uniforms in [0,1) -> out [γ+1] (−1 padded), *num_accepted.
// Validates every row of p and q (finite, >= 0, |Σ − 1| <= *_sum_tolerance) before deciding.
int32_t verify_sample_row(const float* p, const float* q, const int64_t* draft, const double* u, int64_t gamma,
                          int64_t vocab, double p_sum_tolerance, double q_sum_tolerance, int64_t* out,
                          int64_t* num_accepted);

// Processing of one row of K positions: logits [K, V]; prev [L] (ids outside [0,V) ignored);
// draft [K-1] or nullptr (position k also sees draft[0..k)). Writes out [K, V]: float32
// probabilities when params.do_sample, else the penalised logits.
int32_t process_logits_row(const float* logits, const int64_t* prev, int64_t prev_len, const int64_t* draft,
                           int64_t positions, int64_t vocab, const ProcessParams& params, VerifyWorkspace& ws,
                           float* out);

// Fused processing + verification of one row, without materialising probabilities for the row:
//   logits [γ+1, V], draft [γ], q [γ, V] or nullptr, prev [L], u [γ+1] (sampling only)
//   -> out [γ+1] (−1 padded), *num_accepted.
// Position i sees prev ∪ draft[0..i). Greedy: argmax of the penalised logits. Sampling: as
// verify_sample_row on the processed p. Positions after the first rejection are not read; q rows
// are validated where read (q_i(d_i) for each decided draft, the whole row at the rejection).
int32_t fused_verify_row(const float* logits, const int64_t* draft, const float* q, const int64_t* prev,
                         int64_t prev_len, const double* u, int64_t gamma, int64_t vocab,
                         const ProcessParams& params, double q_sum_tolerance, VerifyWorkspace& ws, int64_t* out,
                         int64_t* num_accepted);

}  // namespace fastspec
