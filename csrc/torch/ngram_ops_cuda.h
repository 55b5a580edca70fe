// Bridge between the NgramTable torch class (ngram_ops.cpp, always built) and its CUDA
// path (ngram_ops_cuda.cpp, built only with CUDA). Only declared here; callers use it
// under #ifdef FASTSPEC_WITH_CUDA.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <tuple>

#include "fastspec/ngram.h"

namespace fastspec_torch {

struct NgramDeviceTable;  // the flat table's arrays on one GPU (ngram_ops_cuda.cpp)

std::shared_ptr<NgramDeviceTable> ngram_upload(const fastspec::NgramTable& table, const c10::Device& device);
c10::Device ngram_device_of(const NgramDeviceTable& table);
int64_t ngram_device_bytes(const NgramDeviceTable& table);

// context [B, L] int64 on the table's device; lengths [B] int64 or undefined.
// Returns tokens [B, gamma] int64 and probs [B, gamma, V] float32 (empty unless return_probs).
std::tuple<at::Tensor, at::Tensor> ngram_draft_cuda(const NgramDeviceTable& table, const at::Tensor& context,
                                                    const c10::optional<at::Tensor>& lengths, int64_t gamma,
                                                    bool return_probs);

}  // namespace fastspec_torch
