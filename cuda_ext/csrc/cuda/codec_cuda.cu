// CUDA twin of the row codec ops (cpu/codec_cpu.cpp): the same row_codec.h functions, so the same bits. Encoding
// runs a thread per row (the codec's min / max / scale are sequential over the row, as on the CPU; encodes are
// off the lookup path); decoding a thread per element.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "codec_ops.h"
#include "cuda/stored_row_copy.cuh"

namespace hps {
namespace cuda {
namespace {

constexpr int kCodecThreads = 256;

unsigned codec_grid(int64_t items) {
  const int64_t want = (items + kCodecThreads - 1) / kCodecThreads;
  const int64_t cap = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 64;
  return static_cast<unsigned>(want < cap ? want : cap);
}

template <int32_t S>
__global__ void encode_rows_kernel(const float* __restrict__ src, int64_t n, int64_t dim, uint8_t* __restrict__ dst) {
  const int64_t row_bytes = stored_row_bytes(S, dim);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    encode_row<S>(src + i * dim, dim, dst + i * row_bytes);
  }
}

template <int32_t S, typename OutT>
__global__ void decode_rows_kernel(const uint8_t* __restrict__ src, int64_t n, int64_t dim, OutT* __restrict__ dst) {
  const int64_t row_bytes = stored_row_bytes(S, dim);
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n * dim;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / dim, c = e - i * dim;
    const uint8_t* row = src + i * row_bytes;
    dst[e] = to_out<OutT>(decode_elem<S>(row, c, scale_bias_of<S>(row, dim)));
  }
}

at::Tensor encode_rows_cuda(const at::Tensor& rows, int64_t storage) {
  HPS_CHECK_CUDA(rows);
  at::Tensor out = encoded_output(rows, storage);
  const int64_t n = rows.size(0), dim = rows.size(1);
  if (n == 0) return out;
  const c10::cuda::CUDAGuard guard(rows.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  with_storage(static_cast<int32_t>(storage), [&](auto s) {
    constexpr int32_t S = decltype(s)::value;
    encode_rows_kernel<S><<<codec_grid(n), kCodecThreads, 0, stream>>>(
        rows.data_ptr<float>(), n, dim, static_cast<uint8_t*>(out.data_ptr()));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor decode_rows_cuda(const at::Tensor& stored, std::optional<at::ScalarType> dtype) {
  HPS_CHECK_CUDA(stored);
  at::Tensor out = decoded_output(stored, dtype);
  const int64_t n = out.size(0), dim = out.size(1);
  if (n == 0 || dim == 0) return out;
  const c10::cuda::CUDAGuard guard(stored.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  with_storage(storage_of(stored, "stored"), [&](auto s) {
    constexpr int32_t S = decltype(s)::value;
    with_out_type(out_dtype_of(out.scalar_type()), [&](auto t) {
      using OutT = decltype(t);
      decode_rows_kernel<S, OutT><<<codec_grid(n * dim), kCodecThreads, 0, stream>>>(
          static_cast<const uint8_t*>(stored.data_ptr()), n, dim, static_cast<OutT*>(out.data_ptr()));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hps, CUDA, m) {
  m.impl("encode_rows", &encode_rows_cuda);
  m.impl("decode_rows", &decode_rows_cuda);
}

}  // namespace cuda
}  // namespace hps
