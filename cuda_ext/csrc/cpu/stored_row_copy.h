// Moving stored rows (row_codec.h) on the CPU, shared by the cache ops and the lookup pipeline's kernels (twins of
// cuda/stored_row_copy.cuh): decode one stored row into a float32 / bfloat16 / float16 output row, fill the
// default row. Stored rows move between tables as they are (memcpy of stored_row_bytes).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

#include "cpu/row_copy.h"
#include "lookup_layout.h"
#include "row_codec.h"

namespace hps {
namespace cpu {

// Calls f(OutT{}) for the output dtype (lookup_layout.h OutDtype).
template <typename F>
void with_out_type(int32_t out_dtype, F&& f) {
  switch (out_dtype) {
    case kOutBFloat16:
      return f(c10::BFloat16{});
    case kOutFloat16:
      return f(c10::Half{});
    default:
      return f(float{});
  }
}

// Output rows: float32, or rounded to nearest even into bfloat16 / float16 (c10's conversions - the CUDA twin's
// __float2bfloat16_rn / __float2half_rn give the same bits).
template <typename OutT>
void fill_row(OutT* dst, float value, int64_t dim) {
  std::fill(dst, dst + dim, static_cast<OutT>(value));
}

// One stored row of storage S into dst as OutT (float32 into float32: a copy, streamed when asked).
template <int32_t S, typename OutT>
void decode_row(OutT* dst, const void* src, int64_t dim, bool streaming) {
  if constexpr (S == kStoreFloat32 && std::is_same<OutT, float>::value) {
    copy_row_out(dst, static_cast<const float*>(src), dim, streaming);
  } else {
    const ScaleBias sb = scale_bias_of<S>(src, dim);
    for (int64_t c = 0; c < dim; ++c) dst[c] = static_cast<OutT>(decode_elem<S>(src, c, sb));
  }
}

}  // namespace cpu
}  // namespace hps
