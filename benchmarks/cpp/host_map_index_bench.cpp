// The host map's index (cuda_ext/csrc/cpu/host_map_index.h: Robin Hood, 12-byte slots, multiply-shift home slot,
// 1.5x growth at 0.9 load) against absl::flat_hash_map<int64_t, uint32_t> (Abseil's Swiss table) on the same keys,
// single-threaded. Issue 19 item 5. Build and run: benchmarks/cpp/run_host_map_index.sh.
//
// Implementations (interleaved run by run, the machine is a shared VM):
//   ours      RobinHoodIndex as Partition uses it: h = mix64(key), find then place; index memory from its block
//             allocator (>= 2 MiB: 2 MiB-aligned mmap + MADV_HUGEPAGE).
//   absl      absl::flat_hash_map<int64_t, uint32_t>, default hash and std::allocator.
//   ours_2x   ours, but reserve(n) reserves 2n (insert_reserve and the lookups run at load 0.45 instead of 0.9)
//   absl_thp  the same with an allocator that gives blocks >= 2 MiB the index's huge-page mapping (THP here is
//             "madvise": without it absl's table gets 4 KiB pages and pays TLB misses ours does not).
// Operations (ns per op = time / keys touched):
//   insert          insert all n keys into an empty map (grows as it goes)
//   insert_reserve  reserve(n), then insert all n keys
//   find_hit        look every key up, random order
//   find_miss       look up n absent keys
//   batch_hit       the fetch path's shape: chunks of 2048 keys in random order; ours hashes the chunk first (fetch
//                   does it in group()) and prefetches the index lines of key j+16 while probing key j; absl calls
//                   prefetch(key j+16) before find(key j) (it hashes both times)
//   erase_half      erase half the keys (random order)
//   find_after_erase look every key up again (half hit, half miss; absl probes past tombstones)
// Keys: n distinct pseudo-random int64 (a bijective mix of 0..n-1) with INT64_MIN and INT64_MAX among them; misses
// are the same mix of n..2n-1 (disjoint). Every run checks every implementation finds the same rows.
#include <absl/container/flat_hash_map.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "cpu/host_map_index.h"

using hps::host_map_detail::RobinHoodIndex;
using hps::host_map_detail::Slot;
using hps::host_map_detail::kEmptyRow;

