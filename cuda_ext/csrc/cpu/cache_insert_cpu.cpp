// CPU twins of cache_insert_or_assign and cache_assign (hps_ops.cpp contract).
//
// insert_or_assign: the contract is "keys applied in input order, one at a time". Buckets never interact, so the
// keys are grouped by bucket (stable: input order kept inside a bucket) and each bucket's keys are walked in order
// by one thread, with a 32-bit mask of the slots this call has written (never evicted, refused when full). Buckets
// run in parallel; the result equals the sequential one exactly. This is also the CUDA twin's decomposition.
//
// assign: slots are resolved in parallel (read-only probes), then rows are copied in input order so the last
// duplicate of a key wins.
//
// Rows are stored rows (cache_state.h): new_values already hold the cache's storage, so both ops copy
// stored_row_bytes per row and never re-encode.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <utility>
#include <vector>

#include "cpu/cache_cpu_common.h"

namespace hps {
namespace {

enum Count { kInserted = 0, kAssigned = 1, kEvicted = 2, kRefused = 3 };

// Hash every key (widened to int64) in parallel.
std::vector<cpu::KeyHash> hash_all(const at::Tensor& keys, int64_t num_buckets) {
  const int64_t n = keys.size(0);
  std::vector<cpu::KeyHash> hk(static_cast<size_t>(n));
  AT_DISPATCH_INDEX_TYPES(keys.scalar_type(), "cache_hash_cpu", [&] {
    const index_t* kp = keys.data_ptr<index_t>();
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) hk[i] = cpu::hash_key(static_cast<int64_t>(kp[i]), num_buckets);
    });
  });
  return hk;
}

