// One loaded .pte and its cache position: qkvx's decode contract on top of ExecuTorch's Module.
//
//   forward(tokens int64 [1, T], input_pos int64 [1]) -> logits float32 [1, T, vocab]
//   constant methods get_max_seq_len (the prefill chunk), get_max_context_len (the cache length),
//   get_vocab_size, get_n_layers, get_eos_ids (docs/architecture.md)
//
// Every check a caller can fail (file, program, operators it needs, token ids, context) is made
// before ExecuTorch runs anything and is a Failure(kBadInput) with one line of text.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace executorch::extension::module {
class Module;
}

namespace qkvx_run {

struct Stats {
  double load_ms = 0;      // program load, forward's plan, XNNPACK's weight packing
  int64_t prefill_tokens = 0;  // tokens given in calls of more than one token
  double prefill_ms = 0;
  int64_t decode_tokens = 0;  // single-token calls
  double decode_ms = 0;
  long peak_rss_kb = 0;  // VmHWM: the whole process (under qemu-user, the emulator's too)
};

class Session {
 public:
  // Loads `path`; threads > 0 resizes ExecuTorch's thread pool (shared with XNNPACK and qkvx's
  // kernels), 0 keeps its default. verbose: ExecuTorch's own log lines go to stderr.
  Session(const std::string& path, int threads, bool verbose);
  ~Session();

  // Appends `tokens` at the current position, in prefill-chunk-sized calls; returns their logits,
  // row-major [T, vocab]. A bad id or a context overflow throws before anything runs.
  std::vector<float> step(const std::vector<int64_t>& tokens);
  void reset() { pos_ = 0; }

  int64_t pos() const { return pos_; }
  int64_t max_context_len() const { return max_context_len_; }
  int64_t prefill_chunk() const { return prefill_chunk_; }
  int64_t vocab_size() const { return vocab_size_; }
  int64_t n_layers() const { return n_layers_; }
  const std::vector<int64_t>& eos_ids() const { return eos_ids_; }
  int threads() const;
  Stats stats() const;

  // A context overflow for `n` more tokens, as the message step() would throw ("" if they fit).
  std::string overflow(int64_t n) const;

 private:
  int64_t constant(const char* method);
  std::vector<float> forward(const int64_t* tokens, int64_t n);

  std::string path_;
  std::unique_ptr<executorch::extension::module::Module> module_;
  int64_t pos_ = 0, max_context_len_ = 0, prefill_chunk_ = 0, vocab_size_ = 0, n_layers_ = 0;
  std::vector<int64_t> eos_ids_;
  Stats stats_;
};

// Host facts for reports: uname's machine ("x86_64", "aarch64" under qemu-aarch64).
std::string machine();

}  // namespace qkvx_run
