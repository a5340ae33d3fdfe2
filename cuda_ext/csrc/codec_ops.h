// The row codec ops (encode_rows, decode_rows) from their tensors, shared by the CPU and CUDA entry points:
// argument checks, output allocation, and the output element's rounding.
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

inline int32_t out_dtype_code(const std::optional<at::ScalarType>& dtype) {
  return out_dtype_of(dtype.value_or(at::kFloat));
}

// A decoded float32 element as the output's element (float32, or bfloat16 / float16 bits rounded to nearest even).
template <int32_t O>
HPS_HD void put_out(void* out, int64_t i, float v) {
  if constexpr (O == kOutFloat32) {
    static_cast<float*>(out)[i] = v;
  } else if constexpr (O == kOutBFloat16) {
    static_cast<uint16_t*>(out)[i] = f32_to_bf16_bits(v);
  } else {
    static_cast<uint16_t*>(out)[i] = f32_to_f16_bits(v);
  }
}

// Calls f(std::integral_constant<int32_t, O>{}) for the output dtype code.
template <typename F>
inline void with_out_code(int32_t o, F&& f) {
  switch (o) {
    case kOutBFloat16:
      return f(std::integral_constant<int32_t, kOutBFloat16>{});
    case kOutFloat16:
      return f(std::integral_constant<int32_t, kOutFloat16>{});
    default:
      return f(std::integral_constant<int32_t, kOutFloat32>{});
  }
}

}  // namespace hps