namespace {

constexpr int64_t kChunk = 2048;  // host_map_cpu.cpp kFetchChunk
constexpr int64_t kAhead = hps::host_map_detail::kSlotPrefetchDistance;

// murmur3 fmix64: a bijection unlike the index's hash (mix64), so keys are distinct and unrelated to it.
uint64_t fmix64(uint64_t k) {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdULL;
  k ^= k >> 33;
  k *= 0xc4ceb9fe1a85ec53ULL;
  k ^= k >> 33;
  return k;
}

double now_ns() {
  return std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Huge-page allocator for absl_thp: the index's own block allocator.
template <typename T>
struct HugeAlloc {
  using value_type = T;
  HugeAlloc() = default;
  template <typename U>
  HugeAlloc(const HugeAlloc<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(hps::host_map_detail::aligned_bytes(n * sizeof(T), "absl")); }
  void deallocate(T* p, size_t n) { hps::host_map_detail::free_bytes(p, n * sizeof(T)); }
  template <typename U>
  bool operator==(const HugeAlloc<U>&) const { return true; }
  template <typename U>
  bool operator!=(const HugeAlloc<U>&) const { return false; }
};

// Factor = 2: reserve(n) reserves 2n (load 0.45 after it): is the gap the 0.9 load or the design? (Only the
// reserved map differs; `insert` grows as ours does.)
template <int Factor, const char* Name>
struct OursT {
  static constexpr const char* kName = Name;
  RobinHoodIndex idx;
  void reserve(int64_t n) { idx.reserve(Factor * n); }
  void insert(int64_t key, uint32_t row) {
    const uint64_t h = hps::mix64(hps::key_bits(key));
    const uint64_t s = idx.find(key, h);
    if (s != idx.cap) {
      idx.slots[s].row = row;
      return;
    }
    idx.add(key, row, h);
  }
  uint32_t find(int64_t key) const { return idx.find_row(key, hps::mix64(hps::key_bits(key))); }
  bool erase(int64_t key) {
    const uint64_t s = idx.find(key, hps::mix64(hps::key_bits(key)));
    if (s == idx.cap) return false;
    idx.remove_slot(s);
    return true;
  }
  // fetch's pipeline over one chunk (index part only: no row prefetch/copy).
  uint64_t batch(const int64_t* keys, int64_t n, uint64_t* hashes) const {
    for (int64_t j = 0; j < n; ++j) hashes[j] = hps::mix64(hps::key_bits(keys[j]));
    for (int64_t j = 0; j < std::min(n, kAhead); ++j) idx.prefetch_slot(hashes[j]);
    uint64_t sum = 0;
    for (int64_t j = 0; j < n; ++j) {
      if (j + kAhead < n) idx.prefetch_slot(hashes[j + kAhead]);
      sum += idx.find_row(keys[j], hashes[j]);
    }
    return sum;
  }
  size_t bytes() const { return idx.cap * sizeof(Slot); }
  size_t slots() const { return idx.cap; }
};

template <typename Map, const char* Name>
struct Absl {
  static constexpr const char* kName = Name;
  Map m;
  void reserve(int64_t n) { m.reserve(n); }
  void insert(int64_t key, uint32_t row) { m.insert_or_assign(key, row); }
  uint32_t find(int64_t key) const {
    auto it = m.find(key);
    return it == m.end() ? kEmptyRow : it->second;
  }
  bool erase(int64_t key) { return m.erase(key) != 0; }
  uint64_t batch(const int64_t* keys, int64_t n, uint64_t*) const {
    for (int64_t j = 0; j < std::min(n, kAhead); ++j) m.prefetch(keys[j]);
    uint64_t sum = 0;
    for (int64_t j = 0; j < n; ++j) {
      if (j + kAhead < n) m.prefetch(keys[j + kAhead]);
      auto it = m.find(keys[j]);
      sum += it == m.end() ? kEmptyRow : it->second;
    }
    return sum;
  }
  // As the brief counts it: capacity * (slot + 1 control byte); absl adds 16 more control bytes in all.
  size_t bytes() const { return m.capacity() * (sizeof(typename Map::value_type) + 1); }
  size_t slots() const { return m.capacity(); }
};

constexpr char kOursName[] = "ours";
constexpr char kOurs2Name[] = "ours_2x";
using Ours = OursT<1, kOursName>;
using Ours2 = OursT<2, kOurs2Name>;
constexpr char kAbslName[] = "absl";
constexpr char kAbslThpName[] = "absl_thp";
using AbslStd = Absl<absl::flat_hash_map<int64_t, uint32_t>, kAbslName>;
using AbslThp = Absl<absl::flat_hash_map<int64_t, uint32_t, absl::container_internal::hash_default_hash<int64_t>,
                                         absl::container_internal::hash_default_eq<int64_t>,
                                         HugeAlloc<std::pair<const int64_t, uint32_t>>>,
                     kAbslThpName>;

const char* kOps[] = {"insert", "insert_reserve", "find_hit", "find_miss", "batch_hit", "erase_half",
                      "find_after_erase"};
constexpr int kNumOps = 7;

struct Data {
  int64_t n;
  std::vector<int64_t> keys;      // insertion order; row of keys[i] = i
  std::vector<int64_t> shuffled;  // the same keys, random order
  std::vector<int64_t> misses;
  std::vector<uint32_t> row_of_shuffled;
};

Data make_data(int64_t n, uint64_t seed) {
  Data d;
  d.n = n;
  d.keys.resize(n);
  d.misses.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    d.keys[i] = static_cast<int64_t>(fmix64(static_cast<uint64_t>(i) ^ seed));
    d.misses[i] = static_cast<int64_t>(fmix64(static_cast<uint64_t>(i + n) ^ seed));
  }
  // Edge keys (their mix-preimages are not in 0..2n-1 for these n, checked below by the miss check).
  d.keys[n / 3] = std::numeric_limits<int64_t>::min();
  d.keys[2 * n / 3] = std::numeric_limits<int64_t>::max();
  std::vector<uint32_t> perm(n);
  for (int64_t i = 0; i < n; ++i) perm[i] = static_cast<uint32_t>(i);
  uint64_t st = seed * 0x9e3779b97f4a7c15ULL + 1;
  for (int64_t i = n - 1; i > 0; --i) {  // Fisher-Yates, splitmix stream
    st += 0x9e3779b97f4a7c15ULL;
    const uint64_t j = hps::host_map_detail::home_slot(hps::mix64(st), static_cast<uint64_t>(i + 1));
    std::swap(perm[i], perm[j]);
  }
  d.shuffled.resize(n);
  d.row_of_shuffled.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    d.shuffled[i] = d.keys[perm[i]];
    d.row_of_shuffled[i] = perm[i];
  }
  return d;
}

