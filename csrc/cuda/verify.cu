// CUDA kernels for verification and logits processing (launchers: fastspec/verify_cuda.h).
// No torch: compiles alone with `nvcc -std=c++17 -Icsrc/include -c csrc/cuda/verify.cu`.
//
// Two shapes (same tokens): one thread block per row, below; or, for small batches, the split
// path in verify_split.cuh (each row position's vocabulary across several blocks). One block
// per row: threads stride over V with coalesced loads. Per position:
//   pass 1  penalty + temperature -> values, block max (+ NaN/+inf flags)
//   top-k   radix select (4 x 8-bit digits, shared counts) of the k-th largest order key
//   pass 2  float64 weights exp(x - max) of the kept tokens, block sum
//   top-p   radix select by mass (4 x 8-bit digits, shared float64 histograms), ties by index
//   accept  u * q(d) < p(d) (thread 0), and at the end the residual inverse CDF as a chunked
//           block scan in index order.
// Maths (Leviathan et al. 2023): accept d_i iff u_i q_i(d_i) < p_i(d_i); at the first rejection
// draw from norm(max(0, p_i - q_i)); if all γ are accepted draw the bonus from p_γ.
#ifndef FASTSPEC_CUDA_EMULATION  // csrc/tests/test_verify_cuda_emulation.cpp runs these kernels on the host
#include <cuda_runtime.h>
// The emulation defines these three itself.
#define FASTSPEC_LAUNCH(kernel, blocks, stream, ...) \
  kernel<<<unsigned(blocks), kThreads, 0, stream>>>(__VA_ARGS__)
#define FASTSPEC_MEMSET_ASYNC(ptr, bytes, stream) cudaMemsetAsync((ptr), 0, (bytes), (stream))
#define FASTSPEC_LAST_ERROR() cudaGetLastError()
#endif

#include <cfloat>
#include <cstdint>

#include "fastspec/verify_cuda.h"

