// Split-vocabulary path of the verify kernels; included by verify.cu inside its anonymous
// namespace (it uses that file's block primitives), so verify.cu still compiles alone.
//
// One block per row leaves most SMs idle at small batch (B = 8 fills 8 of 132). Here each row
// position's vocabulary is cut into `splits` chunks, one block each, and all γ+1 positions of a
// row are processed at once; the accept/reject walk then reads them in the CPU's order, so the
// tokens are those of the row-at-a-time code (positions after a rejection are simply unused).
// A kernel boundary is the grid-wide barrier (no co-residency needed), so each phase is a launch:
//   values      penalty + temperature -> values; chunk max, NaN, +inf (argmax for greedy)  [R·S]
//   top-k ×4    radix select of the k-th largest key: chunk digit counts                  [R·S]
//   weights     exp(x − max) of the kept tokens: chunk sums, or top-p digit 0 masses      [R·S]
//   top-p ×3    radix select by mass: chunk digit masses                                  [R·S]
//   ties        members of the boundary key per chunk                                     [R·S]
//   final       tie threshold (one block), chunk sums of the kept weights                 [R·S]
//   residual    accept walk; chunk totals of the residual and of p                        [B·S]
//   find        accept walk, q checks, inverse CDF inside one chunk, outputs              [B]
// (R = B·(γ+1) row positions, S chunks.) Deterministic: chunk partials are combined in chunk
// order by every reader; top-p and residual masses are 80-bit fixed point, whose integer sums
// are exact in any order, so a chunk's total equals the running sum at its last token bit for
// bit and the inverse CDF always lands inside the chosen chunk. Masses below 2^-80 count as 0.

// --------------------------------------------------------------------------------- fixed point
// value = hi·2^-40 + lo·2^-80; components add as integers (exact, order-free).
struct Fixed {
  unsigned long long hi, lo;
};

__device__ __forceinline__ Fixed fixed_add(Fixed a, Fixed b) { return Fixed{a.hi + b.hi, a.lo + b.lo}; }
__device__ __forceinline__ Fixed fixed_sub(Fixed a, Fixed b) { return Fixed{a.hi - b.hi, a.lo - b.lo}; }
__device__ __forceinline__ double fixed_value(Fixed f) { return double(f.hi) * 0x1p-40 + double(f.lo) * 0x1p-80; }

// w in [0, 2^23): the bits above 2^-80.
__device__ __forceinline__ Fixed to_fixed(double w) {
  const double scaled = w * 0x1p40;
  const double whole = floor(scaled);
  return Fixed{(unsigned long long)whole, (unsigned long long)((scaled - whole) * 0x1p40)};
}

// --------------------------------------------------------------------------------- state
constexpr int64_t kMaxChunk = 16384;  // tokens per block at most: the seen-id bitmap lives in shared memory

// Per row position, after processing (written by the weights / final phases).
struct RowState {
  float best;          // max processed logit
  uint32_t kth;        // top-k: keep keys >= kth (0: off)
  uint32_t prefix;     // top-p: the boundary key (0: off)
  int32_t status;      // processing status bits of this position
  int64_t tie_index;   // top-p: boundary-key tokens are kept from this index on
};

struct SplitBuffers {
  int64_t splits, chunk;
  float* part_max;       // [R,S] chunk max
  int32_t* part_flags;   // [R2,S] bit 0 NaN / bad value, bit 1 +inf
  int64_t* part_arg;     // [R,S] first index of the chunk max (greedy)
  double* part_sum;      // [R2,S] chunk sums: kept weights (processing) or probabilities (checks)
  int64_t* part_ties;    // [R,S] boundary-key members in the chunk
  RowState* state;       // [R]
  Fixed* res_total;      // [B,S] residual mass of the chunk
  Fixed* p_total;        // [B,S] p mass of the chunk (fallback when the residual has none)
  int64_t* res_last;     // [B,S] last index with residual > 0 (-1: none)
  int64_t* p_last;       // [B,S] last index with p > 0
  int32_t* q_bad;        // [B,S] rejected position's q: NaN/inf/negative in the chunk
  double* q_sum;         // [B,S] rejected position's q: chunk sum
  uint32_t* topk_hist;   // [R,4,256] digit counts (zeroed before use)
  Fixed* topp_hist;      // [R,4,256] digit masses (zeroed before use)
  float* values;         // [R,V] processed logits (processing only)
};

struct SplitShared {
  uint32_t seen[kMaxChunk / 32];  // bitmap of the chunk's seen ids (repetition penalty)
  Fixed bins[256];
  unsigned int counts[256];
  unsigned long long reduce[kWarps];
  unsigned long long scalar;
  Fixed above;
  int digit;
  int64_t value_i;
  int32_t status;
};

__device__ __forceinline__ int64_t chunk_begin(const SplitBuffers& buf, int64_t s) { return s * buf.chunk; }
__device__ __forceinline__ int64_t chunk_end(const SplitBuffers& buf, int64_t s, int64_t vocab) {
  return (s + 1) * buf.chunk < vocab ? (s + 1) * buf.chunk : vocab;
}

