// The host-memory tier's hash map (HPS "volatile DB" / HashMap backend), registered as the torch custom class
// torch.classes.hps.HostHashMap. Design, and where it differs from HPS's hash-map backend
// (HugeCTR/src/hps/hash_map_backend.cpp):
//
//  * Partitions: key -> partition by hash bits 8..31 of mix64(key) (multiply-shift range reduction: bits the
//    cache's bucket (high 32) and digest (low 8) do not use, and no division per key).
//    Each partition has its own std::shared_mutex: fetch takes it shared, insert/erase/reserve exclusive (HPS
//    had one mutex for the whole backend).
//  * Index: open addressing, Robin Hood linear probing with backward-shift deletion, 12-byte slots
//    {int64 key, uint32 row}. Occupancy lives in the row field (kEmptyRow), so every int64 value - INT64_MIN and
//    INT64_MAX included - is a valid key. The home slot is the multiply-shift range reduction of the hash, so
//    the capacity need not be a power of two: the index grows by 1.5x when it reaches 0.75 load (never doubles).
//    The index is cpu/host_map_index.h (RobinHoodIndex, torch-free, one per partition); benchmarked alone against
//    absl::flat_hash_map in benchmarks/cpp/ (results: benchmarks/results/host_map_index.md).
//  * Value arena: pages of stored rows (row_codec.h: the table's storage - float32, float16, bfloat16, int8 or fp8
//    rows with their row-wise scale - copied as bytes, never decoded here) plus a uint32 access meta per row. Page sizes grow with the
//    partition (1/32 of its rows, at least 16 KiB, at most allocation_rate bytes), so growth wastes < 1/32 of the
//    rows plus one small page. NOTE: HPS allocates whole allocation_rate pages (256 MiB by default) per
//    partition, which alone costs 4 GiB for 16 partitions; here allocation_rate is the largest page.
//    reserve(n) allocates exactly sized pages. Freed rows go to a free list and are reused first.
//    A row id is (page << shift) | offset, shift = bits of the largest page, so finding a row costs no search.
//    Blocks of >= 2 MiB (pages, large indexes) are anonymous mappings aligned to 2 MiB with MADV_HUGEPAGE: a
//    random row read then costs no TLB miss (measured ~25% faster fetch at dim 128).
//    Memory, measured: <= 1.3x the raw key+vector bytes (HPS: up to ~10x, the complaint this fixes).
//  * Access meta: LFU count (fetch hit += 1, saturating at 2^31; insert/overwrite resets to 0 as in HPS) or LRU
//    logical time (partition clock, bumped once per fetch/insert call and partition; hits and writes get the
//    new clock). Fetches update it under the shared lock with relaxed atomics. When the clock reaches 2^31 the
//    partition halves all times and its clock under the exclusive lock (order kept). HPS used time(nullptr):
//    one-second resolution.
//  * Overflow: overflow_margin is a hard bound per partition. When a new key would make a partition exceed
//    the margin, the partition is first pruned to floor(margin * target) entries by the policy: evict_random
//    (uniform: random slots by rejection sampling from a per-partition RNG seeded from `seed`), evict_least_used
//    (smallest LFU counts) or evict_oldest (smallest LRU times), via std::nth_element over (meta, key) pairs -
//    ties go to the smaller key, so results are reproducible. NOTE: HPS checked the margin only before each
//    batch, so a partition could overshoot it by a whole batch; here the size never exceeds the margin (a batch
//    with more new keys than the margin can evict keys it inserted itself earlier in the same call).
//  * Parallelism: a call's keys are counting-sorted by partition (stable, so duplicates keep input order and
//    the last one wins), into per-thread scratch buffers reused across calls. fetch cuts the sorted keys into
//    chunks of 2048 that the intra-op threads take from a shared counter (a descheduled thread on a busy machine
//    does not hold the others up); a chunk takes the shared lock of each partition it touches and pipelines its
//    keys: the index lines of key j+16 and the row of key j+8 are prefetched while key j is copied out. Large
//    outputs are written with streaming stores (no read-for-ownership of lines nobody reads here).
//    insert/erase/reserve hand out whole partitions the same way (one thread owns a partition's exclusive lock).
//    Torch releases the GIL around custom-class method calls, so Python threads calling fetch run in parallel.
//  * Consistency: a row is written only under its partition's exclusive lock and read under the shared lock,
//    so a fetch never sees a half-written row.
#include "host_map.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <shared_mutex>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "cache_layout.h"
#include "checks.h"
#include "cpu/row_copy.h"

