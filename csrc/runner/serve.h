// qkvx-run --serve: one loaded .pte served over stdin / stdout in the frame protocol of
// qkvx/harness/arm64_driver.py, so the host drives the C++ runner and the emulated onnxruntime
// driver with the same code (qkvx/harness/child.py).
//
// A frame is 1 kind byte, an 8-byte little-endian payload length, then the payload.
//   server -> host at start:  H {json: machine, max_seq_len, prefill_chunk, vocab_size, ...}
//                             or E message (then exit 2)
//   host -> server:           S npy int64 [T]  (append T tokens)  -> L npy float32 [T, vocab]
//                             R                (reset the cache)    -> K
//                             T                (timings)            -> J {json: load_ms, ms_per_token, ...}
//   any failure:                                                    -> E message (one line)
// EOF on stdin ends the server (exit 0).
#pragma once

#include <string>

namespace qkvx_run {

int serve(const std::string& path, int threads, bool verbose);

}  // namespace qkvx_run