__device__ unsigned long long block_sum_u64(unsigned long long v, SplitShared& ss) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) ss.reduce[warp] = v;
  __syncthreads();
  if (warp == 0) {
    unsigned long long w = lane < kWarps ? ss.reduce[lane] : 0ull;
    w = warp_sum(w);
    if (lane == 0) ss.scalar = w;
  }
  __syncthreads();
  const unsigned long long r = ss.scalar;
  __syncthreads();
  return r;
}

__device__ Fixed block_sum_fixed(Fixed v, SplitShared& ss) {
  const unsigned long long hi = block_sum_u64(v.hi, ss);
  return Fixed{hi, block_sum_u64(v.lo, ss)};
}

// Exclusive prefix sum over the block (thread order), exact integers; *total = block total.
__device__ unsigned long long block_exclusive_scan_u64(unsigned long long v, SplitShared& ss,
                                                       unsigned long long* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  unsigned long long inclusive = v;
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned long long up = __shfl_up_sync(0xffffffffu, inclusive, o);
    if (lane >= o) inclusive += up;
  }
  if (lane == 31) ss.reduce[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const unsigned long long w = lane < kWarps ? ss.reduce[lane] : 0ull;
    unsigned long long inc = w;
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned long long up = __shfl_up_sync(0xffffffffu, inc, o);
      if (lane >= o) inc += up;
    }
    if (lane < kWarps) ss.reduce[lane] = inc - w;
    if (lane == kWarps - 1) ss.scalar = inc;
  }
  __syncthreads();
  const unsigned long long result = ss.reduce[warp] + inclusive - v;
  *total = ss.scalar;
  __syncthreads();
  return result;
}

// --------------------------------------------------------------------------------- radix chains
// Warp 0 scans ss.bins from digit 255 down: the first digit whose cumulative mass (from `above`)
// satisfies reached(); writes ss.digit (-1: none) and ss.above (the mass before that digit, or
// the total when none). The caller syncs before reading them.
template <class Reached>
__device__ void choose_digit(SplitShared& ss, Fixed above, const Reached& reached) {
  if ((threadIdx.x >> 5) != 0) return;
  const int lane = threadIdx.x & 31;
  Fixed mine{0, 0};
  for (int j = 0; j < 8; ++j) mine = fixed_add(mine, ss.bins[255 - lane * 8 - j]);  // lane 0: the top bins
  Fixed inclusive = mine;
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned long long hi = __shfl_up_sync(0xffffffffu, inclusive.hi, o);
    const unsigned long long lo = __shfl_up_sync(0xffffffffu, inclusive.lo, o);
    if (lane >= o) inclusive = fixed_add(inclusive, Fixed{hi, lo});
  }
  int first = reached(fixed_add(above, inclusive)) ? lane : 32;
  for (int o = 16; o > 0; o >>= 1) {
    const int other = __shfl_xor_sync(0xffffffffu, first, o);
    first = other < first ? other : first;
  }
  if (first == 32) {
    if (lane == 31) {
      ss.digit = -1;
      ss.above = fixed_add(above, inclusive);
    }
    return;
  }
  if (lane == first) {
    Fixed running = fixed_add(above, fixed_sub(inclusive, mine));
    int digit = 255 - lane * 8 - 7;
    for (int j = 0; j < 8; ++j) {
      const Fixed next = fixed_add(running, ss.bins[255 - lane * 8 - j]);
      if (reached(next)) {
        digit = 255 - lane * 8 - j;
        break;
      }
      running = next;
    }
    ss.digit = digit;
    ss.above = running;
  }
}

struct Radix {
  uint32_t prefix = 0, mask = 0;
  Fixed above{0, 0};
  double target = 0.0;
  bool found = true;
};

// The top-k chain: digits 0..passes-1 of the k-th largest key from the row's count histograms.
__device__ Radix topk_chain(const uint32_t* hist, int passes, int64_t k, SplitShared& ss) {
  Radix st;
  int64_t remaining = k;
  for (int d = 0; d < passes; ++d) {
    for (int b = threadIdx.x; b < 256; b += kThreads) ss.bins[b] = Fixed{hist[d * 256 + b], 0};
    __syncthreads();
    choose_digit(ss, Fixed{0, 0}, [remaining](Fixed cum) { return int64_t(cum.hi) >= remaining; });
    __syncthreads();
    const int digit = ss.digit < 0 ? 0 : ss.digit;  // counts always reach k: the guard is for safety
    remaining -= int64_t(ss.above.hi);
    const int shift = 24 - 8 * d;
    st.prefix |= uint32_t(digit) << shift;
    st.mask |= 255u << shift;
    __syncthreads();
  }
  return st;
}

// The top-p chain: target = top_p · (total kept mass); digits 0..passes-1 of the boundary key.
__device__ Radix topp_chain(const Fixed* hist, int passes, double top_p, SplitShared& ss) {
  Radix st;
  Fixed local{0, 0};
  for (int b = threadIdx.x; b < 256; b += kThreads) local = fixed_add(local, hist[b]);
  st.target = top_p * fixed_value(block_sum_fixed(local, ss));
  const double target = st.target;
  for (int d = 0; d < passes && st.found; ++d) {
    for (int b = threadIdx.x; b < 256; b += kThreads) ss.bins[b] = hist[d * 256 + b];
    __syncthreads();
    choose_digit(ss, st.above, [target](Fixed cum) { return fixed_value(cum) >= target; });
    __syncthreads();
    st.found = ss.digit >= 0;  // exact sums: always found below a top_p < 1
    const int shift = 24 - 8 * d;
    st.prefix |= uint32_t(st.found ? ss.digit : 0) << shift;
    st.mask |= 255u << shift;
    st.above = ss.above;
    __syncthreads();
  }
  return st;
}

