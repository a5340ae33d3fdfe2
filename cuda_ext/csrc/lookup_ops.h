// The find ops (cache_find_misses, resident_find) from their tensors, shared by the CPU and CUDA entry points:
// argument checks (the entry point adds "on my device"), the FindArgs, and the op's outputs around one launch.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "cache_state.h"
#include "lookup_layout.h"
#include "resident_index.h"
#include "stored_rows.h"

namespace hps {

using FindOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline void check_find_keys(const at::Tensor& keys, const at::Tensor& table) {
  check_query_keys(keys, table);
  TORCH_CHECK_VALUE(keys.size(0) < (int64_t{1} << 31), "keys: at most 2^31 - 1 per call, found ", keys.size(0));
}

// The dynamic cache's state into a FindArgs, ApplyArgs or InsertSortedArgs (the same fields in each).
template <typename Args>
void set_cache_state(Args& a, const at::Tensor& slot_keys, const at::Tensor& digests, const at::Tensor& scores,
                     const at::Tensor& values, const at::Tensor& clock) {
  a.slot_keys = slot_keys.data_ptr<int64_t>();
  a.digests = digests.data_ptr<uint8_t>();
  a.scores = scores.data_ptr<int32_t>();
  a.values = values.data_ptr();
  a.clock = clock.data_ptr<int64_t>();
  a.num_buckets = slot_keys.size(0) / kBucketSize;
  a.storage = storage_of(values, "values");
}

// Checked cache state -> FindArgs (and the mode of its policy).
inline FindArgs cache_find_args(const at::Tensor& slot_keys, const at::Tensor& digests, at::Tensor& scores,
                                const at::Tensor& values, at::Tensor& clock, const at::Tensor& keys, int64_t policy,
                                double default_value) {
  check_cache_state(slot_keys, digests, scores, values, clock);
  check_policy(policy);
  check_find_keys(keys, slot_keys);
  FindArgs a;
  set_cache_state(a, slot_keys, digests, scores, values, clock);
  a.dim = dim_of_width(a.storage, values.size(1));
  a.default_value = static_cast<float>(default_value);
  return a;
}

// Checked resident index and rows -> FindArgs.
inline FindArgs resident_find_args(const at::Tensor& index_keys, const at::Tensor& index_digests,
                                   const at::Tensor& index_rows, const at::Tensor& index_spill, const at::Tensor& rows,
                                   const at::Tensor& keys, double default_value) {
  const int64_t num_buckets = check_resident_index(index_keys, index_digests, index_rows, index_spill, rows);
  check_find_keys(keys, index_keys);
  FindArgs a;
  a.slot_keys = index_keys.data_ptr<int64_t>();
  a.digests = index_digests.data_ptr<uint8_t>();
  a.slot_rows = index_rows.data_ptr<int32_t>();
  a.spill = index_spill.data_ptr<uint8_t>();
  a.values = rows.data_ptr();
  a.num_buckets = num_buckets;
  a.storage = storage_of(rows, "rows");
  a.dim = dim_of_width(a.storage, rows.size(1));
  a.default_value = static_cast<float>(default_value);
  return a;
}

// The op's outputs around launch(a): out (n, D) on the keys' device (never where host-mapped rows are), miss
// positions (n,) int32 and keys (n,) int64 (zeros past the count), the count (0-d int64, read from a fresh control
// block on the device: no host sync).
template <typename Launch>
FindOutputs run_find_op(FindArgs& a, const at::Tensor& keys, const Launch& launch) {
  const int64_t n = keys.size(0);
  at::Tensor out = at::empty({n, a.dim}, keys.options().dtype(at::kFloat));
  at::Tensor miss_pos = at::zeros({n}, keys.options().dtype(at::kInt));
  at::Tensor miss_keys = at::zeros({n}, keys.options().dtype(at::kLong));
  at::Tensor ctrl = at::zeros({kCtrlSize}, keys.options().dtype(at::kLong));
  if (n > 0) {
    a.keys = keys.data_ptr();
    a.key_is_int64 = keys.scalar_type() == at::kLong;
    a.n = n;
    a.out = out.data_ptr<float>();
    a.miss_pos = miss_pos.data_ptr<int32_t>();
    a.miss_keys = miss_keys.data_ptr<int64_t>();
    a.ctrl = ctrl.data_ptr<int64_t>();
    launch(a);
  }
  return {out, miss_pos, miss_keys, ctrl.select(0, kCtrlMisses).clone()};
}

}  // namespace hps
