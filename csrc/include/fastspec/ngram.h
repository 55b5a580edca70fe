// NgramTable: counts of all n-grams of orders 1..n, with Laplace smoothing and
// backoff, greedy multi-step drafting and a versioned, checksummed binary format.
// Framework-agnostic (no torch); the torch face is csrc/torch/ngram_ops.cpp.
//
// Semantics (the Python reference twin fastspec.ngram.ReferenceNgramTable is the spec):
//   * Token ids are in [0, V). In training sequences -1 is padding and a sequence
//     break: no n-gram spans it.
//   * For a context, the model uses the longest suffix (k = min(n-1, len) tokens down
//     to 0) that has been seen as a context, i.e. was followed by some token in the
//     fitted data. The empty context (unigram) is seen as soon as anything was fitted.
//     There: p(w) = (count(ctx, w) + s) / (total(ctx) + s*V), computed in double and
//     rounded to float. An unfitted table gives uniform 1/V.
//   * Greedy drafting picks argmax_w count(ctx, w), smallest id on ties (this equals
//     the first maximal index of the probabilities), appends it and repeats.
//
// Storage: contexts are nodes of a suffix trie keyed by (parent, token) in an
// open-addressing hash table of 32-bit ids; continuation counts are entries keyed by
// (context, token) in a second one, chained per context for enumeration. Each
// context keeps its total and its argmax, so greedy drafting never scans a
// continuation list.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "fastspec/ngram_flat.h"

namespace fastspec {

// The flat, read-only copy of a table (host memory) that is uploaded to a GPU.
struct NgramFlat {
  std::vector<uint64_t> slot_keys;
  std::vector<uint32_t> slot_ctx;
  std::vector<uint32_t> ctx_total, ctx_best, cont_offsets, cont_tokens, cont_counts;
  int order = 1;
  int64_t vocab_size = 1;
  double smoothing = 1.0;
  ngram::FlatView view() const;  // host pointers into the vectors above
};

class NgramTable {
 public:
  static constexpr int kMaxOrder = ngram::kMaxOrder;
  static constexpr uint32_t kFormatVersion = 1;

  // Throws std::invalid_argument unless 1 <= n <= 16, 1 <= vocab_size < 2^31 and
  // smoothing is finite and >= 0.
  NgramTable(int n, int64_t vocab_size, double smoothing = 1.0);
  ~NgramTable();
  NgramTable(NgramTable&&) noexcept;
  NgramTable& operator=(NgramTable&&) noexcept;
  NgramTable(const NgramTable&) = delete;
  NgramTable& operator=(const NgramTable&) = delete;

  int order() const;
  int64_t vocab_size() const;
  double smoothing() const;

  // Sequences are tokens[offsets[i], offsets[i+1]) for i < num_seqs; offsets must be
  // non-decreasing from offsets[0] >= 0. Every id must be -1 or in [0, V): checked
  // for the whole batch before anything changes (std::invalid_argument).
  void update(const int64_t* tokens, const int64_t* offsets, int64_t num_seqs);
  // clear() then update(), with the same all-or-nothing validation.
  void fit(const int64_t* tokens, const int64_t* offsets, int64_t num_seqs);
  void clear();

  uint64_t num_entries() const;   // distinct n-grams over all orders 1..n
  uint64_t num_contexts() const;  // distinct seen contexts (incl. the empty one)
  uint64_t num_tokens() const;    // tokens counted (= total of the empty context)
  uint64_t memory_bytes() const;  // heap bytes held (capacities, not sizes)
  uint64_t version() const;       // bumped by every change; device copies compare it

  // Batched drafting. context is [B, L] row-major. Without lengths, each row may
  // start with -1 left padding, and -1 may not follow a real token. With lengths
  // (nullable, [B]), row b's context is its first lengths[b] tokens (0 <= lengths[b]
  // <= L), all in [0, V). Writes out_tokens [B, gamma] and, when out_probs is not
  // null, out_probs [B, gamma, V] (the distribution each token was drafted from).
  // Invalid input throws std::invalid_argument before anything is written.
  void draft(const int64_t* context, int64_t batch, int64_t length, const int64_t* lengths,
             int64_t gamma, int64_t* out_tokens, float* out_probs) const;
  // out_probs [B, V]: the next-token distribution after each row's context.
  void next_probs(const int64_t* context, int64_t batch, int64_t length,
                  const int64_t* lengths, float* out_probs) const;

  // Same semantics through the public lookup of one context (oldest token first,
  // all in [0, V)): returns the id of the context used (0 = empty context), its
  // total, and its argmax token.
  uint32_t longest_seen_context(const int64_t* tokens, int64_t count) const;
  uint32_t context_total(uint32_t ctx) const;
  uint32_t context_best(uint32_t ctx) const;
  // Count of (context, token); 0 when unseen.
  uint32_t count(uint32_t ctx, uint32_t token) const;

  NgramFlat build_flat() const;

  // Versioned binary format: magic "FSNGRAM\0", version, n, V, smoothing, sizes,
  // payload, FNV-1a-64 checksum over header fields and payload; little-endian. The
  // payload order is canonical: equal counts give equal bytes.
  std::vector<uint8_t> serialize() const;
  // Throws std::runtime_error with a clear message on a truncated, corrupted,
  // foreign or wrong-version buffer; never reads out of bounds.
  static NgramTable deserialize(const uint8_t* data, size_t size);
  void save(const std::string& path) const;
  static NgramTable load(const std::string& path);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// FNV-1a 64-bit hash; exposed for tests.
uint64_t fnv1a64(const uint8_t* data, size_t size, uint64_t seed = 0xcbf29ce484222325ULL);

}  // namespace fastspec