// --------------------------------------------------------------------------------- helpers
// Repetition penalty ids of position i inside [begin, end): prev (ids outside [0,V) never fall
// inside) and draft[0..i).
__device__ void mark_seen(SplitShared& ss, int64_t begin, int64_t end, const int64_t* prev, int64_t prev_len,
                          const int64_t* draft, int64_t num_draft) {
  const int64_t words = (end - begin + 31) / 32;
  for (int64_t w = threadIdx.x; w < words; w += kThreads) ss.seen[w] = 0;
  __syncthreads();
  for (int64_t j = threadIdx.x; j < prev_len + num_draft; j += kThreads) {
    const int64_t t = j < prev_len ? prev[j] : draft[j - prev_len];
    if (t >= begin && t < end) atomicOr(&ss.seen[(t - begin) >> 5], 1u << ((t - begin) & 31));
  }
  __syncthreads();
}

__device__ __forceinline__ bool is_seen(const SplitShared& ss, int64_t offset) {
  return (ss.seen[offset >> 5] >> (offset & 31)) & 1u;
}

// Status bits and max of row position r from its chunk partials (chunk order).
__device__ int32_t row_status(const SplitBuffers& buf, int64_t r, float* best) {
  int flags = 0;
  float m = -INFINITY;
  for (int64_t s = 0; s < buf.splits; ++s) {
    flags |= buf.part_flags[r * buf.splits + s];
    m = fmaxf(m, buf.part_max[r * buf.splits + s]);
  }
  *best = m;
  if (flags & 1) return kNanLogits;
  if (flags & 2) return kPosInfLogits;
  if (m == -INFINITY) return kNoFiniteLogits;
  return 0;
}

__device__ __forceinline__ double row_norm(const SplitBuffers& buf, int64_t r) {
  double norm = 0.0;
  for (int64_t s = 0; s < buf.splits; ++s) norm += buf.part_sum[r * buf.splits + s];
  return norm;
}

// Unnormalised processed weight of token v at row position r (0 when cut by top-k / top-p).
__device__ __forceinline__ double kept_weight(const SplitBuffers& buf, int64_t r, const RowState& st, int64_t vocab,
                                              int64_t v) {
  const float y = buf.values[r * vocab + v];
  const uint32_t key = order_key(y);
  const bool keep = key >= st.kth && (key > st.prefix || (key == st.prefix && v >= st.tie_index));
  return keep ? exp(double(y) - double(st.best)) : 0.0;
}

__device__ __forceinline__ int64_t first_bad_draft(const int64_t* d, int64_t gamma, int64_t vocab) {
  for (int64_t i = 0; i < gamma; ++i)
    if (d[i] < 0 || d[i] >= vocab) return i;
  return -1;
}

// --------------------------------------------------------------------------------- kernels
enum ValuesMode : int {
  kModeArgmax = 0,     // greedy: chunk max + first argmax of the penalised logits
  kModeValues = 1,     // sampling: penalty + temperature -> buf.values, chunk max
  kModePenalised = 2,  // process (greedy): penalised logits -> out
};

// grid R·S: block (r, s) = row position r (b·K + i), chunk s. Position i sees prev ∪ draft[0..i).
__global__ void __launch_bounds__(kThreads)
    split_values_kernel(const float* logits, const int64_t* prev, int64_t prev_len, const int64_t* draft,
                        int64_t positions, int64_t vocab, ProcessParams params, int mode, SplitBuffers buf,
                        float* out) {
  __shared__ Shared sh;
  __shared__ SplitShared ss;
  const int64_t S = buf.splits, r = blockIdx.x / S, s = blockIdx.x % S;
  const int64_t b = r / positions, i = r % positions;
  const int64_t begin = chunk_begin(buf, s), end = chunk_end(buf, s, vocab);
  const bool penalty = params.repetition_penalty != 1.0f;
  if (penalty)
    mark_seen(ss, begin, end, prev != nullptr ? prev + b * prev_len : nullptr, prev != nullptr ? prev_len : 0,
              draft != nullptr ? draft + b * (positions - 1) : nullptr, draft != nullptr ? i : 0);
  const float* x = logits + r * vocab;
  const bool scale = mode == kModeValues && params.temperature != 1.0f;
  float local_max = -INFINITY;
  int64_t local_arg = INT64_MAX;
  int nan = 0, posinf = 0;
  for (int64_t v = begin + threadIdx.x; v < end; v += kThreads) {
    float y = x[v];
    if (penalty && is_seen(ss, v - begin)) y = penalize(y, params.repetition_penalty);
    if (scale) y = __fdiv_rn(y, params.temperature);
    nan |= y != y;
    posinf |= y == INFINITY;
    if (mode == kModeValues) buf.values[r * vocab + v] = y;
    if (mode == kModePenalised) out[r * vocab + v] = y;
    if (local_arg == INT64_MAX || y > local_max) {  // strict: the first index wins ties
      local_max = y;
      local_arg = v;
    }
  }
  nan = __syncthreads_or(nan);
  posinf = __syncthreads_or(posinf);
  const float best = block_max(local_max, sh);
  int64_t arg = 0;
  if (mode == kModeArgmax) arg = block_min_index(local_max == best ? local_arg : INT64_MAX, sh);
  if (threadIdx.x == 0) {
    buf.part_max[r * S + s] = best;
    buf.part_arg[r * S + s] = arg == INT64_MAX ? begin : arg;
    buf.part_flags[r * S + s] = (nan ? 1 : 0) | (posinf ? 2 : 0);
  }
}