namespace fastspec {
namespace cuda {
namespace {

#ifndef FASTSPEC_VERIFY_THREADS
#define FASTSPEC_VERIFY_THREADS 512
#endif
constexpr int kThreads = FASTSPEC_VERIFY_THREADS;
constexpr int kWarps = kThreads / 32;
constexpr int kScanItems = 4;

#ifdef __CUDACC__
#define FASTSPEC_UNROLL _Pragma("unroll")
#else
#define FASTSPEC_UNROLL
#endif  // elements per thread per chunk of the inverse-CDF scan

__device__ __forceinline__ uint32_t order_key(float x) {
  x = x == 0.0f ? 0.0f : x;  // -0 == +0
  const uint32_t bits = __float_as_uint(x);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// The float value of an order key (inverse of order_key).
__device__ __forceinline__ float key_value(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// IEEE round-to-nearest float32 ops, whatever --use_fast_math says: must equal the CPU and HF.
__device__ __forceinline__ float penalize(float x, float penalty) {
  return x < 0.0f ? __fmul_rn(x, penalty) : __fdiv_rn(x, penalty);
}

// --------------------------------------------------------------------------------- block helpers
struct Shared {
  double reduce[kWarps];
  float reduce_f[kWarps];
  int64_t reduce_i[kWarps];
  unsigned int counts[256];
  double mass[256];
  // broadcast slots
  double scalar_d;
  float scalar_f;
  int64_t scalar_i;
  uint32_t prefix;
  int flag;
};

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ double block_sum(double v, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) sh.reduce[warp] = v;
  __syncthreads();
  if (warp == 0) {
    double w = lane < kWarps ? sh.reduce[lane] : 0.0;
    w = warp_sum(w);
    if (lane == 0) sh.scalar_d = w;
  }
  __syncthreads();
  const double r = sh.scalar_d;
  __syncthreads();
  return r;
}

__device__ float block_max(float v, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  if (lane == 0) sh.reduce_f[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float w = lane < kWarps ? sh.reduce_f[lane] : -INFINITY;
    for (int o = 16; o > 0; o >>= 1) w = fmaxf(w, __shfl_xor_sync(0xffffffffu, w, o));
    if (lane == 0) sh.scalar_f = w;
  }
  __syncthreads();
  const float r = sh.scalar_f;
  __syncthreads();
  return r;
}

// min over the block of an int64 (used for "first index such that ...").
__device__ int64_t block_min_index(int64_t v, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 16; o > 0; o >>= 1) {
    const long long other = __shfl_xor_sync(0xffffffffu, (long long)v, o);
    v = other < v ? other : v;
  }
  if (lane == 0) sh.reduce_i[warp] = v;
  __syncthreads();
  if (warp == 0) {
    long long w = lane < kWarps ? sh.reduce_i[lane] : INT64_MAX;
    for (int o = 16; o > 0; o >>= 1) {
      const long long other = __shfl_xor_sync(0xffffffffu, w, o);
      w = other < w ? other : w;
    }
    if (lane == 0) sh.scalar_i = w;
  }
  __syncthreads();
  const int64_t r = sh.scalar_i;
  __syncthreads();
  return r;
}

__device__ int64_t block_max_index(int64_t v, Shared& sh) { return -block_min_index(-v, sh); }

// How many of `group` equal-weight members (weight `e` each) a top-p boundary keeps: members join
// while the mass above stays below `target`. Sequential on purpose: the float64 running sum rounds
// exactly like the CPU core's loop. Shared by the one-block and the split paths.
__device__ __forceinline__ int64_t kept_tie_members(double above, double e, double target, int64_t group) {
  double running = above;
  for (int64_t j = 0; j < group; ++j) {
    if (running + e >= target) return j + 1;
    running += e;
  }
  return group;
}

// Exclusive prefix sum over the block (thread order); *total gets the block total.
__device__ double block_exclusive_scan(double v, Shared& sh, double* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  double inclusive = v;
  for (int o = 1; o < 32; o <<= 1) {
    const double up = __shfl_up_sync(0xffffffffu, inclusive, o);
    if (lane >= o) inclusive += up;
  }
  if (lane == 31) sh.reduce[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    double w = lane < kWarps ? sh.reduce[lane] : 0.0;
    double inc = w;
    for (int o = 1; o < 32; o <<= 1) {
      const double up = __shfl_up_sync(0xffffffffu, inc, o);
      if (lane >= o) inc += up;
    }
    if (lane < kWarps) sh.reduce[lane] = inc - w;  // exclusive warp offsets
    if (lane == kWarps - 1) sh.scalar_d = inc;
  }
  __syncthreads();
  const double result = sh.reduce[warp] + inclusive - v;
  *total = sh.scalar_d;
  __syncthreads();
  return result;
}

// ------------------------------------------------------------------------------- row operations
__device__ void write_output(const int64_t* draft, int64_t gamma, int64_t accepted, int64_t token, int64_t* out,
                             int64_t* num_accepted) {
  if (threadIdx.x == 0) {
    for (int64_t i = 0; i <= gamma; ++i) out[i] = i < accepted ? draft[i] : (i == accepted ? token : -1);
    *num_accepted = accepted;
  }
}

__device__ void write_failure(int64_t gamma, int32_t bits, int64_t* out, int64_t* num_accepted, int32_t* status) {
  if (threadIdx.x == 0) {
    for (int64_t i = 0; i <= gamma; ++i) out[i] = -1;
    *num_accepted = 0;
    *status = bits;
  }
}

// Thread 0 checks the draft ids; the result is block-uniform.
__device__ bool drafts_valid(const int64_t* draft, int64_t gamma, int64_t vocab) {
  int bad = 0;
  if (threadIdx.x == 0)
    for (int64_t i = 0; i < gamma; ++i) bad |= draft[i] < 0 || draft[i] >= vocab;
  return !__syncthreads_or(bad);
}

// A probability row: finite, >= 0, |Σ − 1| <= tolerance. Returns 0 or bad_bit / sum_bit.
__device__ int32_t check_prob_row(const float* row, int64_t vocab, double tolerance, int32_t bad_bit,
                                  int32_t sum_bit, Shared& sh) {
  double sum = 0.0;
  int bad = 0;
  for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
    const float x = row[v];
    bad |= !(x >= 0.0f && x <= FLT_MAX);
    sum += double(x);
  }
  if (__syncthreads_or(bad)) return bad_bit;
  sum = block_sum(sum, sh);
  return fabs(sum - 1.0) > tolerance ? sum_bit : 0;
}

// First index whose running sum (index order) of weight(v) exceeds u * total, with the CPU's
// fallbacks (last positive weight; -1 when there is no mass).
template <class Weight>
__device__ int64_t inverse_cdf(int64_t vocab, double u, const Weight& weight, Shared& sh) {
  double local = 0.0;
  int64_t last_positive = -1;
  for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
    const double w = weight(v);
    local += w;
    if (w > 0.0) last_positive = v;
  }
  const double total = block_sum(local, sh);
  last_positive = block_max_index(last_positive, sh);
  if (!(total > 0.0)) return -1;
  const double target = u * total;
  double base = 0.0;
  constexpr int64_t kChunk = int64_t(kThreads) * kScanItems;
  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t first = start + int64_t(threadIdx.x) * kScanItems;
    double items[kScanItems];
    double mine = 0.0;
FASTSPEC_UNROLL
    for (int j = 0; j < kScanItems; ++j) {
      items[j] = first + j < vocab ? weight(first + j) : 0.0;
      mine += items[j];
    }
    double chunk_total;
    double running = base + block_exclusive_scan(mine, sh, &chunk_total);
    int64_t found = INT64_MAX;
FASTSPEC_UNROLL
    for (int j = 0; j < kScanItems; ++j) {
      running += items[j];
      if (found == INT64_MAX && first + j < vocab && running > target) found = first + j;
    }
    found = block_min_index(found, sh);
    if (found != INT64_MAX) return found;
    base += chunk_total;
  }
  return last_positive;
}

