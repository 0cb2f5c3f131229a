// Key spans of one sequence under a padding mask (the onnxruntime op's attention_mask).
#include <algorithm>

#include "core.h"

namespace qkvx {

Status spans_from_mask(const int64_t* mask, int64_t S, int64_t T, int64_t R, int64_t max_pos,
                       std::vector<KeySpan>& spans) {
  spans.clear();
  const int64_t P = S - T, M = T * R;
  int64_t cum = 0;
  for (int64_t j = 0; j < S; ++j) {
    cum += mask[j];
    const int64_t pos = std::max<int64_t>(cum - 1, 0);
    if (max_pos > 0 && pos >= max_pos) {
      return fail(QKVX_INVALID_ARGUMENT,
                  "qkvx: key %lld has rotary position %lld, past the %lld rows of the tables",
                  (long long)j, (long long)pos, (long long)max_pos);
    }
    if (mask[j] != 0) {
      KeySpan* last = spans.empty() ? nullptr : &spans.back();
      if (last && last->end == j && last->m_begin == 0 && last->m_end == M &&
          last->pos0 + (j - last->begin) == pos) {
        last->end = j + 1;  // the run goes on
      } else {
        spans.push_back({j, j + 1, pos, 0, M});
      }
    } else if (j >= P) {  // a masked new token: seen by its own query rows only
      spans.push_back({j, j + 1, pos, (j - P) * R, (j - P + 1) * R});
    }
  }
  return Status{};
}

}  // namespace qkvx
