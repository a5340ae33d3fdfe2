// How a table stores its rows (issue 16): one codec per storage dtype, written once for host and device code, so
// the CPU and CUDA twins encode and decode to the same bits by construction.
//
// A stored row is the row of a 2-D "stored" tensor, whose dtype names the codec:
//   float32   (n, D)     float           x
//   float16   (n, D)     half            x rounded to nearest even (|x| beyond 65504 becomes inf: refused on load)
//   bfloat16  (n, D)     bfloat16        x rounded to nearest even
//   int8      (n, D + 8) int8            q_c = round((x_c - bias) / scale) - 128, then scale and bias as two float32
//                                        in the row's last 8 bytes; x_c ~ (q_c + 128) * scale + bias, where
//                                        bias = min_c x_c and scale = (max - min) / 255 (FBGEMM's row-wise uint8,
//                                        stored shifted into int8)
//   fp8_e4m3  (n, D + 4) float8_e4m3fn   q_c = e4m3(x_c / scale), then scale as one float32 in the last 4 bytes;
//                                        x_c ~ q_c * scale, where scale = max_c |x_c| / 448 (e4m3's largest value)
// int8 and fp8 need D % 4 == 0, so the float tail is 4-byte aligned in every row.
//
// Encoding happens where rows enter a table (load, update, a cache insert from float rows); everything between
// tiers and into the cache moves stored rows as opaque bytes; decoding happens where rows leave (a lookup's
// output, an export). Encode and decode use only correctly rounded float operations written out explicitly
// (mul_rn and friends: never contracted into an FMA), so both devices give the same bits.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if !defined(__CUDACC__)
#include <cmath>
#endif

#include "cache_layout.h"

namespace hps {

enum Storage : int32_t {
  kStoreFloat32 = 0,
  kStoreFloat16 = 1,
  kStoreBFloat16 = 2,
  kStoreInt8 = 3,
  kStoreFp8E4M3 = 4,
};
constexpr int32_t kNumStorages = 5;

// Bytes of one element of the stored tensor, and of the per-row tail (scale / bias) after the D elements.
HPS_HD constexpr int64_t storage_elem_bytes(int32_t s) {
  return s == kStoreFloat32 ? 4 : (s == kStoreFloat16 || s == kStoreBFloat16) ? 2 : 1;
}
HPS_HD constexpr int64_t storage_tail_bytes(int32_t s) { return s == kStoreInt8 ? 8 : s == kStoreFp8E4M3 ? 4 : 0; }
// Elements per stored row (the stored tensor's second dimension) and bytes per stored row, for embedding dim D.
HPS_HD constexpr int64_t stored_width(int32_t s, int64_t dim) { return dim + storage_tail_bytes(s) / storage_elem_bytes(s); }
HPS_HD constexpr int64_t stored_row_bytes(int32_t s, int64_t dim) { return stored_width(s, dim) * storage_elem_bytes(s); }
HPS_HD constexpr int64_t dim_of_width(int32_t s, int64_t width) { return width - storage_tail_bytes(s) / storage_elem_bytes(s); }

// ------------------------------------------------------------------------------------------------ exact arithmetic
// Correctly rounded single operations. nvcc contracts a * b + c into an FMA unless told not to; the intrinsics are
// never contracted. Host code is built with -ffp-contract=off (setup.py) for the same reason.
HPS_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
HPS_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
HPS_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
HPS_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
// Round to the nearest integer, ties to even (the default rounding mode on the host).
HPS_HD float rint_even(float a) {
#if defined(__CUDA_ARCH__)
  return rintf(a);
#else
  return std::nearbyint(a);
#endif
}

HPS_HD uint32_t float_bits(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof(u));
  return u;
}
HPS_HD float bits_float(uint32_t u) {
  float x;
  memcpy(&x, &u, sizeof(x));
  return x;
}

