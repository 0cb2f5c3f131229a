// qkvx-run: a qkvx .pte on ExecuTorch's C++ runtime, no Python and no libtorch: what an app
// embeds. Linked with the XNNPACK delegate, ExecuTorch's optimized (and portable) kernels and
// qkvx's kernel library, whose operators register when the libraries load.
//
//   qkvx-run MODEL.pte --tokens FILE|- [--prefill P] [--steps N] [--logits OUT.npy] [--threads N] [-v]
//   qkvx-run MODEL.pte --serve [--threads N] [-v]
//
// Batch: token ids (decimal, separated by white space or commas) from FILE or stdin ("-"). The
// first P (default: all) are one prefill, in calls of at most the program's prefill chunk; the
// rest are fed one decode step each (teacher forcing); then N greedy decode steps feed the argmax
// of the last logits. --logits writes every position's logits as .npy float32 [rows, vocab] (one
// row per fed token, in order). The last stdout line is a JSON object: machine, program facts,
// load_ms, prefill / decode tokens and ms, ms_per_token (decode), peak_rss_kb, generated ids.
// --serve: the frame protocol of serve.h on stdin / stdout.
//
// Exit codes: 0 ok; 2 bad input, one line on stderr (no such or corrupted file, a program needing
// an operator no linked library registers, a token id outside the vocabulary, a context overflow,
// a bad option); 3 ExecuTorch failed on input that passed those checks.
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

#include "error.h"
#include "npy.h"
#include "report.h"
#include "serve.h"
#include "session.h"

