#include "serve.h"

#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <memory>

#include "error.h"
#include "npy.h"
#include "report.h"
#include "session.h"

namespace qkvx_run {
namespace {

bool write_all(int fd, const char* p, size_t n) {
  while (n) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

// 1: got n bytes; 0: EOF before the first byte; -1: EOF or error part way.
int read_all(int fd, char* p, size_t n) {
  size_t got = 0;
  while (got < n) {
    ssize_t r = ::read(fd, p + got, n - got);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return got == 0 && r == 0 ? 0 : -1;
    got += static_cast<size_t>(r);
  }
  return 1;
}

bool send(int fd, char kind, const std::string& head, const char* data = nullptr, size_t n = 0) {
  char h[9];
  h[0] = kind;
  uint64_t len = head.size() + n;
  for (int i = 0; i < 8; ++i) h[1 + i] = static_cast<char>((len >> (8 * i)) & 0xff);
  return write_all(fd, h, 9) && write_all(fd, head.data(), head.size()) && (!n || write_all(fd, data, n));
}

}  // namespace

int serve(const std::string& path, int threads, bool verbose) {
  // The protocol owns the real stdout; fd 1 is pointed at stderr so that nothing a library
  // prints can corrupt a frame.
  int out = ::dup(1);
  ::dup2(2, 1);
  std::unique_ptr<Session> session;
  try {
    session = std::make_unique<Session>(path, threads, verbose);
  } catch (const Failure& f) {
    std::fprintf(stderr, "error: %s\n", one_line(f.what()).c_str());
    send(out, 'E', one_line(f.what()));
    return f.code;
  }
  if (!send(out, 'H', info_json_open(*session) + stats_members(*session) + "}")) return kRuntimeFailure;
  for (;;) {
    char h[9];
    int got = read_all(0, h, 9);
    if (got == 0) return kOk;  // the host closed stdin: done
    if (got < 0) break;
    uint64_t len = 0;
    for (int i = 0; i < 8; ++i) len |= static_cast<uint64_t>(static_cast<unsigned char>(h[1 + i])) << (8 * i);
    if (len > (uint64_t{1} << 32)) {
      send(out, 'E', "frame of " + std::to_string(len) + " bytes refused");
      break;
    }
    std::string payload(len, '\0');
    if (len && read_all(0, &payload[0], len) != 1) break;
    bool ok = true;
    try {
      switch (h[0]) {
        case 'S': {
          std::vector<int64_t> ids = parse_npy_int64_1d(payload);
          std::vector<float> logits = session->step(ids);
          std::string head = npy_float32_2d_header(static_cast<int64_t>(ids.size()), session->vocab_size());
          ok = send(out, 'L', head, reinterpret_cast<const char*>(logits.data()), logits.size() * sizeof(float));
          break;
        }
        case 'R':
          session->reset();
          ok = send(out, 'K', "");
          break;
        case 'T':
          ok = send(out, 'J', info_json_open(*session) + stats_members(*session) + "}");
          break;
        default:
          ok = send(out, 'E', std::string("unknown request kind '") + h[0] + "'");
      }
    } catch (const Failure& f) {  // keep serving: the host decides whether to go on
      ok = send(out, 'E', one_line(f.what()));
    } catch (const std::bad_alloc&) {
      ok = send(out, 'E', "out of memory");
    }
    if (!ok) return kRuntimeFailure;  // the host went away mid-answer
  }
  std::fprintf(stderr, "error: request frame cut short\n");
  return kBadInput;
}

}  // namespace qkvx_run
