// qkvx-run's one failure type: a message (one line) and the process exit code it maps to.
#pragma once

#include <stdexcept>
#include <string>

namespace qkvx_run {

enum ExitCode : int {
  kOk = 0,
  kBadInput = 2,        // the caller's input: file, program, kernels it needs, tokens, context, usage
  kRuntimeFailure = 3,  // ExecuTorch failed on input that passed every check
};

struct Failure : std::runtime_error {
  int code;
  Failure(int code_, const std::string& message) : std::runtime_error(message), code(code_) {}
};

// `text` as one printable ASCII line: a message may quote bytes of a corrupted file.
inline std::string one_line(const std::string& text) {
  std::string out;
  for (unsigned char c : text) out += (c >= 0x20 && c < 0x7f) ? static_cast<char>(c) : (c == '\n' ? ' ' : '?');
  return out;
}

[[noreturn]] inline void bad_input(const std::string& message) { throw Failure(kBadInput, message); }
[[noreturn]] inline void runtime_failure(const std::string& message) {
  throw Failure(kRuntimeFailure, message);
}

}  // namespace qkvx_run
