// Runs the CUDA verify kernels and launchers (csrc/cuda/verify.cu, verify_split.cuh) on the host
// and checks them against the CPU core: one fiber (ucontext) per CUDA thread, 64 per block (2
// warps), blocks one after another, kernels of a launch sequence in stream order. Barriers, warp
// shuffles and atomics are emulated below; at every barrier the fibers resume in a varying
// order, so a missing __syncthreads shows up as a wrong result, and a barrier not reached by
// every thread aborts with a message. No GPU or CUDA toolkit needed. This checks the kernels'
// logic (reductions, radix selects, scans, the split path's phases); a real GPU run still has to
// check device compilation, memory ordering and speed.
#include <gtest/gtest.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#endif

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

constexpr int kThreads = FASTSPEC_VERIFY_THREADS;
constexpr size_t kStack = 512 * 1024;  // generous: sanitizer builds have large frames

struct Barrier {
  int count = 0, arrived = 0;
  long generation = 0;
};

// Context switch. x86-64: save the callee-saved registers and swap stack pointers (no signal
// mask syscall, unlike swapcontext: ~50x faster); elsewhere ucontext.
#if defined(__x86_64__) && defined(__GNUC__)
#define EMU_FAST_SWITCH 1
extern "C" void emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl emu_switch
  .type emu_switch, @function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch, .-emu_switch
)");
#endif

struct Fiber {
#ifdef EMU_FAST_SWITCH
  void* sp = nullptr;
#else
  ucontext_t context;
#endif
  std::unique_ptr<char[]> stack;
  Dim dim;
  bool done = false;
  const Barrier* waiting = nullptr;
  long wait_generation = 0;
  int or_calls = 0;
  void* fake_stack = nullptr;
};

Fiber fibers[kThreads];
Fiber* current = nullptr;
Dim block_index;
#ifdef EMU_FAST_SWITCH
void* scheduler_sp = nullptr;
#else
ucontext_t scheduler;
#endif
const void* scheduler_stack = nullptr;
size_t scheduler_stack_size = 0;
const std::function<void()>* kernel = nullptr;
Barrier block_barrier;
Barrier warp_barriers[kThreads / 32];
uint64_t warp_slots[kThreads / 32][32];
int or_slots[2];
uint32_t order_seed = 1;

// Scheduler -> fiber f, and back when f yields or ends.
void resume(Fiber& f) {
  current = &f;
#ifdef EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack.get(), kStack);
#endif
#ifdef EMU_FAST_SWITCH
  emu_switch(&scheduler_sp, f.sp);
#else
  swapcontext(&scheduler, &f.context);
#endif
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  current = nullptr;
}

void arrived_in_fiber() {
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(current->fake_stack, &scheduler_stack, &scheduler_stack_size);
#endif
}

void to_scheduler(Fiber& f, bool ending) {
#ifdef EMU_ASAN
  __sanitizer_start_switch_fiber(ending ? nullptr : &f.fake_stack, scheduler_stack, scheduler_stack_size);
#else
  (void)ending;
#endif
#ifdef EMU_FAST_SWITCH
  emu_switch(&f.sp, scheduler_sp);
#else
  swapcontext(&f.context, &scheduler);
#endif
}

void yield() {
  to_scheduler(*current, false);
  arrived_in_fiber();
}

void entry() {
  arrived_in_fiber();
  (*kernel)();
  current->done = true;
#ifdef EMU_FAST_SWITCH
  to_scheduler(*current, true);  // never resumed again
  std::abort();
#else
#ifdef EMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, scheduler_stack, scheduler_stack_size);
#endif
  // returning switches to uc_link (the scheduler)
#endif
}

// A fresh fiber whose first resume starts entry().
void prepare(Fiber& f) {
#ifdef EMU_FAST_SWITCH
  // top: 16-byte aligned; [top-8] a null return slot so entry() starts with rsp % 16 == 8 as after
  // a call; [top-16] entry's address for emu_switch's ret; below, six zeroed callee-saved registers.
  uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack.get()) + kStack) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;
  *--sp = reinterpret_cast<void*>(&entry);
  for (int i = 0; i < 6; ++i) *--sp = nullptr;
  f.sp = sp;
