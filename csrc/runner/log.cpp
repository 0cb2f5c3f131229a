#include "log.h"

#include <cstdio>
#include <mutex>
#include <string>
#include <vector>

#include <executorch/runtime/platform/platform.h>

namespace qkvx_run::log {
namespace {

std::mutex mu;
std::vector<std::string> lines;  // error-level (and above) messages since clear()
bool pass_through = false;

void emit(et_timestamp_t, et_pal_log_level_t level, const char* file, const char*, size_t line,
          const char* message, size_t length) {
  std::string text(message, length);
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.pop_back();
  std::lock_guard<std::mutex> g(mu);
  if (pass_through) std::fprintf(stderr, "executorch %c %s:%zu] %s\n", static_cast<char>(level), file, line,
                                 text.c_str());
  if (level == kError || level == kFatal) {
    if (lines.size() > 256) lines.erase(lines.begin());  // a loop of errors cannot grow it
    lines.push_back(text);
  }
}

}  // namespace

void install(bool verbose) {
  static bool done = false;
  pass_through = verbose;
  if (!done) {
    executorch::runtime::register_pal(executorch::runtime::PalImpl::create(emit, __FILE__));
    done = true;
  }
}

void clear() {
  std::lock_guard<std::mutex> g(mu);
  lines.clear();
}

std::string last(const char* prefix) {
  std::lock_guard<std::mutex> g(mu);
  return lines.empty() ? "" : prefix + lines.back();
}

size_t errors() {
  std::lock_guard<std::mutex> g(mu);
  return lines.size();
}

std::string missing_operators() {
  std::lock_guard<std::mutex> g(mu);
  const std::string key = "Missing operator: [";
  std::string out;
  for (const std::string& l : lines) {
    size_t at = l.find(key);
    if (at == std::string::npos) continue;
    size_t close = l.find("] ", at);
    if (close == std::string::npos) continue;
    std::string op = l.substr(close + 2);
    if (out.find(op) == std::string::npos) out += (out.empty() ? "" : ", ") + op;
  }
  return out;
}

}  // namespace qkvx_run::log