struct RunResult {
  double ns[kNumOps];
  double bytes_per_key_grown, bytes_per_key_reserved;
  size_t slots_grown, slots_reserved;
  uint64_t check[4];  // sums that every implementation must agree on
};

void fail(const char* what, const char* impl) {
  std::fprintf(stderr, "CHECK FAILED: %s (%s)\n", what, impl);
  std::exit(1);
}

template <typename Impl>
RunResult run_one(const Data& d) {
  RunResult r{};
  const int64_t n = d.n;
  const double nd = static_cast<double>(n);
  {  // insert, growing
    auto m = std::make_unique<Impl>();
    const double t0 = now_ns();
    for (int64_t i = 0; i < n; ++i) m->insert(d.keys[i], static_cast<uint32_t>(i));
    r.ns[0] = (now_ns() - t0) / nd;
    r.bytes_per_key_grown = static_cast<double>(m->bytes()) / nd;
    r.slots_grown = m->slots();
  }
  auto m = std::make_unique<Impl>();
  {  // insert after reserve: this map is the one the lookups use
    const double t0 = now_ns();
    m->reserve(n);
    for (int64_t i = 0; i < n; ++i) m->insert(d.keys[i], static_cast<uint32_t>(i));
    r.ns[1] = (now_ns() - t0) / nd;
    r.bytes_per_key_reserved = static_cast<double>(m->bytes()) / nd;
    r.slots_reserved = m->slots();
  }
  {  // find_hit
    uint64_t sum = 0;
    const double t0 = now_ns();
    for (int64_t i = 0; i < n; ++i) sum += m->find(d.shuffled[i]);
    r.ns[2] = (now_ns() - t0) / nd;
    r.check[0] = sum;
    // Exact check (outside the timing): every key, edge keys included, maps to its row.
    for (int64_t i = 0; i < n; ++i) {
      if (m->find(d.shuffled[i]) != d.row_of_shuffled[i]) fail("find_hit row", Impl::kName);
    }
    if (m->find(std::numeric_limits<int64_t>::min()) != static_cast<uint32_t>(n / 3)) fail("INT64_MIN", Impl::kName);
    if (m->find(std::numeric_limits<int64_t>::max()) != static_cast<uint32_t>(2 * n / 3)) fail("INT64_MAX", Impl::kName);
  }
  {  // find_miss
    uint64_t hits = 0;
    const double t0 = now_ns();
    for (int64_t i = 0; i < n; ++i) hits += m->find(d.misses[i]) != kEmptyRow;
    r.ns[3] = (now_ns() - t0) / nd;
    if (hits != 0) fail("find_miss found a key", Impl::kName);
  }
  {  // batch_hit
    std::vector<uint64_t> hashes(kChunk);
    uint64_t sum = 0;
    const double t0 = now_ns();
    for (int64_t b = 0; b < n; b += kChunk) sum += m->batch(d.shuffled.data() + b, std::min(kChunk, n - b), hashes.data());
    r.ns[4] = (now_ns() - t0) / nd;
    if (sum != r.check[0]) fail("batch_hit sum", Impl::kName);
  }
  {  // erase_half: the first half of the random order
    int64_t erased = 0;
    const double t0 = now_ns();
    for (int64_t i = 0; i < n / 2; ++i) erased += m->erase(d.shuffled[i]);
    r.ns[5] = (now_ns() - t0) / static_cast<double>(n / 2);
    if (erased != n / 2) fail("erase count", Impl::kName);
  }
  {  // find_after_erase
    uint64_t sum = 0, hits = 0;
    const double t0 = now_ns();
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t row = m->find(d.shuffled[i]);
      hits += row != kEmptyRow;
      sum += row;
    }
    r.ns[6] = (now_ns() - t0) / nd;
    if (hits != static_cast<uint64_t>(n - n / 2)) fail("find_after_erase hits", Impl::kName);
    r.check[1] = sum;
  }
  return r;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t k = v.size();
  return k % 2 ? v[k / 2] : 0.5 * (v[k / 2 - 1] + v[k / 2]);
}

}  // namespace

