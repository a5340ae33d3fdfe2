// The row codec ops (encode_rows, decode_rows) from their tensors, shared by the CPU and CUDA entry points:
// argument checks and output allocation.
#pragma once

#include <optional>

#include <ATen/ATen.h>

#include "stored_rows.h"

namespace hps {

// float32 rows (n, D) -> the empty stored tensor (n, stored_width) they encode into; raises on bad arguments.
inline at::Tensor encoded_output(const at::Tensor& rows, int64_t storage) {
  check_storage_code(storage);
  HPS_CHECK_DTYPE(rows, at::kFloat);
  HPS_CHECK_DIM(rows, 2);
  HPS_CHECK_CONTIGUOUS(rows);
  const int32_t s = static_cast<int32_t>(storage);
  check_storage_dim(s, rows.size(1));
  return at::empty({rows.size(0), stored_width(s, rows.size(1))}, rows.options().dtype(storage_dtype(s)));
}

// Stored rows (n, W) -> the empty (n, D) output they decode into (float32, or bfloat16 / float16 when asked).
inline at::Tensor decoded_output(const at::Tensor& stored, const std::optional<at::ScalarType>& dtype) {
  const int64_t dim = check_stored(stored, "stored");
  const at::ScalarType out_type = dtype.value_or(at::kFloat);
  out_dtype_of(out_type);  // raises for a dtype a decode cannot write
  return at::empty({stored.size(0), dim}, stored.options().dtype(out_type));
}

}  // namespace hps