#else
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = f.stack.get();
  f.context.uc_stack.ss_size = kStack;
  f.context.uc_link = &scheduler;
  makecontext(&f.context, entry, 0);
#endif
}

void wait(Barrier& barrier) {
  current->waiting = &barrier;
  current->wait_generation = barrier.generation;
  if (++barrier.arrived == barrier.count) {
    barrier.arrived = 0;
    ++barrier.generation;
  }
  yield();  // everyone yields, the last arriver too: the scheduler picks the next order
}

bool runnable(const Fiber& f) {
  return !f.done && (f.waiting == nullptr || f.waiting->generation != f.wait_generation);
}

// Runs one block: every fiber until it ends, in a varying order at each round of barriers.
void run_block() {
  for (int t = 0; t < kThreads; ++t) {
    Fiber& f = fibers[t];
    if (!f.stack) f.stack.reset(new char[kStack]);
    f.dim.x = unsigned(t);
    f.done = false;
    f.waiting = nullptr;
    f.or_calls = 0;
    prepare(f);
  }
  block_barrier = Barrier{kThreads};
  for (auto& w : warp_barriers) w = Barrier{32};
  or_slots[0] = or_slots[1] = 0;
  for (;;) {
    bool progress = false, all_done = true;
    order_seed = order_seed * 1103515245u + 12345u;
    const int offset = int(order_seed >> 16) % kThreads;
    const bool backwards = (order_seed >> 8) & 1u;
    for (int k = 0; k < kThreads; ++k) {
      const int t = backwards ? (offset + kThreads - k) % kThreads : (offset + k) % kThreads;
      Fiber& f = fibers[t];
      if (f.done) continue;
      all_done = false;
      if (!runnable(f)) continue;
      f.waiting = nullptr;
      resume(f);
      progress = true;
    }
    if (all_done) return;
    if (!progress) {
      std::fprintf(stderr, "emulation: deadlock in block %u: a barrier is not reached by every thread\n",
                   block_index.x);
      std::abort();
    }
  }
}

template <class Kernel>
void launch(int64_t blocks, const Kernel& body) {
  const std::function<void()> fn = body;
  kernel = &fn;
  for (int64_t b = 0; b < blocks; ++b) {
    block_index.x = unsigned(b);
    run_block();
  }
  kernel = nullptr;
}

inline void syncthreads() { wait(block_barrier); }

inline int syncthreads_or(int predicate) {
  const int slot = current->or_calls++ & 1;
  or_slots[slot] |= predicate != 0;
  syncthreads();
  const int result = or_slots[slot];
  syncthreads();
  if (current->dim.x == 0) or_slots[slot] = 0;  // reused two calls later, after two more barriers
  return result;
}

template <typename T>
T shuffle_from(T value, int source_lane) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  const int warp = int(current->dim.x) / 32, lane = int(current->dim.x) % 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  warp_slots[warp][lane] = bits;
  wait(warp_barriers[warp]);
  T result;
  std::memcpy(&result, &warp_slots[warp][source_lane], sizeof(T));
  wait(warp_barriers[warp]);
  return result;
}

}  // namespace emu

#define threadIdx (emu::current->dim)
#define blockIdx emu::block_index
#define __syncthreads() emu::syncthreads()
#define __syncthreads_or(p) emu::syncthreads_or(p)
#define __shfl_xor_sync(mask, v, o) emu::shuffle_from((v), (int(threadIdx.x) % 32) ^ (o))
#define __shfl_up_sync(mask, v, o) \
  emu::shuffle_from((v), int(threadIdx.x) % 32 >= (o) ? int(threadIdx.x) % 32 - (o) : int(threadIdx.x) % 32)