template <class Prob, class DraftProb>
__device__ int64_t sample_residual(int64_t vocab, double u, const Prob& prob, const DraftProb& draft_prob,
                                   Shared& sh) {
  int64_t token = inverse_cdf(
      vocab, u,
      [&](int64_t v) {
        const double r = prob(v) - draft_prob(v);
        return r > 0.0 ? r : 0.0;
      },
      sh);
  if (token < 0) token = inverse_cdf(vocab, u, prob, sh);
  return token < 0 ? 0 : token;
}

// Radix select: the k-th largest order key (counting ties) of keys(v) over [0, vocab).
template <class Key>
__device__ uint32_t kth_largest_key(int64_t vocab, int64_t k, const Key& key, Shared& sh) {
  uint32_t prefix = 0, mask = 0;
  int64_t remaining = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += kThreads) sh.counts[b] = 0;
    __syncthreads();
    for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
      const uint32_t kv = key(v);
      if ((kv & mask) == prefix) atomicAdd(&sh.counts[(kv >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t above = 0;
      int chosen = 0;
      for (int b = 255; b >= 0; --b) {
        if (above + sh.counts[b] >= remaining) {
          chosen = b;
          break;
        }
        above += sh.counts[b];
      }
      sh.scalar_i = remaining - above;
      sh.prefix = prefix | (uint32_t(chosen) << shift);
    }
    __syncthreads();
    remaining = sh.scalar_i;
    prefix = sh.prefix;
    mask |= 255u << shift;
    __syncthreads();
  }
  return prefix;
}

// Processes one position for sampling into values/weights; returns status bits (block-uniform)
// and the normaliser of the kept weights in *norm.
__device__ int32_t sample_position(const float* logits, const uint8_t* seen, int64_t vocab,
                                   const ProcessParams& params, float* values, double* weights, Shared& sh,
                                   double* norm) {
  float local_max = -INFINITY;
  int nan = 0, posinf = 0;
  for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
    float x = logits[v];
    if (seen != nullptr && seen[v]) x = penalize(x, params.repetition_penalty);
    if (params.temperature != 1.0f) x = __fdiv_rn(x, params.temperature);
    values[v] = x;
    nan |= x != x;
    posinf |= x == INFINITY;
    local_max = fmaxf(local_max, x);
  }
  if (__syncthreads_or(nan)) return kNanLogits;
  if (__syncthreads_or(posinf)) return kPosInfLogits;
  const float best = block_max(local_max, sh);
  if (best == -INFINITY) return kNoFiniteLogits;
  uint32_t kth_key = 0;
  if (params.top_k > 0 && params.top_k < vocab)
    kth_key = kth_largest_key(vocab, params.top_k, [values](int64_t v) { return order_key(values[v]); }, sh);
  double local = 0.0;
  for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
    const float x = values[v];
    const double e = order_key(x) >= kth_key ? exp(double(x) - double(best)) : 0.0;
    weights[v] = e;
    local += e;
  }
  double sum = block_sum(local, sh);
  if (params.top_p < 1.0) {
    // Keep a token iff the mass above it in (value, index) order is < top_p * sum.
    const double target = params.top_p * sum;
    uint32_t prefix = 0, mask = 0;
    double above = 0.0;
    bool found = true;
    for (int shift = 24; shift >= 0 && found; shift -= 8) {
      for (int b = threadIdx.x; b < 256; b += kThreads) sh.mass[b] = 0.0;
      __syncthreads();
      for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
        const double w = weights[v];
        const uint32_t kv = order_key(values[v]);
        if (w > 0.0 && (kv & mask) == prefix) atomicAdd(&sh.mass[(kv >> shift) & 255u], w);
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        int chosen = -1, lowest = -1;
        for (int b = 255; b >= 0; --b) {
          if (sh.mass[b] > 0.0 && above + sh.mass[b] >= target) {
            chosen = b;
            break;
          }
          if (sh.mass[b] > 0.0) lowest = b;
          above += sh.mass[b];
        }
        if (chosen < 0 && shift != 24 && lowest >= 0) {
          // the bucket chosen one level up re-summed to just under target: take its last digit
          chosen = lowest;
          above -= sh.mass[lowest];
        }
        sh.flag = chosen >= 0;
        sh.prefix = prefix | (uint32_t(chosen < 0 ? 0 : chosen) << shift);
        sh.scalar_d = above;
      }
      __syncthreads();
      found = sh.flag;
      prefix = sh.prefix;
      above = sh.scalar_d;
      mask |= 255u << shift;
      __syncthreads();
    }
    if (found) {
      // The boundary tie group (order key == prefix): all members weigh the same; keep the
      // highest indices while the mass above stays < target (HF's stable ascending order).
      double count_local = 0.0;
      for (int64_t v = threadIdx.x; v < vocab; v += kThreads)
        count_local += (weights[v] > 0.0 && order_key(values[v]) == prefix) ? 1.0 : 0.0;
      const int64_t group = int64_t(block_sum(count_local, sh));
      const double e = exp(double(key_value(prefix)) - double(best));  // bitwise the members' weight
      if (threadIdx.x == 0) sh.scalar_i = kept_tie_members(above, e, target, group);
      __syncthreads();
      const int64_t kept = sh.scalar_i;
      __syncthreads();
      int64_t index_threshold = 0;  // keep members with index >= this
      if (kept < group) {
        index_threshold = int64_t(kth_largest_key(
            vocab, kept,
            [values, weights, prefix](int64_t v) {
              return (weights[v] > 0.0 && order_key(values[v]) == prefix) ? uint32_t(v) : 0u;
            },
            sh));
      }
      local = 0.0;
      for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
        const uint32_t kv = order_key(values[v]);
        const bool keep = kv > prefix || (kv == prefix && v >= index_threshold);
        if (!keep) weights[v] = 0.0;
        local += weights[v];
      }
      sum = block_sum(local, sh);
    }
  }
  *norm = sum;
  return 0;
}

