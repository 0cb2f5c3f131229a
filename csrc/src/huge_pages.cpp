// Transparent huge pages for the caches. Attention streams each head plane of the cache; on 4 KiB
// pages every 4 KiB of that stream costs a TLB walk (two-level under a hypervisor), which caps
// the read well below the memory's bandwidth. The runtime that owns the cache (ExecuTorch's
// planned memory, torch's allocator) allocates it with plain malloc, so the kernel asks the
// kernel for huge pages on the whole 2 MiB-aligned interior of the cache on its first write:
// MADV_HUGEPAGE, so pages not yet touched fault in as huge pages (lazily: untouched parts of a
// long cache still cost no memory), and MADV_COLLAPSE for the 2 MiB regions already touched.
//
// Advice only: contents never change, and every failure (no THP, an old kernel, a file-backed
// mapping) leaves the pages as they were. QKVX_HUGE_PAGES=0 in the environment turns it off.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#ifndef MADV_HUGEPAGE
#define MADV_HUGEPAGE 14
#endif
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
#endif

#include "core.h"

namespace qkvx {
namespace {

bool huge_pages_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("QKVX_HUGE_PAGES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return on;
}

}  // namespace

void prefer_huge_pages(const qkvx_tensor* cache, int64_t start_pos, int64_t rows) {
#if defined(__linux__)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const void* data = cache->data;
  const int64_t bytes = numel(cache) * elem_bytes(cache->dtype);
  if (!huge_pages_enabled() || bytes < static_cast<int64_t>(kHuge)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end <= begin) return;
  // The advice belongs to the mapping, not to the addresses: a cache freed and another mapped at
  // the same addresses (a program loaded again) starts without it, and its pages already written
  // (an initial cache state copied in at load) are 4 KiB ones. So the advice is given again
  // whenever a write does not continue the previous write to these addresses (a new sequence, a
  // seek, another cache there); a write that continues costs a lookup. Not caught: another
  // cache there whose first write lands exactly where the freed one's next write would have (no
  // cheap, portable call tells a huge page from a small one).
  static std::mutex mu;
  static std::map<std::pair<uintptr_t, uintptr_t>, int64_t> next_row;  // the row a continuing write starts at
  std::lock_guard<std::mutex> lock(mu);
  const auto [it, first] = next_row.try_emplace({begin, end}, start_pos + rows);
  if (!first) {
    const bool continues = it->second == start_pos;
    it->second = start_pos + rows;
    if (continues) return;
  }
  void* base = reinterpret_cast<void*>(begin);
  if (madvise(base, end - begin, MADV_HUGEPAGE) != 0) return;
  // Regions with a resident page were faulted in as 4 KiB pages before the advice: collapse them.
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> resident((end - begin) / page);
  if (mincore(base, end - begin, resident.data()) != 0) return;
  const size_t per_huge = kHuge / page;
  for (size_t r = 0; r < resident.size(); r += per_huge) {
    bool touched = false;
    for (size_t i = r; i < r + per_huge && !touched; ++i) touched = resident[i] & 1;
    if (touched) madvise(reinterpret_cast<void*>(begin + r * page), kHuge, MADV_COLLAPSE);
  }
#else
  (void)cache, (void)start_pos, (void)rows;
#endif
}

}  // namespace qkvx
