// Runs the CUDA verify kernels (csrc/cuda/verify.cu) on the host, one std::thread per CUDA
// thread (64 per block, 2 warps), and checks them against the CPU core. No GPU or CUDA toolkit
// needed: barriers, warp shuffles and shared-memory atomics are emulated below. This checks the
// kernels' logic (reductions, radix selects, scans, control flow); a real GPU run still has to
// check compilation for the device and performance.
#include <gtest/gtest.h>

#include <condition_variable>
#include <cstring>
#include <functional>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

// ---------------------------------------------------------------------------- CUDA emulation
#define FASTSPEC_CUDA_EMULATION 1
#define FASTSPEC_VERIFY_THREADS 64
typedef int cudaError_t;
typedef void* cudaStream_t;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace emu {

struct Dim {
  unsigned x = 0;
};
thread_local Dim thread_index, block_index;

class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const long generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation != generation_; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int count_, arrived_ = 0;
  long generation_ = 0;
};

constexpr int kThreads = FASTSPEC_VERIFY_THREADS;
Barrier* block_barrier = nullptr;
Barrier* warp_barriers[kThreads / 32] = {};
uint64_t warp_slots[kThreads / 32][32];
int or_slots[2];
thread_local int or_calls = 0;
std::mutex atomic_mutex;

inline void syncthreads() { block_barrier->wait(); }

inline int syncthreads_or(int predicate) {
  const int slot = or_calls++ & 1;
  {
    std::lock_guard<std::mutex> lock(atomic_mutex);
    or_slots[slot] |= predicate != 0;
  }
  syncthreads();
  const int result = or_slots[slot];
  syncthreads();
  if (thread_index.x == 0) or_slots[slot] = 0;  // reused two calls later, after two more barriers
  return result;
}

template <typename T>
T shuffle_from(T value, int source_lane) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  const int warp = int(thread_index.x) / 32, lane = int(thread_index.x) % 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  warp_slots[warp][lane] = bits;
  warp_barriers[warp]->wait();
  T result;
  std::memcpy(&result, &warp_slots[warp][source_lane], sizeof(T));
  warp_barriers[warp]->wait();
  return result;
}

template <class Kernel>
void launch(int blocks, const Kernel& kernel) {
  for (int b = 0; b < blocks; ++b) {
    Barrier block(kThreads);
    block_barrier = &block;
    std::vector<std::unique_ptr<Barrier>> warps;
    for (int w = 0; w < kThreads / 32; ++w) {
      warps.emplace_back(new Barrier(32));
      warp_barriers[w] = warps.back().get();
    }
    or_slots[0] = or_slots[1] = 0;
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t)
      threads.emplace_back([&, t] {
        thread_index.x = unsigned(t);
        block_index.x = unsigned(b);
        or_calls = 0;
        kernel();
      });
    for (auto& th : threads) th.join();
  }
}

}  // namespace emu

#define threadIdx emu::thread_index
#define blockIdx emu::block_index
#define __syncthreads() emu::syncthreads()
#define __syncthreads_or(p) emu::syncthreads_or(p)
#define __shfl_xor_sync(mask, v, o) emu::shuffle_from((v), (int(threadIdx.x) % 32) ^ (o))
#define __shfl_up_sync(mask, v, o) \
  emu::shuffle_from((v), int(threadIdx.x) % 32 >= (o) ? int(threadIdx.x) % 32 - (o) : int(threadIdx.x) % 32)

inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline uint32_t __float_as_uint(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline float __uint_as_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}
template <typename T>
T atomicAdd(T* address, T value) {
  std::lock_guard<std::mutex> lock(emu::atomic_mutex);
  const T old = *address;
  *address = old + value;
  return old;
}

#include "../cuda/verify.cu"

// ---------------------------------------------------------------------------- tests
using namespace fastspec;

