// The admission sketch's add (cache_layout.h) as the lookup pipeline calls it on its miss list, without the op's
// tensors: CPU in cpu/sketch_cpu.cpp, CUDA in cuda/sketch_cuda.cu (the same counts as the op sketch_add).
#pragma once

#include <cstdint>

#ifdef HPS_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace hps {
namespace cpu {
// +1 on the counters of keys[0..n) (duplicates each time); sketch (kSketchDepth * width) int32.
void sketch_add_keys(int32_t* sketch, int64_t width, const int64_t* keys, int64_t n);
}  // namespace cpu

#ifdef HPS_WITH_CUDA
namespace cuda {
// The same on `stream`, for keys[0..min(n, *count)) when `count` (device memory) is given - a find's miss list
// whose length only the device knows - else keys[0..n). keys: device or pinned host memory.
void launch_sketch_add(int32_t* sketch, int64_t width, const int64_t* keys, int64_t n, const int64_t* count,
                       cudaStream_t stream);
}  // namespace cuda
#endif
}  // namespace hps
