// The host half of a cached lookup's miss path, as two device-generic ops (hps_ops.cpp states the contract):
//
//   collect_misses: the misses planned (positions, distinct keys, inverse) with one stream sync - the only one of a
//                   lookup - and the distinct keys' rows fetched from the host-memory map straight into a pinned
//                   buffer.
//   apply_misses:   the plan and the rows back with two async copies from pinned memory, one scatter launch.
//
// Why on the host: a lookup needs its misses on the host anyway (the tiers live there), and with a few hundred
// misses per call the GPU compaction (scan, sort, two more scans: ~12 launches) plus its own D2H of the counts
// costs more launch latency than de-duplicating on the CPU takes. Large GPU batches are the other way round, and
// are de-duplicated on the GPU (plan_on_device). The Python engine then makes three calls on
// the miss path (find, collect, apply) plus the insert, instead of ~40 small ops and five syncs.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#include "cache_layout.h"
#include "checks.h"
#include "cpu/host_map.h"
#include "miss_path.h"
#include "pipeline_checks.h"

namespace hps {
namespace {

using MapPtr = c10::intrusive_ptr<HostHashMap>;

// Host buffers the GPU copies to or from are pinned: the copies are then truly asynchronous and the caching host
// allocator keeps a buffer alive until its copy has run.
at::Tensor host_empty(at::IntArrayRef sizes, at::ScalarType dtype, bool pinned) {
  return at::empty(sizes, at::TensorOptions().dtype(dtype).pinned_memory(pinned));
}

// Distinct keys of the miss positions in first-occurrence order: an open-addressing table of power-of-two
// capacity >= 2 m (load <= 1/2), probed linearly from mix64(key).
struct MissDeduper {
  std::vector<int64_t> keys;
  std::vector<int64_t> index;  // -1 = empty slot
  uint64_t mask;

  explicit MissDeduper(int64_t misses) {
    uint64_t cap = 16;
    while (cap < static_cast<uint64_t>(misses) * 2) cap <<= 1;
    keys.resize(cap);
    index.assign(cap, -1);
    mask = cap - 1;
  }

  // Index of `key` among the distinct keys seen so far; `next` is the index a new key gets.
  int64_t insert(int64_t key, int64_t next) {
    for (uint64_t s = mix64(static_cast<uint64_t>(key)) & mask;; s = (s + 1) & mask) {
      if (index[s] < 0) {
        keys[s] = key;
        index[s] = next;
        return next;
      }
      if (keys[s] == key) return index[s];
    }
  }
};

// A plan is one int64 host buffer: [m, u, positions (m, ascending), inverse (m), unique keys (u, ascending)], so
// that one copy takes both the scatter plan and the keys to insert to the device. [0, 0] when nothing missed.

// Small batches: found and keys to the host (the second copy blocks, so it also waits for the first), then the
// misses de-duplicated there with a hash table, and the distinct keys sorted.
at::Tensor plan_on_host(const at::Tensor& keys, const at::Tensor& found, int64_t num_buckets) {
  const int64_t n = keys.size(0);
  const bool pinned = keys.is_cuda();
  at::Tensor keys_h = keys, found_h = found;
  if (!keys.device().is_cpu()) {
    keys_h = host_empty({n}, keys.scalar_type(), pinned);
    found_h = host_empty({n}, at::kBool, pinned);
    keys_h.copy_(keys, /*non_blocking=*/true);
    found_h.copy_(found, /*non_blocking=*/false);
  }
  keys_h = keys_h.contiguous();
  found_h = found_h.contiguous();
  const bool* fp = found_h.data_ptr<bool>();
  int64_t misses = 0;
  for (int64_t i = 0; i < n; ++i) misses += !fp[i];
  if (misses == 0) return at::zeros({2}, at::kLong);

  // Sized for the worst case (every miss distinct), trimmed at the end.
  at::Tensor index = host_empty({2 + 3 * misses}, at::kLong, pinned);
  int64_t* ip = index.data_ptr<int64_t>();
  int64_t* positions = ip + 2;
  int64_t* inverse = ip + 2 + misses;
  int64_t* unique_keys = ip + 2 + 2 * misses;
  int64_t unique = 0;
  {
    MissDeduper dedup(misses);
    AT_DISPATCH_INDEX_TYPES(keys_h.scalar_type(), "collect_misses", [&] {
      const index_t* kp = keys_h.data_ptr<index_t>();
      int64_t j = 0;
      for (int64_t i = 0; i < n; ++i) {
        if (fp[i]) continue;
        const int64_t key = static_cast<int64_t>(kp[i]);  // int32 keys widen by sign extension
        const int64_t u = dedup.insert(key, unique);
        if (u == unique) unique_keys[unique++] = key;
        positions[j] = i;
        inverse[j] = u;
        ++j;
      }
    });
  }
  // Ascending keys, as the device planner gives them; or, for a cache of num_buckets buckets, ascending
  // (bucket, key), which lets the insert skip its sort (cache_insert_grouped).
  std::vector<int64_t> order(unique);
  std::iota(order.begin(), order.end(), int64_t{0});
  if (num_buckets > 0) {
    std::vector<int64_t> bucket(unique);
    for (int64_t u = 0; u < unique; ++u) bucket[u] = bucket_of(mix64(key_bits(unique_keys[u])), num_buckets);
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return bucket[a] != bucket[b] ? bucket[a] < bucket[b] : unique_keys[a] < unique_keys[b];
    });
  } else {
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return unique_keys[a] < unique_keys[b]; });
  }
  std::vector<int64_t> rank(unique), sorted(unique);
  for (int64_t r = 0; r < unique; ++r) {
    rank[order[r]] = r;
    sorted[r] = unique_keys[order[r]];
  }
  std::copy(sorted.begin(), sorted.end(), unique_keys);
  for (int64_t j = 0; j < misses; ++j) inverse[j] = rank[inverse[j]];
  ip[0] = misses;
  ip[1] = unique;
  return index.narrow(0, 0, 2 + 2 * misses + unique);
}