namespace {

struct Case {
  int64_t batch, gamma, vocab;
  std::vector<float> logits, q;  // [B,γ+1,V], [B,γ,V]
  std::vector<int64_t> draft, prev;  // [B,γ], [B,L]
  std::vector<double> u;  // [B,γ+1]
  int64_t prev_len = 6;
};

Case make_case(int64_t batch, int64_t gamma, int64_t vocab, const ProcessParams& params, uint32_t seed,
               bool integer_logits = false) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<double> uniform;
  Case c{batch, gamma, vocab, {}, {}, {}, {}, {}};
  c.logits.resize(size_t(batch * (gamma + 1) * vocab));
  for (auto& x : c.logits) x = integer_logits ? std::round(normal(rng) * 2) : normal(rng) * 2;
  c.prev.resize(size_t(batch * c.prev_len));
  for (auto& t : c.prev) t = int64_t(rng() % uint32_t(vocab + 2)) - 1;  // includes -1 and V
  // q: processed drafter logits; drafts sampled from q
  c.q.resize(size_t(batch * gamma * vocab));
  c.draft.resize(size_t(batch * gamma));
  VerifyWorkspace ws;
  ProcessParams sampling = params;
  sampling.do_sample = true;
  for (int64_t b = 0; b < batch; ++b) {
    std::vector<float> q_logits(c.logits.begin() + b * (gamma + 1) * vocab,
                                c.logits.begin() + (b * (gamma + 1) + gamma) * vocab);
    for (auto& x : q_logits) x += 0.5f * normal(rng);
    if (gamma > 0)
      process_logits_row(q_logits.data(), nullptr, 0, nullptr, gamma, vocab, sampling, ws, c.q.data() + b * gamma * vocab);
    for (int64_t i = 0; i < gamma; ++i) {
      double running = 0, target = uniform(rng);
      int64_t token = vocab - 1;
      for (int64_t v = 0; v < vocab; ++v)
        if ((running += c.q[(b * gamma + i) * vocab + v]) > target) {
          token = v;
          break;
        }
      c.draft[b * gamma + i] = token;
    }
  }
  c.u.resize(size_t(batch * (gamma + 1)));
  for (auto& x : c.u) x = uniform(rng);
  return c;
}

struct Outputs {
  std::vector<int64_t> out, accepted;
  std::vector<int32_t> status;
};

Outputs cpu_fused(const Case& c, const ProcessParams& params, bool with_q) {
  Outputs o{std::vector<int64_t>(size_t(c.batch * (c.gamma + 1))), std::vector<int64_t>(size_t(c.batch)),
            std::vector<int32_t>(size_t(c.batch))};
  VerifyWorkspace ws;
  for (int64_t b = 0; b < c.batch; ++b)
    o.status[b] = fused_verify_row(c.logits.data() + b * (c.gamma + 1) * c.vocab, c.draft.data() + b * c.gamma,
                                   with_q ? c.q.data() + b * c.gamma * c.vocab : nullptr, c.prev.data() + b * c.prev_len,
                                   c.prev_len, c.u.data() + b * (c.gamma + 1), c.gamma, c.vocab, params, 1e-3, ws,
                                   o.out.data() + b * (c.gamma + 1), o.accepted.data() + b);
  return o;
}

Outputs emulated_fused(const Case& c, const ProcessParams& params, bool with_q) {
  Outputs o{std::vector<int64_t>(size_t(c.batch * (c.gamma + 1))), std::vector<int64_t>(size_t(c.batch)),
            std::vector<int32_t>(size_t(c.batch), -1)};
  std::vector<float> values(size_t(c.batch * c.vocab));
  std::vector<double> weights(size_t(c.batch * c.vocab));
  std::vector<uint8_t> seen(size_t(c.batch * c.vocab));
  cuda::RowScratch scratch{values.data(), weights.data(), seen.data()};
  emu::launch(int(c.batch), [&] {
    cuda::fused_verify_kernel(c.logits.data(), c.draft.data(), with_q ? c.q.data() : nullptr, c.prev.data(), c.prev_len,
                              c.u.data(), c.gamma, c.vocab, params, 1e-3, scratch, o.out.data(), o.accepted.data(),
                              o.status.data());
  });
  return o;
}

void expect_same(const Outputs& a, const Outputs& b) {
  EXPECT_EQ(a.status, b.status);
  EXPECT_EQ(a.out, b.out);
  EXPECT_EQ(a.accepted, b.accepted);
}

}  // namespace

TEST(CudaEmulation, FusedVerifyEqualsCpu) {
  std::vector<ProcessParams> configs(6);
  configs[1].do_sample = true;
  configs[2].do_sample = true, configs[2].top_k = 20, configs[2].temperature = 0.7f;
  configs[3].do_sample = true, configs[3].top_p = 0.9;
  configs[4].do_sample = true, configs[4].top_k = 300, configs[4].top_p = 0.8, configs[4].repetition_penalty = 1.3f;
  configs[5].repetition_penalty = 1.3f;  // greedy with penalty
  uint32_t seed = 0;
  for (const auto& params : configs)
    for (int64_t vocab : {111, 600})
      for (int64_t gamma : {0, 3}) {
        const Case c = make_case(2, gamma, vocab, params, ++seed);
        for (bool with_q : {true, false}) {
          if (!params.do_sample && with_q) continue;
          SCOPED_TRACE("vocab " + std::to_string(vocab) + " gamma " + std::to_string(gamma) + " top_k " +
                       std::to_string(params.top_k) + " top_p " + std::to_string(params.top_p));
          expect_same(emulated_fused(c, params, with_q), cpu_fused(c, params, with_q));
        }
      }
}