// Seen set of a row: prev ids in [0,V) (ids outside ignored).
__device__ void init_seen(uint8_t* seen, const int64_t* prev, int64_t prev_len, int64_t vocab) {
  for (int64_t v = threadIdx.x; v < vocab; v += kThreads) seen[v] = 0;
  __syncthreads();
  for (int64_t j = threadIdx.x; j < prev_len; j += kThreads) {
    const int64_t t = prev[j];
    if (t >= 0 && t < vocab) seen[t] = 1;
  }
  __syncthreads();
}

// Greedy token of one position: first maximal index of the penalised logits; -1 on NaN.
__device__ int64_t greedy_position(const float* logits, const uint8_t* seen, float penalty, int64_t vocab,
                                   Shared& sh) {
  float local_max = -INFINITY;
  int64_t local_arg = INT64_MAX;
  int nan = 0;
  for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
    float x = logits[v];
    if (seen != nullptr && seen[v]) x = penalize(x, penalty);
    nan |= x != x;
    if (local_arg == INT64_MAX || x > local_max) {  // strict: the first index wins ties
      local_max = x;
      local_arg = v;
    }
  }
  if (__syncthreads_or(nan)) return -1;
  const float best = block_max(local_max, sh);
  const int64_t arg = block_min_index(local_max == best ? local_arg : INT64_MAX, sh);
  return arg == INT64_MAX ? 0 : arg;
}

// ------------------------------------------------------------------------------------- kernels
__global__ void __launch_bounds__(kThreads) verify_greedy_kernel(const float* logits, const int64_t* draft,
                                                                  int64_t gamma, int64_t vocab, int64_t* out,
                                                                  int64_t* num_accepted, int32_t* status) {
  __shared__ Shared sh;
  const int64_t b = blockIdx.x;
  const float* x = logits + b * (gamma + 1) * vocab;
  const int64_t* d = draft + b * gamma;
  if (!drafts_valid(d, gamma, vocab)) return write_failure(gamma, kBadDraftToken, out + b * (gamma + 1),
                                                           num_accepted + b, status + b);
  int64_t i = 0, token = 0;
  for (;; ++i) {
    token = greedy_position(x + i * vocab, nullptr, 1.0f, vocab, sh);
    if (token < 0) return write_failure(gamma, kNanLogits, out + b * (gamma + 1), num_accepted + b, status + b);
    if (i == gamma || token != d[i]) break;
  }
  write_output(d, gamma, i, token, out + b * (gamma + 1), num_accepted + b);
  if (threadIdx.x == 0) status[b] = 0;
}

