// torch.classes.fastspec.NgramTable: the torch face of fastspec::NgramTable
// (csrc/cpu/ngram.cpp). Python face: fastspec/ngram.py. Tensor checks live here; the
// core validates token ids itself (all or nothing) and its std::invalid_argument
// becomes a Python ValueError, other failures a RuntimeError.
#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <memory>
#include <cstring>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>

#include "fastspec/ngram.h"
#ifdef FASTSPEC_WITH_CUDA
#include "ngram_ops_cuda.h"
#endif

namespace {

constexpr int64_t kMaxGamma = 1 << 16;

// Runs a core call, turning its exceptions into torch's ValueError / RuntimeError.
template <class F>
auto translate(const char* what, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  } catch (const std::exception& e) {
    TORCH_CHECK(false, what, ": ", e.what());
  }
}

void check_context(const at::Tensor& context, const c10::optional<at::Tensor>& lengths, const char* op) {
  TORCH_CHECK_VALUE(context.dim() == 2, op, ": context_ids must be [B, L], got ", context.dim(), " dims");
  TORCH_CHECK_VALUE(context.scalar_type() == at::kLong, op, ": context_ids must be int64, got ",
                    context.scalar_type());
  if (lengths.has_value()) {
    const at::Tensor& len = *lengths;
    TORCH_CHECK_VALUE(len.dim() == 1 && len.size(0) == context.size(0), op, ": lengths must be [B] = [",
                      context.size(0), "]");
    TORCH_CHECK_VALUE(len.scalar_type() == at::kLong, op, ": lengths must be int64");
    TORCH_CHECK_VALUE(len.device() == context.device(), op, ": lengths is on ", len.device(),
                      " but context_ids is on ", context.device());
  }
}

struct NgramTableHolder : torch::CustomClassHolder {
  fastspec::NgramTable table;
#ifdef FASTSPEC_WITH_CUDA
  std::shared_ptr<fastspec_torch::NgramDeviceTable> device_copy;
  uint64_t device_version = 0;
#endif

  NgramTableHolder(int64_t n, int64_t vocab_size, double smoothing)
      : table(make(n, vocab_size, smoothing)) {}
  explicit NgramTableHolder(fastspec::NgramTable&& t) : table(std::move(t)) {}

  static fastspec::NgramTable make(int64_t n, int64_t vocab_size, double smoothing) {
    TORCH_CHECK_VALUE(n >= 1 && n <= fastspec::NgramTable::kMaxOrder, "NgramTable: n must be in [1, 16], got ", n);
    return translate("NgramTable", [&] { return fastspec::NgramTable(static_cast<int>(n), vocab_size, smoothing); });
  }

  // tokens: 1-D int64 CPU, the sequences concatenated; offsets: [num_seqs+1] int64,
  // sequence i is tokens[offsets[i]:offsets[i+1]].
  void count(const at::Tensor& tokens, const at::Tensor& offsets, bool reset) {
    const char* op = reset ? "NgramTable.fit" : "NgramTable.update";
    TORCH_CHECK_VALUE(tokens.dim() == 1 && offsets.dim() == 1, op, ": tokens and offsets must be 1-D");
    TORCH_CHECK_VALUE(tokens.scalar_type() == at::kLong && offsets.scalar_type() == at::kLong, op,
                      ": tokens and offsets must be int64");
    TORCH_CHECK_VALUE(tokens.device().is_cpu() && offsets.device().is_cpu(), op,
                      ": training tokens must be CPU tensors");
    TORCH_CHECK_VALUE(offsets.numel() >= 1, op, ": offsets needs at least one element");
    const at::Tensor tok = tokens.contiguous(), off = offsets.contiguous();
    const int64_t* o = off.data_ptr<int64_t>();
    const int64_t num_seqs = off.numel() - 1;
    TORCH_CHECK_VALUE(o[0] >= 0 && o[num_seqs] <= tok.numel(), op, ": offsets must lie within [0, ", tok.numel(),
                      "]");
    translate(op, [&] {
      if (reset)
        table.fit(tok.data_ptr<int64_t>(), o, num_seqs);
      else
        table.update(tok.data_ptr<int64_t>(), o, num_seqs);
    });
  }
  void fit(const at::Tensor& tokens, const at::Tensor& offsets) { count(tokens, offsets, true); }
  void update(const at::Tensor& tokens, const at::Tensor& offsets) { count(tokens, offsets, false); }
  void clear() { table.clear(); }

  // context [B, L] int64 (-1 left padding, or lengths [B]); returns tokens [B, gamma]
  // int64 and probs [B, gamma, V] float32 (an empty tensor unless return_probs).
  std::tuple<at::Tensor, at::Tensor> draft(const at::Tensor& context, const c10::optional<at::Tensor>& lengths,
                                           int64_t gamma, bool return_probs) {
    check_context(context, lengths, "NgramTable.draft");
    TORCH_CHECK_VALUE(gamma >= 1 && gamma <= kMaxGamma, "NgramTable.draft: gamma must be in [1, ", kMaxGamma,
                      "], got ", gamma);
    if (context.is_cuda()) {
#ifdef FASTSPEC_WITH_CUDA
      return fastspec_torch::ngram_draft_cuda(device_table(context.device()), context, lengths, gamma, return_probs);
#else
      TORCH_CHECK(false, "NgramTable.draft: fastspec was built without CUDA");
#endif
    }
    TORCH_CHECK_VALUE(context.device().is_cpu(), "NgramTable.draft: unsupported device ", context.device());
    const at::Tensor ctx = context.contiguous();
    at::Tensor len;
    if (lengths.has_value()) len = lengths->contiguous();
    const int64_t B = ctx.size(0), L = ctx.size(1);
    at::Tensor tokens = at::empty({B, gamma}, ctx.options());
    at::Tensor probs = return_probs ? at::empty({B, gamma, table.vocab_size()}, ctx.options().dtype(at::kFloat))
                                    : at::empty({0}, ctx.options().dtype(at::kFloat));
    translate("NgramTable.draft", [&] {
      table.draft(ctx.data_ptr<int64_t>(), B, L, len.defined() ? len.data_ptr<int64_t>() : nullptr, gamma,
                  tokens.data_ptr<int64_t>(), return_probs ? probs.data_ptr<float>() : nullptr);
    });
    return {tokens, probs};
  }