// The index's allocation failures raise torch errors like the rest of the map.
#define HPS_HOST_MAP_CHECK(cond, ...) TORCH_CHECK(cond, __VA_ARGS__)
#include "cpu/host_map_index.h"

namespace hps {
namespace host_map_detail {

// Index constants, Slot, home_slot and the block allocator: host_map_index.h.
constexpr uint32_t kMetaLimit = uint32_t(1) << 31;  // LFU saturation and LRU renormalisation point
constexpr int64_t kMinPageBytes = 16 << 10;
constexpr int64_t kMaxPageRowsLimit = int64_t(1) << 20;  // keeps >= 4096 page ids in a 32-bit row id
constexpr int64_t kPageGrowthDivisor = 32;                 // a new page holds 1/32 of the partition's rows
constexpr int64_t kRowPrefetchDistance = 8;
constexpr int64_t kRowRing = 16;  // > kRowPrefetchDistance, power of two
constexpr int64_t kMaxPrefetchBytes = 1024;
constexpr int64_t kFetchChunk = 2048;             // keys per work item of a fetch
constexpr int64_t kKeepScratchKeys = int64_t(1) << 18;  // calls up to this size reuse per-thread buffers

// Run fn(c) for c in [0, num_chunks) on the intra-op threads, handing out chunks dynamically (a shared counter)
// rather than one fixed range per thread: on a busy machine a descheduled thread does not hold up the others.
// fn_done() runs once per worker after its last chunk.
template <typename F, typename G>
void parallel_chunks(int64_t num_chunks, const F& fn, const G& fn_done) {
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_chunks);
  if (workers <= 1 || at::in_parallel_region()) {
    for (int64_t c = 0; c < num_chunks; ++c) fn(c);
    fn_done();
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < num_chunks;
         c = next.fetch_add(1, std::memory_order_relaxed)) {
      fn(c);
    }
    fn_done();
  });
}

template <typename F>
void parallel_chunks(int64_t num_chunks, const F& fn) {
  parallel_chunks(num_chunks, fn, [] {});
}

// One call's keys grouped by partition: order[offsets[p] .. offsets[p+1]) are the input positions of partition
// p's keys in input order; hashes[j] = mix64(keys[order[j]]). Buffers are uninitialised arrays, reused by the
// calling thread across calls (no allocation, page faults or zeroing per call) up to kKeepScratchKeys keys.
struct Grouped {
  std::unique_ptr<uint32_t[]> order;
  std::unique_ptr<uint64_t[]> hashes;
  std::unique_ptr<uint64_t[]> tmp_hash;
  std::unique_ptr<uint16_t[]> tmp_part;
  std::vector<int64_t> offsets;
  std::vector<int64_t> cursor;
  int64_t capacity = 0;

  void ensure(int64_t n, int64_t num_partitions) {
    if (n > capacity) {
      order.reset(new uint32_t[n]);
      hashes.reset(new uint64_t[n]);
      tmp_hash.reset(new uint64_t[n]);
      tmp_part.reset(new uint16_t[n]);
      capacity = n;
    }
    offsets.assign(num_partitions + 1, 0);
  }
};

// The calling thread's reusable buffers, or a fresh set for an unusually large call (freed after it).
class ScratchLease {
 public:
  explicit ScratchLease(int64_t n) {
    static thread_local Grouped cached;
    if (n <= kKeepScratchKeys) {
      g_ = &cached;
    } else {
      owned_ = std::make_unique<Grouped>();
      g_ = owned_.get();
    }
  }
  Grouped& get() { return *g_; }

 private:
  Grouped* g_;
  std::unique_ptr<Grouped> owned_;
};

// Small deterministic generator for evict_random (splitmix64 stream): the same seed gives the same victims on
// every platform (std distributions are implementation-defined), in 8 bytes of state per partition.
struct SplitMix64 {
  uint64_t state;
  uint64_t next() { return mix64(state += 0x9e3779b97f4a7c15ULL); }
  uint64_t below(uint64_t bound) { return home_slot(next(), bound); }  // uniform in [0, bound)
};

struct Page {
  uint8_t* values;  // (rows, row_bytes)
  uint32_t* meta;  // (rows,)
  uint32_t rows;
};

// One partition: index + arena + lock. All fields are guarded by `mutex` except `clock` (atomic) and the meta
// words, which fetches update with relaxed atomics under the shared lock.
struct Partition {
  Partition(int64_t row_bytes, uint32_t shift, int64_t min_page_rows, int64_t max_page_rows, uint64_t seed)
      : row_bytes(row_bytes), shift(shift), min_page_rows(min_page_rows), max_page_rows(max_page_rows), rng{seed} {}
  ~Partition() {
    for (Page& p : pages) free_bytes(p.values, page_bytes(p.rows));
  }
  Partition(const Partition&) = delete;
  Partition& operator=(const Partition&) = delete;