// The insert itself, for checked arguments and the keys' hashes `hk` (hash_all). Returns the counts.
// With a sketch (admission, LFU only): a key that must evict is refused unless its estimate beats the victim's
// score, and an inserted key starts at max(estimate, 1) (cache_layout.h).
at::Tensor insert_hashed(at::Tensor& slot_keys, at::Tensor& digests, at::Tensor& scores, at::Tensor& values,
                         const at::Tensor& clock, const at::Tensor& keys, const at::Tensor& new_values,
                         int64_t policy, const std::vector<cpu::KeyHash>& hk, const at::Tensor* sketch) {
  at::Tensor counts = at::zeros({4}, slot_keys.options());  // [inserted, assigned, evicted, refused]
  const int64_t n = keys.size(0);
  if (n == 0) return counts;
  // (bucket base, input index), sorted: groups each bucket's keys, in input order inside the group.
  std::vector<std::pair<int64_t, int64_t>> order(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) order[i] = {hk[i].base, i};
  std::sort(order.begin(), order.end());
  std::vector<int64_t> group_start;  // index into `order` of each bucket group's first key, plus n
  for (int64_t i = 0; i < n; ++i) {
    if (i == 0 || order[i].first != order[i - 1].first) group_start.push_back(i);
  }
  group_start.push_back(n);
  const int64_t num_groups = static_cast<int64_t>(group_start.size()) - 1;

  const int32_t new_score = policy == kPolicyLRU ? cpu::score_from_clock(clock.data_ptr<int64_t>()[0]) : 1;
  const size_t row_bytes = static_cast<size_t>(stored_row_bytes_of(values));
  int64_t* sk = slot_keys.data_ptr<int64_t>();
  uint8_t* dg = digests.data_ptr<uint8_t>();
  int32_t* sc = scores.data_ptr<int32_t>();
  uint8_t* val = static_cast<uint8_t*>(values.data_ptr());
  const uint8_t* nv = static_cast<const uint8_t*>(new_values.data_ptr());
  const int32_t* sketch_p = sketch != nullptr ? sketch->data_ptr<int32_t>() : nullptr;
  const int64_t width = sketch != nullptr ? sketch->size(0) / kSketchDepth : 0;
  std::atomic<int64_t> total[4] = {{0}, {0}, {0}, {0}};

  // Tasks of about kInsertGrainKeys keys: a small insert (a lookup's misses) stays on the calling thread. A
  // parallel region waits for its slowest thread, and on a busy machine one of them is often descheduled (measured on
  // 2 cores with one unrelated busy process: a 1,024-key lookup's p99 went from 0.77 ms to 8.4 ms when its ~150
  // misses were inserted by two threads).
  constexpr int64_t kInsertGrainKeys = 2048;
  const int64_t grain = std::max<int64_t>(16, num_groups * kInsertGrainKeys / std::max<int64_t>(n, 1));
  at::parallel_for(0, num_groups, grain, [&](int64_t g_begin, int64_t g_end) {
    int64_t local[4] = {0, 0, 0, 0};
    for (int64_t g = g_begin; g < g_end; ++g) {
      uint32_t written = 0;  // bit j: slot base + j was inserted or assigned by this call
      for (int64_t o = group_start[g]; o < group_start[g + 1]; ++o) {
        const int64_t i = order[o].second;
        const cpu::KeyHash& k = hk[i];
        int64_t s = cpu::probe(sk, dg, k);
        if (s >= 0) {  // present (before this call or inserted earlier in it): assign, score untouched
          std::memcpy(val + s * row_bytes, nv + i * row_bytes, row_bytes);
          written |= uint32_t(1) << (s - k.base);
          ++local[kAssigned];
          continue;
        }
        for (int64_t j = 0; j < kBucketSize; ++j) {  // lowest free slot
          if (dg[k.base + j] == kEmptyDigest) {
            s = k.base + j;
            break;
          }
        }
        const int32_t estimate = sketch_p != nullptr ? cpu::sketch_estimate(sketch_p, width, mix64(key_bits(k.key))) : 0;
        if (s < 0) {  // full: lowest score among slots not written by this call, ties to the lowest index
          for (int64_t j = 0; j < kBucketSize; ++j) {
            if ((written >> j) & 1u) continue;
            if (s < 0 || sc[k.base + j] < sc[s]) s = k.base + j;
          }
          if (s < 0 || (sketch_p != nullptr && estimate <= sc[s])) {  // no victim, or not admitted
            ++local[kRefused];
            continue;
          }
          ++local[kEvicted];
        }
        sk[s] = k.key;
        dg[s] = k.digest;
        sc[s] = sketch_p != nullptr && estimate > new_score ? estimate : new_score;
        std::memcpy(val + s * row_bytes, nv + i * row_bytes, row_bytes);
        written |= uint32_t(1) << (s - k.base);
        ++local[kInserted];
      }
    }
    for (int c = 0; c < 4; ++c) total[c].fetch_add(local[c], std::memory_order_relaxed);
  });
  int64_t* cp = counts.data_ptr<int64_t>();
  for (int c = 0; c < 4; ++c) cp[c] = total[c].load();
  return counts;
}

at::Tensor cache_insert_or_assign_cpu(at::Tensor& slot_keys,          // (S,) int64
                                      at::Tensor& digests,            // (S,) uint8
                                      at::Tensor& scores,             // (S,) int32
                                      at::Tensor& values,             // (S, W) stored rows
                                      const at::Tensor& clock,        // (1,) int64, read only
                                      const at::Tensor& keys,         // (n,) int32|int64
                                      const at::Tensor& new_values,   // (n, W) stored rows, values' dtype
                                      int64_t policy,
                                      const std::optional<at::Tensor>& sketch) {  // admission, or none
  const int64_t num_buckets = cpu::check_cpu_state(slot_keys, digests, scores, values, clock);
  check_policy(policy);
  check_query_keys(keys, slot_keys);
  check_new_values(new_values, keys, values);
  check_admission(sketch, slot_keys, policy);
  return insert_hashed(slot_keys, digests, scores, values, clock, keys, new_values, policy,
                       hash_all(keys, num_buckets), sketch ? &*sketch : nullptr);
}

