// Stored-row tensors (row_codec.h) on the ATen side: which codec a tensor's dtype names, its embedding dim, and
// the checks every op that takes stored rows makes (both devices; the entry points add "on my device").
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "checks.h"
#include "lookup_layout.h"
#include "row_codec.h"

namespace hps {

// The storage of a stored tensor's dtype; raises for a dtype that is not one.
inline int32_t storage_of(const at::Tensor& stored, const char* name) {
  switch (stored.scalar_type()) {
    case at::kFloat:
      return kStoreFloat32;
    case at::kHalf:
      return kStoreFloat16;
    case at::kBFloat16:
      return kStoreBFloat16;
    case at::kChar:
      return kStoreInt8;
    case at::kFloat8_e4m3fn:
      return kStoreFp8E4M3;
    default:
      TORCH_CHECK_TYPE(false, name, " must hold stored rows: float32, float16, bfloat16, int8 (row-wise scale and "
                       "bias) or float8_e4m3fn (row-wise scale), found ", stored.scalar_type());
  }
  return kStoreFloat32;
}

inline at::ScalarType storage_dtype(int32_t s) {
  switch (s) {
    case kStoreFloat16:
      return at::kHalf;
    case kStoreBFloat16:
      return at::kBFloat16;
    case kStoreInt8:
      return at::kChar;
    case kStoreFp8E4M3:
      return at::kFloat8_e4m3fn;
    default:
      return at::kFloat;
  }
}

inline void check_storage_code(int64_t s) {
  TORCH_CHECK_VALUE(s >= 0 && s < kNumStorages, "storage must be 0 (float32), 1 (float16), 2 (bfloat16), 3 (int8) "
                    "or 4 (fp8_e4m3), found ", s);
}

// The embedding dim a storage can hold: int8 and fp8 rows keep their float tail 4-byte aligned.
inline void check_storage_dim(int32_t s, int64_t dim) {
  TORCH_CHECK_VALUE(storage_tail_bytes(s) == 0 || dim % 4 == 0, "dim must be a multiple of 4 for ",
                    s == kStoreInt8 ? "int8" : "fp8_e4m3", " storage (its row-wise scale follows the row), found ",
                    dim);
}

// A 2-D contiguous stored tensor; returns its embedding dim.
inline int64_t check_stored(const at::Tensor& stored, const char* name) {
  const int32_t s = storage_of(stored, name);
  TORCH_CHECK_VALUE(stored.dim() == 2, name, " must be 2-D, found shape ", stored.sizes());
  TORCH_CHECK_VALUE(stored.is_contiguous(), name, " must be contiguous");
  const int64_t dim = dim_of_width(s, stored.size(1));
  TORCH_CHECK_VALUE(dim >= 0, name, ": a ", stored.scalar_type(), " stored row holds at least ",
                    storage_tail_bytes(s), " tail bytes, found width ", stored.size(1));
  check_storage_dim(s, dim);
  return dim;
}

// Bytes of one row of a checked stored tensor: stored_row_bytes of its storage and dim, what moving a stored row
// as it is copies.
inline int64_t stored_row_bytes_of(const at::Tensor& stored) { return stored.size(1) * stored.element_size(); }

// n float32 rows (host memory) encoded into n stored rows at dst (host memory), a task per block of rows.
inline void encode_rows_into(int32_t storage, const float* src, int64_t n, int64_t dim, void* dst) {
  uint8_t* out = static_cast<uint8_t*>(dst);
  const int64_t row_bytes = stored_row_bytes(storage, dim);
  with_storage(storage, [&](auto s) {
    constexpr int32_t S = decltype(s)::value;
    at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) encode_row<S>(src + i * dim, dim, out + i * row_bytes);
    });
  });
}

// The OutDtype of a lookup's (or a decode's) output tensor (lookup_layout.h); TypeError for a dtype it cannot be.
inline int32_t out_dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return kOutFloat32;
    case at::kBFloat16:
      return kOutBFloat16;
    case at::kHalf:
      return kOutFloat16;
    default:
      TORCH_CHECK_TYPE(false, "dtype: a lookup returns float32, bfloat16 or float16, found ", t);
  }
  return kOutFloat32;
}

}  // namespace hps