// ------------------------------------------------------------------------------------------------ element formats
// float32 -> float16 bits, round to nearest even (overflow -> inf, NaN stays NaN).
HPS_HD uint16_t f32_to_f16_bits(float x) {
  const uint32_t u = float_bits(x);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return sign | 0x7E00u;   // NaN
  if (a >= 0x477FF000u) return sign | 0x7C00u;  // rounds past 65504: inf
  if (a >= 0x38800000u) {                       // normal in float16 (>= 2^-14): drop 13 mantissa bits
    const uint32_t r = a + 0xFFFu + ((a >> 13) & 1u);
    return sign | static_cast<uint16_t>((r >> 13) - (112u << 10));
  }
  // subnormal in float16: a multiple of 2^-24 (the scaling by 2^24 is exact)
  return sign | static_cast<uint16_t>(rint_even(bits_float(a) * 16777216.0f));
}

HPS_HD float f16_bits_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu;
  const uint32_t m = h & 0x3FFu;
  if (e == 0) {  // zero or subnormal: m * 2^-24, exact
    const float v = static_cast<float>(m) * 5.9604644775390625e-8f;
    return bits_float(float_bits(v) | sign);
  }
  if (e == 31) return bits_float(sign | 0x7F800000u | (m << 13));
  return bits_float(sign | ((e + 112u) << 23) | (m << 13));
}

