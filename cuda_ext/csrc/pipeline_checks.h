// Argument checks of the lookup-pipeline ops, shared by the CPU and CUDA entry points (which check "on my device"
// first). Data-dependent checks (index ranges, offsets order) stay with the CPU twins: on CUDA they would need a
// host sync.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "checks.h"

namespace hps {

// compact_misses: keys (n,) int32|int64, found (n,) bool, one device.
inline void check_keys_found(const at::Tensor& keys, const at::Tensor& found) {
  HPS_CHECK_KEY_DTYPE(keys);
  HPS_CHECK_DIM(keys, 1);
  HPS_CHECK_DTYPE(found, at::kBool);
  HPS_CHECK_DIM(found, 1);
  HPS_CHECK_SAME_DEVICE(found, keys);
  TORCH_CHECK_VALUE(found.size(0) == keys.size(0), "found must have shape (", keys.size(0), ",), found ",
                    found.sizes());
}

// scatter_rows: out (n, D) float32 contiguous, positions/inverse (cap,) int64, rows (u, D) float32, counts (2,).
inline void check_scatter_rows_args(const at::Tensor& out, const at::Tensor& positions, const at::Tensor& inverse,
                                    const at::Tensor& rows, const at::Tensor& counts) {
  HPS_CHECK_DTYPE(out, at::kFloat);
  HPS_CHECK_DIM(out, 2);
  HPS_CHECK_CONTIGUOUS(out);
  HPS_CHECK_DTYPE(rows, at::kFloat);
  HPS_CHECK_DIM(rows, 2);
  HPS_CHECK_DTYPE(positions, at::kLong);
  HPS_CHECK_DIM(positions, 1);
  HPS_CHECK_DTYPE(inverse, at::kLong);
  HPS_CHECK_DIM(inverse, 1);
  HPS_CHECK_DTYPE(counts, at::kLong);
  for (const at::Tensor* t : {&positions, &inverse, &rows, &counts}) HPS_CHECK_SAME_DEVICE(*t, out);
  TORCH_CHECK_VALUE(counts.dim() == 1 && counts.size(0) == 2, "counts must have shape (2,), found ", counts.sizes());
  TORCH_CHECK_VALUE(inverse.size(0) == positions.size(0), "inverse must have shape (", positions.size(0),
                    ",) like positions, found ", inverse.sizes());
  TORCH_CHECK_VALUE(rows.size(1) == out.size(1), "rows dim must equal out dim ", out.size(1), ", found ",
                    rows.size(1));
}

// bag_reduce: values (n, D) float32, offsets (B + 1,) int64, weights (n,) float32 or None, mode 0-2.
// Returns whether weights were given.
inline bool check_bag_reduce_args(const at::Tensor& values, const at::Tensor& offsets,
                                  const std::optional<at::Tensor>& weights_opt, int64_t mode) {
  HPS_CHECK_DTYPE(values, at::kFloat);
  HPS_CHECK_DIM(values, 2);
  HPS_CHECK_DTYPE(offsets, at::kLong);
  HPS_CHECK_DIM(offsets, 1);
  HPS_CHECK_SAME_DEVICE(offsets, values);
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 2, "mode must be 0 (sum), 1 (mean) or 2 (sqrtn), found ", mode);
  TORCH_CHECK_VALUE(offsets.size(0) >= 1, "offsets must have B + 1 >= 1 entries, found shape ", offsets.sizes());
  const bool has_w = weights_opt.has_value() && weights_opt->defined();
  if (has_w) {
    const at::Tensor& weights = *weights_opt;
    HPS_CHECK_DTYPE(weights, at::kFloat);
    HPS_CHECK_DIM(weights, 1);
    HPS_CHECK_SAME_DEVICE(weights, values);
    TORCH_CHECK_VALUE(weights.size(0) == values.size(0), "weights must have shape (", values.size(0), ",), found ",
                      weights.sizes());
  }
  return has_w;
}

}  // namespace hps