  const int64_t row_bytes;  // one stored row
  const uint32_t shift;  // row id = (page << shift) | offset
  const int64_t min_page_rows, max_page_rows;

  mutable std::shared_mutex mutex;
  std::atomic<uint32_t> clock{0};

  RobinHoodIndex index;  // key -> row

  std::vector<Page> pages;
  int64_t page_rows_total = 0;
  size_t cur_page = 0;  // next never-used row: (cur_page, cur_off)
  uint32_t cur_off = 0;
  std::vector<uint32_t> free_rows;
  SplitMix64 rng;

  // ---- rows
  uint8_t* row_values(uint32_t row) const {
    return pages[row >> shift].values + static_cast<int64_t>(row & ((uint32_t(1) << shift) - 1)) * row_bytes;
  }
  uint32_t* row_meta(uint32_t row) const { return pages[row >> shift].meta + (row & ((uint32_t(1) << shift) - 1)); }

  uint64_t max_pages() const { return (uint64_t(1) << (32 - shift)) - 1; }  // page id all-ones never used

  uint64_t page_bytes(int64_t rows) const {
    return value_bytes(rows) + static_cast<uint64_t>(rows) * sizeof(uint32_t);
  }
  // The rows of a page, padded to 4 bytes: the meta words follow them (a row of an odd number of 2-byte elements
  // would leave them 2-byte aligned).
  uint64_t value_bytes(int64_t rows) const {
    return (static_cast<uint64_t>(rows) * static_cast<uint64_t>(row_bytes) + 3) & ~uint64_t(3);
  }

  void add_page(int64_t rows) {
    TORCH_CHECK(pages.size() < max_pages(), "HostHashMap: a partition is full (", page_rows_total,
                " rows in ", pages.size(), " pages); use more partitions or a larger allocation_rate");
    pages.reserve(pages.size() + 1);  // before allocating, so a failure here leaks nothing
    auto* mem = static_cast<uint8_t*>(aligned_bytes(page_bytes(rows), "a value page"));
    pages.push_back(Page{mem, reinterpret_cast<uint32_t*>(mem + value_bytes(rows)),
                         static_cast<uint32_t>(rows)});
    page_rows_total += rows;
  }

  int64_t unused_page_rows() const {
    int64_t n = 0;
    for (size_t p = cur_page; p < pages.size(); ++p) n += pages[p].rows - (p == cur_page ? cur_off : 0);
    return n;
  }

  uint32_t alloc_row() {
    if (!free_rows.empty()) {
      const uint32_t r = free_rows.back();
      free_rows.pop_back();
      return r;
    }
    while (cur_page < pages.size() && cur_off >= pages[cur_page].rows) {
      ++cur_page;
      cur_off = 0;
    }
    if (cur_page == pages.size()) {
      add_page(std::clamp(page_rows_total / kPageGrowthDivisor, min_page_rows, max_page_rows));
    }
    return (static_cast<uint32_t>(cur_page) << shift) | cur_off++;
  }

  // ---- index (host_map_index.h) + the rows it frees
  void remove_slot(uint64_t s) { free_rows.push_back(index.remove_slot(s)); }

  void reserve(int64_t entries) {
    index.reserve(entries);
    int64_t need = entries - index.size - static_cast<int64_t>(free_rows.size()) - unused_page_rows();
    while (need > 0) {
      const int64_t rows = std::min(need, max_page_rows);
      add_page(rows);
      need -= rows;
    }
  }

  // ---- access meta
  // LRU only: halve times and clock before the uint32 clock can wrap (needs the exclusive lock).
  void renormalize_clock_locked() {
    for (Page& p : pages) {
      for (uint32_t r = 0; r < p.rows; ++r) p.meta[r] >>= 1;
    }
    clock.store(clock.load(std::memory_order_relaxed) >> 1, std::memory_order_relaxed);
  }
  uint32_t tick_locked() {  // under the exclusive lock
    if (clock.load(std::memory_order_relaxed) >= kMetaLimit) renormalize_clock_locked();
    return clock.fetch_add(1, std::memory_order_relaxed) + 1;
  }

  int64_t memory_bytes() const {
    int64_t b = sizeof(Partition) + index.memory_bytes();
    for (const Page& p : pages) b += static_cast<int64_t>(block_bytes(page_bytes(p.rows)));
    b += static_cast<int64_t>(pages.capacity() * sizeof(Page) + free_rows.capacity() * sizeof(uint32_t));
    return b;
  }
};

}  // namespace host_map_detail