// float32 -> bfloat16 bits, round to nearest even.
HPS_HD uint16_t f32_to_bf16_bits(float x) {
  const uint32_t u = float_bits(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

HPS_HD float bf16_bits_to_f32(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

// float32 (finite, |x| <= 448) -> float8 e4m3fn bits, round to nearest even (larger magnitudes saturate to 448).
HPS_HD uint8_t f32_to_e4m3_bits(float x) {
  const uint32_t u = float_bits(x);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a >= 0x3C800000u) {  // normal in e4m3 (>= 2^-6): keep 3 mantissa bits, rebias the exponent (127 -> 7)
    const uint32_t r = a + 0x7FFFFu + ((a >> 20) & 1u);
    uint32_t v = (r >> 20) - (120u << 3);
    if (v > 0x7Eu) v = 0x7Eu;  // 448; 0x7F is NaN
    return sign | static_cast<uint8_t>(v);
  }
  // subnormal in e4m3: a multiple of 2^-9 (8 * 2^-9 = 2^-6 encodes as the smallest normal, as it should)
  return sign | static_cast<uint8_t>(rint_even(bits_float(a) * 512.0f));
}

HPS_HD float e4m3_bits_to_f32(uint8_t q) {
  const uint32_t sign = static_cast<uint32_t>(q & 0x80u) << 24;
  const uint32_t e = (q >> 3) & 0xFu;
  const uint32_t m = q & 0x7u;
  if (e == 0) {  // m * 2^-9, exact
    const float v = static_cast<float>(m) * 0.001953125f;
    return bits_float(float_bits(v) | sign);
  }
  if (e == 15 && m == 7) return bits_float(sign | 0x7FC00000u);  // NaN (e4m3fn has no inf)
  return bits_float(sign | ((e + 120u) << 23) | (m << 20));
}

// ------------------------------------------------------------------------------------------------ rows
constexpr float kInt8Levels = 255.0f;
constexpr float kFp8Max = 448.0f;

// The scale/bias tail of a stored int8 / fp8 row (D elements of one byte, then the floats; 4-byte aligned since
// D % 4 == 0 - the device reads it with one load, the host through memcpy, which keeps the type-punning defined).
HPS_HD float row_tail_float(const void* row, int64_t dim, int k) {
#if defined(__CUDA_ARCH__)
  return reinterpret_cast<const float*>(static_cast<const uint8_t*>(row) + dim)[k];
#else
  float v;
  memcpy(&v, static_cast<const uint8_t*>(row) + dim + 4 * k, sizeof(v));
  return v;
#endif
}

// A stored row's scale and bias (zero for the storages without them), read once per row.
struct ScaleBias {
  float scale = 0.f;
  float bias = 0.f;
};

template <int32_t S>
HPS_HD ScaleBias scale_bias_of(const void* row, int64_t dim) {
  ScaleBias sb;
  if constexpr (storage_tail_bytes(S) > 0) sb.scale = row_tail_float(row, dim, 0);
  if constexpr (S == kStoreInt8) sb.bias = row_tail_float(row, dim, 1);
  return sb;
}

// Element c of a stored row as float32 (sb: the row's scale_bias_of).
template <int32_t S>
HPS_HD float decode_elem(const void* row, int64_t c, ScaleBias sb) {
  const float scale = sb.scale, bias = sb.bias;
  if constexpr (S == kStoreFloat32) {
    return static_cast<const float*>(row)[c];
  } else if constexpr (S == kStoreFloat16) {
    return f16_bits_to_f32(static_cast<const uint16_t*>(row)[c]);
  } else if constexpr (S == kStoreBFloat16) {
    return bf16_bits_to_f32(static_cast<const uint16_t*>(row)[c]);
  } else if constexpr (S == kStoreInt8) {
    const float q = static_cast<float>(static_cast<int32_t>(static_cast<const int8_t*>(row)[c]) + 128);
    return add_rn(mul_rn(q, scale), bias);
  } else {
    return mul_rn(e4m3_bits_to_f32(static_cast<const uint8_t*>(row)[c]), scale);
  }
}

// One float32 row of `dim` elements into its stored form (stored_row_bytes(S, dim) bytes at dst). Sequential, so
// the min / max / scale come out the same on every device.
template <int32_t S>
HPS_HD void encode_row(const float* src, int64_t dim, void* dst) {
  if constexpr (S == kStoreFloat32) {
    memcpy(dst, src, static_cast<size_t>(dim) * sizeof(float));
  } else if constexpr (S == kStoreFloat16) {
    uint16_t* d = static_cast<uint16_t*>(dst);
    for (int64_t c = 0; c < dim; ++c) d[c] = f32_to_f16_bits(src[c]);
  } else if constexpr (S == kStoreBFloat16) {
    uint16_t* d = static_cast<uint16_t*>(dst);
    for (int64_t c = 0; c < dim; ++c) d[c] = f32_to_bf16_bits(src[c]);
  } else if constexpr (S == kStoreInt8) {
    float lo = src[0], hi = src[0];
    for (int64_t c = 1; c < dim; ++c) {
      lo = src[c] < lo ? src[c] : lo;
      hi = src[c] > hi ? src[c] : hi;
    }
    const float scale = div_rn(sub_rn(hi, lo), kInt8Levels);
    int8_t* d = static_cast<int8_t*>(dst);
    for (int64_t c = 0; c < dim; ++c) {
      float q = scale > 0.f ? rint_even(div_rn(sub_rn(src[c], lo), scale)) : 0.f;
      q = q < 0.f ? 0.f : (q > kInt8Levels ? kInt8Levels : q);
      d[c] = static_cast<int8_t>(static_cast<int32_t>(q) - 128);
    }
    memcpy(d + dim, &scale, sizeof(float));
    memcpy(d + dim + 4, &lo, sizeof(float));
  } else {
    float amax = 0.f;
    for (int64_t c = 0; c < dim; ++c) {
      const float a = src[c] < 0.f ? -src[c] : src[c];
      amax = a > amax ? a : amax;
    }
    const float scale = div_rn(amax, kFp8Max);
    uint8_t* d = static_cast<uint8_t*>(dst);
    for (int64_t c = 0; c < dim; ++c) {
      float y = scale > 0.f ? div_rn(src[c], scale) : 0.f;
      y = y < -kFp8Max ? -kFp8Max : (y > kFp8Max ? kFp8Max : y);
      d[c] = f32_to_e4m3_bits(y);
    }
    memcpy(d + dim, &scale, sizeof(float));
  }
}

// Calls f(std::integral_constant<int32_t, S>{}) for the storage s (host code: picks the kernel instantiation).
template <typename F>
inline void with_storage(int32_t s, F&& f) {
  switch (s) {
    case kStoreFloat16:
      return f(std::integral_constant<int32_t, kStoreFloat16>{});
    case kStoreBFloat16:
      return f(std::integral_constant<int32_t, kStoreBFloat16>{});
    case kStoreInt8:
      return f(std::integral_constant<int32_t, kStoreInt8>{});
    case kStoreFp8E4M3:
      return f(std::integral_constant<int32_t, kStoreFp8E4M3>{});
    default:
      return f(std::integral_constant<int32_t, kStoreFloat32>{});
  }
}

}  // namespace hps