// grid B: greedy decision of each row from the argmax partials (verify_greedy, fused greedy).
__global__ void __launch_bounds__(kThreads)
    split_greedy_decide_kernel(const int64_t* draft, int64_t gamma, int64_t vocab, SplitBuffers buf, int64_t* out,
                               int64_t* num_accepted, int32_t* status) {
  if (threadIdx.x != 0) return;
  const int64_t b = blockIdx.x, K = gamma + 1, S = buf.splits;
  const int64_t* d = draft + b * gamma;
  int64_t* o = out + b * K;
  if (first_bad_draft(d, gamma, vocab) >= 0) return write_failure(gamma, kBadDraftToken, o, num_accepted + b, status + b);
  int64_t i = 0, token = 0;
  for (;; ++i) {
    const int64_t r = b * K + i;
    int flags = 0;
    float best = -INFINITY;
    for (int64_t s = 0; s < S; ++s) {
      flags |= buf.part_flags[r * S + s];
      best = fmaxf(best, buf.part_max[r * S + s]);
    }
    if (flags & 1) return write_failure(gamma, kNanLogits, o, num_accepted + b, status + b);
    token = 0;
    for (int64_t s = 0; s < S; ++s)
      if (buf.part_max[r * S + s] == best) {
        token = buf.part_arg[r * S + s];
        break;
      }
    if (i == gamma || token != d[i]) break;
  }
  write_output(d, gamma, i, token, o, num_accepted + b);
  status[b] = 0;
}

// grid R·S, pass 0..3: chunk counts of top-k digit `pass` among keys matching the chosen prefix.
__global__ void __launch_bounds__(kThreads)
    split_topk_kernel(int pass, int64_t vocab, ProcessParams params, SplitBuffers buf) {
  __shared__ SplitShared ss;
  const int64_t S = buf.splits, r = blockIdx.x / S, s = blockIdx.x % S;
  float best;
  if (row_status(buf, r, &best) != 0) return;  // block-uniform
  const Radix st = topk_chain(buf.topk_hist + r * 1024, pass, params.top_k, ss);
  for (int b = threadIdx.x; b < 256; b += kThreads) ss.counts[b] = 0;
  __syncthreads();
  const int shift = 24 - 8 * pass;
  for (int64_t v = chunk_begin(buf, s) + threadIdx.x; v < chunk_end(buf, s, vocab); v += kThreads) {
    const uint32_t key = order_key(buf.values[r * vocab + v]);
    if ((key & st.mask) == st.prefix) atomicAdd(&ss.counts[(key >> shift) & 255u], 1u);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < 256; b += kThreads)
    if (ss.counts[b]) atomicAdd(&buf.topk_hist[r * 1024 + pass * 256 + b], ss.counts[b]);
}

// Adds the chunk's fixed-point masses of the kept tokens matching `prefix` to digit `pass`.
__device__ void add_mass_histogram(const SplitBuffers& buf, int64_t r, int64_t s, int64_t vocab, float best,
                                   uint32_t kth, const Radix& st, int pass, SplitShared& ss) {
  for (int b = threadIdx.x; b < 256; b += kThreads) ss.bins[b] = Fixed{0, 0};
  __syncthreads();
  const int shift = 24 - 8 * pass;
  for (int64_t v = chunk_begin(buf, s) + threadIdx.x; v < chunk_end(buf, s, vocab); v += kThreads) {
    const float y = buf.values[r * vocab + v];
    const uint32_t key = order_key(y);
    if (key < kth || (key & st.mask) != st.prefix) continue;
    const Fixed f = to_fixed(exp(double(y) - double(best)));
    Fixed& bin = ss.bins[(key >> shift) & 255u];
    if (f.hi) atomicAdd(&bin.hi, f.hi);
    if (f.lo) atomicAdd(&bin.lo, f.lo);
  }
  __syncthreads();
  Fixed* global = buf.topp_hist + r * 1024 + pass * 256;
  for (int b = threadIdx.x; b < 256; b += kThreads) {
    if (ss.bins[b].hi) atomicAdd(&global[b].hi, ss.bins[b].hi);
    if (ss.bins[b].lo) atomicAdd(&global[b].lo, ss.bins[b].lo);
  }
}

