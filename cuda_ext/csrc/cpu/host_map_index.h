// The host map's index (see host_map_cpu.cpp's design comment): one partition's open-addressing Robin Hood
// table of 12-byte slots {int64 key, uint32 row}, with backward-shift deletion, a multiply-shift home slot (the
// capacity need not be a power of two; no division per key), growth by 1.5x at 0.75 load and an explicit slot
// prefetch for the fetch pipeline. Occupancy lives in the row field (kEmptyRow), so every int64 key - INT64_MIN
// and INT64_MAX included - is valid.
//
// Self-contained (no torch): HostHashMap's Partition owns one (with its value arena and lock around it), and
// benchmarks/cpp/host_map_index_bench.cpp measures it alone against absl::flat_hash_map. Not thread-safe: the
// caller's lock guards it. Allocation failures go through HPS_HOST_MAP_CHECK, which host_map_cpu.cpp defines as
// TORCH_CHECK before including this header; the default throws std::runtime_error.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <sstream>
#include <stdexcept>

#include <sys/mman.h>

#include "cache_layout.h"  // mix64, key_bits

#ifndef HPS_HOST_MAP_CHECK
namespace hps {
namespace host_map_detail {
template <typename... Args>
[[noreturn]] inline void index_fail(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  throw std::runtime_error(os.str());
}
}  // namespace host_map_detail
}  // namespace hps
#define HPS_HOST_MAP_CHECK(cond, ...) \
  do {                                \
    if (!(cond)) ::hps::host_map_detail::index_fail(__VA_ARGS__); \
  } while (0)
#endif