int main(int argc, char** argv) {
  // usage: host_map_index_bench [runs_1m] [runs_16m] [sizes...]; default 7 runs at 1M, 5 at 16M.
  const int runs_small = argc > 1 ? std::atoi(argv[1]) : 7;
  const int runs_large = argc > 2 ? std::atoi(argv[2]) : 5;
  std::vector<int64_t> sizes;
  for (int a = 3; a < argc; ++a) sizes.push_back(std::atoll(argv[a]));
  if (sizes.empty()) sizes = {int64_t(1) << 20, int64_t(1) << 24};
  constexpr int kImpls = 4;
  const char* names[kImpls] = {Ours::kName, AbslStd::kName, AbslThp::kName, Ours2::kName};

  std::printf("# sizeof(absl slot) = %zu, sizeof(our slot) = %zu, prefetch distance %" PRId64 ", chunk %" PRId64 "\n",
              sizeof(std::pair<const int64_t, uint32_t>), sizeof(Slot), kAhead, kChunk);
  for (int64_t n : sizes) {
    const int runs = n >= (int64_t(1) << 22) ? runs_large : runs_small;
    const Data d = make_data(n, 0x5eed0000ULL + static_cast<uint64_t>(n));
    std::vector<RunResult> res[kImpls];
    for (int run = 0; run < runs; ++run) {
      // Rotate the order every run so no implementation always goes first (or after the same neighbour).
      for (int k = 0; k < kImpls; ++k) {
        const int impl = (run + k) % kImpls;
        RunResult r = impl == 0   ? run_one<Ours>(d)
                      : impl == 1 ? run_one<AbslStd>(d)
                      : impl == 2 ? run_one<AbslThp>(d)
                                  : run_one<Ours2>(d);
        res[impl].push_back(r);
        std::printf("# n=%" PRId64 " run=%d %-8s", n, run, names[impl]);
        for (int o = 0; o < kNumOps; ++o) std::printf(" %s=%.1f", kOps[o], r.ns[o]);
        std::printf("\n");
        std::fflush(stdout);
      }
      for (int impl = 1; impl < kImpls; ++impl) {
        if (res[impl].back().check[0] != res[0].back().check[0] || res[impl].back().check[1] != res[0].back().check[1]) {
          fail("implementations disagree", names[impl]);
        }
      }
    }
    std::printf("\n## n = %" PRId64 " keys (%d runs, median ns/op; ratio = ours / absl, < 1: ours faster)\n\n", n, runs);
    std::printf("| op | ours | absl | absl_thp | ours/absl | ours/absl_thp | ours_2x | ours_2x/absl |\n"
                "|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for (int o = 0; o < kNumOps; ++o) {
      double med[kImpls];
      for (int impl = 0; impl < kImpls; ++impl) {
        std::vector<double> v;
        for (const RunResult& r : res[impl]) v.push_back(r.ns[o]);
        med[impl] = median(v);
      }
      std::printf("| %s | %.1f | %.1f | %.1f | %.2f | %.2f | %.1f | %.2f |\n", kOps[o], med[0], med[1], med[2],
                  med[0] / med[1], med[0] / med[2], med[3], med[3] / med[1]);
    }
    std::printf("\n| memory | ours | absl |\n|---|---:|---:|\n");
    std::printf("| bytes/key after growing | %.1f (%zu slots) | %.1f (%zu slots) |\n", res[0][0].bytes_per_key_grown,
                res[0][0].slots_grown, res[1][0].bytes_per_key_grown, res[1][0].slots_grown);
    std::printf("| bytes/key after reserve(n) | %.1f (%zu slots) | %.1f (%zu slots) |\n",
                res[0][0].bytes_per_key_reserved, res[0][0].slots_reserved, res[1][0].bytes_per_key_reserved,
                res[1][0].slots_reserved);
    std::printf("| bytes/key, ours_2x after reserve(2n) | %.1f (%zu slots) | |\n", res[3][0].bytes_per_key_reserved,
                res[3][0].slots_reserved);
    std::fflush(stdout);
  }
  return 0;
}