// grid R·S: row state (status, max, top-k threshold); then either the chunk sums of the kept
// weights (no top-p) or top-p digit 0 masses.
__global__ void __launch_bounds__(kThreads)
    split_weights_kernel(int64_t vocab, ProcessParams params, SplitBuffers buf) {
  __shared__ Shared sh;
  __shared__ SplitShared ss;
  const int64_t S = buf.splits, r = blockIdx.x / S, s = blockIdx.x % S;
  float best;
  const int32_t status = row_status(buf, r, &best);
  if (status != 0) {
    if (s == 0 && threadIdx.x == 0) buf.state[r] = RowState{best, 0u, 0u, status, 0};
    return;
  }
  uint32_t kth = 0;
  if (params.top_k > 0 && params.top_k < vocab) kth = topk_chain(buf.topk_hist + r * 1024, 4, params.top_k, ss).prefix;
  if (s == 0 && threadIdx.x == 0) buf.state[r] = RowState{best, kth, 0u, 0, 0};
  if (params.top_p < 1.0) {
    Radix none;
    return add_mass_histogram(buf, r, s, vocab, best, kth, none, 0, ss);
  }
  double local = 0.0;
  for (int64_t v = chunk_begin(buf, s) + threadIdx.x; v < chunk_end(buf, s, vocab); v += kThreads) {
    const float y = buf.values[r * vocab + v];
    local += order_key(y) >= kth ? exp(double(y) - double(best)) : 0.0;
  }
  const double sum = block_sum(local, sh);
  if (threadIdx.x == 0) buf.part_sum[r * S + s] = sum;
}

// grid R·S, pass 1..3: top-p digit `pass` masses.
__global__ void __launch_bounds__(kThreads)
    split_topp_kernel(int pass, int64_t vocab, ProcessParams params, SplitBuffers buf) {
  __shared__ SplitShared ss;
  const int64_t S = buf.splits, r = blockIdx.x / S, s = blockIdx.x % S;
  const RowState row = buf.state[r];
  if (row.status != 0) return;
  const Radix st = topp_chain(buf.topp_hist + r * 1024, pass, params.top_p, ss);
  if (!st.found) return;
  add_mass_histogram(buf, r, s, vocab, row.best, row.kth, st, pass, ss);
}

// Members of the top-p boundary key (kept by top-k, positive weight) at token v.
__device__ __forceinline__ bool tie_member(const SplitBuffers& buf, int64_t r, int64_t vocab, int64_t v,
                                           uint32_t kth, uint32_t prefix, float best) {
  const float y = buf.values[r * vocab + v];
  const uint32_t key = order_key(y);
  return key == prefix && key >= kth && exp(double(y) - double(best)) > 0.0;
}

// grid R·S: members of the boundary key in each chunk.
__global__ void __launch_bounds__(kThreads) split_ties_kernel(int64_t vocab, ProcessParams params, SplitBuffers buf) {
  __shared__ Shared sh;
  __shared__ SplitShared ss;
  const int64_t S = buf.splits, r = blockIdx.x / S, s = blockIdx.x % S;
  const RowState row = buf.state[r];
  if (row.status != 0) return;
  const Radix st = topp_chain(buf.topp_hist + r * 1024, 4, params.top_p, ss);
  double count = 0.0;
  if (st.found)
    for (int64_t v = chunk_begin(buf, s) + threadIdx.x; v < chunk_end(buf, s, vocab); v += kThreads)
      count += tie_member(buf, r, vocab, v, row.kth, st.prefix, row.best) ? 1.0 : 0.0;
  count = block_sum(count, sh);
  if (threadIdx.x == 0) buf.part_ties[r * S + s] = int64_t(count);
}

// grid R·S: how many boundary members top-p keeps (the highest indices, HF's stable order), the
// index threshold (found by the one block whose chunk holds it), chunk sums of the kept weights.
__global__ void __launch_bounds__(kThreads) split_final_kernel(int64_t vocab, ProcessParams params, SplitBuffers buf) {
  __shared__ Shared sh;
  __shared__ SplitShared ss;
  const int64_t S = buf.splits, r = blockIdx.x / S, s = blockIdx.x % S;
  const int64_t begin = chunk_begin(buf, s), end = chunk_end(buf, s, vocab);
  const RowState row = buf.state[r];
  if (row.status != 0) return;
  const Radix st = topp_chain(buf.topp_hist + r * 1024, 4, params.top_p, ss);
  uint32_t prefix = 0;
  int64_t threshold = 0;  // keep boundary members with index >= threshold
  if (st.found) {
    prefix = st.prefix;
    int64_t group = 0, after = 0;  // members in all chunks / in the chunks after this one
    for (int64_t c = 0; c < S; ++c) {
      group += buf.part_ties[r * S + c];
      if (c > s) after += buf.part_ties[r * S + c];
    }
    const int64_t mine = buf.part_ties[r * S + s];
    if (threadIdx.x == 0) {  // members weigh the same; keep while the mass above stays < target
      const double e = exp(double(key_value(prefix)) - double(row.best));
      ss.value_i = kept_tie_members(fixed_value(st.above), e, st.target, group);
    }
    __syncthreads();
    const int64_t kept = ss.value_i;
    __syncthreads();
    if (after >= kept) {
      threshold = INT64_MAX;  // every kept member lies in a later chunk
    } else if (after + mine <= kept) {
      threshold = begin;  // all of this chunk's members are kept
    } else {
      const float best = row.best;
      const uint32_t kth = row.kth;
      const SplitBuffers& b = buf;
      const uint32_t key = kth_largest_key(end - begin, kept - after, [&](int64_t j) {
        return tie_member(b, r, vocab, begin + j, kth, prefix, best) ? uint32_t(j + 1) : 0u;
      }, sh);
      threshold = begin + int64_t(key) - 1;
    }
    if (threadIdx.x == 0 && after < kept && kept <= after + mine) buf.state[r].tie_index = threshold;
  }
  if (s == 0 && threadIdx.x == 0) buf.state[r].prefix = prefix;
  double local = 0.0;
  for (int64_t v = begin + threadIdx.x; v < end; v += kThreads) {
    const float y = buf.values[r * vocab + v];
    const uint32_t key = order_key(y);
    const bool keep = key >= row.kth && (key > prefix || (key == prefix && v >= threshold));
    local += keep ? exp(double(y) - double(row.best)) : 0.0;
  }
  const double sum = block_sum(local, sh);
  if (threadIdx.x == 0) buf.part_sum[r * S + s] = sum;
}