__global__ void __launch_bounds__(kThreads) verify_sample_kernel(const float* p, const float* q,
                                                                  const int64_t* draft, const double* u,
                                                                  int64_t gamma, int64_t vocab, double p_tol,
                                                                  double q_tol, int64_t* out, int64_t* num_accepted,
                                                                  int32_t* status) {
  __shared__ Shared sh;
  const int64_t b = blockIdx.x, K = gamma + 1;
  const float* pr = p + b * K * vocab;
  const float* qr = q != nullptr ? q + b * gamma * vocab : nullptr;
  const int64_t* d = draft + b * gamma;
  const double* ur = u + b * K;
  int64_t* o = out + b * K;
  if (!drafts_valid(d, gamma, vocab)) return write_failure(gamma, kBadDraftToken, o, num_accepted + b, status + b);
  for (int64_t i = 0; i <= gamma; ++i)
    if (int32_t s = check_prob_row(pr + i * vocab, vocab, p_tol, kBadTargetProbs, kTargetNotNormalized, sh))
      return write_failure(gamma, s, o, num_accepted + b, status + b);
  if (qr != nullptr)
    for (int64_t i = 0; i < gamma; ++i)
      if (int32_t s = check_prob_row(qr + i * vocab, vocab, q_tol, kBadDraftProbs, kDraftNotNormalized, sh))
        return write_failure(gamma, s, o, num_accepted + b, status + b);
  int64_t accepted = 0;
  for (; accepted < gamma; ++accepted) {  // every thread reads the same two numbers
    const int64_t t = d[accepted];
    const double q_d = qr == nullptr ? 1.0 : double(qr[accepted * vocab + t]);
    if (!(ur[accepted] * q_d < double(pr[accepted * vocab + t]))) break;
  }
  const float* p_row = pr + accepted * vocab;
  auto prob = [p_row](int64_t v) { return double(p_row[v]); };
  int64_t token;
  if (accepted == gamma) {
    token = sample_residual(vocab, ur[gamma], prob, [](int64_t) { return 0.0; }, sh);
  } else if (qr == nullptr) {
    const int64_t t = d[accepted];
    token = sample_residual(vocab, ur[gamma], prob, [t](int64_t v) { return v == t ? 1.0 : 0.0; }, sh);
  } else {
    const float* q_row = qr + accepted * vocab;
    token = sample_residual(vocab, ur[gamma], prob, [q_row](int64_t v) { return double(q_row[v]); }, sh);
  }
  write_output(d, gamma, accepted, token, o, num_accepted + b);
  if (threadIdx.x == 0) status[b] = 0;
}

__global__ void __launch_bounds__(kThreads) process_logits_kernel(const float* logits, const int64_t* prev,
                                                                   int64_t prev_len, const int64_t* draft,
                                                                   int64_t positions, int64_t vocab,
                                                                   ProcessParams params, RowScratch scratch,
                                                                   float* out, int32_t* status) {
  __shared__ Shared sh;
  const int64_t b = blockIdx.x;
  const float* x = logits + b * positions * vocab;
  const int64_t* d = draft != nullptr ? draft + b * (positions - 1) : nullptr;
  float* values = scratch.values + b * vocab;
  double* weights = scratch.weights + b * vocab;
  uint8_t* seen = params.repetition_penalty != 1.0f ? scratch.seen + b * vocab : nullptr;
  if (d != nullptr && !drafts_valid(d, positions - 1, vocab)) {
    if (threadIdx.x == 0) status[b] = kBadDraftToken;
    return;
  }
  if (seen != nullptr) init_seen(seen, prev != nullptr ? prev + b * prev_len : nullptr, prev != nullptr ? prev_len : 0,
                                 vocab);
  for (int64_t i = 0; i < positions; ++i) {
    if (seen != nullptr && i > 0 && d != nullptr) {
      if (threadIdx.x == 0) seen[d[i - 1]] = 1;
      __syncthreads();
    }
    const float* xi = x + i * vocab;
    float* oi = out + (b * positions + i) * vocab;
    if (!params.do_sample) {
      int nan = 0;
      for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
        const float y = seen != nullptr && seen[v] ? penalize(xi[v], params.repetition_penalty) : xi[v];
        nan |= y != y;
        oi[v] = y;
      }
      if (__syncthreads_or(nan)) {
        if (threadIdx.x == 0) status[b] = kNanLogits;
        return;
      }
      continue;
    }
    double norm = 0.0;
    if (int32_t s = sample_position(xi, seen, vocab, params, values, weights, sh, &norm)) {
      if (threadIdx.x == 0) status[b] = s;
      return;
    }
    for (int64_t v = threadIdx.x; v < vocab; v += kThreads) oi[v] = float(weights[v] / norm);
    __syncthreads();
  }
  if (threadIdx.x == 0) status[b] = 0;
}

