// Host entry point of the CUDA n-gram drafting kernels (csrc/cuda/ngram.cu).
// No torch and no CUDA headers here: pointers are device pointers, the stream is a
// cudaStream_t passed as void*, and the return value is a cudaError_t as int.
#pragma once

#include <cstdint>

#include "fastspec/ngram_flat.h"

namespace fastspec {
namespace cuda {

// Greedy drafting over a table uploaded as `table` (device pointers, see
// ngram_flat.h), with the semantics of NgramTable::draft. context [B, L] int64, each
// row left-padded with -1, or, when `lengths` [B] is not null, row b's first
// lengths[b] tokens. The caller validates the ids. Writes out_tokens [B, gamma] and,
// if out_probs is not null, out_probs [B, gamma, V].
int ngram_draft(const ngram::FlatView& table, const int64_t* context, int64_t batch, int64_t length,
                const int64_t* lengths, int64_t gamma, int64_t* out_tokens, float* out_probs, void* stream);

const char* error_string(int code);

}  // namespace cuda
}  // namespace fastspec