// grid R·S: process_logits output, probabilities of the kept tokens.
__global__ void __launch_bounds__(kThreads)
    split_write_probs_kernel(int64_t vocab, SplitBuffers buf, float* out) {
  const int64_t S = buf.splits, r = blockIdx.x / S, s = blockIdx.x % S;
  const RowState row = buf.state[r];
  if (row.status != 0) return;
  const double norm = row_norm(buf, r);
  for (int64_t v = chunk_begin(buf, s) + threadIdx.x; v < chunk_end(buf, s, vocab); v += kThreads)
    out[r * vocab + v] = float(kept_weight(buf, r, row, vocab, v) / norm);
}

// grid B: process_logits status (draft ids, then the first failing position).
__global__ void __launch_bounds__(kThreads)
    split_process_status_kernel(const int64_t* draft, int64_t positions, int64_t vocab, bool do_sample,
                                SplitBuffers buf, int32_t* status) {
  if (threadIdx.x != 0) return;
  const int64_t b = blockIdx.x;
  if (draft != nullptr && first_bad_draft(draft + b * (positions - 1), positions - 1, vocab) >= 0) {
    status[b] = kBadDraftToken;
    return;
  }
  int32_t code = 0;
  for (int64_t i = 0; i < positions && code == 0; ++i) {
    const int64_t r = b * positions + i;
    if (do_sample) {
      code = buf.state[r].status;
    } else {
      int flags = 0;
      for (int64_t s = 0; s < buf.splits; ++s) flags |= buf.part_flags[r * buf.splits + s];
      code = (flags & 1) ? kNanLogits : 0;
    }
  }
  status[b] = code;
}

// grid (B·K + B·γ)·S: verify_sample's row checks (p rows, then q rows): bad values, chunk sums.
__global__ void __launch_bounds__(kThreads)
    split_check_rows_kernel(const float* p, const float* q, int64_t batch, int64_t gamma, int64_t vocab,
                            SplitBuffers buf) {
  __shared__ Shared sh;
  const int64_t S = buf.splits, row = blockIdx.x / S, s = blockIdx.x % S, R = batch * (gamma + 1);
  const float* x = row < R ? p + row * vocab : q + (row - R) * vocab;
  double sum = 0.0;
  int bad = 0;
  for (int64_t v = chunk_begin(buf, s) + threadIdx.x; v < chunk_end(buf, s, vocab); v += kThreads) {
    const float value = x[v];
    bad |= !(value >= 0.0f && value <= FLT_MAX);
    sum += double(value);
  }
  bad = __syncthreads_or(bad);
  sum = block_sum(sum, sh);
  if (threadIdx.x == 0) {
    buf.part_flags[row * S + s] = bad;
    buf.part_sum[row * S + s] = sum;
  }
}

struct Walk {
  int64_t accepted;
  int32_t status;
};

