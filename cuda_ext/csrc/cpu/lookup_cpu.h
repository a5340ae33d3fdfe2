// The lookup pipeline's CPU kernels (lookup_cpu.cpp), callable from pipeline.cpp: the twins of
// cuda/lookup_cuda.h with the same arguments and results.
#pragma once

#include "lookup_layout.h"

namespace hps {
namespace cpu {

// One find over a.n > 0 keys: rows (or the default row) into a.out, misses appended, control block counters
// updated, and the miss count and a.seq written to a.host_flag when set.
void find(const FindArgs& a, FindMode mode);

// One miss application: scatter, cache insert (through cache_insert_grouped), resident row writes.
// Index pushes are not used on the CPU (the host index is the table's own index there).
void apply(const ApplyArgs& a);

}  // namespace cpu
}  // namespace hps