__global__ void __launch_bounds__(kThreads) fused_verify_kernel(const float* logits, const int64_t* draft,
                                                                 const float* q, const int64_t* prev,
                                                                 int64_t prev_len, const double* u, int64_t gamma,
                                                                 int64_t vocab, ProcessParams params,
                                                                 double q_tol, RowScratch scratch, int64_t* out,
                                                                 int64_t* num_accepted, int32_t* status) {
  __shared__ Shared sh;
  const int64_t b = blockIdx.x, K = gamma + 1;
  const float* x = logits + b * K * vocab;
  const int64_t* d = draft + b * gamma;
  const float* qr = q != nullptr ? q + b * gamma * vocab : nullptr;
  int64_t* o = out + b * K;
  uint8_t* seen = params.repetition_penalty != 1.0f ? scratch.seen + b * vocab : nullptr;
  if (!drafts_valid(d, gamma, vocab)) return write_failure(gamma, kBadDraftToken, o, num_accepted + b, status + b);
  if (seen != nullptr) init_seen(seen, prev != nullptr ? prev + b * prev_len : nullptr, prev != nullptr ? prev_len : 0,
                                 vocab);
  if (!params.do_sample) {
    int64_t i = 0, token = 0;
    for (;; ++i) {
      if (seen != nullptr && i > 0) {
        if (threadIdx.x == 0) seen[d[i - 1]] = 1;
        __syncthreads();
      }
      token = greedy_position(x + i * vocab, seen, params.repetition_penalty, vocab, sh);
      if (token < 0) return write_failure(gamma, kNanLogits, o, num_accepted + b, status + b);
      if (i == gamma || token != d[i]) break;
    }
    write_output(d, gamma, i, token, o, num_accepted + b);
    if (threadIdx.x == 0) status[b] = 0;
    return;
  }
  float* values = scratch.values + b * vocab;
  double* weights = scratch.weights + b * vocab;
  const double* ur = u + b * K;
  int64_t accepted = 0;
  double norm = 0.0;
  for (;; ++accepted) {
    if (seen != nullptr && accepted > 0) {
      if (threadIdx.x == 0) seen[d[accepted - 1]] = 1;
      __syncthreads();
    }
    if (int32_t s = sample_position(x + accepted * vocab, seen, vocab, params, values, weights, sh, &norm))
      return write_failure(gamma, s, o, num_accepted + b, status + b);
    if (accepted == gamma) break;
    const int64_t t = d[accepted];
    const double p_d = weights[t] / norm;  // written by this block before the last barrier
    double q_d = 1.0;
    if (qr != nullptr) {
      const float qv = qr[accepted * vocab + t];
      if (!(qv >= 0.0f && qv <= FLT_MAX)) return write_failure(gamma, kBadDraftProbs, o, num_accepted + b, status + b);
      q_d = qv;
    }
    if (!(ur[accepted] * q_d < p_d)) break;
  }
  auto prob = [weights, norm](int64_t v) { return weights[v] / norm; };
  int64_t token;
  if (accepted == gamma) {
    token = sample_residual(vocab, ur[gamma], prob, [](int64_t) { return 0.0; }, sh);
  } else if (qr == nullptr) {
    const int64_t t = d[accepted];
    token = sample_residual(vocab, ur[gamma], prob, [t](int64_t v) { return v == t ? 1.0 : 0.0; }, sh);
  } else {
    const float* q_row = qr + accepted * vocab;
    if (int32_t s = check_prob_row(q_row, vocab, q_tol, kBadDraftProbs, kDraftNotNormalized, sh))
      return write_failure(gamma, s, o, num_accepted + b, status + b);
    token = sample_residual(vocab, ur[gamma], prob, [q_row](int64_t v) { return double(q_row[v]); }, sh);
  }
  write_output(d, gamma, accepted, token, o, num_accepted + b);
  if (threadIdx.x == 0) status[b] = 0;
}

#include "verify_split.cuh"

// Carves the split path's buffers out of one workspace (256-byte aligned pieces); the histogram
// part, which kernels add to atomically, is contiguous so one memset clears it.
struct Carver {
  char* base;
  size_t offset = 0;
  template <typename T>
  T* take(int64_t count) {
    offset = (offset + 255) / 256 * 256;
    T* p = base == nullptr ? nullptr : reinterpret_cast<T*>(base + offset);
    offset += size_t(count) * sizeof(T);
    return p;
  }
};

SplitBuffers carve(const SplitPlan& plan, void* workspace, int64_t batch, int64_t positions, int64_t vocab,
                   bool processes, size_t* zero_offset, size_t* zero_bytes, size_t* total) {
  Carver c{static_cast<char*>(workspace)};
  const int64_t S = plan.splits, R = batch * positions, R2 = 2 * R;  // R2: verify_sample's p and q rows
  SplitBuffers buf;
  buf.splits = S;
  buf.chunk = plan.chunk;
  buf.part_max = c.take<float>(R * S);
  buf.part_flags = c.take<int32_t>(R2 * S);
  buf.part_arg = c.take<int64_t>(R * S);
  buf.part_sum = c.take<double>(R2 * S);
  buf.part_ties = c.take<int64_t>(R * S);
  buf.state = c.take<RowState>(R);
  buf.res_total = c.take<Fixed>(batch * S);
  buf.p_total = c.take<Fixed>(batch * S);
  buf.res_last = c.take<int64_t>(batch * S);
  buf.p_last = c.take<int64_t>(batch * S);
  buf.q_bad = c.take<int32_t>(batch * S);
  buf.q_sum = c.take<double>(batch * S);
  c.offset = (c.offset + 255) / 256 * 256;
  const size_t zero_start = c.offset;
  buf.topk_hist = c.take<uint32_t>(processes ? R * 1024 : 0);
  buf.topp_hist = c.take<Fixed>(processes ? R * 1024 : 0);
  *zero_offset = zero_start;
  *zero_bytes = processes ? c.offset - zero_start : 0;
  buf.values = c.take<float>(processes ? R * vocab : 0);
  *total = c.offset + 256;
  return buf;
}

}  // namespace