// The accept/reject walk of row b (one thread). fused: p from the processed row positions;
// else p rows given (their checks and q's, in the CPU's order, come first).
__device__ Walk walk_row(bool fused, const float* p, const float* q, const int64_t* draft, const double* u,
                         int64_t b, int64_t batch, int64_t gamma, int64_t vocab, double p_tol, double q_tol,
                         const SplitBuffers& buf) {
  const int64_t K = gamma + 1, S = buf.splits, R = batch * K;
  const int64_t* d = draft + b * gamma;
  const double* ur = u + b * K;
  if (first_bad_draft(d, gamma, vocab) >= 0) return Walk{0, kBadDraftToken};
  if (!fused) {
    const int64_t rows = q != nullptr ? 2 * K - 1 : K;
    for (int64_t j = 0; j < rows; ++j) {
      const int64_t row = j < K ? b * K + j : R + b * gamma + (j - K);
      int bad = 0;
      double sum = 0.0;
      for (int64_t s = 0; s < S; ++s) {
        bad |= buf.part_flags[row * S + s];
        sum += buf.part_sum[row * S + s];
      }
      const bool is_p = j < K;
      if (bad) return Walk{0, is_p ? kBadTargetProbs : kBadDraftProbs};
      if (fabs(sum - 1.0) > (is_p ? p_tol : q_tol)) return Walk{0, is_p ? kTargetNotNormalized : kDraftNotNormalized};
    }
  }
  int64_t a = 0;
  for (;; ++a) {
    const int64_t r = b * K + a;
    if (fused && buf.state[r].status != 0) return Walk{a, buf.state[r].status};
    if (a == gamma) break;
    const int64_t t = d[a];
    const double p_d = fused ? kept_weight(buf, r, buf.state[r], vocab, t) / row_norm(buf, r) : double(p[r * vocab + t]);
    double q_d = 1.0;
    if (q != nullptr) {
      const float qv = q[(b * gamma + a) * vocab + t];
      if (fused && !(qv >= 0.0f && qv <= FLT_MAX)) return Walk{a, kBadDraftProbs};
      q_d = qv;
    }
    if (!(ur[a] * q_d < p_d)) break;
  }
  return Walk{a, 0};
}

// p and draft probability of token v at row b's decided position a.
struct ResidualRow {
  bool fused;
  const float* p;      // unfused: p row
  const float* q_row;  // nullptr: deterministic drafter (one-hot) or bonus
  int64_t draft_token; // -1: bonus (q = 0)
  int64_t r;           // row position
  RowState state;
  double norm;
  const SplitBuffers* buf;
  int64_t vocab;
  __device__ double prob(int64_t v) const {
    return fused ? kept_weight(*buf, r, state, vocab, v) / norm : double(p[v]);
  }
  __device__ double residual(int64_t v) const {
    const double dq = q_row != nullptr ? double(q_row[v]) : (v == draft_token ? 1.0 : 0.0);
    const double x = prob(v) - dq;
    return x > 0.0 ? x : 0.0;
  }
};

__device__ ResidualRow residual_row(bool fused, const float* p, const float* q, const int64_t* draft, int64_t b,
                                    int64_t gamma, int64_t vocab, int64_t a, const SplitBuffers& buf) {
  ResidualRow row;
  row.fused = fused;
  row.r = b * (gamma + 1) + a;
  row.p = fused ? nullptr : p + row.r * vocab;
  row.q_row = a < gamma && q != nullptr ? q + (b * gamma + a) * vocab : nullptr;
  row.draft_token = a < gamma && q == nullptr ? draft[b * gamma + a] : -1;
  row.buf = &buf;
  row.vocab = vocab;
  if (fused) {
    row.state = buf.state[row.r];
    row.norm = row_norm(buf, row.r);
  }
  return row;
}

// grid B·S: chunk totals of the residual and of p at each row's decided position.
__global__ void __launch_bounds__(kThreads)
    split_residual_kernel(bool fused, const float* p, const float* q, const int64_t* draft, const double* u,
                          int64_t batch, int64_t gamma, int64_t vocab, double p_tol, double q_tol, SplitBuffers buf) {
  __shared__ Shared sh;
  __shared__ SplitShared ss;
  const int64_t S = buf.splits, b = blockIdx.x / S, s = blockIdx.x % S;
  if (threadIdx.x == 0) {
    const Walk w = walk_row(fused, p, q, draft, u, b, batch, gamma, vocab, p_tol, q_tol, buf);
    ss.value_i = w.accepted;
    ss.status = w.status;
  }
  __syncthreads();
  const int64_t a = ss.value_i;
  const int32_t failed = ss.status;
  __syncthreads();
  if (failed) return;
  const ResidualRow row = residual_row(fused, p, q, draft, b, gamma, vocab, a, buf);
  Fixed res{0, 0}, prob{0, 0};
  int64_t res_last = -1, p_last = -1;
  double q_sum = 0.0;
  int q_bad = 0;
  const bool check_q = fused && row.q_row != nullptr;
  for (int64_t v = chunk_begin(buf, s) + threadIdx.x; v < chunk_end(buf, s, vocab); v += kThreads) {
    const double x = row.residual(v), pv = row.prob(v);
    res = fixed_add(res, to_fixed(x));
    prob = fixed_add(prob, to_fixed(pv));
    if (x > 0.0) res_last = v;
    if (pv > 0.0) p_last = v;
    if (check_q) {
      const float qv = row.q_row[v];
      q_bad |= !(qv >= 0.0f && qv <= FLT_MAX);
      q_sum += double(qv);
    }
  }
  res = block_sum_fixed(res, ss);
  prob = block_sum_fixed(prob, ss);
  res_last = block_max_index(res_last, sh);
  p_last = block_max_index(p_last, sh);
  if (check_q) {
    q_bad = __syncthreads_or(q_bad);
    q_sum = block_sum(q_sum, sh);
  }
  if (threadIdx.x == 0) {
    const int64_t k = b * S + s;
    buf.res_total[k] = res;
    buf.p_total[k] = prob;
    buf.res_last[k] = res_last;
    buf.p_last[k] = p_last;
    buf.q_bad[k] = q_bad;
    buf.q_sum[k] = q_sum;
  }
}

