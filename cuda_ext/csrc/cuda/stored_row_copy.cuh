// Moving stored rows (row_codec.h) on the GPU, shared by the cache ops and the lookup pipeline's kernels:
//   group_decode_row  one stored row -> float32 / bfloat16 / float16 output by a group of G lanes (a lookup's hit,
//                     a scatter or gather of fetched rows); float32 rows keep the plain 16-byte copy
//   group_fill_row    the default row
//   copy_unit         the access width for moving a stored row as it is (group_copy_bytes, cache_cuda_common.cuh:
//                     cache inserts, resident writes - no re-encoding in between)
// With kVec4 a lane moves 4 elements per access (16 bytes of float32, 8 of float16 / bfloat16, 4 of int8 / fp8);
// callers pick it with stored_vec4(). Decoding matches row_codec.h's decode_elem bit for bit (the conversions are
// exact; int8 / fp8 use the same correctly rounded multiply and add).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <initializer_list>
#include <type_traits>

#include "cuda/cache_cuda_common.cuh"
#include "lookup_layout.h"
#include "row_codec.h"

namespace hps {
namespace cuda {

// ------------------------------------------------------------------------------------------------ output elements
// A float as OutT (float, __nv_bfloat16 or __half), rounded to nearest even - as row_codec.h's f32_to_*_bits.
template <typename OutT>
__device__ __forceinline__ OutT to_out(float v) {
  if constexpr (std::is_same<OutT, __nv_bfloat16>::value) {
    return __float2bfloat16_rn(v);
  } else if constexpr (std::is_same<OutT, __half>::value) {
    return __float2half_rn(v);
  } else {
    return v;
  }
}

// Four floats as four 16-bit values in one 8-byte word (OutT is a 16-bit type).
template <typename OutT>
__device__ __forceinline__ uint2 pack4(float4 v) {
  const OutT q[4] = {to_out<OutT>(v.x), to_out<OutT>(v.y), to_out<OutT>(v.z), to_out<OutT>(v.w)};
  uint2 r;
  memcpy(&r, q, sizeof(r));
  return r;
}

template <typename OutT>
__device__ __forceinline__ void store4(OutT* dst, int64_t c4, float4 v) {
  if constexpr (std::is_same<OutT, float>::value) {
    reinterpret_cast<float4*>(dst)[c4] = v;
  } else {
    reinterpret_cast<uint2*>(dst)[c4] = pack4<OutT>(v);
  }
}

// Calls f(OutT{}) for the output dtype (lookup_layout.h OutDtype).
template <typename F>
void with_out_type(int32_t out_dtype, F&& f) {
  switch (out_dtype) {
    case kOutBFloat16:
      return f(__nv_bfloat16{});
    case kOutFloat16:
      return f(__half{});
    default:
      return f(float{});
  }
}

// ------------------------------------------------------------------------------------------------ stored elements
// The word a lane loads for 4 consecutive stored elements.
template <int32_t S>
struct Word4 {
  using type = typename std::conditional<S == kStoreFloat32, float4,
                                         typename std::conditional<storage_elem_bytes(S) == 2, uint2, uint32_t>::type>::type;
};

__device__ __forceinline__ float byte_fp8(uint32_t w, int b) {
  const __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>((w >> (8 * b)) & 0xFFu), __NV_E4M3);
  return __half2float(__half(h));
}

// 4 stored elements (one loaded word) -> 4 floats, exactly as decode_elem<S>.
template <int32_t S>
__device__ __forceinline__ float4 decode4(typename Word4<S>::type w, ScaleBias sb) {
  if constexpr (S == kStoreFloat32) {
    return w;
  } else if constexpr (S == kStoreFloat16) {
    const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&w.x));
    const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&w.y));
    return make_float4(a.x, a.y, b.x, b.y);
  } else if constexpr (S == kStoreBFloat16) {
    return make_float4(__uint_as_float(w.x << 16), __uint_as_float(w.x & 0xFFFF0000u), __uint_as_float(w.y << 16),
                       __uint_as_float(w.y & 0xFFFF0000u));
  } else if constexpr (S == kStoreInt8) {
    float v[4];
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int32_t q = static_cast<int32_t>(static_cast<int8_t>((w >> (8 * b)) & 0xFFu)) + 128;
      v[b] = __fadd_rn(__fmul_rn(static_cast<float>(q), sb.scale), sb.bias);
    }
    return make_float4(v[0], v[1], v[2], v[3]);
  } else {
    return make_float4(__fmul_rn(byte_fp8(w, 0), sb.scale), __fmul_rn(byte_fp8(w, 1), sb.scale),
                       __fmul_rn(byte_fp8(w, 2), sb.scale), __fmul_rn(byte_fp8(w, 3), sb.scale));
  }
}