using host_map_detail::Grouped;
using host_map_detail::kEmptyRow;
using host_map_detail::parallel_chunks;
using host_map_detail::Partition;
using host_map_detail::ScratchLease;

HostHashMap::HostHashMap(int64_t dim, int64_t num_partitions, int64_t overflow_margin, int64_t overflow_policy,
                         double overflow_resolution_target, int64_t allocation_rate, int64_t seed, int64_t storage)
    : dim_(dim),
      storage_(static_cast<int32_t>(storage)),
      num_partitions_(num_partitions),
      overflow_margin_(overflow_margin),
      overflow_policy_(overflow_policy) {
  TORCH_CHECK_VALUE(dim > 0, "HostHashMap: dim must be > 0, found ", dim);
  check_storage_code(storage);
  check_storage_dim(storage_, dim);
  width_ = stored_width(storage_, dim);
  row_bytes_ = stored_row_bytes(storage_, dim);
  TORCH_CHECK_VALUE(num_partitions >= 1 && num_partitions <= kHostMapMaxPartitions,
                    "HostHashMap: num_partitions must be in [1, ", kHostMapMaxPartitions, "], found ", num_partitions);
  TORCH_CHECK_VALUE(overflow_margin >= 1, "HostHashMap: overflow_margin must be >= 1, found ", overflow_margin);
  TORCH_CHECK_VALUE(overflow_policy == kEvictRandom || overflow_policy == kEvictLeastUsed ||
                        overflow_policy == kEvictOldest,
                    "HostHashMap: overflow_policy must be 0 (evict_random), 1 (evict_least_used) or 2 (evict_oldest), "
                    "found ", overflow_policy);
  TORCH_CHECK_VALUE(overflow_resolution_target > 0.0 && overflow_resolution_target < 1.0,
                    "HostHashMap: overflow_resolution_target must be in (0, 1), found ", overflow_resolution_target);
  const int64_t row_bytes = row_bytes_;
  TORCH_CHECK_VALUE(allocation_rate >= row_bytes, "HostHashMap: allocation_rate must be at least one row (",
                    row_bytes, " bytes), found ", allocation_rate);

  const long double keep = static_cast<long double>(overflow_margin) * overflow_resolution_target;
  keep_after_overflow_ = std::min<int64_t>(overflow_margin - 1, static_cast<int64_t>(std::floor(keep)));

  const int64_t max_page_rows = std::min(allocation_rate / row_bytes, host_map_detail::kMaxPageRowsLimit);
  const int64_t min_page_rows = std::clamp<int64_t>(host_map_detail::kMinPageBytes / row_bytes, 1, max_page_rows);
  uint32_t shift = 0;
  while ((int64_t(1) << shift) < max_page_rows) ++shift;
  parts_.reserve(num_partitions);
  for (int64_t p = 0; p < num_partitions; ++p) {
    const uint64_t part_seed = mix64(static_cast<uint64_t>(seed) ^ mix64(static_cast<uint64_t>(p) + 1));
    parts_.push_back(std::make_unique<Partition>(row_bytes, shift, min_page_rows, max_page_rows, part_seed));
  }
}

namespace {
// handle -> map, weakly: the registry never keeps a map alive.
std::mutex registry_mutex;
std::unordered_map<int64_t, c10::weak_intrusive_ptr<HostHashMap>>& registry() {
  static auto* maps = new std::unordered_map<int64_t, c10::weak_intrusive_ptr<HostHashMap>>();
  return *maps;
}
int64_t next_handle = 1;
}  // namespace

// The last strong reference is gone: drop the registry's weak one here. (In the destructor it would never happen: an
// intrusive_ptr target with a live weak reference is not destroyed, so the map and its rows would leak.)
void HostHashMap::release_resources() {
  if (handle_ >= 0) {
    std::lock_guard<std::mutex> lock(registry_mutex);
    registry().erase(handle_);
    handle_ = -1;
  }
}

HostHashMap::~HostHashMap() = default;

int64_t HostHashMap::handle(const c10::intrusive_ptr<HostHashMap>& self) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  if (handle_ < 0) {
    handle_ = next_handle++;
    registry().emplace(handle_, c10::weak_intrusive_ptr<HostHashMap>(self));
  }
  return handle_;
}