// First index of [begin, end) whose running fixed-point sum from `base` exceeds target.
template <class Weight>
__device__ int64_t scan_chunk(int64_t begin, int64_t end, Fixed base, double target, const Weight& weight,
                              Shared& sh, SplitShared& ss) {
  constexpr int64_t kSpan = int64_t(kThreads) * kScanItems;
  for (int64_t start = begin; start < end; start += kSpan) {
    const int64_t first = start + int64_t(threadIdx.x) * kScanItems;
    Fixed items[kScanItems];
    Fixed mine{0, 0};
FASTSPEC_UNROLL
    for (int j = 0; j < kScanItems; ++j) {
      items[j] = first + j < end ? to_fixed(weight(first + j)) : Fixed{0, 0};
      mine = fixed_add(mine, items[j]);
    }
    Fixed total;
    const unsigned long long hi = block_exclusive_scan_u64(mine.hi, ss, &total.hi);
    const unsigned long long lo = block_exclusive_scan_u64(mine.lo, ss, &total.lo);
    Fixed running = fixed_add(base, Fixed{hi, lo});
    int64_t found = INT64_MAX;
FASTSPEC_UNROLL
    for (int j = 0; j < kScanItems; ++j) {
      running = fixed_add(running, items[j]);
      if (found == INT64_MAX && first + j < end && fixed_value(running) > target) found = first + j;
    }
    found = block_min_index(found, sh);
    if (found != INT64_MAX) return found;
    base = fixed_add(base, total);
  }
  return -1;  // not reached: the chunk was chosen because its total exceeds target
}

// grid B: walk, q checks, then the inverse CDF: the chunk is chosen from the exact totals, the
// token by a scan of that chunk alone.
__global__ void __launch_bounds__(kThreads)
    split_find_kernel(bool fused, const float* p, const float* q, const int64_t* draft, const double* u,
                      int64_t batch, int64_t gamma, int64_t vocab, double p_tol, double q_tol, SplitBuffers buf,
                      int64_t* out, int64_t* num_accepted, int32_t* status) {
  __shared__ Shared sh;
  __shared__ SplitShared ss;
  const int64_t S = buf.splits, b = blockIdx.x, K = gamma + 1;
  int64_t* o = out + b * K;
  if (threadIdx.x == 0) {
    const Walk w = walk_row(fused, p, q, draft, u, b, batch, gamma, vocab, p_tol, q_tol, buf);
    int32_t code = w.status;
    if (code == 0 && fused && w.accepted < gamma && q != nullptr) {  // the rejected position's q, in full
      int bad = 0;
      double sum = 0.0;
      for (int64_t s = 0; s < S; ++s) {
        bad |= buf.q_bad[b * S + s];
        sum += buf.q_sum[b * S + s];
      }
      code = bad ? kBadDraftProbs : (fabs(sum - 1.0) > q_tol ? kDraftNotNormalized : 0);
    }
    ss.value_i = w.accepted;
    ss.status = code;
  }
  __syncthreads();
  const int64_t a = ss.value_i;
  const int32_t code = ss.status;
  __syncthreads();
  if (code) return write_failure(gamma, code, o, num_accepted + b, status + b);
  const ResidualRow row = residual_row(fused, p, q, draft, b, gamma, vocab, a, buf);
  // residual if it has mass, else p, else token 0 (the CPU's fallbacks)
  bool use_residual = true;
  Fixed total{0, 0};
  for (int64_t s = 0; s < S; ++s) total = fixed_add(total, buf.res_total[b * S + s]);
  if (!(fixed_value(total) > 0.0)) {
    use_residual = false;
    total = Fixed{0, 0};
    for (int64_t s = 0; s < S; ++s) total = fixed_add(total, buf.p_total[b * S + s]);
  }
  int64_t token = 0;
  if (fixed_value(total) > 0.0) {
    const Fixed* totals = use_residual ? buf.res_total + b * S : buf.p_total + b * S;
    const double target = u[b * K + gamma] * fixed_value(total);
    Fixed base{0, 0};
    int64_t chosen = -1;
    for (int64_t s = 0; s < S; ++s) {
      const Fixed next = fixed_add(base, totals[s]);
      if (fixed_value(next) > target) {
        chosen = s;
        break;
      }
      base = next;
    }
    if (chosen < 0) {  // u·total rounded up to total: the last positive weight
      const int64_t* last = use_residual ? buf.res_last + b * S : buf.p_last + b * S;
      token = -1;
      for (int64_t s = 0; s < S; ++s) token = last[s] > token ? last[s] : token;
    } else if (use_residual) {
      token = scan_chunk(chunk_begin(buf, chosen), chunk_end(buf, chosen, vocab), base, target,
                         [&row](int64_t v) { return row.residual(v); }, sh, ss);
    } else {
      token = scan_chunk(chunk_begin(buf, chosen), chunk_end(buf, chosen, vocab), base, target,
                         [&row](int64_t v) { return row.prob(v); }, sh, ss);
    }
    token = token < 0 ? 0 : token;
  }
  write_output(draft + b * gamma, gamma, a, token, o, num_accepted + b);
  if (threadIdx.x == 0) status[b] = 0;
}
