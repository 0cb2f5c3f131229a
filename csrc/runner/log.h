// ExecuTorch's log lines, captured: a failure becomes one line of qkvx-run's own, with the
// runtime's reason in it, instead of a page of ExecuTorch's output on stderr.
#pragma once

#include <string>

namespace qkvx_run::log {

// Routes ExecuTorch's log (its PAL) here; verbose: also pass every line to stderr as it comes.
void install(bool verbose);
void clear();
// The last error-level line since clear(), prefixed with `prefix` ("" if none).
std::string last(const char* prefix);
// Error-level lines since clear().
size_t errors();
// "a, b" for every "Missing operator: [i] a" since clear() ("" if none).
std::string missing_operators();

}  // namespace qkvx_run::log
