// CUDA batched n-gram drafting over the flat table (csrc/include/fastspec/ngram_flat.h).
// No torch: compiles alone with `nvcc -std=c++17 -Icsrc/include -c csrc/cuda/ngram.cu`.
//
// Two kernels, same lookup code as the host (ngram::longest_seen_context):
//   * tokens only: one thread per row walks the hash table gamma times; the argmax of
//     each context is precomputed (ctx_best), so no continuation list is read.
//   * with probabilities: one block per row; thread 0 walks, then the whole block
//     writes the V-wide row (smoothed floor, vectorized) and scatters the context's
//     continuations on top.
#include <cuda_runtime.h>

#include <cstdint>

#include "fastspec/ngram_cuda.h"
#include "fastspec/ngram_flat.h"

namespace fastspec {
namespace cuda {
namespace {

using ngram::FlatView;

constexpr int kRowsPerBlock = 128;
constexpr int kProbThreads = 256;

__global__ void draft_tokens_kernel(FlatView table, const int64_t* __restrict__ context, int64_t batch,
                                    int64_t length, const int64_t* __restrict__ lengths, int64_t gamma,
                                    int64_t* __restrict__ out_tokens) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  ngram::draft_row(table, context + b * length, lengths != nullptr ? lengths[b] : length, gamma,
                   out_tokens + b * gamma);
}

// row[0, n) = value, block-strided, with 16-byte stores for the aligned middle part.
__device__ __forceinline__ void fill_row(float* row, int64_t n, float value) {
  const int64_t misalign = static_cast<int64_t>((reinterpret_cast<uintptr_t>(row) / sizeof(float)) & 3);
  int64_t head = misalign == 0 ? 0 : 4 - misalign;
  if (head > n) head = n;
  for (int64_t i = threadIdx.x; i < head; i += blockDim.x) row[i] = value;
  float4* body = reinterpret_cast<float4*>(row + head);
  const int64_t num_vec = (n - head) / 4;
  const float4 v4 = make_float4(value, value, value, value);
  for (int64_t i = threadIdx.x; i < num_vec; i += blockDim.x) body[i] = v4;
  for (int64_t i = head + num_vec * 4 + threadIdx.x; i < n; i += blockDim.x) row[i] = value;
}

__global__ void draft_probs_kernel(FlatView table, const int64_t* __restrict__ context, int64_t length,
                                   const int64_t* __restrict__ lengths, int64_t gamma,
                                   int64_t* __restrict__ out_tokens, float* __restrict__ out_probs) {
  const int64_t b = blockIdx.x;
  const int64_t V = table.vocab_size;
  const int max_ctx = table.order - 1;
  __shared__ uint32_t shared_ctx;
  uint32_t hist[ngram::kMaxOrder];  // used by thread 0 only
  int count = 0;
  if (threadIdx.x == 0)
    count = ngram::load_history(context + b * length, lengths != nullptr ? lengths[b] : length, max_ctx, hist);
  for (int64_t j = 0; j < gamma; ++j) {
    if (threadIdx.x == 0) {
      const uint32_t ctx = ngram::longest_seen_context(table, hist, count);
      const uint32_t token = table.ctx_best[ctx];
      out_tokens[b * gamma + j] = token;
      count = ngram::push_history(hist, count, max_ctx, token);
      shared_ctx = ctx;
    }
    __syncthreads();
    const uint32_t ctx = shared_ctx;
    const uint32_t total = table.ctx_total[ctx];
    float* row = out_probs + (b * gamma + j) * V;
    fill_row(row, V, ngram::floor_prob(table, ctx));
    __syncthreads();  // the floor is written before the seen continuations overwrite it
    if (total != 0) {
      const uint32_t begin = table.cont_offsets[ctx], end = table.cont_offsets[ctx + 1];
      for (uint32_t e = begin + threadIdx.x; e < end; e += blockDim.x)
        row[table.cont_tokens[e]] =
            ngram::smoothed_prob(table.cont_counts[e], total, table.smoothing, table.smoothing_times_vocab);
    }
    __syncthreads();  // shared_ctx is rewritten next step
  }
}

}  // namespace

int ngram_draft(const ngram::FlatView& table, const int64_t* context, int64_t batch, int64_t length,
                const int64_t* lengths, int64_t gamma, int64_t* out_tokens, float* out_probs, void* stream) {
  if (batch <= 0 || gamma <= 0) return static_cast<int>(cudaSuccess);
  if (batch > 0x7fffffffLL) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (out_probs == nullptr) {
    const unsigned blocks = static_cast<unsigned>((batch + kRowsPerBlock - 1) / kRowsPerBlock);
    draft_tokens_kernel<<<blocks, kRowsPerBlock, 0, s>>>(table, context, batch, length, lengths, gamma, out_tokens);
  } else {
    draft_probs_kernel<<<static_cast<unsigned>(batch), kProbThreads, 0, s>>>(table, context, length, lengths, gamma,
                                                                            out_tokens, out_probs);
  }
  return static_cast<int>(cudaGetLastError());
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace cuda
}  // namespace fastspec