c10::intrusive_ptr<HostHashMap> find_host_map(int64_t handle) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto it = registry().find(handle);
  c10::intrusive_ptr<HostHashMap> map = it == registry().end() ? c10::intrusive_ptr<HostHashMap>() : it->second.lock();
  TORCH_CHECK_VALUE(map, "no live HostHashMap has handle ", handle, " (get one from HostHashMap.handle())");
  return map;
}

void HostHashMap::check_keys(const at::Tensor& keys, const char* what) const {
  TORCH_CHECK_VALUE(keys.device().is_cpu(), "HostHashMap.", what, ": keys must be a CPU tensor, found ", keys.device());
  TORCH_CHECK_TYPE(keys.scalar_type() == at::kLong, "HostHashMap.", what, ": keys must have dtype int64, found ",
                   keys.scalar_type());
  TORCH_CHECK_VALUE(keys.dim() == 1, "HostHashMap.", what, ": keys must be 1-D (n,), found shape ", keys.sizes());
  TORCH_CHECK_VALUE(keys.numel() < (int64_t(1) << 32), "HostHashMap.", what,
                    ": at most 2^32 - 1 keys per call, found ", keys.numel());
}

void HostHashMap::group(const int64_t* keys, int64_t n, Grouped& g) const {
  g.ensure(n, num_partitions_);
  uint32_t* order = g.order.get();
  uint64_t* hashes = g.hashes.get();
  if (num_partitions_ == 1) {
    at::parallel_for(0, n, 1 << 14, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        order[i] = static_cast<uint32_t>(i);
        hashes[i] = mix64(key_bits(keys[i]));
      }
    });
    g.offsets[1] = n;
    return;
  }
  uint64_t* h = g.tmp_hash.get();
  uint16_t* part = g.tmp_part.get();
  const uint64_t np = static_cast<uint64_t>(num_partitions_);
  at::parallel_for(0, n, 1 << 14, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      h[i] = mix64(key_bits(keys[i]));
      part[i] = static_cast<uint16_t>((((h[i] >> 8) & 0xFFFFFFu) * np) >> 24);  // hash bits 8..31
    }
  });
  // Stable counting sort by partition.
  for (int64_t i = 0; i < n; ++i) ++g.offsets[part[i] + 1];
  for (int64_t p = 0; p < num_partitions_; ++p) g.offsets[p + 1] += g.offsets[p];
  g.cursor.assign(g.offsets.begin(), g.offsets.end() - 1);
  int64_t* cursor = g.cursor.data();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = cursor[part[i]]++;
    order[j] = static_cast<uint32_t>(i);
    hashes[j] = h[i];
  }
}

std::tuple<at::Tensor, at::Tensor> HostHashMap::fetch(const at::Tensor& keys) {
  check_keys(keys, "fetch");
  const int64_t n = keys.numel();
  at::Tensor out = at::empty({n, width_}, keys.options().dtype(storage_dtype(storage_)));
  at::Tensor found = at::empty({n}, keys.options().dtype(at::kBool));
  fetch_into(keys, out, found);
  return {out, found};
}

