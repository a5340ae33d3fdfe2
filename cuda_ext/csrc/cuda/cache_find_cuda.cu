// CUDA twin of cache_find: hits decoded out as float32 (misses -> 0), found mask, LRU/LFU score of each hit
// touched, clock bumped once per non-empty call (hps_ops.cpp contract; results identical to
// cpu/cache_find_cpu.cpp).
//
// Parallel decomposition: a group of G lanes per query key, 32 / G keys per warp at once (G = 8, or 4 for large
// batches of narrow rows; see find_group). The group's lanes read the key's bucket digests in one coalesced access
// (the 32 digests are one 32-byte sector; each lane loads 32 / G of them), OR their match bits with G-wide
// shuffles, and only digest matches cost a read of the slot key (usually one 8-byte read, i.e. one more sector).
// The group then decodes the stored row into the output (group_decode_row: a plain copy for float32 rows), 4
// elements per lane access when dim % 4 == 0 and the rows are aligned for it (scalar otherwise), up to 4 loads
// per lane in flight. Several keys per warp keep more independent memory chains
// (key -> digests -> slot key -> row) in flight than one warp per key: 2.9 vs 1.9 G keys/s at dim 128 on an H200.
// Bytes per key at dim 128: key 8 + digests 32 + slot key 32 (one sector) + score 32 (read-modify-write of a
// sector) + row 512 read + 512 written + found 1, about 1.1 KB against 1.35 KB for a probe that reads the whole
// bucket's 32 int64 keys.
//
// Scores: an LRU hit stores the new clock (clock + 1, read in-kernel from the clock tensor, no host sync); every
// writer stores that one value. An LFU hit adds one with a saturating CAS loop, so duplicates give
// min(old + hits, INT32_MAX) whatever the interleaving - the CPU twin's final state. The clock tensor itself is
// bumped by a one-thread kernel after the find kernel, on the same (current) stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cuda/cache_cuda_common.cuh"
#include "cuda/stored_row_copy.cuh"