#define FASTSPEC_LAUNCH(kernel, blocks, stream, ...) \
  ((void)(stream), emu::launch(int64_t(blocks), [&] { kernel(__VA_ARGS__); }))
#define FASTSPEC_MEMSET_ASYNC(ptr, bytes, stream) ((void)(stream), std::memset((ptr), 0, (bytes)), cudaError_t(0))
#define FASTSPEC_LAST_ERROR() cudaError_t(0)

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
// One OS thread: read-modify-writes are atomic between barriers by construction.
template <typename T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
inline unsigned atomicOr(unsigned* address, unsigned value) {
  const unsigned old = *address;
  *address = old | value;
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

// ---------------------------------------------------------------------------- split path
// The launchers with a forced or automatic SplitPlan (vocabulary across blocks, all positions at
// once) against the same launchers with one block per row and against the CPU core: tokens,
// accepted counts and statuses equal exactly; process_logits probabilities within float64
// rounding with the same support.
namespace {

constexpr int kSmCount = 132;  // an H100/H200: what plan_split(auto) sees there
#ifdef EMU_ASAN
constexpr bool kFull = false;  // sanitizer builds run ~15x slower: a subset of the sizes below
#else
constexpr bool kFull = true;
#endif

struct Launch {
  int request;  // plan_split request: 0 one block per row, -1 auto, n forced
  const char* name;
};

struct Workspace {
  cuda::SplitPlan plan;
  std::vector<double> storage;  // 8-byte aligned
  std::vector<float> values;
  std::vector<double> weights;
  std::vector<uint8_t> seen;
  cuda::RowScratch scratch;
  Workspace(int64_t batch, int64_t positions, int64_t vocab, bool processes, int request)
      : plan(cuda::plan_split(batch, positions, vocab, processes, request, kSmCount)),
        storage(plan.workspace_bytes / 8 + 1, std::nan("")),  // garbage-filled: nothing may rely on zeros
        values(size_t(batch * vocab)),
        weights(size_t(batch * vocab)),
        seen(size_t(batch * vocab)),
        scratch{values.data(), weights.data(), seen.data()} {}
  void* ptr() { return plan.splits ? storage.data() : nullptr; }
};

Outputs launch_fused(const Case& c, const ProcessParams& params, bool with_q, int request, int64_t* splits = nullptr) {
  Outputs o{std::vector<int64_t>(size_t(c.batch * (c.gamma + 1)), -7), std::vector<int64_t>(size_t(c.batch), -7),
            std::vector<int32_t>(size_t(c.batch), -7)};
  Workspace ws(c.batch, c.gamma + 1, c.vocab, params.do_sample, request);
  if (splits) *splits = ws.plan.splits;
  EXPECT_EQ(cuda::launch_fused_verify(c.logits.data(), c.draft.data(), with_q ? c.q.data() : nullptr, c.prev.data(),
                                      c.prev_len, params.do_sample ? c.u.data() : nullptr, c.batch, c.gamma, c.vocab,
                                      params, 1e-3, ws.scratch, ws.plan, ws.ptr(), o.out.data(), o.accepted.data(),
                                      o.status.data(), nullptr),
            0);
  return o;
}

std::string describe(const ProcessParams& p, int64_t batch, int64_t gamma, int64_t vocab, bool with_q) {
  return "B " + std::to_string(batch) + " gamma " + std::to_string(gamma) + " V " + std::to_string(vocab) +
         (p.do_sample ? " sample" : " greedy") + " T " + std::to_string(p.temperature) + " top_k " +
         std::to_string(p.top_k) + " top_p " + std::to_string(p.top_p) + " penalty " +
         std::to_string(p.repetition_penalty) + (with_q ? " q" : " one-hot q");
}

std::vector<ProcessParams> all_configs() {
  std::vector<ProcessParams> configs(7);
  configs[1].repetition_penalty = 1.3f;  // greedy with penalty
  for (size_t i = 2; i < configs.size(); ++i) configs[i].do_sample = true;
  configs[3].temperature = 0.7f, configs[3].top_k = 20;
  configs[4].top_p = 0.9;
  configs[5].top_k = 300, configs[5].top_p = 0.8, configs[5].repetition_penalty = 1.3f, configs[5].temperature = 1.3f;
  configs[6].top_k = 1;
  return configs;
}

// split (forced `splits`, and auto) == one block per row == CPU, for every config and q kind.
void check_fused(const Case& c, const ProcessParams& params, std::initializer_list<int> requests) {
  for (bool with_q : {true, false}) {
    if ((!params.do_sample || c.gamma == 0) && with_q) continue;
    SCOPED_TRACE(describe(params, c.batch, c.gamma, c.vocab, with_q));
    const Outputs cpu = cpu_fused(c, params, with_q);
    expect_same(launch_fused(c, params, with_q, 0), cpu);
    for (int request : requests) {
      SCOPED_TRACE("split request " + std::to_string(request));
      int64_t splits = 0;
      const Outputs split = launch_fused(c, params, with_q, request, &splits);
      EXPECT_GE(splits, 1);
      expect_same(split, cpu);
    }
  }
}

}  // namespace

TEST(CudaEmulationSplit, PlanSplitsSmallBatchesOnly) {
  for (int64_t vocab : {111, 32128, 49152, 128256}) {
    for (int64_t batch : {1, 3, 8, 33}) {
      const cuda::SplitPlan plan = cuda::plan_split(batch, 9, vocab, true, -1, kSmCount);
      SCOPED_TRACE("V " + std::to_string(vocab) + " B " + std::to_string(batch));
      ASSERT_GE(plan.splits, 1);
      EXPECT_GE(plan.splits * plan.chunk, vocab);
      EXPECT_LT((plan.splits - 1) * plan.chunk, vocab);  // no empty chunk
      EXPECT_LE(plan.chunk, cuda::kMaxChunk);
      EXPECT_GT(plan.workspace_bytes, size_t(batch * 9 * vocab * 4));  // holds the processed values
    }
    EXPECT_EQ(cuda::plan_split(34, 9, vocab, true, -1, kSmCount).splits, 0);  // 4·B > SMs: one block per row
    EXPECT_GE(cuda::plan_split(64, 9, vocab, true, 2, kSmCount).splits, 2);   // forced: any batch
    EXPECT_EQ(cuda::plan_split(1, 9, vocab, true, 0, kSmCount).splits, 0);     // forced off
  }
  // auto at B = 1, γ = 8 on V = 32128: about two blocks per SM, >= 2048 tokens per block
  const cuda::SplitPlan plan = cuda::plan_split(1, 9, 32128, false, -1, kSmCount);
  EXPECT_EQ(plan.splits, 15);
  EXPECT_EQ(plan.chunk % 32, 0);
  EXPECT_EQ(cuda::plan_split(1, 9, 111, false, 3, kSmCount).chunk, 37);  // forced: exact cut of a tiny V
  EXPECT_EQ(cuda::plan_split(1, 9, 40000, false, 1, kSmCount).splits, 3);  // the seen bitmap caps a chunk
}

TEST(CudaEmulationSplit, FusedVerifyEqualsOneBlockEqualsCpuEveryGamma) {
  // V = 111 cut in 3 chunks of 37 (and 1 chunk: only the positions in parallel), every γ 0..8
  uint32_t seed = 100;
  for (const auto& params : all_configs())
    for (int64_t batch : {1, 3, 8})
      for (int64_t gamma = 0; gamma <= 8; ++gamma) {
        if (batch == 8 && gamma % 3 != 1) continue;  // B = 8 at γ 1, 4, 7: keeps the run short
        if (!kFull && (batch == 8 || gamma % 4 != 0)) continue;
        const Case c = make_case(batch, gamma, 111, params, ++seed);
        check_fused(c, params, {3, 1});
      }
}

TEST(CudaEmulationSplit, FusedVerifyEqualsOneBlockEqualsCpuLargeVocab) {
  // automatic plans: V = 32128 -> 15 chunks of 2144 at B=1, γ=8; V = 49152 -> 4+ chunks
  uint32_t seed = 500;
  const auto configs = all_configs();
  struct Shape {
    int64_t batch, gamma, vocab;
  };
  for (const Shape& sh : {Shape{1, 8, 32128}, Shape{3, 4, 32128}, Shape{8, 1, 49152}, Shape{1, 3, 49152}})
    for (size_t k = 0; k < configs.size(); ++k) {
      if (sh.batch == 8 && k % 2 == 1) continue;  // B = 8: half the configs
      if (!kFull && (sh.batch != 1 || k % 2 == 0)) continue;
      const Case c = make_case(sh.batch, sh.gamma, sh.vocab, configs[k], ++seed);
      check_fused(c, configs[k], {-1});
    }
}

TEST(CudaEmulationSplit, TopPBoundaryTiesAcrossChunks) {
  // Integer logits: the top-p boundary value is shared by many tokens spread over every chunk,
  // so the kept members (highest indices first) straddle chunk edges.
  uint32_t seed = 900;
  for (double top_p : {0.3, 0.5, 0.77, 0.95})
    for (int64_t top_k : {0, 40}) {
      if (!kFull && (top_k == 0 || top_p < 0.5)) continue;
      ProcessParams params;
      params.do_sample = true, params.top_p = top_p, params.top_k = top_k;
      const Case c = make_case(3, 3, 300, params, ++seed, /*integer_logits=*/true);
      check_fused(c, params, {7, 2, 1});
    }
}

TEST(CudaEmulationSplit, ProcessLogitsEqualsOneBlockAndCpu) {
  uint32_t seed = 1300;
  for (const auto& params : all_configs())
    for (int64_t vocab : {111, 4099})
      for (bool integer_logits : {false, true}) {
        if (!kFull && vocab > 111) continue;
        const Case c = make_case(3, 4, vocab, params, ++seed, integer_logits);
        const int64_t K = c.gamma + 1;
        std::vector<float> cpu(c.logits.size());
        VerifyWorkspace vw;
        std::vector<int32_t> cpu_status(size_t(c.batch));
        for (int64_t b = 0; b < c.batch; ++b)
          cpu_status[b] = process_logits_row(c.logits.data() + b * K * c.vocab, c.prev.data() + b * c.prev_len,
                                             c.prev_len, c.draft.data() + b * c.gamma, K, c.vocab, params, vw,
                                             cpu.data() + b * K * c.vocab);
        std::vector<float> one(c.logits.size(), -1.0f);
        for (int request : {0, 3, -1}) {
          SCOPED_TRACE(describe(params, c.batch, c.gamma, c.vocab, false) + " request " + std::to_string(request));
          Workspace ws(c.batch, K, c.vocab, params.do_sample, request);
          std::vector<float> gpu(c.logits.size(), -1.0f);
          std::vector<int32_t> status(size_t(c.batch), -7);
          cuda::launch_process_logits(c.logits.data(), c.prev.data(), c.prev_len, c.draft.data(), c.batch, K, c.vocab,
                                      params, ws.scratch, ws.plan, ws.ptr(), gpu.data(), status.data(), nullptr);
          EXPECT_EQ(status, cpu_status);
          for (size_t i = 0; i < cpu.size(); ++i) {
            ASSERT_EQ(cpu[i] > 0, gpu[i] > 0) << "support differs at " << i;
            ASSERT_NEAR(cpu[i], gpu[i], params.do_sample ? 1e-6f * std::max(1.0f, cpu[i]) : 0.0f) << "at " << i;
          }
          if (request == 0) one = gpu;
          else if (params.do_sample) for (size_t i = 0; i < cpu.size(); ++i) ASSERT_NEAR(one[i], gpu[i], 1e-7f);
          else EXPECT_EQ(one, gpu);  // greedy: the penalised logits, exactly
        }
      }
}

TEST(CudaEmulationSplit, VerifySampleAndGreedyEqualCpu) {
  ProcessParams sampling;
  sampling.do_sample = true;
  for (int64_t vocab : {111, 32128}) {
    const int64_t B = 3, G = 4, K = G + 1;
    const Case c = make_case(B, G, vocab, sampling, uint32_t(vocab));
    std::vector<float> p(c.logits.size());
    VerifyWorkspace vw;
    for (int64_t b = 0; b < B; ++b)
      process_logits_row(c.logits.data() + b * K * vocab, nullptr, 0, c.draft.data() + b * G, K, vocab, sampling, vw,
                         p.data() + b * K * vocab);
    std::vector<float> bad_p = p, bad_q = c.q;
    bad_p[size_t(1 * K * vocab + 2 * vocab + 5)] = -0.5f;  // row 1: a negative target probability
    bad_q[size_t(2 * G * vocab + 3 * vocab + 1)] += 0.5f;  // row 2: a draft row summing to 1.5
    for (bool corrupt : {false, true})
      for (bool with_q : {true, false}) {
        const float* pp = corrupt ? bad_p.data() : p.data();
        const float* qq = with_q ? (corrupt ? bad_q.data() : c.q.data()) : nullptr;
        Outputs cpu{std::vector<int64_t>(size_t(B * K)), std::vector<int64_t>(size_t(B)), std::vector<int32_t>(size_t(B))};
        for (int64_t b = 0; b < B; ++b)
          cpu.status[b] = verify_sample_row(pp + b * K * vocab, qq ? qq + b * G * vocab : nullptr, c.draft.data() + b * G,
                                            c.u.data() + b * K, G, vocab, 1e-3, 1e-3, cpu.out.data() + b * K,
                                            cpu.accepted.data() + b);
        if (corrupt) {
          EXPECT_EQ(cpu.status[1], kBadTargetProbs);
          EXPECT_EQ(cpu.status[2], with_q ? kDraftNotNormalized : 0);
        }
        for (int request : {0, 5, -1}) {
          SCOPED_TRACE("V " + std::to_string(vocab) + " request " + std::to_string(request) + (with_q ? " q" : "") +
                       (corrupt ? " corrupt" : ""));
          Workspace ws(B, K, vocab, false, request);
          Outputs gpu{std::vector<int64_t>(size_t(B * K)), std::vector<int64_t>(size_t(B)), std::vector<int32_t>(size_t(B), -7)};
          cuda::launch_verify_sample(pp, qq, c.draft.data(), c.u.data(), B, G, vocab, 1e-3, 1e-3, ws.plan, ws.ptr(),
                                     gpu.out.data(), gpu.accepted.data(), gpu.status.data(), nullptr);
          for (int64_t b = 0; b < B; ++b)
            if (cpu.status[b]) {  // failed rows: outputs unspecified on the CPU
              for (int64_t i = 0; i < K; ++i) cpu.out[b * K + i] = gpu.out[b * K + i];
              cpu.accepted[b] = gpu.accepted[b];
            }
          expect_same(gpu, cpu);
        }
      }
    // greedy: a NaN in row 2 after its first mismatch is never read; one in row 0 at position 0 is
    std::vector<float> logits = c.logits;
    std::vector<int64_t> draft(size_t(B * G));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < G; ++i) {  // drafts = the target's argmax for the first 2 positions
        const float* row = logits.data() + (b * K + i) * vocab;
        draft[size_t(b * G + i)] = i < 2 ? int64_t(std::max_element(row, row + vocab) - row) : (i * 7 + b) % vocab;
      }
    logits[size_t((2 * K + 4) * vocab + 9)] = std::nanf("");
    logits[size_t(0 * K * vocab + 3)] = std::nanf("");
    draft[size_t(1 * G + 3)] = -2;  // row 1: bad id
    Outputs cpu{std::vector<int64_t>(size_t(B * K)), std::vector<int64_t>(size_t(B)), std::vector<int32_t>(size_t(B))};
    for (int64_t b = 0; b < B; ++b)
      cpu.status[b] = verify_greedy_row(logits.data() + b * K * vocab, draft.data() + b * G, G, vocab,
                                        cpu.out.data() + b * K, cpu.accepted.data() + b);
    EXPECT_EQ(cpu.status, (std::vector<int32_t>{kNanLogits, kBadDraftToken, 0}));
    for (int request : {0, 4, -1}) {
      SCOPED_TRACE("greedy V " + std::to_string(vocab) + " request " + std::to_string(request));
      Workspace ws(B, K, vocab, false, request);
      Outputs gpu{std::vector<int64_t>(size_t(B * K)), std::vector<int64_t>(size_t(B)), std::vector<int32_t>(size_t(B), -7)};
      cuda::launch_verify_greedy(logits.data(), draft.data(), B, G, vocab, ws.plan, ws.ptr(), gpu.out.data(),
                                 gpu.accepted.data(), gpu.status.data(), nullptr);
      EXPECT_EQ(gpu.status, cpu.status);
      EXPECT_EQ(std::vector<int64_t>(gpu.out.begin() + 2 * K, gpu.out.end()),
                std::vector<int64_t>(cpu.out.begin() + 2 * K, cpu.out.end()));
      EXPECT_EQ(gpu.accepted[2], cpu.accepted[2]);
      EXPECT_EQ(cpu.accepted[2], 2);
    }
  }
}

