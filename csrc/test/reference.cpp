#include "reference.h"

#include <cmath>

namespace ref {

double half_value(uint16_t h) {
  const int sign = (h >> 15) ? -1 : 1;
  const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
  if (e == 31) return m ? NAN : sign * INFINITY;
  if (e == 0) return sign * std::ldexp(static_cast<double>(m), -24);
  return sign * std::ldexp(1.0 + m / 1024.0, e - 15);
}

const void* Cache::data() const {
  return dtype == 6 ? static_cast<const void*>(f32.data())
       : dtype == 5 ? static_cast<const void*>(f16.data())
                    : static_cast<const void*>(i8.data());
}

double Cache::at(int64_t g, int64_t s, int64_t d, int64_t S, int64_t D) const {
  const int64_t i = (g * S + s) * D + d;
  if (dtype == 6) return f32[i];
  if (dtype == 5) return half_value(f16[i]);
  return static_cast<double>(i8[i]) * static_cast<double>(scale[g * S + s]);
}

std::vector<double> attend(const std::vector<float>& q, int64_t T, int64_t H, int64_t D,
                           const Cache& k, const Cache* v, int64_t G, int64_t S,
                           const std::vector<float>* cos, const std::vector<float>* sin,
                           int64_t start_pos) {
  return attend_masked(q, T, H, D, k, v, G, S, cos, sin, start_pos,
                       std::vector<int64_t>(static_cast<size_t>(start_pos + T), 1),
                       1.0 / std::sqrt(static_cast<double>(D)));
}

std::vector<double> attend_masked(const std::vector<float>& q, int64_t T, int64_t H, int64_t D,
                                  const Cache& k, const Cache* v, int64_t G, int64_t S,
                                  const std::vector<float>* cos, const std::vector<float>* sin,
                                  int64_t start_pos, const std::vector<int64_t>& mask, double scale) {
  std::vector<double> out(static_cast<size_t>(T * H * D), 0.0);
  const int64_t R = H / G;
  std::vector<int64_t> position(mask.size());
  int64_t cum = 0;
  for (size_t s = 0; s < mask.size(); ++s) {
    cum += mask[s];
    position[s] = cum - 1 > 0 ? cum - 1 : 0;
  }
  for (int64_t t = 0; t < T; ++t) {
    const int64_t last = start_pos + t;
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = h / R;
      std::vector<int64_t> seen;
      for (int64_t s = 0; s <= last; ++s) {
        if (mask[s] != 0 || s == last) seen.push_back(s);
      }
      std::vector<double> score(seen.size());
      for (size_t i = 0; i < seen.size(); ++i) {
        const int64_t s = seen[i];
        double dot = 0.0;
        for (int64_t d = 0; d < D; ++d) {
          double key = k.at(g, s, d, S, D);
          if (cos != nullptr) {
            const int64_t half = D / 2;
            const double partner = d < half ? -k.at(g, s, d + half, S, D) : k.at(g, s, d - half, S, D);
            const int64_t r = position[s] * half + d % half;  // half tables [P][D/2]
            key = key * (*cos)[r] + partner * (*sin)[r];
          }
          dot += static_cast<double>(q[(t * H + h) * D + d]) * key;
        }
        score[i] = dot * scale;
      }
      double mx = score[0];
      for (double x : score) mx = x > mx ? x : mx;
      double total = 0.0;
      for (double& x : score) total += (x = std::exp(x - mx));
      for (size_t i = 0; i < seen.size(); ++i) {
        const double p = score[i] / total;
        for (int64_t d = 0; d < D; ++d) {
          const double val = v != nullptr ? v->at(g, seen[i], d, S, D) : k.at(g, seen[i], d, S, D);
          out[(t * H + h) * D + d] += p * val;
        }
      }
    }
  }
  return out;
}

}  // namespace ref