  // [B, V] float32: the distribution of the next token after each row's context.
  at::Tensor next_probs(const at::Tensor& context, const c10::optional<at::Tensor>& lengths) {
    at::Tensor probs = std::get<1>(draft(context, lengths, 1, true));
    return probs.select(1, 0);
  }

  void save(const std::string& path) {
    translate("NgramTable.save", [&] { table.save(path); });
  }
  static c10::intrusive_ptr<NgramTableHolder> load(const std::string& path) {
    return c10::make_intrusive<NgramTableHolder>(
        translate("NgramTable.load", [&] { return fastspec::NgramTable::load(path); }));
  }
  // The same bytes as the file, as a uint8 tensor (for pickling).
  at::Tensor to_bytes() {
    std::vector<uint8_t> bytes = translate("NgramTable.to_bytes", [&] { return table.serialize(); });
    at::Tensor out = at::empty({static_cast<int64_t>(bytes.size())}, at::TensorOptions().dtype(at::kByte));
    std::memcpy(out.data_ptr<uint8_t>(), bytes.data(), bytes.size());
    return out;
  }
  static c10::intrusive_ptr<NgramTableHolder> from_bytes(const at::Tensor& bytes) {
    TORCH_CHECK_VALUE(bytes.dim() == 1 && bytes.scalar_type() == at::kByte && bytes.device().is_cpu(),
                      "NgramTable.from_bytes: expected a 1-D uint8 CPU tensor");
    const at::Tensor b = bytes.contiguous();
    return c10::make_intrusive<NgramTableHolder>(translate("NgramTable.from_bytes", [&] {
      return fastspec::NgramTable::deserialize(b.data_ptr<uint8_t>(), static_cast<size_t>(b.numel()));
    }));
  }

  // Uploads (or refreshes) the GPU copy; later CUDA drafts reuse it until the counts change.
  void to_device(const std::string& device) {
    const c10::Device d(device);
    if (d.is_cpu()) return;
#ifdef FASTSPEC_WITH_CUDA
    TORCH_CHECK_VALUE(d.is_cuda(), "NgramTable.to: unsupported device ", d);
    (void)device_table(d);
#else
    TORCH_CHECK(false, "NgramTable.to(", d, "): fastspec was built without CUDA");
#endif
  }
  int64_t device_memory_bytes() {
#ifdef FASTSPEC_WITH_CUDA
    return device_copy ? fastspec_torch::ngram_device_bytes(*device_copy) : 0;
#else
    return 0;
#endif
  }

#ifdef FASTSPEC_WITH_CUDA
  const fastspec_torch::NgramDeviceTable& device_table(const c10::Device& device) {
    c10::Device d = device;
    if (!d.has_index()) d = c10::Device(c10::kCUDA, 0);
    if (!device_copy || device_version != table.version() || fastspec_torch::ngram_device_of(*device_copy) != d) {
      device_copy = fastspec_torch::ngram_upload(table, d);
      device_version = table.version();
    }
    return *device_copy;
  }
#endif

  int64_t n() { return table.order(); }
  int64_t vocab_size() { return table.vocab_size(); }
  double smoothing() { return table.smoothing(); }
  int64_t num_entries() { return static_cast<int64_t>(table.num_entries()); }
  int64_t num_contexts() { return static_cast<int64_t>(table.num_contexts()); }
  int64_t num_tokens() { return static_cast<int64_t>(table.num_tokens()); }
  int64_t memory_bytes() { return static_cast<int64_t>(table.memory_bytes()); }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastspec, m) {
  m.class_<NgramTableHolder>("NgramTable")
      .def(torch::init<int64_t, int64_t, double>())
      .def("fit", &NgramTableHolder::fit)
      .def("update", &NgramTableHolder::update)
      .def("clear", &NgramTableHolder::clear)
      .def("draft", &NgramTableHolder::draft)
      .def("next_probs", &NgramTableHolder::next_probs)
      .def("save", &NgramTableHolder::save)
      .def_static("load", &NgramTableHolder::load)
      .def("to_bytes", &NgramTableHolder::to_bytes)
      .def_static("from_bytes", &NgramTableHolder::from_bytes)
      .def("to_device", &NgramTableHolder::to_device)
      .def("device_memory_bytes", &NgramTableHolder::device_memory_bytes)
      .def("n", &NgramTableHolder::n)
      .def("vocab_size", &NgramTableHolder::vocab_size)
      .def("smoothing", &NgramTableHolder::smoothing)
      .def("num_entries", &NgramTableHolder::num_entries)
      .def("num_contexts", &NgramTableHolder::num_contexts)
      .def("num_tokens", &NgramTableHolder::num_tokens)
      .def("memory_bytes", &NgramTableHolder::memory_bytes);
}