void HostHashMap::fetch_into(const at::Tensor& keys_in, at::Tensor& out, at::Tensor& found) {
  check_keys(keys_in, "fetch_into");
  const int64_t n = keys_in.numel();
  TORCH_CHECK_VALUE(out.device().is_cpu() && out.scalar_type() == storage_dtype(storage_) && out.dim() == 2 &&
                        out.size(0) == n && out.size(1) == width_ && out.is_contiguous(),
                    "HostHashMap.fetch_into: out must be a contiguous CPU ", storage_dtype(storage_),
                    " tensor of shape (", n, ", ", width_,
                    "), found ", out.scalar_type(), " ", out.sizes(), " on ", out.device());
  TORCH_CHECK_VALUE(found.device().is_cpu() && found.scalar_type() == at::kBool && found.dim() == 1 &&
                        found.size(0) == n && found.is_contiguous(),
                    "HostHashMap.fetch_into: found must be a contiguous CPU bool tensor of shape (", n, ",), found ",
                    found.scalar_type(), " ", found.sizes(), " on ", found.device());
  fetches_.fetch_add(1, std::memory_order_relaxed);
  if (n == 0) return;
  keys_requested_.fetch_add(n, std::memory_order_relaxed);
  const at::Tensor keys = keys_in.contiguous();
  const int64_t* kp = keys.data_ptr<int64_t>();
  uint8_t* op = static_cast<uint8_t*>(out.data_ptr());
  bool* fp = found.data_ptr<bool>();
  ScratchLease lease(n);
  Grouped& g = lease.get();
  group(kp, n, g);
  const uint32_t* order = g.order.get();
  const uint64_t* hashes = g.hashes.get();
  const int64_t* offsets = g.offsets.data();
  const int64_t row_bytes = row_bytes_;
  const int64_t prefetch_bytes = std::min<int64_t>(row_bytes, host_map_detail::kMaxPrefetchBytes);
  const int64_t policy = overflow_policy_;
  const bool streaming = cpu::use_streaming_stores_bytes(op, n, row_bytes);
  constexpr int64_t kSlotAhead = host_map_detail::kSlotPrefetchDistance;
  constexpr int64_t kRowAhead = host_map_detail::kRowPrefetchDistance;
  constexpr int64_t kRingMask = host_map_detail::kRowRing - 1;

  // Work item c = sorted positions [c * kFetchChunk, ...): runs of one partition each, under its shared lock.
  const int64_t chunk = host_map_detail::kFetchChunk;
  parallel_chunks(
      (n + chunk - 1) / chunk,
      [&](int64_t c) {
        const int64_t begin = c * chunk, end = std::min(n, begin + chunk);
        int64_t hits = 0;
        int64_t p = std::upper_bound(offsets, offsets + num_partitions_ + 1, begin) - offsets - 1;
        for (int64_t rb = begin; rb < end; ++p) {
          const int64_t re = std::min(end, offsets[p + 1]);
          if (re <= rb) continue;
          Partition& part = *parts_[p];
          if (policy == kEvictOldest && part.clock.load(std::memory_order_relaxed) >= host_map_detail::kMetaLimit) {
            std::unique_lock<std::shared_mutex> wl(part.mutex);
            if (part.clock.load(std::memory_order_relaxed) >= host_map_detail::kMetaLimit) {
              part.renormalize_clock_locked();
            }
          }
          std::shared_lock<std::shared_mutex> lock(part.mutex);
          const uint32_t now = policy == kEvictOldest ? part.clock.fetch_add(1, std::memory_order_relaxed) + 1 : 0;

          // Pipeline: prefetch the index lines of key j+16, probe key j+8 and prefetch its row, copy out key j.
          uint32_t ring[host_map_detail::kRowRing];
          auto resolve = [&](int64_t j) {
            const uint32_t r = part.index.find_row(kp[order[j]], hashes[j]);
            ring[j & kRingMask] = r;
            if (r != kEmptyRow) {
              const char* src = reinterpret_cast<const char*>(part.row_values(r));
              for (int64_t b = 0; b < prefetch_bytes; b += 64) __builtin_prefetch(src + b, 0, 3);
              if (policy != kEvictRandom) __builtin_prefetch(part.row_meta(r), 1, 3);
            }
          };
          for (int64_t j = rb; j < std::min(re, rb + kSlotAhead); ++j) part.index.prefetch_slot(hashes[j]);
          for (int64_t j = rb; j < std::min(re, rb + kRowAhead); ++j) resolve(j);
          for (int64_t j = rb; j < re; ++j) {
            if (j + kSlotAhead < re) part.index.prefetch_slot(hashes[j + kSlotAhead]);
            if (j + kRowAhead < re) resolve(j + kRowAhead);
            const uint32_t r = ring[j & kRingMask];
            const int64_t i = order[j];
            if (r == kEmptyRow) {
              std::memset(op + i * row_bytes, 0, static_cast<size_t>(row_bytes));
              fp[i] = false;
              continue;
            }
            cpu::copy_bytes_out(op + i * row_bytes, part.row_values(r), row_bytes, streaming);
            fp[i] = true;
            ++hits;
            if (policy == kEvictLeastUsed) {
              // NOTE: GCC atomic builtins, not std::atomic_ref: the GPU machine's torch builds as C++17.
              uint32_t* m = part.row_meta(r);
              if (__atomic_load_n(m, __ATOMIC_RELAXED) < host_map_detail::kMetaLimit) {
                __atomic_fetch_add(m, 1u, __ATOMIC_RELAXED);
              }
            } else if (policy == kEvictOldest) {
              __atomic_store_n(part.row_meta(r), now, __ATOMIC_RELAXED);
            }
          }
          rb = re;
        }
        keys_found_.fetch_add(hits, std::memory_order_relaxed);
      },
      [&] {
        if (streaming) cpu::streaming_fence();  // streamed rows visible before the join
      });
}

