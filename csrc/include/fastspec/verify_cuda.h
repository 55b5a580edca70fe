// CUDA launchers for verification and logits processing (kernels in csrc/cuda/verify.cu).
// Framework-agnostic: raw device pointers, no torch. Semantics, shapes and status bits are those
// of the CPU core in fastspec/verify.h; the whole step runs on the stream (no host
// synchronisation inside).
//
// Two launch shapes, same tokens: one thread block per row (plan.splits == 0), or, for small
// batches, each row position's vocabulary split across plan.splits blocks with all γ+1 positions
// processed at once (plan_split picks it; csrc/cuda/verify_split.cuh). Float64 sums are block
// reductions (deterministic order), so token choices equal the CPU's except where a uniform falls
// within float64 rounding (~1e-16) of a decision boundary.
#pragma once

#ifndef FASTSPEC_CUDA_EMULATION
#include <cuda_runtime.h>
#endif

#include <cstddef>
#include <cstdint>

#include "fastspec/verify.h"

namespace fastspec {
namespace cuda {

// Scratch for the row kernels, each [B, V] in device memory.
struct RowScratch {
  float* values = nullptr;    // processed logits
  double* weights = nullptr;  // exp(x - max) of the kept tokens
  uint8_t* seen = nullptr;    // repetition-penalty membership (only used when the penalty != 1)
};

// How a call is cut into blocks. splits == 0: one block per row (RowScratch used, no workspace);
// splits >= 1: `chunk` tokens per block and a device workspace of workspace_bytes (any contents;
// the launcher zeroes what it needs).
struct SplitPlan {
  int64_t splits = 0;
  int64_t chunk = 0;
  size_t workspace_bytes = 0;
};

// request: -1 auto (split when 4·batch <= sm_count, about two blocks per SM, >= 2048 tokens per
// block; the split path reads every position, one block per row stops at the first rejection), 0 one block per row, n >= 1 at least n blocks per row position (tests, benchmarks).
// positions = γ+1 (K for process_logits); processes: the call processes logits for sampling
// (fused_verify / process_logits with do_sample), which needs a [B,K,V] float buffer.
SplitPlan plan_split(int64_t batch, int64_t positions, int64_t vocab, bool processes, int request, int sm_count);

// logits [B,γ+1,V] float32, draft [B,γ] -> out [B,γ+1], num_accepted [B], status [B]
cudaError_t launch_verify_greedy(const float* logits, const int64_t* draft, int64_t batch, int64_t gamma,
                                 int64_t vocab, const SplitPlan& plan, void* workspace, int64_t* out,
                                 int64_t* num_accepted, int32_t* status, cudaStream_t stream);

// p [B,γ+1,V], q [B,γ,V] or nullptr, draft [B,γ], u [B,γ+1] -> out, num_accepted, status
cudaError_t launch_verify_sample(const float* p, const float* q, const int64_t* draft, const double* u,
                                 int64_t batch, int64_t gamma, int64_t vocab, double p_sum_tolerance,
                                 double q_sum_tolerance, const SplitPlan& plan, void* workspace, int64_t* out,
                                 int64_t* num_accepted, int32_t* status, cudaStream_t stream);

// logits [B,K,V], prev [B,L] or nullptr, draft [B,K-1] or nullptr -> out [B,K,V], status [B]
cudaError_t launch_process_logits(const float* logits, const int64_t* prev, int64_t prev_len, const int64_t* draft,
                                  int64_t batch, int64_t positions, int64_t vocab, ProcessParams params,
                                  RowScratch scratch, const SplitPlan& plan, void* workspace, float* out,
                                  int32_t* status, cudaStream_t stream);

// logits [B,γ+1,V], draft [B,γ], q [B,γ,V] or nullptr, prev [B,L] or nullptr, u [B,γ+1] or nullptr
// (greedy) -> out [B,γ+1], num_accepted [B], status [B]
cudaError_t launch_fused_verify(const float* logits, const int64_t* draft, const float* q, const int64_t* prev,
                                int64_t prev_len, const double* u, int64_t batch, int64_t gamma, int64_t vocab,
                                ProcessParams params, double q_sum_tolerance, RowScratch scratch,
                                const SplitPlan& plan, void* workspace, int64_t* out, int64_t* num_accepted,
                                int32_t* status, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastspec
