// The host-memory tier's hash map (HPS's "volatile DB"), exposed to Python as torch.classes.hps.HostHashMap.
// One object holds one table: int64 keys -> stored rows of a fixed dim (row_codec.h: float32, or a compact storage
// with its row-wise scale, kept and copied as bytes), split over partitions that each have
// their own lock, open-addressing index and paged value arena. See host_map_cpu.cpp for the design notes.
#pragma once

#include <ATen/ATen.h>
#include <torch/custom_class.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <tuple>
#include <vector>

#include "../stored_rows.h"

namespace hps {

// Overflow policies, numbered as the constructor takes them (HPS names in the Python tier).
constexpr int64_t kEvictRandom = 0;     // uniform random victims (seeded per partition)
constexpr int64_t kEvictLeastUsed = 1;  // lowest LFU count
constexpr int64_t kEvictOldest = 2;     // lowest LRU time

constexpr int64_t kHostMapMaxPartitions = 4096;

namespace host_map_detail {
struct Partition;
struct Grouped;
}  // namespace host_map_detail

class HostHashMap : public torch::CustomClassHolder {
 public:
  // dim: row length; num_partitions in [1, 4096]; overflow_margin: max entries per partition (>= 1);
  // overflow_policy: kEvictRandom | kEvictLeastUsed | kEvictOldest; overflow_resolution_target in (0, 1):
  // a full partition is pruned to margin * target entries; allocation_rate: largest value page in bytes
  // (>= one row); seed: seeds the per-partition RNGs of evict_random; storage: the row_codec.h Storage of the rows.
  HostHashMap(int64_t dim, int64_t num_partitions, int64_t overflow_margin, int64_t overflow_policy,
              double overflow_resolution_target, int64_t allocation_rate, int64_t seed, int64_t storage);
  ~HostHashMap() override;
  void release_resources() override;

  // keys int64 (n,) CPU -> (stored rows (n, width) of the storage's dtype, found bool (n,)); missing rows are zeros.
  std::tuple<at::Tensor, at::Tensor> fetch(const at::Tensor& keys);
  // The same into caller-owned buffers (e.g. pinned memory the rows are copied to the GPU from):
  // out (n, width) of the storage's dtype, contiguous, found bool (n,) contiguous, both CPU.
  void fetch_into(const at::Tensor& keys, at::Tensor& out, at::Tensor& found);
  // keys int64 (n,), values stored rows (n, width): insert or overwrite (last duplicate wins); returns #new keys.
  int64_t insert(const at::Tensor& keys, const at::Tensor& values);
  // keys int64 (n,): returns #keys that were present (and are gone now).
  int64_t erase(const at::Tensor& keys);
  int64_t size() const;
  // Pre-size index and value pages for n entries in total (spread over the partitions), so a bulk load
  // neither rehashes nor over-allocates.
  void reserve(int64_t n);
  // Bytes allocated right now: index arrays + value pages (with their meta) + free lists + bookkeeping.
  int64_t memory_bytes() const;
  int64_t dim() const { return dim_; }
  int64_t storage() const { return storage_; }
  int64_t width() const { return width_; }  // elements per stored row
  // A process-unique number naming this map to native code (a LookupPipeline): passing the object itself through
  // the dispatcher from Python costs ~30 us per call, an int nothing. Resolved by find_host_map.
  int64_t handle(const c10::intrusive_ptr<HostHashMap>& self);
  int64_t num_partitions() const { return num_partitions_; }
  int64_t evictions() const { return evictions_.load(std::memory_order_relaxed); }
  // [fetch calls, keys requested, keys found] over the map's life, whoever fetched (the tier, or a lookup
  // pipeline by handle).
  std::vector<int64_t> fetch_counts() const {
    return {fetches_.load(std::memory_order_relaxed), keys_requested_.load(std::memory_order_relaxed),
            keys_found_.load(std::memory_order_relaxed)};
  }
  // Every stored key, int64 (size(),), partition by partition in index order.
  at::Tensor export_keys() const;
  // Entries per partition, int64 (num_partitions,) (tests, balance checks).
  at::Tensor partition_sizes() const;

 private:
  // Sort one call's keys by partition into `g` (stable counting sort; hashes computed once).
  void group(const int64_t* keys, int64_t n, host_map_detail::Grouped& g) const;
  void check_keys(const at::Tensor& keys, const char* what) const;
  // Evict `count` entries of a partition by the policy (exclusive lock held); returns count.
  int64_t evict_locked(host_map_detail::Partition& part, int64_t count);

  int64_t handle_ = -1;  // -1 until handle() is first called
  int64_t dim_;
  int32_t storage_;
  int64_t width_ = 0;
  int64_t row_bytes_ = 0;
  int64_t num_partitions_;
  int64_t overflow_margin_;
  int64_t overflow_policy_;
  int64_t keep_after_overflow_;  // floor(margin * target)
  std::atomic<int64_t> evictions_{0};
  std::atomic<int64_t> fetches_{0};
  std::atomic<int64_t> keys_requested_{0};
  std::atomic<int64_t> keys_found_{0};
  std::vector<std::unique_ptr<host_map_detail::Partition>> parts_;
};

// The live map with this handle; ValueError if there is none (never registered, or already freed).
c10::intrusive_ptr<HostHashMap> find_host_map(int64_t handle);

}  // namespace hps