namespace hps {
namespace {

using namespace hps::cuda;

template <typename key_t, int G, bool kVec4, bool kLRU, int32_t S>
__global__ void __launch_bounds__(kThreads)
    cache_find_kernel(const int64_t* __restrict__ slot_keys, const uint8_t* __restrict__ digests,
                      int32_t* __restrict__ scores, const uint8_t* __restrict__ values,
                      const int64_t* __restrict__ clock, const key_t* __restrict__ keys, int64_t n,
                      int64_t num_buckets, int64_t dim, float* __restrict__ out, bool* __restrict__ found) {
  const int64_t row_bytes = stored_row_bytes(S, dim);
  constexpr int kKeysPerWarp = kWarp / G;
  const int lane = lane_id();
  const int glane = lane % G;
  // The clock is bumped after this kernel; every hit of this call gets the bumped value.
  const int32_t lru_score = kLRU ? score_from_clock(clock[0] + 1) : 0;
  const int64_t stride = total_warps() * kKeysPerWarp;
  // Warp-uniform loop: every lane reaches the probe's shuffles, groups past n only take part in them.
  for (int64_t i0 = global_warp_id() * kKeysPerWarp; i0 < n; i0 += stride) {
    const int64_t i = i0 + lane / G;
    const bool valid = i < n;
    int64_t key = 0;
    int64_t base = 0;
    uint8_t digest = 0;
    if (valid) {
      key = static_cast<int64_t>(keys[i]);
      const uint64_t h = mix64(key_bits(key));
      base = bucket_of(h, num_buckets) * kBucketSize;
      digest = digest_of(h);
    }
    const int j = group_probe<G>(slot_keys, digests, base, key, digest, glane, valid);
    if (!valid) continue;
    float* dst = out + i * dim;
    if (j < 0) {
      if (glane == 0) found[i] = false;
      group_zero_row<G, kVec4>(dst, dim, glane);
      continue;
    }
    const int64_t s = base + j;
    if (glane == 0) {
      found[i] = true;
      if (kLRU) {
        scores[s] = lru_score;
      } else {
        lfu_bump_atomic(scores + s);
      }
    }
    group_decode_row<G, kVec4, S, float>(dst, values + s * row_bytes, dim, glane);
  }
}

__global__ void clock_bump_kernel(int64_t* clock) { clock[0] += 1; }

template <typename key_t, int G, bool kVec4, int32_t S>
void launch_find(bool lru, cudaStream_t stream, const at::Tensor& slot_keys, const at::Tensor& digests,
                 at::Tensor& scores, const at::Tensor& values, const at::Tensor& clock, const at::Tensor& keys,
                 int64_t n, int64_t num_buckets, int64_t dim, at::Tensor& out, at::Tensor& found) {
  auto kernel = lru ? cache_find_kernel<key_t, G, kVec4, true, S> : cache_find_kernel<key_t, G, kVec4, false, S>;
  const unsigned grid = warp_grid((n + kWarp / G - 1) / (kWarp / G));
  kernel<<<grid, kThreads, 0, stream>>>(slot_keys.data_ptr<int64_t>(), digests.data_ptr<uint8_t>(),
                                        scores.data_ptr<int32_t>(), static_cast<const uint8_t*>(values.data_ptr()),
                                        clock.data_ptr<int64_t>(), keys.data_ptr<key_t>(), n, num_buckets, dim,
                                        out.data_ptr<float>(), found.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename key_t, bool kVec4, int32_t S>
void launch_find_group(int group, bool lru, cudaStream_t stream, const at::Tensor& slot_keys,
                       const at::Tensor& digests, at::Tensor& scores, const at::Tensor& values,
                       const at::Tensor& clock, const at::Tensor& keys, int64_t n, int64_t num_buckets, int64_t dim,
                       at::Tensor& out, at::Tensor& found) {
  switch (group) {
    case 4:
      return launch_find<key_t, 4, kVec4, S>(lru, stream, slot_keys, digests, scores, values, clock, keys, n,
                                             num_buckets, dim, out, found);
    case 8:
      return launch_find<key_t, 8, kVec4, S>(lru, stream, slot_keys, digests, scores, values, clock, keys, n,
                                             num_buckets, dim, out, found);
    default:
      return launch_find<key_t, 32, kVec4, S>(lru, stream, slot_keys, digests, scores, values, clock, keys, n,
                                              num_buckets, dim, out, found);
  }
}

std::tuple<at::Tensor, at::Tensor> cache_find_cuda(const at::Tensor& slot_keys, const at::Tensor& digests,
                                                   at::Tensor& scores,        // (S,) int32, touched
                                                   const at::Tensor& values,  // (S, W) stored rows
                                                   at::Tensor& clock,         // (1,) int64, bumped if n > 0
                                                   const at::Tensor& keys,    // (n,) int32|int64
                                                   int64_t policy) {
  const int64_t num_buckets = check_cuda_state(slot_keys, digests, scores, values, clock);
  check_policy(policy);
  check_query_keys(keys, slot_keys);
  const c10::cuda::CUDAGuard guard(slot_keys.device());
  const int32_t storage = storage_of(values, "values");
  const int64_t n = keys.size(0);
  const int64_t dim = dim_of_width(storage, values.size(1));
  const at::TensorOptions out_options = values.options().dtype(at::kFloat);
  if (n == 0) {  // an empty call does not bump the clock
    return {at::zeros({0, dim}, out_options), at::zeros({0}, keys.options().dtype(at::kBool))};
  }
  at::Tensor out = at::empty({n, dim}, out_options);                   // (n, D) float32: every row written
  at::Tensor found = at::empty({n}, keys.options().dtype(at::kBool));  // (n,)
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool lru = policy == kPolicyLRU;
  const bool vec4 = stored_vec4(storage, dim, {values.data_ptr()}, out.data_ptr(), kOutFloat32);
  const int group = find_group(n, dim, digests.data_ptr());
  with_storage(storage, [&](auto storage_c) {
    constexpr int32_t S = decltype(storage_c)::value;
    AT_DISPATCH_INDEX_TYPES(keys.scalar_type(), "cache_find_cuda", [&] {
      if (vec4) {
        launch_find_group<index_t, true, S>(group, lru, stream, slot_keys, digests, scores, values, clock, keys, n,
                                            num_buckets, dim, out, found);
      } else {
        launch_find_group<index_t, false, S>(group, lru, stream, slot_keys, digests, scores, values, clock, keys, n,
                                             num_buckets, dim, out, found);
      }
    });
  });
  clock_bump_kernel<<<1, 1, 0, stream>>>(clock.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, found};
}

}  // namespace

TORCH_LIBRARY_IMPL(hps, CUDA, m) { m.impl("cache_find", &cache_find_cuda); }

}  // namespace hps
