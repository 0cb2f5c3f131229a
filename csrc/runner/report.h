// The JSON qkvx-run reports: the program's facts (the serve hello) and its timings (the stats line).
#pragma once

#include <string>

#include "session.h"

namespace qkvx_run {

std::string json_string(const std::string& s);
// {"machine", "max_seq_len" (the cache length), "prefill_chunk", "vocab_size", "n_layers",
//  "eos_ids", "threads", "simd", "load_ms"}: without the closing brace, so a caller can append.
std::string info_json_open(const Session& s);
// load_ms, prefill_tokens, prefill_ms, decode_tokens, decode_ms, ms_per_token (decode),
// prefill_ms_per_token, peak_rss_kb; ", "-prefixed members to append to an open object.
std::string stats_members(const Session& s);

}  // namespace qkvx_run
