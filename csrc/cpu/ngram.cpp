// NgramTable implementation (see csrc/include/fastspec/ngram.h). No torch.
#include "fastspec/ngram.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>

namespace fastspec {

namespace {

constexpr uint32_t kEmptySlot = ~uint32_t(0);
constexpr uint32_t kNoEntry = ~uint32_t(0);
constexpr uint32_t kMaxId = 0xFFFFFFF0u;  // ids stay clear of the sentinels
constexpr size_t kHeaderBytes = 64;
constexpr char kMagic[8] = {'F', 'S', 'N', 'G', 'R', 'A', 'M', '\0'};

struct Context {
  uint32_t parent;      // the context one token shorter (root: itself)
  uint32_t token;       // the token this context adds in front of its parent
  uint32_t total;       // times followed by any token
  uint32_t best_token;  // argmax continuation, smallest id on ties (0 when empty)
  uint32_t best_count;
  uint32_t head;        // first entry of its continuation chain
};

struct Entry {
  uint32_t ctx;
  uint32_t token;
  uint32_t count;
  uint32_t next;  // next entry of the same context
};

// Open addressing over dense 32-bit ids (linear probing, load <= 0.7). A slot holds
// the id and a 32-bit fingerprint of its key's hash, so a probe only reads the owning
// array (to compare the full key) when the fingerprint matches: about one cache miss
// per lookup instead of one per probe step. 8 bytes per slot.
class IdSlots {
 public:
  IdSlots() { reset(); }
  void reset() {
    slots_.assign(16, kEmpty);
    size_ = 0;
  }
  // Slot holding `key`, or the empty slot where it would go.
  template <class KeyOf>
  size_t probe(uint64_t key, const KeyOf& key_of) const {
    const size_t mask = slots_.size() - 1;
    const uint64_t h = ngram::mix64(key);
    const uint64_t fingerprint = h >> 32;
    size_t i = static_cast<size_t>(h) & mask;
    while (true) {
      const uint64_t s = slots_[i];
      if (s == kEmpty || ((s >> 32) == fingerprint && key_of(static_cast<uint32_t>(s)) == key)) return i;
      i = (i + 1) & mask;
    }
  }
  // The id in a slot, kEmptySlot when empty.
  uint32_t at(size_t slot) const { return static_cast<uint32_t>(slots_[slot]); }
  // Grows first if one more id would exceed the load factor; returns true if it did
  // (slots found earlier are then stale). The stored ids are exactly [first, end), so
  // the rehash walks the owning array in order.
  template <class KeyOf>
  bool reserve_one(const KeyOf& key_of, uint32_t first, uint32_t end) {
    if ((size_ + 1) * 10 <= slots_.size() * 7) return false;
    slots_.assign(slots_.size() * 2, kEmpty);
    for (uint32_t id = first; id < end; ++id) {
      const uint64_t key = key_of(id);
      slots_[probe(key, key_of)] = pack(key, id);
    }
    return true;
  }
  void set(size_t slot, uint64_t key, uint32_t id) {
    slots_[slot] = pack(key, id);
    ++size_;
  }
  size_t bytes() const { return slots_.capacity() * sizeof(uint64_t); }
  void prefetch(uint64_t key) const {
#if defined(__GNUC__)
    __builtin_prefetch(&slots_[static_cast<size_t>(ngram::mix64(key)) & (slots_.size() - 1)]);
#else
    (void)key;
#endif
  }
  // If the home slot of `key` holds a fingerprint match, prefetch that id's record.
  template <class AddressOf>
  void prefetch_owner(uint64_t key, const AddressOf& address_of) const {
#if defined(__GNUC__)
    const uint64_t h = ngram::mix64(key);
    const uint64_t s = slots_[static_cast<size_t>(h) & (slots_.size() - 1)];
    if (s != kEmpty && (s >> 32) == (h >> 32)) __builtin_prefetch(address_of(static_cast<uint32_t>(s)));
#else
    (void)key;
    (void)address_of;
#endif
  }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t(0);  // id 0xFFFFFFFF is never used
  static uint64_t pack(uint64_t key, uint32_t id) {
    return (ngram::mix64(key) >> 32 << 32) | uint64_t(id);
  }
  std::vector<uint64_t> slots_;
  size_t size_ = 0;
};

void put_u32(std::vector<uint8_t>& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
void put_u64(std::vector<uint8_t>& out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}

// Bounds-checked little-endian reads.
class Reader {
 public:
  Reader(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  uint32_t u32() { return static_cast<uint32_t>(take(4)); }
  uint64_t u64() { return take(8); }
  size_t pos() const { return pos_; }

 private:
  uint64_t take(size_t bytes) {
    if (bytes > size_ - pos_) throw std::runtime_error("n-gram table file is truncated");
    uint64_t v = 0;
    for (size_t i = 0; i < bytes; ++i) v |= uint64_t(data_[pos_ + i]) << (8 * i);
    pos_ += bytes;
    return v;
  }
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

void check_args(int n, int64_t vocab_size, double smoothing) {
  if (n < 1 || n > ngram::kMaxOrder)
    throw std::invalid_argument("NgramTable: n must be in [1, 16], got " + std::to_string(n));
  if (vocab_size < 1 || vocab_size > int64_t(std::numeric_limits<int32_t>::max()))
    throw std::invalid_argument("NgramTable: vocab_size must be in [1, 2^31), got " +
                                std::to_string(vocab_size));
  if (!std::isfinite(smoothing) || smoothing < 0)
    throw std::invalid_argument("NgramTable: smoothing must be finite and >= 0");
}

}  // namespace

struct NgramTable::Impl {
  int n;
  int64_t vocab;
  double smoothing;
  double smoothing_times_vocab;
  std::vector<Context> contexts;
  IdSlots context_slots;  // (parent, token) -> context id (root not stored)
  std::vector<Entry> entries;
  IdSlots entry_slots;    // (context, token) -> entry id
  uint64_t version = 0;

  Impl(int n_, int64_t vocab_, double s_)
      : n(n_), vocab(vocab_), smoothing(s_), smoothing_times_vocab(s_ * static_cast<double>(vocab_)) {
    reset();
  }

  void reset() {
    contexts.clear();
    contexts.shrink_to_fit();
    contexts.push_back(Context{0, 0, 0, 0, 0, kNoEntry});
    context_slots.reset();
    entries.clear();
    entries.shrink_to_fit();
    entry_slots.reset();
    ++version;
  }

  uint64_t context_key(uint32_t id) const { return ngram::edge_key(contexts[id].parent, contexts[id].token); }
  uint64_t entry_key(uint32_t id) const { return ngram::edge_key(entries[id].ctx, entries[id].token); }

  uint32_t find_child(uint32_t parent, uint32_t token) const {
    const size_t slot = context_slots.probe(ngram::edge_key(parent, token),
                                            [this](uint32_t id) { return context_key(id); });
    return context_slots.at(slot) == kEmptySlot ? ngram::kNoContext : context_slots.at(slot);
  }

  uint32_t find_entry(uint32_t ctx, uint32_t token) const {
    const size_t slot = entry_slots.probe(ngram::edge_key(ctx, token),
                                          [this](uint32_t id) { return entry_key(id); });
    return entry_slots.at(slot) == kEmptySlot ? kNoEntry : entry_slots.at(slot);
  }

  // Returns the child id and whether it was created.
  std::pair<uint32_t, bool> child(uint32_t parent, uint32_t token) {
    auto key_of = [this](uint32_t id) { return context_key(id); };
    const uint64_t key = ngram::edge_key(parent, token);
    size_t slot = context_slots.probe(key, key_of);
    if (context_slots.at(slot) != kEmptySlot) return {context_slots.at(slot), false};
    if (contexts.size() >= kMaxId) throw std::overflow_error("NgramTable: too many contexts");
    const uint32_t id = static_cast<uint32_t>(contexts.size());
    if (context_slots.reserve_one(key_of, 1, id)) slot = context_slots.probe(key, key_of);
    contexts.push_back(Context{parent, token, 0, 0, 0, kNoEntry});
    context_slots.set(slot, key, id);
    return {id, true};
  }

  // count(ctx, token) += delta; returns whether the entry was new.
  bool add(uint32_t ctx, uint32_t token, uint32_t delta) {
    auto key_of = [this](uint32_t id) { return entry_key(id); };
    const uint64_t key = ngram::edge_key(ctx, token);
    size_t slot = entry_slots.probe(key, key_of);
    uint32_t e = entry_slots.at(slot);
    const bool created = e == kEmptySlot;
    if (created) {
      if (entries.size() >= kMaxId) throw std::overflow_error("NgramTable: too many n-grams");
      e = static_cast<uint32_t>(entries.size());
      if (entry_slots.reserve_one(key_of, 0, e)) slot = entry_slots.probe(key, key_of);
      entries.push_back(Entry{ctx, token, 0, contexts[ctx].head});
      contexts[ctx].head = e;
      entry_slots.set(slot, key, e);
    }
    Entry& entry = entries[e];
    entry.count += delta;
    Context& c = contexts[ctx];
    c.total += delta;
    // Counts only grow, so the argmax is either the old one or this token.
    if (entry.count > c.best_count || (entry.count == c.best_count && token < c.best_token)) {
      c.best_count = entry.count;
      c.best_token = token;
    }
    return created;
  }

  // recent_first[0] is the most recent token, count <= n-1.
  uint32_t longest(const uint32_t* recent_first, int count) const {
    uint32_t ctx = 0;
    for (int k = 0; k < count; ++k) {
      const uint32_t c = find_child(ctx, recent_first[k]);
      if (c == ngram::kNoContext) break;
      ctx = c;
    }
    return ctx;
  }

  void fill_probs(uint32_t ctx, float* row) const {
    const Context& c = contexts[ctx];
    if (c.total == 0) {  // only the root of an unfitted table
      std::fill(row, row + vocab, ngram::uniform_prob(vocab));
      return;
    }
    std::fill(row, row + vocab, ngram::smoothed_prob(0, c.total, smoothing, smoothing_times_vocab));
    for (uint32_t e = c.head; e != kNoEntry; e = entries[e].next)
      row[entries[e].token] = ngram::smoothed_prob(entries[e].count, c.total, smoothing, smoothing_times_vocab);
  }

  void validate_sequences(const int64_t* tokens, const int64_t* offsets, int64_t num_seqs,
                          uint64_t* valid_tokens) const {
    if (num_seqs < 0) throw std::invalid_argument("NgramTable.update: negative number of sequences");
    *valid_tokens = 0;
    if (num_seqs == 0) return;
    if (offsets == nullptr) throw std::invalid_argument("NgramTable.update: offsets is null");
    if (offsets[0] < 0) throw std::invalid_argument("NgramTable.update: offsets[0] < 0");
    for (int64_t i = 0; i < num_seqs; ++i) {
      if (offsets[i + 1] < offsets[i])
        throw std::invalid_argument("NgramTable.update: offsets must be non-decreasing");
    }
    if (offsets[num_seqs] > offsets[0] && tokens == nullptr)
      throw std::invalid_argument("NgramTable.update: tokens is null");
    for (int64_t i = offsets[0]; i < offsets[num_seqs]; ++i) {
      const int64_t t = tokens[i];
      if (t < -1 || t >= vocab)
        throw std::invalid_argument("NgramTable.update: token id " + std::to_string(t) +
                                    " out of range [0, " + std::to_string(vocab) + ") (-1 = padding)");
      if (t >= 0) ++*valid_tokens;
    }
  }

  void check_capacity(uint64_t valid_tokens, bool after_reset) const {
    const uint64_t counted = after_reset ? 0 : contexts[0].total;
    if (counted + valid_tokens > uint64_t(std::numeric_limits<uint32_t>::max()))
      throw std::overflow_error("NgramTable: more than 2^32-1 tokens in total");
  }

  // Counting is memory-latency bound (every lookup is a cache miss in a large table),
  // so positions are processed order by order: within one order the lookups of
  // different positions are independent, and the loop prefetches the hash slot two
  // strides ahead and the record it points to one stride ahead.
  void count_sequences(const int64_t* tokens, const int64_t* offsets, int64_t num_seqs) {
    ++version;
    constexpr size_t kChunk = size_t(1) << 20;  // positions per batch (bounds scratch memory)
    std::vector<int64_t> pos;    // positions of real tokens
    std::vector<uint8_t> reach;  // real tokens right before each in its run, <= n-1
    pos.reserve(kChunk);
    reach.reserve(kChunk);
    for (int64_t s = 0; s < num_seqs; ++s) {
      int run = 0;
      for (int64_t i = offsets[s]; i < offsets[s + 1]; ++i) {
        if (tokens[i] < 0) {  // -1 breaks the sequence
          run = 0;
          continue;
        }
        pos.push_back(i);
        reach.push_back(static_cast<uint8_t>(std::min(run, n - 1)));
        ++run;
        if (pos.size() == kChunk) {
          count_positions(tokens, pos, reach);
          pos.clear();
          reach.clear();
        }
      }
    }
    count_positions(tokens, pos, reach);
  }

  void count_positions(const int64_t* tokens, const std::vector<int64_t>& pos, const std::vector<uint8_t>& reach) {
    constexpr size_t kAhead = 8;
    const size_t num = pos.size();
    for (size_t a = 0; a < num; ++a) add(0, static_cast<uint32_t>(tokens[pos[a]]), 1);  // unigrams: hot
    std::vector<uint32_t> ctx(num, 0);  // each position's context of the previous order
    std::vector<uint32_t> live(num);    // positions that have a context of this order
    for (size_t a = 0; a < num; ++a) live[a] = static_cast<uint32_t>(a);
    auto context_at = [this](uint32_t id) { return static_cast<const void*>(&contexts[id]); };
    auto entry_at = [this](uint32_t id) { return static_cast<const void*>(&entries[id]); };
    for (int k = 1; k < n; ++k) {
      size_t m = 0;
      for (const uint32_t idx : live)
        if (reach[idx] >= k) live[m++] = idx;
      live.resize(m);
      if (m == 0) break;
      // order-k context = (order-(k-1) context) extended by the token k back
      auto ctx_key = [&](uint32_t idx) {
        return ngram::edge_key(ctx[idx], static_cast<uint32_t>(tokens[pos[idx] - k]));
      };
      for (size_t a = 0; a < m; ++a) {
        if (a + 2 * kAhead < m) context_slots.prefetch(ctx_key(live[a + 2 * kAhead]));
        if (a + kAhead < m) context_slots.prefetch_owner(ctx_key(live[a + kAhead]), context_at);
        const uint32_t idx = live[a];
        ctx[idx] = child(ctx[idx], static_cast<uint32_t>(tokens[pos[idx] - k])).first;
      }
      auto count_key = [&](uint32_t idx) {
        return ngram::edge_key(ctx[idx], static_cast<uint32_t>(tokens[pos[idx]]));
      };
      for (size_t a = 0; a < m; ++a) {
        if (a + 2 * kAhead < m) entry_slots.prefetch(count_key(live[a + 2 * kAhead]));
        if (a + kAhead < m) entry_slots.prefetch_owner(count_key(live[a + kAhead]), entry_at);
        const uint32_t idx = live[a];
        add(ctx[idx], static_cast<uint32_t>(tokens[pos[idx]]), 1);
      }
    }
  }

  // Checks a [B, L] context batch (see ngram.h) before anything is written.
  void validate_context(const int64_t* context, int64_t batch, int64_t length,
                        const int64_t* lengths) const {
    if (batch < 0 || length < 0) throw std::invalid_argument("NgramTable: negative context shape");
    if (batch > 0 && length > 0 && context == nullptr)
      throw std::invalid_argument("NgramTable: context is null");
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t* row = context + b * length;
      if (lengths != nullptr) {
        if (lengths[b] < 0 || lengths[b] > length)
          throw std::invalid_argument("NgramTable: lengths[" + std::to_string(b) + "] = " +
                                      std::to_string(lengths[b]) + " outside [0, " +
                                      std::to_string(length) + "]");
        for (int64_t i = 0; i < lengths[b]; ++i) {
          if (row[i] < 0 || row[i] >= vocab)
            throw std::invalid_argument("NgramTable: context id " + std::to_string(row[i]) +
                                        " out of range [0, " + std::to_string(vocab) + ")");
        }
      } else {
        bool started = false;
        for (int64_t i = 0; i < length; ++i) {
          const int64_t t = row[i];
          if (t < -1 || t >= vocab)
            throw std::invalid_argument("NgramTable: context id " + std::to_string(t) +
                                        " out of range [0, " + std::to_string(vocab) +
                                        ") (-1 = left padding)");
          if (t >= 0) started = true;
          else if (started)
            throw std::invalid_argument("NgramTable: -1 padding must be on the left of each context row "
                                        "(pass lengths for right padding)");
        }
      }
    }
  }
};

ngram::FlatView NgramFlat::view() const {
  ngram::FlatView v;
  v.slot_keys = slot_keys.data();
  v.slot_ctx = slot_ctx.data();
  v.slot_mask = slot_keys.size() - 1;
  v.ctx_total = ctx_total.data();
  v.ctx_best = ctx_best.data();
  v.cont_offsets = cont_offsets.data();
  v.cont_tokens = cont_tokens.data();
  v.cont_counts = cont_counts.data();
  v.num_contexts = static_cast<uint32_t>(ctx_total.size());
  v.order = order;
  v.vocab_size = vocab_size;
  v.smoothing = smoothing;
  v.smoothing_times_vocab = smoothing * static_cast<double>(vocab_size);
  return v;
}

NgramTable::NgramTable(int n, int64_t vocab_size, double smoothing) {
  check_args(n, vocab_size, smoothing);
  impl_ = std::make_unique<Impl>(n, vocab_size, smoothing);
}
NgramTable::~NgramTable() = default;
NgramTable::NgramTable(NgramTable&&) noexcept = default;
NgramTable& NgramTable::operator=(NgramTable&&) noexcept = default;

int NgramTable::order() const { return impl_->n; }
int64_t NgramTable::vocab_size() const { return impl_->vocab; }
double NgramTable::smoothing() const { return impl_->smoothing; }
uint64_t NgramTable::num_entries() const { return impl_->entries.size(); }
uint64_t NgramTable::num_contexts() const { return impl_->contexts.size(); }
uint64_t NgramTable::num_tokens() const { return impl_->contexts[0].total; }
uint64_t NgramTable::version() const { return impl_->version; }

uint64_t NgramTable::memory_bytes() const {
  return sizeof(*this) + sizeof(Impl) + impl_->contexts.capacity() * sizeof(Context) +
         impl_->entries.capacity() * sizeof(Entry) + impl_->context_slots.bytes() +
         impl_->entry_slots.bytes();
}

void NgramTable::clear() { impl_->reset(); }

void NgramTable::update(const int64_t* tokens, const int64_t* offsets, int64_t num_seqs) {
  uint64_t valid = 0;
  impl_->validate_sequences(tokens, offsets, num_seqs, &valid);
  impl_->check_capacity(valid, /*after_reset=*/false);
  impl_->count_sequences(tokens, offsets, num_seqs);
}

void NgramTable::fit(const int64_t* tokens, const int64_t* offsets, int64_t num_seqs) {
  uint64_t valid = 0;
  impl_->validate_sequences(tokens, offsets, num_seqs, &valid);  // all or nothing
  impl_->check_capacity(valid, /*after_reset=*/true);
  impl_->reset();
  impl_->count_sequences(tokens, offsets, num_seqs);
  impl_->contexts.shrink_to_fit();  // a fitted table is usually only read from now on
  impl_->entries.shrink_to_fit();
}

void NgramTable::draft(const int64_t* context, int64_t batch, int64_t length, const int64_t* lengths,
                       int64_t gamma, int64_t* out_tokens, float* out_probs) const {
  if (gamma < 0) throw std::invalid_argument("NgramTable.draft: gamma must be >= 0");
  impl_->validate_context(context, batch, length, lengths);
  const Impl& t = *impl_;
  const int max_ctx = t.n - 1;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t* row = context + b * length;
    uint32_t hist[ngram::kMaxOrder];  // most recent first, at most n-1 tokens
    int count = ngram::load_history(row, lengths != nullptr ? lengths[b] : length, max_ctx, hist);
    for (int64_t j = 0; j < gamma; ++j) {
      const uint32_t ctx = t.longest(hist, count);
      const uint32_t token = t.contexts[ctx].best_token;
      out_tokens[b * gamma + j] = token;
      if (out_probs != nullptr) t.fill_probs(ctx, out_probs + (b * gamma + j) * t.vocab);
      count = ngram::push_history(hist, count, max_ctx, token);  // the token extends the context
    }
  }
}

void NgramTable::next_probs(const int64_t* context, int64_t batch, int64_t length,
                            const int64_t* lengths, float* out_probs) const {
  std::vector<int64_t> tokens(static_cast<size_t>(std::max<int64_t>(batch, 0)));
  draft(context, batch, length, lengths, 1, tokens.data(), out_probs);
}

uint32_t NgramTable::longest_seen_context(const int64_t* tokens, int64_t count) const {
  uint32_t hist[ngram::kMaxOrder];
  int k = 0;
  for (int64_t i = count - 1; i >= 0 && k < impl_->n - 1; --i) {
    if (tokens[i] < 0 || tokens[i] >= impl_->vocab)
      throw std::invalid_argument("NgramTable: context id out of range");
    hist[k++] = static_cast<uint32_t>(tokens[i]);
  }
  return impl_->longest(hist, k);
}

uint32_t NgramTable::context_total(uint32_t ctx) const {
  if (ctx >= impl_->contexts.size()) throw std::out_of_range("NgramTable: bad context id");
  return impl_->contexts[ctx].total;
}

uint32_t NgramTable::context_best(uint32_t ctx) const {
  if (ctx >= impl_->contexts.size()) throw std::out_of_range("NgramTable: bad context id");
  return impl_->contexts[ctx].best_token;
}

uint32_t NgramTable::count(uint32_t ctx, uint32_t token) const {
  if (ctx >= impl_->contexts.size()) return 0;
  const uint32_t e = impl_->find_entry(ctx, token);
  return e == kNoEntry ? 0 : impl_->entries[e].count;
}

NgramFlat NgramTable::build_flat() const {
  const Impl& t = *impl_;
  NgramFlat f;
  f.order = t.n;
  f.vocab_size = t.vocab;
  f.smoothing = t.smoothing;
  const size_t num_ctx = t.contexts.size();
  size_t cap = 2;
  while (cap < 2 * (num_ctx - 1)) cap *= 2;  // load <= 0.5: short probes, >= 1 empty slot
  f.slot_keys.assign(cap, ngram::kEmptyKey);
  f.slot_ctx.assign(cap, 0);
  for (size_t id = 1; id < num_ctx; ++id) {
    const uint64_t key = ngram::edge_key(t.contexts[id].parent, t.contexts[id].token);
    size_t slot = static_cast<size_t>(ngram::mix64(key)) & (cap - 1);
    while (f.slot_keys[slot] != ngram::kEmptyKey) slot = (slot + 1) & (cap - 1);
    f.slot_keys[slot] = key;
    f.slot_ctx[slot] = static_cast<uint32_t>(id);
  }
  f.ctx_total.resize(num_ctx);
  f.ctx_best.resize(num_ctx);
  f.cont_offsets.resize(num_ctx + 1);
  f.cont_tokens.reserve(t.entries.size());
  f.cont_counts.reserve(t.entries.size());
  std::vector<std::pair<uint32_t, uint32_t>> conts;
  for (size_t id = 0; id < num_ctx; ++id) {
    f.ctx_total[id] = t.contexts[id].total;
    f.ctx_best[id] = t.contexts[id].best_token;
    f.cont_offsets[id] = static_cast<uint32_t>(f.cont_tokens.size());
    conts.clear();
    for (uint32_t e = t.contexts[id].head; e != kNoEntry; e = t.entries[e].next)
      conts.emplace_back(t.entries[e].token, t.entries[e].count);
    std::sort(conts.begin(), conts.end());
    for (const auto& c : conts) {
      f.cont_tokens.push_back(c.first);
      f.cont_counts.push_back(c.second);
    }
  }
  f.cont_offsets[num_ctx] = static_cast<uint32_t>(f.cont_tokens.size());
  return f;
}

uint64_t fnv1a64(const uint8_t* data, size_t size, uint64_t seed) {
  uint64_t h = seed;
  for (size_t i = 0; i < size; ++i) {
    h ^= data[i];
    h *= 0x100000001b3ULL;
  }
  return h;
}

// Layout (little-endian): [0,8) magic, [8,12) version, [12,16) n, [16,24) V,
// [24,32) smoothing (IEEE bits), [32,40) contexts incl. root, [40,48) entries,
// [48,56) payload bytes, [56,64) FNV-1a-64 of bytes [8,56) then the payload.
// Payload: (contexts-1) x {parent u32, token u32}, then entries x {ctx u32, token u32,
// count u32}, in a canonical order (equal counts give equal files).
std::vector<uint8_t> NgramTable::serialize() const {
  const Impl& t = *impl_;
  std::vector<uint8_t> out;
  const uint64_t payload = (t.contexts.size() - 1) * 8 + t.entries.size() * 12;
  out.reserve(kHeaderBytes + payload);
  for (char c : kMagic) out.push_back(static_cast<uint8_t>(c));
  put_u32(out, kFormatVersion);
  put_u32(out, static_cast<uint32_t>(t.n));
  put_u64(out, static_cast<uint64_t>(t.vocab));
  uint64_t s_bits;
  std::memcpy(&s_bits, &t.smoothing, sizeof(s_bits));
  put_u64(out, s_bits);
  put_u64(out, t.contexts.size());
  put_u64(out, t.entries.size());
  put_u64(out, payload);
  put_u64(out, 0);  // checksum, patched below
  // Canonical order, so equal counts give equal bytes however they were inserted:
  // contexts by (depth, parent's new id, token), entries by (context's new id, token).
  // A parent always has a smaller id than its children (it is created first).
  const size_t num_ctx = t.contexts.size();
  std::vector<std::vector<uint32_t>> by_depth(static_cast<size_t>(t.n));
  std::vector<uint8_t> depth(num_ctx, 0);
  for (size_t id = 1; id < num_ctx; ++id) {
    depth[id] = static_cast<uint8_t>(depth[t.contexts[id].parent] + 1);
    by_depth[depth[id]].push_back(static_cast<uint32_t>(id));
  }
  std::vector<uint32_t> new_id(num_ctx, 0);
  uint32_t next_id = 1;
  for (auto& level : by_depth) {
    std::sort(level.begin(), level.end(), [&](uint32_t a, uint32_t b) {
      const Context &x = t.contexts[a], &y = t.contexts[b];
      return new_id[x.parent] != new_id[y.parent] ? new_id[x.parent] < new_id[y.parent] : x.token < y.token;
    });
    for (const uint32_t id : level) {
      new_id[id] = next_id++;
      put_u32(out, new_id[t.contexts[id].parent]);
      put_u32(out, t.contexts[id].token);
    }
  }
  std::vector<uint32_t> entry_order(t.entries.size());
  for (size_t e = 0; e < entry_order.size(); ++e) entry_order[e] = static_cast<uint32_t>(e);
  std::sort(entry_order.begin(), entry_order.end(), [&](uint32_t a, uint32_t b) {
    const Entry &x = t.entries[a], &y = t.entries[b];
    return new_id[x.ctx] != new_id[y.ctx] ? new_id[x.ctx] < new_id[y.ctx] : x.token < y.token;
  });
  for (const uint32_t e : entry_order) {
    put_u32(out, new_id[t.entries[e].ctx]);
    put_u32(out, t.entries[e].token);
    put_u32(out, t.entries[e].count);
  }
  uint64_t h = fnv1a64(out.data() + 8, 48);
  h = fnv1a64(out.data() + kHeaderBytes, out.size() - kHeaderBytes, h);
  for (int i = 0; i < 8; ++i) out[56 + i] = static_cast<uint8_t>(h >> (8 * i));
  return out;
}

NgramTable NgramTable::deserialize(const uint8_t* data, size_t size) {
  using std::runtime_error;
  using std::to_string;
  if (size == 0) throw runtime_error("n-gram table file is empty");
  if (data == nullptr) throw runtime_error("n-gram table buffer is null");
  if (size >= 8 && std::memcmp(data, kMagic, 8) != 0)
    throw runtime_error("not a fastspec n-gram table (bad magic)");
  if (size < kHeaderBytes)
    throw runtime_error("n-gram table file is truncated: " + to_string(size) +
                        " bytes, the header alone is 64");
  Reader r(data + 8, size - 8);
  const uint32_t version = r.u32();
  if (version != kFormatVersion)
    throw runtime_error("unsupported n-gram table format version " + to_string(version) +
                        " (this build reads version " + to_string(kFormatVersion) + ")");
  const uint32_t n = r.u32();
  const uint64_t vocab = r.u64();
  const uint64_t s_bits = r.u64();
  const uint64_t num_ctx = r.u64();
  const uint64_t num_entries = r.u64();
  const uint64_t payload = r.u64();
  const uint64_t checksum = r.u64();
  const uint64_t available = size - kHeaderBytes;
  if (payload > available)
    throw runtime_error("n-gram table file is truncated: header promises " + to_string(payload) +
                        " payload bytes, file has " + to_string(available));
  if (payload < available)
    throw runtime_error("n-gram table file has " + to_string(available - payload) +
                        " unexpected trailing bytes");
  uint64_t h = fnv1a64(data + 8, 48);
  h = fnv1a64(data + kHeaderBytes, payload, h);
  if (h != checksum) throw runtime_error("n-gram table file is corrupted (checksum mismatch)");

  double smoothing;
  std::memcpy(&smoothing, &s_bits, sizeof(smoothing));
  if (n < 1 || n > uint32_t(ngram::kMaxOrder) || vocab < 1 ||
      vocab > uint64_t(std::numeric_limits<int32_t>::max()) || !std::isfinite(smoothing) || smoothing < 0)
    throw runtime_error("n-gram table file has invalid parameters");
  if (num_ctx < 1 || num_ctx > kMaxId || num_entries > kMaxId || (num_ctx - 1) > payload / 8 ||
      num_entries > payload / 12 || (num_ctx - 1) * 8 + num_entries * 12 != payload)
    throw runtime_error("n-gram table file has inconsistent sizes");

  NgramTable table(static_cast<int>(n), static_cast<int64_t>(vocab), smoothing);
  Impl& t = *table.impl_;
  Reader p(data + kHeaderBytes, payload);
  std::vector<uint8_t> depth(num_ctx, 0);
  t.contexts.reserve(num_ctx);
  for (uint64_t id = 1; id < num_ctx; ++id) {
    const uint32_t parent = p.u32(), token = p.u32();
    if (parent >= id || token >= vocab || uint32_t(depth[parent]) + 1 > n - 1)
      throw runtime_error("n-gram table file has an invalid context record");
    const auto made = t.child(parent, token);
    if (!made.second || made.first != id)
      throw runtime_error("n-gram table file has a duplicate context record");
    depth[id] = static_cast<uint8_t>(depth[parent] + 1);
  }
  t.entries.reserve(num_entries);
  for (uint64_t e = 0; e < num_entries; ++e) {
    const uint32_t ctx = p.u32(), token = p.u32(), count = p.u32();
    if (ctx >= num_ctx || token >= vocab || count == 0)
      throw runtime_error("n-gram table file has an invalid n-gram record");
    if (uint64_t(t.contexts[ctx].total) + count > std::numeric_limits<uint32_t>::max())
      throw runtime_error("n-gram table file has counts that overflow");
    if (!t.add(ctx, token, count)) throw runtime_error("n-gram table file has a duplicate n-gram record");
  }
  for (uint64_t id = 1; id < num_ctx; ++id) {
    if (t.contexts[id].total == 0)
      throw runtime_error("n-gram table file has a context that is never followed by a token");
  }
  return table;
}

void NgramTable::save(const std::string& path) const {
  const std::vector<uint8_t> bytes = serialize();
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) throw std::runtime_error("cannot open " + path + " for writing");
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  f.close();
  if (!f) throw std::runtime_error("failed to write " + path);
}

NgramTable NgramTable::load(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (f.bad()) throw std::runtime_error("failed to read " + path);
  try {
    return deserialize(bytes.data(), bytes.size());
  } catch (const std::runtime_error& e) {
    throw std::runtime_error(path + ": " + e.what());
  }
}

}  // namespace fastspec
