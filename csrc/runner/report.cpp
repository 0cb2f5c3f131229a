#include "report.h"

#include <cstdio>

#include "qkvx/kernels.h"

namespace qkvx_run {
namespace {

std::string num(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.4f", v);
  return buf;
}

}  // namespace

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

std::string info_json_open(const Session& s) {
  std::string eos = "[";
  for (size_t i = 0; i < s.eos_ids().size(); ++i) eos += (i ? ", " : "") + std::to_string(s.eos_ids()[i]);
  eos += "]";
  return "{\"machine\": " + json_string(machine()) + ", \"runtime\": \"executorch\"" +
         ", \"max_seq_len\": " + std::to_string(s.max_context_len()) +
         ", \"prefill_chunk\": " + std::to_string(s.prefill_chunk()) +
         ", \"vocab_size\": " + std::to_string(s.vocab_size()) + ", \"n_layers\": " +
         std::to_string(s.n_layers()) + ", \"eos_ids\": " + eos + ", \"threads\": " +
         std::to_string(s.threads()) + ", \"simd\": " + json_string(qkvx_simd_path());
}

std::string stats_members(const Session& s) {
  Stats st = s.stats();
  auto per = [](double ms, int64_t n) { return n ? ms / static_cast<double>(n) : 0.0; };
  return ", \"load_ms\": " + num(st.load_ms) + ", \"prefill_tokens\": " + std::to_string(st.prefill_tokens) +
         ", \"prefill_ms\": " + num(st.prefill_ms) + ", \"decode_tokens\": " +
         std::to_string(st.decode_tokens) + ", \"decode_ms\": " + num(st.decode_ms) +
         ", \"ms_per_token\": " + num(per(st.decode_ms, st.decode_tokens)) +
         ", \"prefill_ms_per_token\": " + num(per(st.prefill_ms, st.prefill_tokens)) +
         ", \"peak_rss_kb\": " + std::to_string(st.peak_rss_kb);
}

}  // namespace qkvx_run
