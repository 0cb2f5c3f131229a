#include "npy.h"

#include <cstring>

#include "error.h"

namespace qkvx_run {
namespace {

const char kMagic[] = "\x93NUMPY";  // 6 bytes, then major, minor version bytes

// The value of `key` in a .npy header dict, up to the next ',' or '}' at depth 0.
std::string field(const std::string& header, const std::string& key) {
  size_t at = header.find("'" + key + "'");
  if (at == std::string::npos) return "";
  at = header.find(':', at);
  if (at == std::string::npos) return "";
  size_t end = at + 1;
  int depth = 0;
  for (; end < header.size(); ++end) {
    char c = header[end];
    if (c == '(') ++depth;
    if (c == ')') --depth;
    if (depth == 0 && (c == ',' || c == '}')) break;
  }
  std::string v = header.substr(at + 1, end - at - 1);
  size_t b = v.find_first_not_of(" "), e = v.find_last_not_of(" ");
  return b == std::string::npos ? "" : v.substr(b, e - b + 1);
}

}  // namespace

std::string npy_float32_2d_header(int64_t rows, int64_t cols) {
  std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + std::to_string(rows) +
                     ", " + std::to_string(cols) + "), }";
  size_t total = 10 + dict.size() + 1;  // magic, version, u16 length, dict, '\n'
  dict.append((64 - total % 64) % 64, ' ');
  dict.push_back('\n');
  std::string out(kMagic, 6);
  out.push_back('\x01');
  out.push_back('\x00');
  out.push_back(static_cast<char>(dict.size() & 0xff));
  out.push_back(static_cast<char>((dict.size() >> 8) & 0xff));
  return out + dict;
}

std::vector<int64_t> parse_npy_int64_1d(const std::string& b) {
  if (b.size() < 10 || b.compare(0, 6, kMagic, 6) != 0) bad_input("token array: not .npy bytes");
  unsigned major = static_cast<unsigned char>(b[6]);
  size_t len = 0, start = 0;
  if (major == 1) {
    len = static_cast<unsigned char>(b[8]) | (static_cast<size_t>(static_cast<unsigned char>(b[9])) << 8);
    start = 10;
  } else if (major == 2 || major == 3) {
    if (b.size() < 12) bad_input("token array: .npy header cut short");
    for (int i = 0; i < 4; ++i) len |= static_cast<size_t>(static_cast<unsigned char>(b[8 + i])) << (8 * i);
    start = 12;
  } else {
    bad_input("token array: unknown .npy version " + std::to_string(major));
  }
  if (b.size() < start + len) bad_input("token array: .npy header cut short");
  std::string header = b.substr(start, len);
  std::string descr = field(header, "descr"), order = field(header, "fortran_order");
  std::string shape = field(header, "shape");
  if (descr != "'<i8'") bad_input("token array: dtype " + descr + ", want int64 ('<i8')");
  if (order != "False") bad_input("token array: Fortran order is not supported");
  // "(N,)": one dimension
  if (shape.size() < 4 || shape.front() != '(' || shape.back() != ')' ||
      shape.find(',') != shape.rfind(',') || shape[shape.size() - 2] != ',')
    bad_input("token array: shape " + shape + ", want one dimension (T,)");
  char* end = nullptr;
  long long n = std::strtoll(shape.c_str() + 1, &end, 10);
  if (end == shape.c_str() + 1 || n < 0) bad_input("token array: bad shape " + shape);
  size_t data = start + len;
  if (b.size() != data + sizeof(int64_t) * static_cast<size_t>(n))
    bad_input("token array: " + std::to_string(b.size() - data) + " data bytes for " + std::to_string(n) +
              " int64 values");
  std::vector<int64_t> out(static_cast<size_t>(n));
  if (n) std::memcpy(out.data(), b.data() + data, sizeof(int64_t) * n);
  return out;
}

}  // namespace qkvx_run