namespace qkvx_run {
namespace {

const char kUsage[] =
    "usage: qkvx-run MODEL.pte --tokens FILE|- [--prefill P] [--steps N] [--logits OUT.npy] "
    "[--threads N] [-v]\n"
    "       qkvx-run MODEL.pte --serve [--threads N] [-v]\n";

struct Options {
  std::string pte, tokens, logits;
  long long prefill = -1, steps = 0;
  int threads = 0;
  bool serve = false, verbose = false;
};

long long integer(const std::string& opt, const char* text, long long min) {
  char* end = nullptr;
  errno = 0;
  long long v = std::strtoll(text, &end, 10);
  if (errno || end == text || *end || v < min)
    bad_input(opt + " wants an integer >= " + std::to_string(min) + ", got '" + text + "'");
  return v;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> const char* {
      if (i + 1 >= argc) bad_input(a + " needs a value (qkvx-run --help)");
      return argv[++i];
    };
    if (a == "--tokens") o.tokens = value();
    else if (a == "--logits") o.logits = value();
    else if (a == "--prefill") o.prefill = integer(a, value(), 0);
    else if (a == "--steps") o.steps = integer(a, value(), 0);
    else if (a == "--threads") o.threads = static_cast<int>(integer(a, value(), 0));
    else if (a == "--serve") o.serve = true;
    else if (a == "-v" || a == "--verbose") o.verbose = true;
    else if (!a.empty() && a[0] == '-' && a != "-") bad_input("unknown option " + a + " (qkvx-run --help)");
    else if (o.pte.empty()) o.pte = a;
    else bad_input("one .pte only, got '" + o.pte + "' and '" + a + "'");
  }
  if (o.pte.empty()) bad_input("no .pte given (qkvx-run --help)");
  if (!o.serve && o.tokens.empty()) bad_input("no --tokens FILE|- given (qkvx-run --help)");
  return o;
}

std::vector<int64_t> read_tokens(const std::string& where) {
  std::string text;
  if (where == "-") {
    text.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
  } else {
    std::ifstream f(where, std::ios::binary);
    if (!f) bad_input(where + ": cannot read the token file (" + std::strerror(errno) + ")");
    text.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  }
  for (char& c : text)
    if (c == ',') c = ' ';
  std::istringstream in(text);
  std::vector<int64_t> ids;
  std::string word;
  while (in >> word) {
    char* end = nullptr;
    errno = 0;
    long long v = std::strtoll(word.c_str(), &end, 10);
    if (errno || *end)
      bad_input((where == "-" ? std::string("stdin") : where) + ": '" + word.substr(0, 20) + "' (item " +
                std::to_string(ids.size()) + ") is not a token id");
    ids.push_back(v);
  }
  if (ids.empty()) bad_input((where == "-" ? std::string("stdin") : where) + ": no token ids");
  return ids;
}

int64_t argmax(const float* row, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (row[i] > row[best]) best = i;
  return best;
}

int batch(const Options& o) {
  std::vector<int64_t> ids = read_tokens(o.tokens);
  const int64_t n = static_cast<int64_t>(ids.size());
  const int64_t prefill = o.prefill < 0 ? n : o.prefill;
  if (prefill > n)
    bad_input("--prefill " + std::to_string(prefill) + " exceeds the " + std::to_string(n) + " token ids given");
  Session s(o.pte, o.threads, o.verbose);
  // Every check before the first call: a bad id anywhere, or a run that cannot fit, fails now.
  for (int64_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= s.vocab_size())
      bad_input("token id " + std::to_string(ids[i]) + " (index " + std::to_string(i) +
                ") is outside the vocabulary [0, " + std::to_string(s.vocab_size()) + ")");
  }
  if (std::string ov = s.overflow(n + o.steps); !ov.empty())
    bad_input(ov + (o.steps ? " (" + std::to_string(n) + " given + " + std::to_string(o.steps) + " --steps)" : ""));
  std::FILE* f = nullptr;
  const std::string partial = o.logits + ".partial";  // renamed into place once complete
  if (!o.logits.empty()) {
    f = std::fopen(partial.c_str(), "wb");
    if (!f) bad_input(o.logits + ": cannot write the logits file (" + std::strerror(errno) + ")");
    std::string head = npy_float32_2d_header(n + o.steps, s.vocab_size());
    std::fwrite(head.data(), 1, head.size(), f);
  }
  std::vector<float> last;
  auto run = [&](const std::vector<int64_t>& tokens) {
    last = s.step(tokens);
    if (f) std::fwrite(last.data(), sizeof(float), last.size(), f);
  };
  if (prefill > 0) run(std::vector<int64_t>(ids.begin(), ids.begin() + prefill));
  for (int64_t i = prefill; i < n; ++i) run({ids[i]});
  std::vector<int64_t> generated;
  for (long long k = 0; k < o.steps; ++k) {
    generated.push_back(argmax(last.data() + last.size() - s.vocab_size(), s.vocab_size()));
    run({generated.back()});
  }
  if (f && (std::fflush(f) != 0 || std::ferror(f) || std::fclose(f) != 0 ||
            std::rename(partial.c_str(), o.logits.c_str()) != 0))
    bad_input(o.logits + ": writing the logits failed (" + std::strerror(errno) + ")");
  std::string gen = "[";
  for (size_t i = 0; i < generated.size(); ++i) gen += (i ? ", " : "") + std::to_string(generated[i]);
  std::printf("%s, \"pte\": %s, \"rows\": %lld%s, \"generated\": %s}\n", info_json_open(s).c_str(),
              json_string(o.pte).c_str(), static_cast<long long>(n + o.steps), stats_members(s).c_str(),
              (gen + "]").c_str());
  return kOk;
}

}  // namespace
}  // namespace qkvx_run

int main(int argc, char** argv) {
  using namespace qkvx_run;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "-h") || !std::strcmp(argv[i], "--help")) {
      std::fputs(kUsage, stdout);
      return kOk;
    }
  }
  try {
    Options o = parse(argc, argv);
    return o.serve ? serve(o.pte, o.threads, o.verbose) : batch(o);
  } catch (const Failure& f) {
    std::fprintf(stderr, "error: %s\n", one_line(f.what()).c_str());
    return f.code;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "error: out of memory\n");
    return kRuntimeFailure;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", one_line(e.what()).c_str());
    return kRuntimeFailure;
  }
}