// Large batches on a GPU: compact_misses de-duplicates there (a sort: milliseconds where a host hash table over
// hundreds of thousands of misses takes a hundred), then the counts and the three valid prefixes come back.
at::Tensor plan_on_device(const at::Tensor& keys, const at::Tensor& found) {
  static auto compact = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("hps::compact_misses", "")
                            .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&,
                                                                                              const at::Tensor&)>();
  at::Tensor unique_keys, positions, inverse, counts;
  std::tie(unique_keys, positions, inverse, counts) = compact.call(keys, found);
  const at::Tensor counts_h = counts.to(at::kCPU);  // the sync
  const int64_t misses = counts_h.data_ptr<int64_t>()[0], unique = counts_h.data_ptr<int64_t>()[1];
  if (misses == 0) return at::zeros({2}, at::kLong);
  at::Tensor index = host_empty({2 + 2 * misses + unique}, at::kLong, /*pinned=*/true);
  index.narrow(0, 0, 2).copy_(counts_h);
  index.narrow(0, 2, misses).copy_(positions.narrow(0, 0, misses), /*non_blocking=*/true);
  index.narrow(0, 2 + misses, misses).copy_(inverse.narrow(0, 0, misses), /*non_blocking=*/true);
  index.narrow(0, 2 + 2 * misses, unique).copy_(unique_keys.narrow(0, 0, unique), /*non_blocking=*/false);
  return index;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t, int64_t, int64_t, bool> collect_misses(
    const at::Tensor& keys,                    // (n,) int32|int64, any device
    const at::Tensor& found,                   // (n,) bool, same device
    int64_t dim,                               // row length of the table
    int64_t source_handle,                     // HostHashMap.handle() of the table's host map, or -1 for none
    int64_t num_buckets) {                     // > 0: order the keys by bucket of a cache this size, if planned on host
  check_keys_found(keys, found);
  TORCH_CHECK_VALUE(dim >= 1, "collect_misses: dim must be >= 1, found ", dim);
  TORCH_CHECK_VALUE(num_buckets >= 0 && num_buckets < (int64_t{1} << 32),
                    "collect_misses: num_buckets must be in [0, 2^32), found ", num_buckets);
  const MapPtr source = source_handle >= 0 ? find_host_map(source_handle) : MapPtr();
  if (source) {
    TORCH_CHECK_VALUE(source->dim() == dim, "collect_misses: the source map holds rows of dim ", source->dim(),
                      ", the table has dim ", dim);
  }
  const int64_t n = keys.size(0);
  const bool pinned = keys.is_cuda();
  const bool on_device = keys.is_cuda() && n > kHostPlanMaxKeys;
  const at::Tensor index = on_device ? plan_on_device(keys, found) : plan_on_host(keys, found, num_buckets);
  const bool grouped = !on_device && num_buckets > 0;
  const int64_t* ip = index.data_ptr<int64_t>();
  const int64_t misses = ip[0], unique = ip[1];
  if (misses == 0) {
    return std::make_tuple(host_empty({0}, at::kLong, false), host_empty({0, dim}, at::kFloat, false),
                           host_empty({0}, at::kBool, false), index, int64_t{0}, int64_t{0}, int64_t{0}, grouped);
  }

  const at::Tensor ukeys = index.narrow(0, 2 + 2 * misses, unique);  // a view: CPU, contiguous
  at::Tensor rows = host_empty({unique, dim}, at::kFloat, pinned);
  at::Tensor in_source = host_empty({unique}, at::kBool, false);
  int64_t source_hits = 0;
  if (source) {
    source->fetch_into(ukeys, rows, in_source);
    const bool* sp = in_source.data_ptr<bool>();
    for (int64_t u = 0; u < unique; ++u) source_hits += sp[u];
  } else {
    rows.zero_();
    in_source.zero_();
  }
  return std::make_tuple(ukeys, rows, in_source, index, misses, unique, source_hits, grouped);
}