at::Tensor cache_assign_cpu(const at::Tensor& slot_keys,   // (S,) int64
                            const at::Tensor& digests,     // (S,) uint8
                            at::Tensor& values,            // (S, W) stored rows
                            const at::Tensor& keys,        // (n,) int32|int64
                            const at::Tensor& new_values)  // (n, W) stored rows, values' dtype
{
  const int64_t num_buckets = cpu::check_cpu_keys_digests(slot_keys, digests);
  check_values(values, slot_keys);
  check_query_keys(keys, slot_keys);
  check_new_values(new_values, keys, values);
  at::Tensor count = at::zeros({}, slot_keys.options());  // 0-d: keys (occurrences) that were present
  const int64_t n = keys.size(0);
  if (n == 0) return count;

  const std::vector<cpu::KeyHash> hk = hash_all(keys, num_buckets);
  const int64_t* sk = slot_keys.data_ptr<int64_t>();
  const uint8_t* dg = digests.data_ptr<uint8_t>();
  std::vector<int64_t> slot(static_cast<size_t>(n));
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) slot[i] = cpu::probe(sk, dg, hk[i]);
  });
  const size_t row_bytes = static_cast<size_t>(stored_row_bytes_of(values));
  uint8_t* val = static_cast<uint8_t*>(values.data_ptr());
  const uint8_t* nv = static_cast<const uint8_t*>(new_values.data_ptr());
  int64_t assigned = 0;
  for (int64_t i = 0; i < n; ++i) {  // input order: the last duplicate's row is the one left
    if (slot[i] < 0) continue;
    std::memcpy(val + slot[i] * row_bytes, nv + i * row_bytes, row_bytes);
    ++assigned;
  }
  count.fill_(assigned);
  return count;
}

// The grouping is checked (an error before anything is written), then the insert is the ordinary one: on the CPU
// the grouping saves nothing, it only has to give the same result as the CUDA twin.
void cache_insert_grouped_cpu(at::Tensor& slot_keys, at::Tensor& digests, at::Tensor& scores, at::Tensor& values,
                              const at::Tensor& clock, const at::Tensor& keys, const at::Tensor& new_values,
                              at::Tensor& counts, int64_t policy, const std::optional<at::Tensor>& sketch) {
  const int64_t num_buckets = cpu::check_cpu_state(slot_keys, digests, scores, values, clock);
  check_policy(policy);
  check_query_keys(keys, slot_keys);
  check_new_values(new_values, keys, values);
  check_admission(sketch, slot_keys, policy);
  HPS_CHECK_DTYPE(counts, at::kLong);
  TORCH_CHECK_VALUE(counts.dim() == 1 && counts.size(0) == 4, "counts must be a (4,) tensor, found shape ",
                    counts.sizes());
  HPS_CHECK_SAME_DEVICE(counts, slot_keys);
  const std::vector<cpu::KeyHash> hk = hash_all(keys, num_buckets);
  for (size_t i = 1; i < hk.size(); ++i) {
    TORCH_CHECK_VALUE(hk[i].base >= hk[i - 1].base, "cache_insert_grouped: keys must come in non-decreasing bucket "
                      "order; key ", i, " is in bucket ", hk[i].base / kBucketSize, " after a key of bucket ",
                      hk[i - 1].base / kBucketSize);
  }
  counts.add_(insert_hashed(slot_keys, digests, scores, values, clock, keys, new_values, policy, hk,
                            sketch ? &*sketch : nullptr));
}

}  // namespace

TORCH_LIBRARY_IMPL(hps, CPU, m) {
  m.impl("cache_insert_grouped", &cache_insert_grouped_cpu);
  m.impl("cache_insert_or_assign", &cache_insert_or_assign_cpu);
  m.impl("cache_assign", &cache_assign_cpu);
}

}  // namespace hps
