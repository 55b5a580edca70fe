// CUDA batched n-gram drafting over the flat table (csrc/include/fastspec/ngram_flat.h).
// No torch: compiles alone with `nvcc -std=c++17 -Icsrc/include -c csrc/cuda/ngram.cu`.
//
// Two kernels, running the same per-row code as the host (ngram_flat.h):
//   * tokens: one thread per row walks the hash table gamma times (draft_row); the
//     argmax of each context is precomputed (ctx_best), so no continuation is read.
//   * probabilities (only when asked, after the tokens on the same stream): one block
//     per (row, step, 4096-token chunk), fully parallel: it rebuilds that step's
//     context from the drafted tokens, writes the smoothed floor (16-byte stores) and
//     scatters the context's continuations that fall in its chunk.
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
constexpr int64_t kChunk = 4096;  // probabilities per block: 4 float4 stores per thread

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

// One block per (row, step, chunk of kChunk tokens): rebuild the step's history from
// the drafted tokens, find the context, write the smoothed floor over the chunk, then
// the continuations whose tokens fall in it (a binary search in the sorted CSR).
__global__ void fill_probs_kernel(FlatView table, const int64_t* __restrict__ context, int64_t length,
                                  const int64_t* __restrict__ lengths, int64_t gamma,
                                  const int64_t* __restrict__ tokens, int64_t num_chunks,
                                  float* __restrict__ out_probs) {
  const int64_t block = blockIdx.x;
  const int64_t row_step = block / num_chunks;  // b * gamma + j
  const int64_t chunk = block % num_chunks;
  const int64_t b = row_step / gamma, j = row_step % gamma;
  const int64_t V = table.vocab_size;
  const int64_t lo = chunk * kChunk;
  const int64_t hi = lo + kChunk < V ? lo + kChunk : V;
  __shared__ uint32_t shared_ctx, shared_begin, shared_end;
  if (threadIdx.x == 0) {
    uint32_t hist[ngram::kMaxOrder];
    const int count = ngram::history_at_step(context + b * length, lengths != nullptr ? lengths[b] : length,
                                             tokens + b * gamma, j, table.order - 1, hist);
    const uint32_t ctx = ngram::longest_seen_context(table, hist, count);
    const uint32_t begin = table.cont_offsets[ctx], end = table.cont_offsets[ctx + 1];
    shared_ctx = ctx;
    shared_begin = ngram::lower_bound_token(table.cont_tokens, begin, end, static_cast<uint64_t>(lo));
    shared_end = ngram::lower_bound_token(table.cont_tokens, begin, end, static_cast<uint64_t>(hi));
  }
  __syncthreads();
  const uint32_t ctx = shared_ctx;
  float* row = out_probs + row_step * V;
  fill_row(row + lo, hi - lo, ngram::floor_prob(table, ctx));
  __syncthreads();  // the floor is written before the seen continuations overwrite it
  const uint32_t total = table.ctx_total[ctx];
  for (uint32_t e = shared_begin + threadIdx.x; e < shared_end; e += blockDim.x)
    row[table.cont_tokens[e]] =
        ngram::smoothed_prob(table.cont_counts[e], total, table.smoothing, table.smoothing_times_vocab);
}

}  // namespace

int ngram_draft(const ngram::FlatView& table, const int64_t* context, int64_t batch, int64_t length,
                const int64_t* lengths, int64_t gamma, int64_t* out_tokens, float* out_probs, void* stream) {
  if (batch <= 0 || gamma <= 0) return static_cast<int>(cudaSuccess);
  if (batch > 0x7fffffffLL) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const unsigned token_blocks = static_cast<unsigned>((batch + kRowsPerBlock - 1) / kRowsPerBlock);
  draft_tokens_kernel<<<token_blocks, kRowsPerBlock, 0, s>>>(table, context, batch, length, lengths, gamma,
                                                              out_tokens);
  if (out_probs != nullptr) {  // same stream: runs after the tokens are drafted
    const int64_t num_chunks = (table.vocab_size + kChunk - 1) / kChunk;
    const int64_t blocks = batch * gamma * num_chunks;
    if (blocks > 0x7fffffffLL) return static_cast<int>(cudaErrorInvalidValue);
    fill_probs_kernel<<<static_cast<unsigned>(blocks), kProbThreads, 0, s>>>(
        table, context, length, lengths, gamma, out_tokens, num_chunks, out_probs);
  }
  return static_cast<int>(cudaGetLastError());
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace cuda
}  // namespace fastspec