SplitPlan plan_split(int64_t batch, int64_t positions, int64_t vocab, bool processes, int request, int sm_count) {
  SplitPlan plan;
  if (request == 0 || batch <= 0 || vocab <= 0 || positions <= 0) return plan;
  const int64_t min_splits = (vocab + kMaxChunk - 1) / kMaxChunk;  // the seen bitmap bounds a chunk
  int64_t splits = request;
  if (request < 0) {
    // one block per row reads only up to the first rejection: keep it once rows fill a quarter of the SMs
    if (4 * batch > sm_count) return plan;
    const int64_t want = (2 * int64_t(sm_count) + batch * positions - 1) / (batch * positions);
    const int64_t cap = vocab / 2048 > 1 ? vocab / 2048 : 1;
    splits = want < cap ? want : cap;
  }
  splits = splits > min_splits ? splits : min_splits;
  splits = splits < vocab ? splits : vocab;
  int64_t chunk = (vocab + splits - 1) / splits;
  if (chunk >= 1024) chunk = (chunk + 31) / 32 * 32;  // warp-aligned chunk starts (tiny V: exact cut)
  plan.chunk = chunk;
  plan.splits = (vocab + chunk - 1) / chunk;
  size_t zero_offset = 0, zero_bytes = 0;
  carve(plan, nullptr, batch, positions, vocab, processes, &zero_offset, &zero_bytes, &plan.workspace_bytes);
  return plan;
}

namespace {

SplitBuffers carve_for_launch(const SplitPlan& plan, void* workspace, int64_t batch, int64_t positions,
                              int64_t vocab, bool processes, cudaStream_t stream, cudaError_t* err) {
  size_t zero_offset = 0, zero_bytes = 0, total = 0;
  SplitBuffers buf = carve(plan, workspace, batch, positions, vocab, processes, &zero_offset, &zero_bytes, &total);
  *err = zero_bytes ? FASTSPEC_MEMSET_ASYNC(static_cast<char*>(workspace) + zero_offset, zero_bytes, stream)
                    : cudaError_t(0);
  return buf;
}

// Processing of every row position for sampling: values, top-k, weights, top-p (split path).
void launch_split_processing(const float* logits, const int64_t* prev, int64_t prev_len, const int64_t* draft,
                             int64_t batch, int64_t positions, int64_t vocab, const ProcessParams& params,
                             const SplitBuffers& buf, cudaStream_t stream) {
  const int64_t blocks = batch * positions * buf.splits;
  FASTSPEC_LAUNCH(split_values_kernel, blocks, stream, logits, prev, prev_len, draft, positions, vocab, params,
                  int(kModeValues), buf, static_cast<float*>(nullptr));
  if (params.top_k > 0 && params.top_k < vocab)
    for (int pass = 0; pass < 4; ++pass) FASTSPEC_LAUNCH(split_topk_kernel, blocks, stream, pass, vocab, params, buf);
  FASTSPEC_LAUNCH(split_weights_kernel, blocks, stream, vocab, params, buf);
  if (params.top_p < 1.0) {
    for (int pass = 1; pass < 4; ++pass) FASTSPEC_LAUNCH(split_topp_kernel, blocks, stream, pass, vocab, params, buf);
    FASTSPEC_LAUNCH(split_ties_kernel, blocks, stream, vocab, params, buf);
    FASTSPEC_LAUNCH(split_final_kernel, blocks, stream, vocab, params, buf);
  }
}

}  // namespace

cudaError_t launch_verify_greedy(const float* logits, const int64_t* draft, int64_t batch, int64_t gamma,
                                 int64_t vocab, const SplitPlan& plan, void* workspace, int64_t* out,
                                 int64_t* num_accepted, int32_t* status, cudaStream_t stream) {
  if (batch == 0) return cudaError_t(0);
  if (plan.splits == 0) {
    FASTSPEC_LAUNCH(verify_greedy_kernel, batch, stream, logits, draft, gamma, vocab, out, num_accepted, status);
    return FASTSPEC_LAST_ERROR();
  }
  cudaError_t err;
  const SplitBuffers buf = carve_for_launch(plan, workspace, batch, gamma + 1, vocab, false, stream, &err);
  if (err) return err;
  FASTSPEC_LAUNCH(split_values_kernel, batch * (gamma + 1) * plan.splits, stream, logits,
                  static_cast<const int64_t*>(nullptr), int64_t(0), static_cast<const int64_t*>(nullptr), gamma + 1,
                  vocab, ProcessParams(), int(kModeArgmax), buf, static_cast<float*>(nullptr));
  FASTSPEC_LAUNCH(split_greedy_decide_kernel, batch, stream, draft, gamma, vocab, buf, out, num_accepted, status);
  return FASTSPEC_LAST_ERROR();
}

