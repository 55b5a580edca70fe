// CUDA implementations of torch.ops.fastspec.{verify_greedy, verify_sample, process_logits,
// fused_verify}: argument checks (verify_common.h), then one launch of the kernels in
// csrc/cuda/verify.cu on the current stream. Built only in CUDA builds (setup.py).
//
// The kernels report bad values per row in a status tensor. Raising needs its B ints on the host:
// that one copy happens after the launch (set FASTSPEC_CUDA_UNCHECKED=1 to skip it; bad rows
// then come back as all −1 with num_accepted 0).
//
// Small batches split each row's vocabulary across blocks (cuda::plan_split; same tokens).
// FASTSPEC_CUDA_VERIFY_SPLIT overrides the choice per call: "0" one block per row, "n" >= 1 at
// least n blocks per row position, unset or "auto" the default (benchmarks and tests use it).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdlib>
#include <string>

#include "fastspec/verify_cuda.h"
#include "verify_common.h"

namespace fastspec {
namespace torch_ops {
namespace {

using at::Tensor;

bool check_status_on_host() {
  static const bool unchecked = [] {
    const char* env = std::getenv("FASTSPEC_CUDA_UNCHECKED");
    return env != nullptr && std::string(env) == "1";
  }();
  return !unchecked;
}

void finish(const char* op, cudaError_t err, const Tensor& status) {
  TORCH_CHECK(err == cudaSuccess, "fastspec.", op, ": CUDA launch failed: ", cudaGetErrorString(err));
  if (check_status_on_host()) raise_on_status(op, status.cpu());
}

int split_request() {
  const char* env = std::getenv("FASTSPEC_CUDA_VERIFY_SPLIT");
  if (env == nullptr || std::string(env).empty() || std::string(env) == "auto") return -1;
  char* end = nullptr;
  const long n = std::strtol(env, &end, 10);
  TORCH_CHECK(end != env && *end == '\0' && n >= 0, "FASTSPEC_CUDA_VERIFY_SPLIT must be auto, 0 or a positive "
              "number of blocks per row position, got '", env, "'");
  return int(n);
}

// What a launch needs besides its inputs: the split plan, its device workspace and, on the
// one-block path with processing, per-row scratch. The tensors live until the op returns (the
// caching allocator reuses them, and stream order makes the reuse safe).
struct Launch {
  cuda::SplitPlan plan;
  void* workspace = nullptr;
  cuda::RowScratch scratch;
  Tensor keep_alive[4];
};

// params: the op's processing (nullptr for the ops that only verify).
Launch make_launch(int64_t B, int64_t K, int64_t V, const at::Device& device, const ProcessParams* params) {
  int sm_count = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device.index()) == cudaSuccess,
              "fastspec: cannot read the multiprocessor count of ", device);
  Launch launch;
  const bool processes = params != nullptr && params->do_sample;
  launch.plan = cuda::plan_split(B, K, V, processes, split_request(), sm_count);
  const auto opts = at::TensorOptions().device(device);
  if (launch.plan.splits > 0) {  // the split path keeps everything in its workspace
    launch.keep_alive[0] = at::empty({int64_t(launch.plan.workspace_bytes)}, opts.dtype(at::kByte));
    launch.workspace = launch.keep_alive[0].data_ptr();
    return launch;
  }
  if (processes) {
    launch.keep_alive[1] = at::empty({B, V}, opts.dtype(at::kFloat));
    launch.keep_alive[2] = at::empty({B, V}, opts.dtype(at::kDouble));
    launch.scratch.values = launch.keep_alive[1].data_ptr<float>();
    launch.scratch.weights = launch.keep_alive[2].data_ptr<double>();
  }
  if (params != nullptr && params->repetition_penalty != 1.0f) {
    launch.keep_alive[3] = at::empty({B, V}, opts.dtype(at::kByte));
    launch.scratch.seen = launch.keep_alive[3].data_ptr<uint8_t>();
  }
  return launch;
}

std::tuple<Tensor, Tensor> verify_greedy_cuda(const Tensor& target_logits, const Tensor& draft_tokens) {
  const char* op = "verify_greedy";
  const GreedyArgs a = prepare_greedy(op, target_logits, draft_tokens);
  const c10::cuda::CUDAGuard guard(a.logits.device());
  Tensor out = at::empty({a.B, a.K}, a.draft.options());
  Tensor num_accepted = at::empty({a.B}, a.draft.options());
  Tensor status = at::zeros({a.B}, a.draft.options().dtype(at::kInt));
  const Launch launch = make_launch(a.B, a.K, a.V, a.logits.device(), nullptr);
  const cudaError_t err = cuda::launch_verify_greedy(
      a.logits.data_ptr<float>(), a.draft.data_ptr<int64_t>(), a.B, a.K - 1, a.V, launch.plan, launch.workspace,
      out.data_ptr<int64_t>(), num_accepted.data_ptr<int64_t>(), status.data_ptr<int32_t>(),
      c10::cuda::getCurrentCUDAStream().stream());
  finish(op, err, status);
  return {out, num_accepted};
}

std::tuple<Tensor, Tensor> verify_sample_cuda(const Tensor& target_probs, const c10::optional<Tensor>& draft_probs,
                                              const Tensor& draft_tokens, const Tensor& uniforms) {
  const char* op = "verify_sample";
  const SampleArgs a = prepare_sample(op, target_probs, draft_probs, draft_tokens, uniforms);
  const c10::cuda::CUDAGuard guard(a.p.device());
  Tensor out = at::empty({a.B, a.K}, a.draft.options());
  Tensor num_accepted = at::empty({a.B}, a.draft.options());
  Tensor status = at::zeros({a.B}, a.draft.options().dtype(at::kInt));
  const Launch launch = make_launch(a.B, a.K, a.V, a.p.device(), nullptr);
  const cudaError_t err = cuda::launch_verify_sample(
      a.p.data_ptr<float>(), ptr_or_null<float>(a.q), a.draft.data_ptr<int64_t>(), a.u.data_ptr<double>(), a.B,
      a.K - 1, a.V, a.p_tol, a.q_tol, launch.plan, launch.workspace, out.data_ptr<int64_t>(),
      num_accepted.data_ptr<int64_t>(), status.data_ptr<int32_t>(), c10::cuda::getCurrentCUDAStream().stream());
  finish(op, err, status);
  return {out, num_accepted};
}

Tensor process_logits_cuda(const Tensor& logits, const c10::optional<Tensor>& prev_tokens,
                           const c10::optional<Tensor>& draft_tokens, bool do_sample, double temperature,
                           int64_t top_k, double top_p, double repetition_penalty) {
  const char* op = "process_logits";
  const ProcessArgs a =
      prepare_process(op, logits, prev_tokens, draft_tokens, do_sample, temperature, top_k, top_p, repetition_penalty);
  const c10::cuda::CUDAGuard guard(a.logits.device());
  Tensor out = at::empty({a.B, a.K, a.V}, a.logits.options());
  Tensor status = at::zeros({a.B}, a.logits.options().dtype(at::kInt));
  const Launch launch = make_launch(a.B, a.K, a.V, a.logits.device(), &a.params);
  const cudaError_t err = cuda::launch_process_logits(
      a.logits.data_ptr<float>(), ptr_or_null<int64_t>(a.prev), a.L, ptr_or_null<int64_t>(a.draft), a.B, a.K, a.V,
      a.params, launch.scratch, launch.plan, launch.workspace, out.data_ptr<float>(), status.data_ptr<int32_t>(),
      c10::cuda::getCurrentCUDAStream().stream());
  finish(op, err, status);
  return out;
}

std::tuple<Tensor, Tensor> fused_verify_cuda(const Tensor& target_logits, const Tensor& draft_tokens,
                                             const c10::optional<Tensor>& draft_probs,
                                             const c10::optional<Tensor>& prev_tokens,
                                             const c10::optional<Tensor>& uniforms, bool do_sample, double temperature,
                                             int64_t top_k, double top_p, double repetition_penalty) {
  const char* op = "fused_verify";
  const FusedArgs a = prepare_fused(op, target_logits, draft_tokens, draft_probs, prev_tokens, uniforms, do_sample,
                                    temperature, top_k, top_p, repetition_penalty);
  const c10::cuda::CUDAGuard guard(a.logits.device());
  Tensor out = at::empty({a.B, a.K}, a.draft.options());
  Tensor num_accepted = at::empty({a.B}, a.draft.options());
  Tensor status = at::zeros({a.B}, a.draft.options().dtype(at::kInt));
  const Launch launch = make_launch(a.B, a.K, a.V, a.logits.device(), &a.params);
  const cudaError_t err = cuda::launch_fused_verify(
      a.logits.data_ptr<float>(), a.draft.data_ptr<int64_t>(), ptr_or_null<float>(a.q), ptr_or_null<int64_t>(a.prev),
      a.L, ptr_or_null<double>(a.u), a.B, a.K - 1, a.V, a.params, a.q_tol, launch.scratch, launch.plan,
      launch.workspace, out.data_ptr<int64_t>(), num_accepted.data_ptr<int64_t>(), status.data_ptr<int32_t>(),
      c10::cuda::getCurrentCUDAStream().stream());
  finish(op, err, status);
  return {out, num_accepted};
}

}  // namespace
}  // namespace torch_ops
}  // namespace fastspec

TORCH_LIBRARY_IMPL(fastspec, CUDA, m) {
  m.impl("verify_greedy", &fastspec::torch_ops::verify_greedy_cuda);
  m.impl("verify_sample", &fastspec::torch_ops::verify_sample_cuda);
  m.impl("process_logits", &fastspec::torch_ops::process_logits_cuda);
  m.impl("fused_verify", &fastspec::torch_ops::fused_verify_cuda);
}