// Whether stored rows move 4 elements per access: dim % 4 == 0 (then every stored row is a whole number of words)
// and every row base pointer aligned to a word; `out` (may be null) aligned to 4 output elements of out_dtype.
inline bool stored_vec4(int32_t storage, int64_t dim, std::initializer_list<const void*> rows, const void* out,
                        int32_t out_dtype) {
  if (dim % 4 != 0) return false;
  const uintptr_t word = static_cast<uintptr_t>(4 * storage_elem_bytes(storage));
  for (const void* p : rows) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % word != 0) return false;
  }
  const uintptr_t out_word = out_dtype == kOutFloat32 ? 16 : 8;
  return out == nullptr || reinterpret_cast<uintptr_t>(out) % out_word == 0;
}

// ------------------------------------------------------------------------------------------------ rows
template <int G, bool kVec4, typename OutT>
__device__ __forceinline__ void group_fill_row(OutT* __restrict__ dst, float value, int64_t dim, int glane) {
  if (kVec4) {
    const float4 v = make_float4(value, value, value, value);
    const int64_t n4 = dim >> 2;
    for (int64_t c = glane; c < n4; c += G) store4<OutT>(dst, c, v);
    return;
  }
  const OutT v = to_out<OutT>(value);
  for (int64_t c = glane; c < dim; c += G) dst[c] = v;
}

// One stored row into the output as OutT by a group of G lanes; up to 4 loads per lane in flight before their
// stores (float32 into float32 is group_copy_row's copy).
template <int G, bool kVec4, int32_t S, typename OutT>
__device__ __forceinline__ void group_decode_row(OutT* __restrict__ dst, const void* __restrict__ src, int64_t dim,
                                                 int glane) {
  if constexpr (S == kStoreFloat32 && std::is_same<OutT, float>::value) {
    group_copy_row<G, kVec4>(dst, static_cast<const float*>(src), dim, glane);
  } else {
    constexpr int kUnroll = 4;
    const ScaleBias sb = scale_bias_of<S>(src, dim);
    if (kVec4) {
      using W = typename Word4<S>::type;
      const W* s = static_cast<const W*>(src);
      const int64_t n4 = dim >> 2;
      for (int64_t c = glane; c < n4; c += kUnroll * G) {
        W r[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (c + u * G < n4) r[u] = s[c + u * G];
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (c + u * G < n4) store4<OutT>(dst, c + u * G, decode4<S>(r[u], sb));
        }
      }
    } else {
      for (int64_t c = glane; c < dim; c += G) dst[c] = to_out<OutT>(decode_elem<S>(src, c, sb));
    }
  }
}

// Bytes per lane access for moving rows of row_bytes as they are: 16 when every row (row_bytes apart from
// 16-byte aligned bases) stays 16-byte aligned, else 4, else 2 (float16 / bfloat16 rows of odd dim).
inline int copy_unit(int64_t row_bytes, std::initializer_list<const void*> bases) {
  for (const int unit : {16, 4, 2}) {
    bool fits = row_bytes % unit == 0;
    for (const void* p : bases) fits = fits && (p == nullptr || reinterpret_cast<uintptr_t>(p) % unit == 0);
    if (fits) return unit;
  }
  return 1;
}

// Calls f(std::integral_constant<int, kUnit>{}) for a copy_unit result (torch's allocations are aligned, so a unit
// below 2 - an odd row start - only comes from a caller's bug).
template <typename F>
void with_copy_unit(int unit, F&& f) {
  switch (unit) {
    case 16:
      return f(std::integral_constant<int, 16>{});
    case 4:
      return f(std::integral_constant<int, 4>{});
    case 2:
      return f(std::integral_constant<int, 2>{});
    default:
      TORCH_CHECK(false, "stored rows must start at even addresses, found a copy unit of ", unit, " byte");
  }
}

// with_copy_unit for rows of storage S: rows of 1- and 4-byte elements are whole 4-byte words (int8 / fp8 need
// dim % 4 == 0), so only 2-byte storages instantiate the 2-byte copy.
template <int32_t S, typename F>
void with_row_unit(int unit, F&& f) {
  if constexpr (storage_elem_bytes(S) != 2) {
    TORCH_CHECK(unit >= 4, "stored rows of this storage must start 4-byte aligned, found a copy unit of ", unit);
    if (unit == 16) return f(std::integral_constant<int, 16>{});
    return f(std::integral_constant<int, 4>{});
  } else {
    with_copy_unit(unit, f);
  }
}

}  // namespace cuda
}  // namespace hps