TEST(CudaEmulationSplit, FusedStatusesFollowTheWalk) {
  // A NaN after the first rejection is never read (ok); at a read position it fails the row; a
  // bad q value at a decided draft fails it; +inf and all -inf fail while sampling.
  ProcessParams params;
  params.do_sample = true, params.top_p = 0.9;
  const int64_t B = 3, G = 4, K = G + 1, V = 4099;
  Case c = make_case(B, G, V, params, 4242);
  for (auto& u : c.u) u = 0.999999;  // reject every draft at position 0 (rows 0, 1)
  c.logits[size_t((0 * K + 3) * V + 17)] = std::nanf("");                  // row 0, unread position 3
  c.logits[size_t((1 * K + 0) * V + 17)] = std::numeric_limits<float>::infinity();  // row 1, position 0
  for (int64_t v = 0; v < V; ++v) c.logits[size_t((2 * K + 0) * V + v)] = -std::numeric_limits<float>::infinity();
  for (bool with_q : {true, false}) {
    const Outputs cpu = cpu_fused(c, params, with_q);
    EXPECT_EQ(cpu.status, (std::vector<int32_t>{0, kPosInfLogits, kNoFiniteLogits}));
    for (int request : {0, 3, -1}) {
      SCOPED_TRACE(std::string(with_q ? "q" : "one-hot") + " request " + std::to_string(request));
      Outputs split = launch_fused(c, params, with_q, request);
      for (int64_t b = 1; b < B; ++b) {  // failed rows: all -1, 0 accepted
        EXPECT_EQ(split.accepted[b], 0);
        EXPECT_EQ(split.out[b * K], -1);
      }
      EXPECT_EQ(split.status, cpu.status);
      EXPECT_EQ(std::vector<int64_t>(split.out.begin(), split.out.begin() + K),
                std::vector<int64_t>(cpu.out.begin(), cpu.out.begin() + K));
    }
  }
  Case d = make_case(B, G, V, params, 4343);
  d.q[size_t((1 * G + 0) * V + d.draft[size_t(1 * G)])] = -1.0f;  // row 1: q(d) negative at a decided draft
  const Outputs cpu = cpu_fused(d, params, true);
  EXPECT_EQ(cpu.status[1], kBadDraftProbs);
  for (int request : {0, 2, -1}) EXPECT_EQ(launch_fused(d, params, true, request).status, cpu.status);
}