std::tuple<at::Tensor, at::Tensor> apply_misses(
    at::Tensor& out,          // (n, D) float32, any device: miss rows overwritten
    const at::Tensor& index,  // (2 + 2m + u,) int64 CPU, as collect_misses returns it
    const at::Tensor& rows) { // (u, D) float32 CPU
  HPS_CHECK_DTYPE(out, at::kFloat);
  HPS_CHECK_DTYPE(index, at::kLong);
  HPS_CHECK_DTYPE(rows, at::kFloat);
  TORCH_CHECK_VALUE(out.dim() == 2 && out.is_contiguous(), "apply_misses: out must be a contiguous 2-D tensor, found ",
                    out.sizes());
  TORCH_CHECK_VALUE(index.device().is_cpu() && rows.device().is_cpu(),
                    "apply_misses: index and rows must be CPU tensors (collect_misses' output), found ",
                    index.device(), " and ", rows.device());
  TORCH_CHECK_VALUE(index.dim() == 1 && index.size(0) >= 2, "apply_misses: index must be 1-D [misses, unique, ...]",
                    ", found shape ", index.sizes());
  const at::Tensor idx = index.contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  const int64_t misses = ip[0], unique = ip[1], n = out.size(0);
  TORCH_CHECK_VALUE(misses >= 0 && unique >= 0 && unique <= misses && index.size(0) == 2 + 2 * misses + unique,
                    "apply_misses: index holds ", index.size(0), " entries, ", 2 + 2 * misses + unique,
                    " expected for ", misses, " misses of ", unique, " keys");
  TORCH_CHECK_VALUE(rows.dim() == 2 && rows.size(0) == unique && rows.size(1) == out.size(1),
                    "apply_misses: rows must have shape (", unique, ", ", out.size(1), "), found ", rows.sizes());
  // Checked here, on the host, so that a bad plan writes nothing on any device.
  for (int64_t j = 0; j < misses; ++j) {
    TORCH_CHECK_VALUE(ip[2 + j] >= 0 && ip[2 + j] < n, "apply_misses: position ", ip[2 + j], " outside [0, ", n, ")");
    TORCH_CHECK_VALUE(ip[2 + misses + j] >= 0 && ip[2 + misses + j] < unique, "apply_misses: inverse ",
                      ip[2 + misses + j], " outside [0, ", unique, ")");
  }
  const at::Tensor idx_d = idx.to(out.device(), /*non_blocking=*/true);
  const at::Tensor rows_d = rows.contiguous().to(out.device(), /*non_blocking=*/true);
  const at::Tensor keys_d = idx_d.narrow(0, 2 + 2 * misses, unique);
  if (misses == 0) return {keys_d, rows_d};
  static auto scatter = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("hps::scatter_rows", "")
                            .typed<void(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const at::Tensor&)>();
  scatter.call(out, idx_d.narrow(0, 2, misses), idx_d.narrow(0, 2 + misses, misses), rows_d, idx_d.narrow(0, 0, 2));
  return {keys_d, rows_d};
}

