// The Python module fastspec._C. Ops register themselves with TORCH_LIBRARY_FRAGMENT
// in their own files (namespace "fastspec"); importing this module runs those
// static registrations, after which they live under torch.ops.fastspec.*.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <mutex>
#include <set>

namespace {

// How many intra-op threads at::parallel_for really used over n one-item tasks: 1 means the build
// lost OpenMP (the template's pragma is dropped without -fopenmp) and every native op runs serially.
int64_t parallel_threads_seen(int64_t n) {
  TORCH_CHECK_VALUE(n >= 1, "parallel_threads_seen: n must be >= 1, got ", n);
  std::set<int> seen;
  std::mutex lock;
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    const std::lock_guard<std::mutex> guard(lock);
    seen.insert(at::get_thread_num());
  });
  return static_cast<int64_t>(seen.size());
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastspec native ops (see fastspec/ops.py for the Python face)";
#ifdef FASTSPEC_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("parallel_threads_seen", &parallel_threads_seen, "threads at::parallel_for used over n tasks (build check)");
}
