// Launchers of the lookup pipeline's CUDA kernels (lookup_cuda.cu), callable from host C++ (pipeline.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include "lookup_layout.h"

namespace hps {
namespace cuda {

// One find over a.n > 0 keys on `stream`: rows (or the default row) into a.out, misses appended, the control
// block's counters updated and, if a.host_flag is set, the miss count and a.seq published to it.
void launch_find(const FindArgs& a, FindMode mode, cudaStream_t stream);

// One miss application (scatter, cache insert / resident row writes and index pushes) on `stream`.
void launch_apply(const ApplyArgs& a, cudaStream_t stream);

// GPU-direct second level: the misses of the find just launched probed in the second level, rows copied into the
// output, the insert staged (SecondLevelArgs); then the staged entries' insert in (bucket, key) order.
void launch_second_level_probe(const SecondLevelArgs& a, cudaStream_t stream);
void launch_second_level_gather(const SecondLevelArgs& a, cudaStream_t stream);
void launch_insert_sorted(const InsertSortedArgs& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace hps