// A small batch's whole cached lookup in one call, under the caller's write lock: find -> plan -> host-map fetch
// -> (if every distinct miss was in the map and the batch is below the async threshold) copy back, scatter and
// insert. What Python would do between these steps costs more on the GPU path than the steps themselves.
// `done` false: the plan is returned unapplied (the caller serves defaults for an async insert, or asks the lower
// tiers for what the map lacked, then applies it as after collect_misses).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t, int64_t, int64_t, bool, bool>
cache_lookup_host(at::Tensor& slot_keys, at::Tensor& digests, at::Tensor& scores, at::Tensor& values,
                  at::Tensor& clock,
                  const at::Tensor& keys,        // (n,) int32|int64 on the cache's device
                  int64_t policy,
                  int64_t source_handle,         // the table's host map, or -1
                  at::Tensor& counts,            // (4,) int64 insert counters, added to
                  double async_hit_rate) {       // a batch with at least this hit rate is left to the caller
  using FindFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, at::Tensor&,
                                                     const at::Tensor&, at::Tensor&, const at::Tensor&, int64_t);
  static auto find = c10::Dispatcher::singleton().findSchemaOrThrow("hps::cache_find", "").typed<FindFn>();
  using InsertFn = void(at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, at::Tensor&, int64_t);
  static auto insert =
      c10::Dispatcher::singleton().findSchemaOrThrow("hps::cache_insert_grouped", "").typed<InsertFn>();

  const int64_t n = keys.numel();
  // Before find, which touches scores and the clock: a refused call changes nothing.
  TORCH_CHECK_VALUE(!keys.is_cuda() || n <= kHostPlanMaxKeys, "cache_lookup_host: at most ", kHostPlanMaxKeys,
                    " keys per call on a GPU (larger batches go through collect_misses), found ", n);
  at::Tensor out, found;
  std::tie(out, found) = find.call(slot_keys, digests, scores, values, clock, keys, policy);
  const int64_t num_buckets = slot_keys.size(0) / kBucketSize;
  auto [ukeys, rows, in_source, index, misses, unique, source_hits, grouped] =
      collect_misses(keys, found, values.size(1), source_handle, num_buckets);
  const bool done = misses == 0 ||
                    (source_hits == unique && 1.0 - static_cast<double>(misses) / static_cast<double>(n) <
                                                  async_hit_rate);
  if (misses > 0 && done) {
    auto [keys_d, rows_d] = apply_misses(out, index, rows);
    insert.call(slot_keys, digests, scores, values, clock, keys_d, rows_d, counts, policy);
  }
  return std::make_tuple(out, ukeys, rows, in_source, index, misses, unique, source_hits, grouped, done);
}

}  // namespace

void register_miss_path_ops(torch::Library& m) {
  m.def(
      "cache_lookup_host(Tensor(a!) slot_keys, Tensor(b!) digests, Tensor(c!) scores, Tensor(d!) values, "
      "Tensor(e!) clock, Tensor keys, int policy, int source, Tensor(f!) counts, float async_hit_rate) -> "
      "(Tensor out, Tensor unique_keys, Tensor rows, Tensor in_source, Tensor index, int misses, int unique, "
      "int source_hits, bool grouped, bool done)",
      &cache_lookup_host);
  m.def(
      "collect_misses(Tensor keys, Tensor found, int dim, int source, int num_buckets=0) -> "
      "(Tensor unique_keys, Tensor rows, Tensor in_source, Tensor index, int misses, int unique, int source_hits, "
      "bool grouped)",
      &collect_misses);
  m.def("apply_misses(Tensor(a!) out, Tensor index, Tensor rows) -> (Tensor unique_keys, Tensor rows)",
        &apply_misses);
}

}  // namespace hps
