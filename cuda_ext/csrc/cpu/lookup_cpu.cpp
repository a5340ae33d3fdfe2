// The lookup pipeline's CPU kernels (twins of cuda/lookup_cuda.cu, identical results) and the CPU ops that expose
// them: cache_find_misses, resident_find, resident_index_build.
//
// find: at::parallel_for over the keys; each task runs cache_find_cpu.cpp's software pipeline - hash and prefetch
// the digests; compare them and prefetch the candidate's key, row and score (a resident table: its row id, and one
// stage later its row); confirm and copy - probing the cache's bucket or the resident index's primary bucket (its
// secondary one, rarely, when the primary is marked spilled). A miss gets the default row; each task collects its
// misses and appends them with one atomic reservation at its end. Counters and the host flag are written after the
// join, as the CUDA last block does.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/cache_cpu_common.h"
#include "cpu/lookup_cpu.h"
#include "cpu/row_copy.h"
#include "cpu/stored_row_copy.h"
#include "lookup_ops.h"
#include "resident_index.h"

namespace hps {
namespace cpu {
namespace {

constexpr int64_t kAhead = kFindAhead;
constexpr int64_t kRing = kFindRing;
constexpr int64_t kGrain = kFindGrain;

struct Pending {
  int64_t key;
  uint64_t hash;
  int64_t base;
  uint32_t mask;
  uint8_t digest;
};

template <typename key_t, int kMode, int32_t S, typename OutT>
void find_impl(const FindArgs& a) {
  const key_t* kp = static_cast<const key_t*>(a.keys);
  const int64_t n = a.n, dim = a.dim, num_buckets = a.num_buckets;
  const int64_t* sk = a.slot_keys;
  const uint8_t* dg = a.digests;
  const uint8_t* val = static_cast<const uint8_t*>(a.values);
  OutT* o = static_cast<OutT*>(a.out);
  const size_t row_bytes = static_cast<size_t>(stored_row_bytes(S, dim));
  const bool streaming = std::is_same<OutT, float>::value && use_streaming_stores(static_cast<const float*>(a.out), n, dim);
  // The clock is bumped after the find (as the CUDA last block does); hits get the bumped value.
  const int32_t lru_score = kMode == kFindCacheLRU ? score_from_clock(a.clock[0] + 1) : 0;
  int64_t* miss_count = a.ctrl + kCtrlMissCount;
  // Keys between the first stage and the copy: two stages for the cache (its rows are addressed by slot), three
  // for a resident table (slot -> row id -> row).
  constexpr int64_t kLag = kMode == kFindResident ? 3 * kAhead : 2 * kAhead;
  static_assert(kRing > kLag, "the ring holds every key in flight");

  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    // This task's misses, appended to the shared list at its end (kept per thread: no allocation per call).
    static thread_local std::vector<int32_t> my_pos;
    static thread_local std::vector<int64_t> my_keys;
    my_pos.clear();
    my_keys.clear();
    Pending ring[kRing];
    for (int64_t i = begin; i < end + kLag; ++i) {
      if (i < end) {
        Pending& p = ring[i & (kRing - 1)];
        p.key = static_cast<int64_t>(kp[i]);
        p.hash = mix64(key_bits(p.key));
        p.base = bucket_of(p.hash, num_buckets) * kBucketSize;
        p.digest = digest_of(p.hash);
        __builtin_prefetch(dg + p.base, 0, 3);
      }
      const int64_t j = i - kAhead;
      if (j >= begin && j < end) {
        Pending& p = ring[j & (kRing - 1)];
        p.mask = digest_mask(dg + p.base, p.digest);
        if (p.mask != 0) {
          const int64_t s = p.base + __builtin_ctz(p.mask);
          __builtin_prefetch(sk + s, 0, 3);
          if (kMode == kFindResident) {
            __builtin_prefetch(a.slot_rows + s, 0, 3);
          } else {
            const uint8_t* row = val + s * static_cast<int64_t>(row_bytes);
            for (size_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(row + off, 0, 3);
            __builtin_prefetch(row + row_bytes - 1, 0, 3);
            __builtin_prefetch(a.scores + s, 1, 3);
          }
        }
      }
      if (kMode == kFindResident) {
        // The resident table's extra stage (key i - 2 kAhead): the candidate's row id has arrived; prefetch its row.
        const int64_t r = i - 2 * kAhead;
        if (r >= begin && r < end) {
          const Pending& p = ring[r & (kRing - 1)];
          if (p.mask != 0) {
            const uint8_t* row =
                val + static_cast<int64_t>(a.slot_rows[p.base + __builtin_ctz(p.mask)]) * static_cast<int64_t>(row_bytes);
            for (size_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(row + off, 0, 3);
          }
        }
      }
      const int64_t m = i - kLag;
      if (m < begin) continue;
      const Pending& p = ring[m & (kRing - 1)];
      int64_t s = confirm(sk, p.base, p.mask, p.key);
      if (kMode == kFindResident && s < 0) {
        const int64_t b1 = p.base / kBucketSize;
        if (a.spill[b1]) {
          const int64_t base2 = secondary_bucket_of(p.hash, num_buckets, b1) * kBucketSize;
          s = confirm(sk, base2, digest_mask(dg + base2, p.digest), p.key);
        }
      }
      OutT* dst = o + m * dim;
      if (s < 0) {
        fill_row(dst, a.default_value, dim);
        my_pos.push_back(static_cast<int32_t>(m));
        my_keys.push_back(p.key);
        continue;
      }
      if (kMode == kFindResident) {
        decode_row<S>(dst, val + static_cast<int64_t>(a.slot_rows[s]) * static_cast<int64_t>(row_bytes), dim,
                      streaming);
      } else {
        decode_row<S>(dst, val + s * static_cast<int64_t>(row_bytes), dim, streaming);
        if (kMode == kFindCacheLRU) {
          __atomic_store_n(a.scores + s, lru_score, __ATOMIC_RELAXED);
        } else {
          lfu_bump_atomic(a.scores + s);
        }
      }
    }
    if (streaming) streaming_fence();
    if (!my_pos.empty()) {
      const int64_t k = static_cast<int64_t>(my_pos.size());
      const int64_t first = __atomic_fetch_add(miss_count, k, __ATOMIC_RELAXED);
      if (a.miss_pos != nullptr) {
        std::memcpy(a.miss_pos + first, my_pos.data(), k * sizeof(int32_t));
        std::memcpy(a.miss_keys + first, my_keys.data(), k * sizeof(int64_t));
      }
    }
  });
  const int64_t misses = a.ctrl[kCtrlMissCount];
  a.ctrl[kCtrlMissCount] = 0;
  a.ctrl[kCtrlLookups] += 1;
  a.ctrl[kCtrlKeys] += n;
  a.ctrl[kCtrlMisses] += misses;
  if (kMode != kFindResident) a.clock[0] += 1;
  if (a.host_flag != nullptr) {
    a.host_flag[kFlagMisses] = misses;
    a.host_flag[kFlagSeq] = a.seq;
  }
}

template <typename key_t, int32_t S, typename OutT>
void find_mode(const FindArgs& a, FindMode mode) {
  switch (mode) {
    case kFindCacheLRU:
      return find_impl<key_t, kFindCacheLRU, S, OutT>(a);
    case kFindCacheLFU:
      return find_impl<key_t, kFindCacheLFU, S, OutT>(a);
    default:
      return find_impl<key_t, kFindResident, S, OutT>(a);
  }
}

}  // namespace

void find(const FindArgs& a, FindMode mode) {
  with_storage(a.storage, [&](auto st) {
    constexpr int32_t S = decltype(st)::value;
    with_out_type(a.out_dtype, [&](auto t) {
      using OutT = decltype(t);
      if (a.key_is_int64) {
        find_mode<int64_t, S, OutT>(a, mode);
      } else {
        find_mode<int32_t, S, OutT>(a, mode);
      }
    });
  });
}

void apply(const ApplyArgs& a) {
  const int64_t dim = a.dim;
  const int64_t row_bytes = stored_row_bytes(a.storage, dim);
  const uint8_t* rows = static_cast<const uint8_t*>(a.rows);
  with_storage(a.storage, [&](auto st) {
    constexpr int32_t S = decltype(st)::value;
    with_out_type(a.out_dtype, [&](auto t) {
      using OutT = decltype(t);
      OutT* out = static_cast<OutT*>(a.out);
      at::parallel_for(0, a.m, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) {
          decode_row<S>(out + static_cast<int64_t>(a.pos[j]) * dim, rows + static_cast<int64_t>(a.inv[j]) * row_bytes,
                        dim, /*streaming=*/false);
        }
      });
    });
  });
  if (a.ukeys != nullptr && a.u > 0) {
    using InsertFn = void(at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, at::Tensor&, int64_t, const std::optional<at::Tensor>&);
    static auto insert =
        c10::Dispatcher::singleton().findSchemaOrThrow("hps::cache_insert_grouped", "").typed<InsertFn>();
    const int64_t slots = a.num_buckets * kBucketSize;
    const int64_t width = stored_width(a.storage, dim);
    const at::ScalarType stored = storage_dtype(a.storage);
    at::Tensor slot_keys = at::from_blob(a.slot_keys, {slots}, at::kLong);
    at::Tensor digests = at::from_blob(a.digests, {slots}, at::kByte);
    at::Tensor scores = at::from_blob(a.scores, {slots}, at::kInt);
    at::Tensor values = at::from_blob(a.values, {slots, width}, stored);
    at::Tensor clock = at::from_blob(const_cast<int64_t*>(a.clock), {1}, at::kLong);
    at::Tensor keys = at::from_blob(const_cast<int64_t*>(a.ukeys), {a.u}, at::kLong);
    at::Tensor new_rows = at::from_blob(const_cast<uint8_t*>(rows), {a.u, width}, stored);
    at::Tensor counts = at::from_blob(a.counts, {4}, at::kLong);
    std::optional<at::Tensor> sketch;
    if (a.sketch != nullptr) {
      sketch = at::from_blob(const_cast<int32_t*>(a.sketch), {kSketchDepth * a.sketch_width}, at::kInt);
    }
    insert.call(slot_keys, digests, scores, values, clock, keys, new_rows, counts, a.lru ? kPolicyLRU : kPolicyLFU,
                sketch);
  }
  if (a.row_ids != nullptr) {
    uint8_t* table = static_cast<uint8_t*>(a.table_rows);
    for (int64_t k = 0; k < a.u; ++k) {
      if (a.row_ids[k] >= 0) {
        std::memcpy(table + static_cast<int64_t>(a.row_ids[k]) * row_bytes, rows + k * row_bytes, row_bytes);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------- ops

namespace {

FindOutputs cache_find_misses_cpu(const at::Tensor& slot_keys, const at::Tensor& digests, at::Tensor& scores,
                                  const at::Tensor& values, at::Tensor& clock, const at::Tensor& keys, int64_t policy,
                                  double default_value) {
  HPS_CHECK_CPU(slot_keys);
  FindArgs a = cache_find_args(slot_keys, digests, scores, values, clock, keys, policy, default_value);
  const FindMode mode = policy == kPolicyLRU ? kFindCacheLRU : kFindCacheLFU;
  return run_find_op(a, keys, [&](const FindArgs& args) { find(args, mode); });
}

FindOutputs resident_find_cpu(const at::Tensor& index_keys, const at::Tensor& index_digests,
                              const at::Tensor& index_rows, const at::Tensor& index_spill, const at::Tensor& rows,
                              const at::Tensor& keys, double default_value) {
  HPS_CHECK_CPU(index_keys);
  FindArgs a = resident_find_args(index_keys, index_digests, index_rows, index_spill, rows, keys, default_value);
  return run_find_op(a, keys, [&](const FindArgs& args) { find(args, kFindResident); });
}

// keys (N,) int64 CPU -> the resident index of row i = keys[i] (a later duplicate's row wins), as CPU tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> resident_index_build(const at::Tensor& keys_in) {
  HPS_CHECK_CPU(keys_in);
  HPS_CHECK_DTYPE(keys_in, at::kLong);
  HPS_CHECK_DIM(keys_in, 1);
  TORCH_CHECK_VALUE(keys_in.size(0) < (int64_t{1} << 31), "keys: at most 2^31 - 1 rows, found ", keys_in.size(0));
  const at::Tensor keys = keys_in.contiguous();
  ResidentIndex index(keys.size(0));
  const int64_t* kp = keys.data_ptr<int64_t>();
  for (int64_t i = 0; i < keys.size(0); ++i) index.put(kp[i], static_cast<int32_t>(i), nullptr, nullptr);
  return {index.keys_tensor().clone(), index.digests_tensor().clone(), index.rows_tensor().clone(),
          index.spill_tensor().clone()};
}

}  // namespace

TORCH_LIBRARY_IMPL(hps, CPU, m) {
  m.impl("cache_find_misses", &cache_find_misses_cpu);
  m.impl("resident_find", &resident_find_cpu);
  m.impl("resident_index_build", &resident_index_build);
}

}  // namespace cpu
}  // namespace hps