cudaError_t launch_verify_sample(const float* p, const float* q, const int64_t* draft, const double* u,
                                 int64_t batch, int64_t gamma, int64_t vocab, double p_sum_tolerance,
                                 double q_sum_tolerance, const SplitPlan& plan, void* workspace, int64_t* out,
                                 int64_t* num_accepted, int32_t* status, cudaStream_t stream) {
  if (batch == 0) return cudaError_t(0);
  if (plan.splits == 0) {
    FASTSPEC_LAUNCH(verify_sample_kernel, batch, stream, p, q, draft, u, gamma, vocab, p_sum_tolerance,
                    q_sum_tolerance, out, num_accepted, status);
    return FASTSPEC_LAST_ERROR();
  }
  cudaError_t err;
  const SplitBuffers buf = carve_for_launch(plan, workspace, batch, gamma + 1, vocab, false, stream, &err);
  if (err) return err;
  const int64_t rows = batch * (gamma + 1) + (q != nullptr ? batch * gamma : 0);
  FASTSPEC_LAUNCH(split_check_rows_kernel, rows * plan.splits, stream, p, q, batch, gamma, vocab, buf);
  FASTSPEC_LAUNCH(split_residual_kernel, batch * plan.splits, stream, false, p, q, draft, u, batch, gamma, vocab,
                  p_sum_tolerance, q_sum_tolerance, buf);
  FASTSPEC_LAUNCH(split_find_kernel, batch, stream, false, p, q, draft, u, batch, gamma, vocab, p_sum_tolerance,
                  q_sum_tolerance, buf, out, num_accepted, status);
  return FASTSPEC_LAST_ERROR();
}

cudaError_t launch_process_logits(const float* logits, const int64_t* prev, int64_t prev_len, const int64_t* draft,
                                  int64_t batch, int64_t positions, int64_t vocab, ProcessParams params,
                                  RowScratch scratch, const SplitPlan& plan, void* workspace, float* out,
                                  int32_t* status, cudaStream_t stream) {
  if (batch == 0) return cudaError_t(0);
  if (plan.splits == 0) {
    FASTSPEC_LAUNCH(process_logits_kernel, batch, stream, logits, prev, prev_len, draft, positions, vocab, params,
                    scratch, out, status);
    return FASTSPEC_LAST_ERROR();
  }
  cudaError_t err;
  const SplitBuffers buf =
      carve_for_launch(plan, workspace, batch, positions, vocab, params.do_sample, stream, &err);
  if (err) return err;
  const int64_t blocks = batch * positions * plan.splits;
  if (params.do_sample) {
    launch_split_processing(logits, prev, prev_len, draft, batch, positions, vocab, params, buf, stream);
    FASTSPEC_LAUNCH(split_write_probs_kernel, blocks, stream, vocab, buf, out);
  } else {
    FASTSPEC_LAUNCH(split_values_kernel, blocks, stream, logits, prev, prev_len, draft, positions, vocab, params,
                    int(kModePenalised), buf, out);
  }
  FASTSPEC_LAUNCH(split_process_status_kernel, batch, stream, draft, positions, vocab, params.do_sample, buf, status);
  return FASTSPEC_LAST_ERROR();
}

cudaError_t launch_fused_verify(const float* logits, const int64_t* draft, const float* q, const int64_t* prev,
                                int64_t prev_len, const double* u, int64_t batch, int64_t gamma, int64_t vocab,
                                ProcessParams params, double q_sum_tolerance, RowScratch scratch,
                                const SplitPlan& plan, void* workspace, int64_t* out, int64_t* num_accepted,
                                int32_t* status, cudaStream_t stream) {
  if (batch == 0) return cudaError_t(0);
  if (plan.splits == 0) {
    FASTSPEC_LAUNCH(fused_verify_kernel, batch, stream, logits, draft, q, prev, prev_len, u, gamma, vocab, params,
                    q_sum_tolerance, scratch, out, num_accepted, status);
    return FASTSPEC_LAST_ERROR();
  }
  cudaError_t err;
  const SplitBuffers buf =
      carve_for_launch(plan, workspace, batch, gamma + 1, vocab, params.do_sample, stream, &err);
  if (err) return err;
  if (!params.do_sample) {
    FASTSPEC_LAUNCH(split_values_kernel, batch * (gamma + 1) * plan.splits, stream, logits, prev, prev_len, draft,
                    gamma + 1, vocab, params, int(kModeArgmax), buf, static_cast<float*>(nullptr));
    FASTSPEC_LAUNCH(split_greedy_decide_kernel, batch, stream, draft, gamma, vocab, buf, out, num_accepted, status);
    return FASTSPEC_LAST_ERROR();
  }
  launch_split_processing(logits, prev, prev_len, draft, batch, gamma + 1, vocab, params, buf, stream);
  FASTSPEC_LAUNCH(split_residual_kernel, batch * plan.splits, stream, true, static_cast<const float*>(nullptr), q,
                  draft, u, batch, gamma, vocab, 0.0, q_sum_tolerance, buf);
  FASTSPEC_LAUNCH(split_find_kernel, batch, stream, true, static_cast<const float*>(nullptr), q, draft, u, batch,
                  gamma, vocab, 0.0, q_sum_tolerance, buf, out, num_accepted, status);
  return FASTSPEC_LAST_ERROR();
}


}  // namespace cuda
}  // namespace fastspec
