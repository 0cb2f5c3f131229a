#include "session.h"

#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/utsname.h>

#include <chrono>
#include <cstdio>

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/platform/platform.h>

#include "error.h"
#include "log.h"
#include "qkvx/kernels.h"

namespace qkvx_run {

using executorch::aten::ScalarType;
using executorch::extension::make_tensor_ptr;
using executorch::extension::module::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::Program;

namespace {

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

std::string error_name(Error e) {
  std::string s = executorch::runtime::to_string(e);
  return s.rfind("Error::", 0) == 0 ? s.substr(7) : s;
}

// The methods a qkvx .pte must have: the forward and what a runner needs to drive it.
const char* const kRequired[] = {"forward", "get_max_seq_len", "get_max_context_len", "get_vocab_size"};

}  // namespace

Session::Session(const std::string& path, int threads, bool verbose) : path_(path) {
  log::install(verbose);
  struct stat st {};
  if (stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) bad_input(path + ": no such file");
  if (threads > 0) qkvx_set_num_threads(threads);
  auto t0 = std::chrono::steady_clock::now();
  // Mmap: weights stay in the page cache until XNNPACK packs them. InternalConsistency verifies
  // the whole flatbuffer first, so a corrupted file is an error here, never a wild read later.
  module_ = std::make_unique<Module>(path, Module::LoadMode::Mmap);
  log::clear();
  if (Error e = module_->load(Program::Verification::InternalConsistency); e != Error::Ok)
    bad_input(path + ": not a loadable ExecuTorch program (" + error_name(e) + log::last(": ") + ")");
  auto names = module_->method_names();
  if (!names.ok()) bad_input(path + ": cannot list the program's methods (" + error_name(names.error()) + ")");
  for (const char* m : kRequired) {
    if (!names->count(m))
      bad_input(path + ": not a qkvx LLM program: no method '" + m +
                "' (the .pte contract: forward(tokens, input_pos) and its constant methods)");
  }
  log::clear();
  if (Error e = module_->load_method("forward"); e != Error::Ok) {
    std::string missing = log::missing_operators();
    if (e == Error::OperatorMissing && !missing.empty())
      bad_input(path + ": needs operator(s) " + missing +
                ", registered by no kernel library linked into qkvx-run (ExecuTorch's optimized and "
                "portable kernels, XNNPACK, qkvx's kernels); export it with qkvx's attention kernels "
                "(recipe attention: qkvx)");
    bad_input(path + ": cannot load method forward (" + error_name(e) + log::last(": ") + ")");
  }
  // ExecuTorch logs some defects of a corrupted program (an operator index out of range) and
  // still returns Ok, leaving a null kernel that crashes at the first call: an error logged while
  // loading fails the load.
  if (log::errors())
    bad_input(path + ": ExecuTorch reported an error loading method forward" + log::last(": ") +
              " (a corrupted program)");
  auto meta = module_->method_meta("forward");
  if (!meta.ok() || meta->num_inputs() != 2 || meta->num_outputs() < 1)
    bad_input(path + ": forward is not forward(tokens, input_pos) -> logits (the qkvx .pte contract)");
  prefill_chunk_ = constant("get_max_seq_len");
  max_context_len_ = constant("get_max_context_len");
  vocab_size_ = constant("get_vocab_size");
  n_layers_ = names->count("get_n_layers") ? constant("get_n_layers") : 0;
  if (names->count("get_eos_ids")) {
    auto out = module_->execute("get_eos_ids");
    if (out.ok())
      for (const EValue& v : *out)
        if (v.isInt()) eos_ids_.push_back(v.toInt());
  }
  if (prefill_chunk_ < 1 || max_context_len_ < 1 || vocab_size_ < 1)
    bad_input(path + ": constant methods give prefill chunk " + std::to_string(prefill_chunk_) +
              ", context " + std::to_string(max_context_len_) + ", vocabulary " + std::to_string(vocab_size_));
  stats_.load_ms = ms_since(t0);
}

Session::~Session() = default;

int64_t Session::constant(const char* method) {
  auto out = module_->execute(method);
  if (!out.ok() || out->empty() || !(*out)[0].isInt())
    bad_input(path_ + ": constant method " + method + " does not return an integer");
  return (*out)[0].toInt();
}

int Session::threads() const { return qkvx_num_threads(); }

Stats Session::stats() const {
  Stats s = stats_;
  // VmHWM: this image's high-water mark. getrusage's ru_maxrss is not: Linux carries it across
  // execve, so a runner started from a big Python process reports the parent's size.
  if (std::FILE* f = std::fopen("/proc/self/status", "r")) {
    char line[256];
    while (std::fgets(line, sizeof line, f))
      if (std::sscanf(line, "VmHWM: %ld kB", &s.peak_rss_kb) == 1) break;
    std::fclose(f);
  }
  if (s.peak_rss_kb == 0) {
    struct rusage ru {};
    getrusage(RUSAGE_SELF, &ru);
    s.peak_rss_kb = ru.ru_maxrss;
  }
  return s;
}

std::string Session::overflow(int64_t n) const {
  if (pos_ + n <= max_context_len_) return "";
  return "context overflow: " + std::to_string(pos_) + " cached + " + std::to_string(n) +
         " new tokens exceed the program's context of " + std::to_string(max_context_len_) +
         " (get_max_context_len)";
}

std::vector<float> Session::step(const std::vector<int64_t>& tokens) {
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n == 0) bad_input("nothing to run: empty token sequence");
  for (int64_t i = 0; i < n; ++i) {
    if (tokens[i] < 0 || tokens[i] >= vocab_size_)
      bad_input("token id " + std::to_string(tokens[i]) + " (index " + std::to_string(i) +
                ") is outside the vocabulary [0, " + std::to_string(vocab_size_) + ")");
  }
  if (std::string o = overflow(n); !o.empty()) bad_input(o);
  std::vector<float> out;
  out.reserve(static_cast<size_t>(n * vocab_size_));
  for (int64_t i = 0; i < n; i += prefill_chunk_) {
    int64_t t = std::min(prefill_chunk_, n - i);
    auto t0 = std::chrono::steady_clock::now();
    std::vector<float> logits = forward(tokens.data() + i, t);
    double ms = ms_since(t0);
    (t == 1 ? stats_.decode_ms : stats_.prefill_ms) += ms;
    (t == 1 ? stats_.decode_tokens : stats_.prefill_tokens) += t;
    out.insert(out.end(), logits.begin(), logits.end());
  }
  return out;
}

std::vector<float> Session::forward(const int64_t* tokens, int64_t n) {
  auto ids = make_tensor_ptr({1, static_cast<int32_t>(n)}, std::vector<int64_t>(tokens, tokens + n));
  auto pos = make_tensor_ptr({1}, std::vector<int64_t>{pos_});
  log::clear();
  auto result = module_->execute("forward", {EValue(*ids), EValue(*pos)});
  if (!result.ok())
    runtime_failure("forward failed at position " + std::to_string(pos_) + " (" +
                    error_name(result.error()) + log::last(": ") + ")");
  const EValue& v = (*result)[0];
  if (!v.isTensor() || v.toTensor().scalar_type() != ScalarType::Float ||
      v.toTensor().numel() != n * vocab_size_)
    runtime_failure("forward returned no float32 [1, " + std::to_string(n) + ", " +
                    std::to_string(vocab_size_) + "] logits");
  const float* data = v.toTensor().const_data_ptr<float>();
  pos_ += n;  // only once the call succeeded: a failed call leaves the position as it was
  return std::vector<float>(data, data + n * vocab_size_);
}

std::string machine() {
  struct utsname u {};
  return uname(&u) == 0 ? u.machine : "unknown";
}

}  // namespace qkvx_run
