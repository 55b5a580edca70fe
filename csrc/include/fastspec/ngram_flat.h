// The n-gram table's read-only "flat" format: what gets uploaded to the GPU.
//
// Built on the CPU by NgramTable::build_flat() (ngram.h) and copied to the device
// as plain arrays. The lookup functions below are __host__ __device__, so the CUDA
// kernel (csrc/cuda/ngram.cu) and the host-side tests run the very same code.
//
// Layout (C = number of contexts, root = context 0 = the empty context):
//   contexts form a suffix trie read right to left: the child of context X under
//   token t is the context "t X" (one token further into the past). Edges live in
//   an open-addressing hash table (linear probing, power-of-two capacity, at least
//   one empty slot): slot_keys[i] = edge_key(parent, t) or kEmptyKey, slot_ctx[i] =
//   the child's id.
//   ctx_total[C]   number of times the context was followed by any token
//   ctx_best[C]    its most frequent continuation (smallest id on ties)
//   cont_offsets[C+1], cont_tokens[E], cont_counts[E]: CSR of continuations,
//                  tokens ascending within a context.
// No torch here: this header is included by the .cu file.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FASTSPEC_HD __host__ __device__ __forceinline__
#else
#define FASTSPEC_HD inline
#endif

namespace fastspec {
namespace ngram {

constexpr int kMaxOrder = 16;               // n <= 16, so contexts hold <= 15 tokens
constexpr uint64_t kEmptyKey = ~uint64_t(0);
constexpr uint32_t kNoContext = ~uint32_t(0);

FASTSPEC_HD uint64_t edge_key(uint32_t parent, uint32_t token) {
  return (uint64_t(parent) << 32) | uint64_t(token);
}

// splitmix64 finalizer: a cheap, well-mixed hash of a 64-bit key.
FASTSPEC_HD uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

// Laplace-smoothed probability at the chosen context, computed in double and
// rounded once to float, identically on host and device (a single add and a single
// IEEE division each, so no FMA contraction can change the result). The caller
// handles the unfitted table (total == 0 at the root) as uniform 1/V.
FASTSPEC_HD float smoothed_prob(uint32_t count, uint32_t total, double smoothing,
                                double smoothing_times_vocab) {
  return static_cast<float>((static_cast<double>(count) + smoothing) /
                            (static_cast<double>(total) + smoothing_times_vocab));
}

FASTSPEC_HD float uniform_prob(int64_t vocab_size) {
  return static_cast<float>(1.0 / static_cast<double>(vocab_size));
}

// Raw pointers to the flat arrays, valid on whichever side (host/device) holds them.
struct FlatView {
  const uint64_t* slot_keys = nullptr;   // [slot_mask+1]
  const uint32_t* slot_ctx = nullptr;    // [slot_mask+1]
  uint64_t slot_mask = 0;
  const uint32_t* ctx_total = nullptr;     // [num_contexts]
  const uint32_t* ctx_best = nullptr;      // [num_contexts]
  const uint32_t* cont_offsets = nullptr;  // [num_contexts+1]
  const uint32_t* cont_tokens = nullptr;   // [num_entries]
  const uint32_t* cont_counts = nullptr;   // [num_entries]
  uint32_t num_contexts = 1;
  int order = 1;            // n
  int64_t vocab_size = 1;   // V
  double smoothing = 1.0;   // s
  double smoothing_times_vocab = 1.0;  // s*V, computed once on the host
};

FASTSPEC_HD uint32_t find_child(const FlatView& t, uint32_t parent, uint32_t token) {
  const uint64_t key = edge_key(parent, token);
  uint64_t slot = mix64(key) & t.slot_mask;
  while (true) {
    const uint64_t k = t.slot_keys[slot];
    if (k == key) return t.slot_ctx[slot];
    if (k == kEmptyKey) return kNoContext;
    slot = (slot + 1) & t.slot_mask;
  }
}

// Backoff: the longest seen suffix of the context. `recent_first[0]` is the most
// recent token; `count` <= n-1. Every prefix of a stored path is stored too (a
// context followed by w implies its shorter suffixes were followed by w), so the
// walk can stop at the first miss.
FASTSPEC_HD uint32_t longest_seen_context(const FlatView& t, const uint32_t* recent_first,
                                          int count) {
  uint32_t ctx = 0;
  for (int k = 0; k < count; ++k) {
    const uint32_t child = find_child(t, ctx, recent_first[k]);
    if (child == kNoContext) break;
    ctx = child;
  }
  return ctx;
}

// Drafting state of one row: its last <= n-1 tokens, most recent first.
// load_history reads row[0, end) backwards and stops at -1 left padding.
FASTSPEC_HD int load_history(const int64_t* row, int64_t end, int max_context, uint32_t* recent_first) {
  int count = 0;
  for (int64_t i = end - 1; i >= 0 && count < max_context; --i) {
    const int64_t v = row[i];
    if (v < 0) break;
    recent_first[count++] = static_cast<uint32_t>(v);
  }
  return count;
}

// The drafted token extends the context: shift it in front, keep at most max_context.
FASTSPEC_HD int push_history(uint32_t* recent_first, int count, int max_context, uint32_t token) {
  if (max_context == 0) return 0;
  const int keep = count < max_context - 1 ? count : max_context - 1;
  for (int k = keep; k > 0; --k) recent_first[k] = recent_first[k - 1];
  recent_first[0] = token;
  return keep + 1;
}

// The probability of every token never seen after `ctx` (the smoothed floor).
FASTSPEC_HD float floor_prob(const FlatView& t, uint32_t ctx) {
  const uint32_t total = t.ctx_total[ctx];
  return total == 0 ? uniform_prob(t.vocab_size) : smoothed_prob(0, total, t.smoothing, t.smoothing_times_vocab);
}

// The history before drafting step `step` of a row, rebuilt from the row and the
// tokens drafted so far (drafted[0, step)): equal to load_history followed by `step`
// push_history calls. Lets every (row, step) of the probability kernel run in parallel.
FASTSPEC_HD int history_at_step(const int64_t* row, int64_t end, const int64_t* drafted, int64_t step,
                                int max_context, uint32_t* recent_first) {
  int count = 0;
  for (int64_t k = step - 1; k >= 0 && count < max_context; --k)
    recent_first[count++] = static_cast<uint32_t>(drafted[k]);
  for (int64_t i = end - 1; i >= 0 && count < max_context; --i) {
    const int64_t v = row[i];
    if (v < 0) break;
    recent_first[count++] = static_cast<uint32_t>(v);
  }
  return count;
}

// First index in the ascending tokens[begin, end) whose token is >= value.
FASTSPEC_HD uint32_t lower_bound_token(const uint32_t* tokens, uint32_t begin, uint32_t end, uint64_t value) {
  while (begin < end) {
    const uint32_t mid = begin + (end - begin) / 2;
    if (tokens[mid] < value)
      begin = mid + 1;
    else
      end = mid;
  }
  return begin;
}

// Greedy drafting of one row over the flat table (what each thread of the CUDA
// tokens kernel runs); writes out[0, gamma).
FASTSPEC_HD void draft_row(const FlatView& t, const int64_t* row, int64_t end, int64_t gamma, int64_t* out) {
  const int max_context = t.order - 1;
  uint32_t hist[kMaxOrder];
  int count = load_history(row, end, max_context, hist);
  for (int64_t j = 0; j < gamma; ++j) {
    const uint32_t token = t.ctx_best[longest_seen_context(t, hist, count)];
    out[j] = token;
    count = push_history(hist, count, max_context, token);
  }
}

}  // namespace ngram
}  // namespace fastspec