namespace hps {
namespace host_map_detail {

constexpr uint32_t kEmptyRow = 0xFFFFFFFFu;
constexpr uint64_t kMinIndexCapacity = 16;
// Grow at load > 3/4, by 3/2: the load stays in [0.5, 0.75] (with 12-byte slots: 16..24 bytes per entry). At 0.9
// a hit probed ~4.5 slots, each recomputing its resident key's hash (12-byte slots keep no hash bits): 0.75 made a
// 2 M-row map's fetch 1.4x faster (dim 16, 26,624 keys) for ~3% more memory at dim 16 (results/host_map_index.md).
constexpr uint64_t kLoadNum = 3, kLoadDen = 4;
constexpr int64_t kSlotPrefetchDistance = 16;  // fetch prefetches the index lines of key j+16 while probing key j

#pragma pack(push, 4)
struct Slot {
  int64_t key;
  uint32_t row;  // kEmptyRow = free slot
};
#pragma pack(pop)
static_assert(sizeof(Slot) == 12, "index slots are 12 bytes");

inline uint64_t round_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

constexpr uint64_t kHuge = 2 << 20;
constexpr uint64_t kOsPage = 4096;

// Bytes a block of `bytes` really takes: large blocks are whole OS pages of an anonymous mapping.
inline uint64_t block_bytes(uint64_t bytes) {
  bytes = std::max<uint64_t>(bytes, 1);
  return bytes >= kHuge ? round_up(bytes, kOsPage) : round_up(bytes, 64);
}

// Large blocks: an anonymous mapping aligned to 2 MiB with MADV_HUGEPAGE, so random row reads do not pay a TLB
// miss per key; small blocks come from malloc.
inline void* aligned_bytes(uint64_t bytes, const char* what) {
  const uint64_t size = block_bytes(bytes);
  if (size >= kHuge) {
    void* raw = mmap(nullptr, size + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    HPS_HOST_MAP_CHECK(raw != MAP_FAILED, "HostHashMap: out of memory mapping ", size, " bytes for ", what);
    const uintptr_t base = reinterpret_cast<uintptr_t>(raw);
    const uintptr_t aligned = round_up(base, kHuge);
    if (aligned > base) munmap(raw, aligned - base);
    const uintptr_t end = base + size + kHuge;
    if (end > aligned + size) munmap(reinterpret_cast<void*>(aligned + size), end - (aligned + size));
    madvise(reinterpret_cast<void*>(aligned), size, MADV_HUGEPAGE);
    return reinterpret_cast<void*>(aligned);
  }
  void* p = std::aligned_alloc(64, size);
  HPS_HOST_MAP_CHECK(p != nullptr, "HostHashMap: out of memory allocating ", bytes, " bytes for ", what);
  return p;
}

inline void free_bytes(void* p, uint64_t bytes) {
  if (p == nullptr) return;
  const uint64_t size = block_bytes(bytes);
  if (size >= kHuge) {
    munmap(p, size);
  } else {
    std::free(p);
  }
}

// Multiply-shift range reduction of a 64-bit hash to [0, cap): no division, any cap.
inline uint64_t home_slot(uint64_t h, uint64_t cap) {
  return static_cast<uint64_t>((static_cast<unsigned __int128>(h) * cap) >> 64);
}

// One partition's index. h is always mix64(key_bits(key)) (the caller hashes a batch once and passes it in).
struct RobinHoodIndex {
  Slot* slots = nullptr;
  uint64_t cap = 0;
  int64_t size = 0;

  RobinHoodIndex() = default;
  ~RobinHoodIndex() { free_bytes(slots, cap * sizeof(Slot)); }
  RobinHoodIndex(const RobinHoodIndex&) = delete;
  RobinHoodIndex& operator=(const RobinHoodIndex&) = delete;

  uint64_t stored_home(uint64_t s) const { return home_slot(mix64(key_bits(slots[s].key)), cap); }
  uint64_t distance(uint64_t s, uint64_t home) const { return s >= home ? s - home : s + cap - home; }
  uint64_t next(uint64_t s) const { return s + 1 == cap ? 0 : s + 1; }

  // Slot holding `key`, or cap when absent. Robin Hood: stop at an empty slot or at an entry closer to its home
  // than we are to ours (the key would have displaced it).
  uint64_t find(int64_t key, uint64_t h) const {
    if (cap == 0) return cap;
    uint64_t s = home_slot(h, cap);
    for (uint64_t d = 0;; ++d) {
      const Slot& slot = slots[s];
      if (slot.row == kEmptyRow) return cap;
      if (slot.key == key) return s;
      if (distance(s, stored_home(s)) < d) return cap;
      s = next(s);
    }
  }

  uint32_t find_row(int64_t key, uint64_t h) const {
    const uint64_t s = find(key, h);
    return s == cap ? kEmptyRow : slots[s].row;
  }

  // A successful probe at 0.75 load passes ~2.5 slots (~30 bytes): fetch the home slot's line and the next.
  void prefetch_slot(uint64_t h) const {
    if (cap == 0) return;
    const char* p = reinterpret_cast<const char*>(&slots[home_slot(h, cap)]);
    __builtin_prefetch(p, 0, 3);
    __builtin_prefetch(p + 64, 0, 3);
  }

  // Add an absent key and count it, growing first when the index is full.
  void add(int64_t key, uint32_t row, uint64_t h) {
    grow_for_one_more();
    place(key, row, h);
    ++size;
  }

  // Place an absent key (capacity must allow one more entry) without counting it: add's step, and rehash's for
  // entries already counted.
  void place(int64_t key, uint32_t row, uint64_t h) {
    uint64_t s = home_slot(h, cap);
    uint64_t d = 0;
    Slot cur{key, row};
    for (;;) {
      if (slots[s].row == kEmptyRow) {
        slots[s] = cur;
        return;
      }
      const uint64_t sd = distance(s, stored_home(s));
      if (sd < d) {  // the resident is closer to home than we are: it moves on, we take its slot
        const Slot tmp = slots[s];
        slots[s] = cur;
        cur = tmp;
        d = sd;
      }
      s = next(s);
      ++d;
    }
  }

  // Backward-shift deletion: pull following displaced entries one step back, so no tombstones are needed.
  // Returns the removed entry's row.
  uint32_t remove_slot(uint64_t s) {
    const uint32_t row = slots[s].row;
    uint64_t n = next(s);
    while (slots[n].row != kEmptyRow && distance(n, stored_home(n)) > 0) {
      slots[s] = slots[n];
      s = n;
      n = next(n);
    }
    slots[s].row = kEmptyRow;
    --size;
    return row;
  }

  void rehash(uint64_t new_cap) {
    Slot* fresh = static_cast<Slot*>(aligned_bytes(new_cap * sizeof(Slot), "an index"));
    for (uint64_t s = 0; s < new_cap; ++s) fresh[s].row = kEmptyRow;
    Slot* old = slots;
    const uint64_t old_cap = cap;
    slots = fresh;
    cap = new_cap;
    for (uint64_t s = 0; s < old_cap; ++s) {
      if (old[s].row != kEmptyRow) place(old[s].key, old[s].row, mix64(key_bits(old[s].key)));
    }
    free_bytes(old, old_cap * sizeof(Slot));
  }

  bool fits(int64_t entries) const { return static_cast<uint64_t>(entries) * kLoadDen <= cap * kLoadNum; }

  void grow_for_one_more() {
    if (fits(size + 1)) return;
    uint64_t c = std::max(kMinIndexCapacity, cap + cap / 2);
    while (static_cast<uint64_t>(size + 1) * kLoadDen > c * kLoadNum) c += c / 2;
    rehash(c);
  }

  // Capacity for `entries` entries without growing (at most 0.75 load).
  void reserve(int64_t entries) {
    if (!fits(entries)) {
      rehash(std::max(kMinIndexCapacity, (static_cast<uint64_t>(entries) * kLoadDen + kLoadNum - 1) / kLoadNum));
    }
  }

  int64_t memory_bytes() const { return cap > 0 ? static_cast<int64_t>(block_bytes(cap * sizeof(Slot))) : 0; }
};

}  // namespace host_map_detail
}  // namespace hps