TEST(CudaEmulation, TopPTiesAndProcessLogitsEqualCpu) {
  ProcessParams params;
  params.do_sample = true;
  params.top_p = 0.5;
  params.top_k = 40;
  const Case c = make_case(2, 2, 300, params, 77, /*integer_logits=*/true);  // many exact ties
  std::vector<float> gpu(c.logits.size()), cpu(c.logits.size());
  std::vector<float> values(size_t(c.batch * c.vocab));
  std::vector<double> weights(size_t(c.batch * c.vocab));
  std::vector<uint8_t> seen(size_t(c.batch * c.vocab));
  std::vector<int32_t> status(size_t(c.batch), -1);
  cuda::RowScratch scratch{values.data(), weights.data(), seen.data()};
  emu::launch(int(c.batch), [&] {
    cuda::process_logits_kernel(c.logits.data(), c.prev.data(), c.prev_len, c.draft.data(), c.gamma + 1, c.vocab,
                                params, scratch, gpu.data(), status.data());
  });
  VerifyWorkspace ws;
  for (int64_t b = 0; b < c.batch; ++b) {
    EXPECT_EQ(status[b], 0);
    process_logits_row(c.logits.data() + b * (c.gamma + 1) * c.vocab, c.prev.data() + b * c.prev_len, c.prev_len,
                       c.draft.data() + b * c.gamma, c.gamma + 1, c.vocab, params, ws,
                       cpu.data() + b * (c.gamma + 1) * c.vocab);
  }
  for (size_t i = 0; i < cpu.size(); ++i) {
    ASSERT_EQ(cpu[i] > 0, gpu[i] > 0) << "support differs at " << i;
    ASSERT_NEAR(cpu[i], gpu[i], 1e-6f * std::max(1.0f, cpu[i]));
  }
  expect_same(emulated_fused(c, params, true), cpu_fused(c, params, true));
}

TEST(CudaEmulation, VerifyGreedyAndSampleEqualCpu) {
  ProcessParams params;
  params.do_sample = true;
  const Case c = make_case(3, 4, 500, params, 5);
  // p = processed target, then the unfused kernels
  std::vector<float> p(c.logits.size());
  VerifyWorkspace ws;
  for (int64_t b = 0; b < c.batch; ++b)
    process_logits_row(c.logits.data() + b * 5 * c.vocab, nullptr, 0, c.draft.data() + b * 4, 5, c.vocab, params, ws,
                       p.data() + b * 5 * c.vocab);
  for (bool with_q : {true, false}) {
    Outputs gpu{std::vector<int64_t>(15), std::vector<int64_t>(3), std::vector<int32_t>(3, -1)};
    Outputs cpu{std::vector<int64_t>(15), std::vector<int64_t>(3), std::vector<int32_t>(3, -1)};
    emu::launch(3, [&] {
      cuda::verify_sample_kernel(p.data(), with_q ? c.q.data() : nullptr, c.draft.data(), c.u.data(), 4, c.vocab, 1e-3,
                                 1e-3, gpu.out.data(), gpu.accepted.data(), gpu.status.data());
    });
    for (int64_t b = 0; b < 3; ++b)
      cpu.status[b] = verify_sample_row(p.data() + b * 5 * c.vocab, with_q ? c.q.data() + b * 4 * c.vocab : nullptr,
                                        c.draft.data() + b * 4, c.u.data() + b * 5, 4, c.vocab, 1e-3, 1e-3,
                                        cpu.out.data() + b * 5, cpu.accepted.data() + b);
    expect_same(gpu, cpu);
  }
  // greedy, with a NaN in row 2 and a bad draft id in row 1
  std::vector<float> logits = c.logits;
  std::vector<int64_t> draft = c.draft;
  logits[2 * 5 * c.vocab + 7] = std::nanf("");
  draft[1 * 4 + 2] = c.vocab;
  Outputs gpu{std::vector<int64_t>(15), std::vector<int64_t>(3), std::vector<int32_t>(3, -1)};
  emu::launch(3, [&] {
    cuda::verify_greedy_kernel(logits.data(), draft.data(), 4, c.vocab, gpu.out.data(), gpu.accepted.data(),
                               gpu.status.data());
  });
  EXPECT_EQ(gpu.status, (std::vector<int32_t>{0, kBadDraftToken, kNanLogits}));
  Outputs cpu{std::vector<int64_t>(5), std::vector<int64_t>(1), std::vector<int32_t>(1)};
  verify_greedy_row(logits.data(), draft.data(), 4, c.vocab, cpu.out.data(), cpu.accepted.data());
  EXPECT_EQ(std::vector<int64_t>(gpu.out.begin(), gpu.out.begin() + 5), cpu.out);
}