int64_t HostHashMap::insert(const at::Tensor& keys_in, const at::Tensor& values_in) {
  check_keys(keys_in, "insert");
  TORCH_CHECK_VALUE(values_in.device().is_cpu(), "HostHashMap.insert: values must be a CPU tensor, found ",
                    values_in.device());
  TORCH_CHECK_TYPE(values_in.scalar_type() == storage_dtype(storage_), "HostHashMap.insert: values must be stored rows "
                   "of the map's storage (dtype ", storage_dtype(storage_), "), found ", values_in.scalar_type());
  TORCH_CHECK_VALUE(values_in.dim() == 2, "HostHashMap.insert: values must be 2-D (n, width), found shape ",
                    values_in.sizes());
  TORCH_CHECK_VALUE(values_in.size(1) == width_, "HostHashMap.insert: values must have width = ", width_,
                    " columns (the table's dim ", dim_, " as stored), found shape ", values_in.sizes());
  TORCH_CHECK_VALUE(values_in.size(0) == keys_in.size(0),
                    "HostHashMap.insert: values must have one row per key: keys has ", keys_in.size(0),
                    " rows, values has shape ", values_in.sizes());
  const at::Tensor keys = keys_in.contiguous();
  const at::Tensor values = values_in.contiguous();
  const int64_t n = keys.numel();
  if (n == 0) return 0;
  const int64_t* kp = keys.data_ptr<int64_t>();
  const uint8_t* vp = static_cast<const uint8_t*>(values.data_ptr());
  ScratchLease lease(n);
  Grouped& g = lease.get();
  group(kp, n, g);
  const uint32_t* order = g.order.get();
  const uint64_t* hashes = g.hashes.get();
  const int64_t row_bytes = row_bytes_;
  std::atomic<int64_t> inserted{0};

  // One work item per partition: its keys in input order under its exclusive lock.
  parallel_chunks(num_partitions_, [&](int64_t p) {
    const int64_t jb = g.offsets[p], je = g.offsets[p + 1];
    if (jb == je) return;
    Partition& part = *parts_[p];
    std::unique_lock<std::shared_mutex> lock(part.mutex);
    const uint32_t fresh = overflow_policy_ == kEvictOldest ? part.tick_locked() : 0;  // LFU: 0, as HPS
    int64_t new_keys = 0, evicted = 0;
    for (int64_t j = jb; j < je; ++j) {
      if (j + 8 < je) part.index.prefetch_slot(hashes[j + 8]);
      const int64_t i = order[j];
      const int64_t key = kp[i];
      const uint64_t h = hashes[j];
      const uint64_t s = part.index.find(key, h);
      uint32_t row;
      if (s != part.index.cap) {
        row = part.index.slots[s].row;
      } else {
        if (part.index.size >= overflow_margin_) evicted += evict_locked(part, part.index.size - keep_after_overflow_);
        part.index.grow_for_one_more();  // before a row is taken: a growth that fails takes none
        row = part.alloc_row();
        part.index.add(key, row, h);
        ++new_keys;
      }
      std::memcpy(part.row_values(row), vp + i * row_bytes, static_cast<size_t>(row_bytes));
      *part.row_meta(row) = fresh;
    }
    inserted.fetch_add(new_keys, std::memory_order_relaxed);
    evictions_.fetch_add(evicted, std::memory_order_relaxed);
  });
  return inserted.load();
}

int64_t HostHashMap::evict_locked(Partition& part, int64_t count) {
  if (count <= 0) return 0;
  if (overflow_policy_ == kEvictRandom) {
    // Uniform over the present entries: draw slots until an occupied one (the load is >= ~0.5 here because the
    // index only grows with the size, which the margin bounds).
    for (int64_t k = 0; k < count; ++k) {
      uint64_t s;
      do {
        s = part.rng.below(part.index.cap);
      } while (part.index.slots[s].row == kEmptyRow);
      part.remove_slot(s);
    }
    return count;
  }
  std::vector<std::pair<uint32_t, int64_t>> cand;  // (meta, key)
  cand.reserve(part.index.size);
  for (uint64_t s = 0; s < part.index.cap; ++s) {
    const uint32_t r = part.index.slots[s].row;
    if (r != kEmptyRow) cand.emplace_back(*part.row_meta(r), part.index.slots[s].key);
  }
  std::nth_element(cand.begin(), cand.begin() + (count - 1), cand.end());
  for (int64_t k = 0; k < count; ++k) {
    const int64_t key = cand[k].second;
    part.remove_slot(part.index.find(key, mix64(key_bits(key))));
  }
  return count;
}

