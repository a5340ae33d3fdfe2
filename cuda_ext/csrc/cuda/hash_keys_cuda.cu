// CUDA twin of hash_keys: one thread per key computes its bucket and digest (cache_layout.h).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cache_layout.h"
#include "checks.h"

namespace hps {
namespace {

template <typename key_t>
__global__ void hash_keys_kernel(const key_t* __restrict__ keys, int64_t n, int64_t num_buckets,
                                 int64_t* __restrict__ bucket, uint8_t* __restrict__ digest) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const uint64_t h = mix64(key_bits(static_cast<int64_t>(keys[i])));
  bucket[i] = bucket_of(h, num_buckets);
  digest[i] = digest_of(h);
}

std::tuple<at::Tensor, at::Tensor> hash_keys_cuda(const at::Tensor& keys, int64_t num_buckets) {
  HPS_CHECK_CUDA(keys);
  HPS_CHECK_KEY_DTYPE(keys);
  HPS_CHECK_DIM(keys, 1);
  TORCH_CHECK_VALUE(num_buckets > 0 && num_buckets < (int64_t(1) << 32),
                    "num_buckets must be in [1, 2^32), found ", num_buckets);
  const c10::cuda::CUDAGuard guard(keys.device());
  const at::Tensor k = keys.contiguous();
  const int64_t n = k.numel();
  at::Tensor bucket = at::empty({n}, k.options().dtype(at::kLong));
  at::Tensor digest = at::empty({n}, k.options().dtype(at::kByte));
  if (n == 0) return {bucket, digest};
  const int threads = 256;
  const int64_t blocks = (n + threads - 1) / threads;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(k.scalar_type(), "hash_keys_cuda", [&] {
    hash_keys_kernel<index_t><<<blocks, threads, 0, stream>>>(k.data_ptr<index_t>(), n, num_buckets,
                                                              bucket.data_ptr<int64_t>(), digest.data_ptr<uint8_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {bucket, digest};
}

}  // namespace

TORCH_LIBRARY_IMPL(hps, CUDA, m) { m.impl("hash_keys", &hash_keys_cuda); }

}  // namespace hps
