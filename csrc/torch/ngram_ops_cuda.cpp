// CUDA path of torch.classes.fastspec.NgramTable (built only with CUDA): uploads the
// flat table (fastspec::NgramFlat) as device tensors and launches the drafting kernels
// of csrc/cuda/ngram.cu on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>
#include <vector>

#include "fastspec/ngram_cuda.h"
#include "ngram_ops_cuda.h"

namespace fastspec_torch {

struct NgramDeviceTable {
  c10::Device device{c10::kCUDA, 0};
  std::vector<at::Tensor> storage;  // owns the device arrays that `view` points into
  fastspec::ngram::FlatView view;
  int64_t bytes = 0;
};

namespace {

// Copies a host vector of 4- or 8-byte ids to the device (as int32/int64 storage).
template <class T>
const T* upload(NgramDeviceTable& out, const std::vector<T>& values) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "ids are 32 or 64 bits");
  const at::ScalarType dtype = sizeof(T) == 4 ? at::kInt : at::kLong;
  at::Tensor host = at::empty({static_cast<int64_t>(values.size())}, at::TensorOptions().dtype(dtype));
  if (!values.empty()) std::memcpy(host.data_ptr(), values.data(), values.size() * sizeof(T));
  at::Tensor dev = host.to(out.device);
  out.bytes += static_cast<int64_t>(values.size() * sizeof(T));
  out.storage.push_back(dev);
  return static_cast<const T*>(dev.data_ptr());
}

}  // namespace

std::shared_ptr<NgramDeviceTable> ngram_upload(const fastspec::NgramTable& table, const c10::Device& device) {
  TORCH_CHECK_VALUE(device.is_cuda() && device.has_index(), "NgramTable: expected a CUDA device with an index, got ",
                    device);
  const c10::cuda::CUDAGuard guard(device);
  const fastspec::NgramFlat flat = table.build_flat();
  auto out = std::make_shared<NgramDeviceTable>();
  out->device = device;
  out->view = flat.view();  // scalars (order, V, smoothing, mask, sizes); pointers replaced below
  out->view.slot_keys = upload(*out, flat.slot_keys);
  out->view.slot_ctx = upload(*out, flat.slot_ctx);
  out->view.ctx_total = upload(*out, flat.ctx_total);
  out->view.ctx_best = upload(*out, flat.ctx_best);
  out->view.cont_offsets = upload(*out, flat.cont_offsets);
  out->view.cont_tokens = upload(*out, flat.cont_tokens);
  out->view.cont_counts = upload(*out, flat.cont_counts);
  return out;
}

c10::Device ngram_device_of(const NgramDeviceTable& table) { return table.device; }

int64_t ngram_device_bytes(const NgramDeviceTable& table) { return table.bytes; }

std::tuple<at::Tensor, at::Tensor> ngram_draft_cuda(const NgramDeviceTable& table, const at::Tensor& context,
                                                    const c10::optional<at::Tensor>& lengths, int64_t gamma,
                                                    bool return_probs) {
  TORCH_CHECK_VALUE(context.device() == table.device, "NgramTable.draft: table is on ", table.device,
                    " but context_ids is on ", context.device());
  const c10::cuda::CUDAGuard guard(context.device());
  const at::Tensor ctx = context.contiguous();  // [B, L]
  const int64_t B = ctx.size(0), L = ctx.size(1), V = table.view.vocab_size;
  // Validate the ids on the device; one host sync (the kernel itself never indexes by
  // a context id, so a bad id could only give a wrong draft, never a bad access).
  at::Tensor bad = at::logical_or(ctx.lt(-1), ctx.ge(V)).any();
  at::Tensor len;
  if (lengths.has_value()) {
    len = lengths->contiguous();  // [B]
    bad = bad.logical_or(at::logical_or(len.lt(0), len.gt(L)).any());
    const at::Tensor in_row = at::arange(L, ctx.options()).unsqueeze(0).lt(len.unsqueeze(1));  // [B, L]
    bad = bad.logical_or(in_row.logical_and(ctx.lt(0)).any());
  } else {
    const at::Tensor started = ctx.ge(0).cumsum(1).gt(0);  // [B, L] a real token came before
    bad = bad.logical_or(started.logical_and(ctx.eq(-1)).any());
  }
  TORCH_CHECK_VALUE(!bad.item<bool>(), "NgramTable.draft: context ids must be in [0, ", V,
                    ") with -1 only as left padding (or, with lengths, 0 <= lengths <= L and valid ids "
                    "within each row's length)");
  at::Tensor tokens = at::empty({B, gamma}, ctx.options());
  at::Tensor probs = return_probs ? at::empty({B, gamma, V}, ctx.options().dtype(at::kFloat))
                                  : at::empty({0}, ctx.options().dtype(at::kFloat));
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(ctx.device().index());
  const int rc = fastspec::cuda::ngram_draft(table.view, ctx.data_ptr<int64_t>(), B, L,
                                             len.defined() ? len.data_ptr<int64_t>() : nullptr, gamma,
                                             tokens.data_ptr<int64_t>(),
                                             return_probs ? probs.data_ptr<float>() : nullptr, stream.stream());
  TORCH_CHECK(rc == 0, "NgramTable.draft (CUDA): ", fastspec::cuda::error_string(rc));
  return {tokens, probs};
}

}  // namespace fastspec_torch