int64_t HostHashMap::erase(const at::Tensor& keys_in) {
  check_keys(keys_in, "erase");
  const at::Tensor keys = keys_in.contiguous();
  const int64_t n = keys.numel();
  if (n == 0) return 0;
  const int64_t* kp = keys.data_ptr<int64_t>();
  ScratchLease lease(n);
  Grouped& g = lease.get();
  group(kp, n, g);
  const uint32_t* order = g.order.get();
  const uint64_t* hashes = g.hashes.get();
  std::atomic<int64_t> erased{0};
  parallel_chunks(num_partitions_, [&](int64_t p) {
    const int64_t jb = g.offsets[p], je = g.offsets[p + 1];
    if (jb == je) return;
    Partition& part = *parts_[p];
    std::unique_lock<std::shared_mutex> lock(part.mutex);
    int64_t count = 0;
    for (int64_t j = jb; j < je; ++j) {
      const uint64_t s = part.index.find(kp[order[j]], hashes[j]);
      if (s != part.index.cap) {
        part.remove_slot(s);
        ++count;
      }
    }
    erased.fetch_add(count, std::memory_order_relaxed);
  });
  return erased.load();
}

int64_t HostHashMap::size() const {
  int64_t total = 0;
  for (const auto& part : parts_) {
    std::shared_lock<std::shared_mutex> lock(part->mutex);
    total += part->index.size;
  }
  return total;
}

void HostHashMap::reserve(int64_t n) {
  TORCH_CHECK_VALUE(n >= 0, "HostHashMap.reserve: n must be >= 0, found ", n);
  if (n == 0) return;
  // Expected share of each partition plus two standard deviations (binomial), never above the margin.
  const double mean = static_cast<double>(n) / num_partitions_;
  const double slack = num_partitions_ == 1 ? 0.0 : 2.0 * std::sqrt(mean * (1.0 - 1.0 / num_partitions_));
  const int64_t per_part = std::min<int64_t>(overflow_margin_, static_cast<int64_t>(std::ceil(mean + slack)));
  parallel_chunks(num_partitions_, [&](int64_t p) {
    Partition& part = *parts_[p];
    std::unique_lock<std::shared_mutex> lock(part.mutex);
    part.reserve(per_part);
  });
}

int64_t HostHashMap::memory_bytes() const {
  int64_t total = sizeof(HostHashMap) + static_cast<int64_t>(parts_.capacity() * sizeof(parts_[0]));
  for (const auto& part : parts_) {
    std::shared_lock<std::shared_mutex> lock(part->mutex);
    total += part->memory_bytes();
  }
  return total;
}

at::Tensor HostHashMap::export_keys() const {
  std::vector<int64_t> keys;
  for (const auto& part : parts_) {
    std::shared_lock<std::shared_mutex> lock(part->mutex);
    keys.reserve(keys.size() + part->index.size);
    for (uint64_t s = 0; s < part->index.cap; ++s) {
      if (part->index.slots[s].row != kEmptyRow) keys.push_back(part->index.slots[s].key);
    }
  }
  at::Tensor out = at::empty({static_cast<int64_t>(keys.size())}, at::TensorOptions().dtype(at::kLong));
  if (!keys.empty()) std::memcpy(out.data_ptr<int64_t>(), keys.data(), keys.size() * sizeof(int64_t));
  return out;
}

at::Tensor HostHashMap::partition_sizes() const {
  at::Tensor out = at::empty({num_partitions_}, at::TensorOptions().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t p = 0; p < num_partitions_; ++p) {
    std::shared_lock<std::shared_mutex> lock(parts_[p]->mutex);
    op[p] = parts_[p]->index.size;
  }
  return out;
}

void register_host_map_class(torch::Library& m) {
  m.class_<HostHashMap>("HostHashMap")
      .def(torch::init<int64_t, int64_t, int64_t, int64_t, double, int64_t, int64_t, int64_t>())
      .def("fetch", &HostHashMap::fetch)
      .def("fetch_into", [](const c10::intrusive_ptr<HostHashMap>& self, const at::Tensor& keys, at::Tensor out,
                            at::Tensor found) { self->fetch_into(keys, out, found); })
      .def("insert", &HostHashMap::insert)
      .def("erase", &HostHashMap::erase)
      .def("handle", [](const c10::intrusive_ptr<HostHashMap>& self) { return self->handle(self); })
      .def("size", &HostHashMap::size)
      .def("reserve", &HostHashMap::reserve)
      .def("memory_bytes", &HostHashMap::memory_bytes)
      .def("dim", &HostHashMap::dim)
      .def("storage", &HostHashMap::storage)
      .def("num_partitions", &HostHashMap::num_partitions)
      .def("evictions", &HostHashMap::evictions)
      .def("fetch_counts", &HostHashMap::fetch_counts)
      .def("export_keys", &HostHashMap::export_keys)
      .def("partition_sizes", &HostHashMap::partition_sizes);
}

}  // namespace hps
