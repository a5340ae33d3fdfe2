// The miss-path ops (miss_path.cpp): what the schema file and Python need from them.
#pragma once

#include <torch/library.h>

#include <cstdint>

namespace hps {

// Up to this many keys a GPU batch's misses are planned on the host (and cache_lookup_host takes it); above it on
// the device. Python reads it as hps_core.ops.host_plan_max_keys().
constexpr int64_t kHostPlanMaxKeys = int64_t{1} << 16;

// Defines collect_misses, apply_misses and cache_lookup_host (they come after the HostHashMap class).
void register_miss_path_ops(torch::Library& m);

}  // namespace hps
