// Shared by the lookup pipeline (pipeline.cpp) and its CPU and CUDA kernels (cpu/lookup_cpu.cpp,
// cuda/lookup_cuda.cu): the control block a find publishes its misses and counters in, the resident index's
// layout, and the kernel argument structs. Everything here is plain data, usable from host and device code.
#pragma once

#include <cstdint>

#include "cache_layout.h"
#include "row_codec.h"

namespace hps {

// ---------------------------------------------------------------------------------------------------------------
// Control block: one int64 array per pipeline, on the table's device, never reallocated (a captured CUDA graph
// keeps its address). The find kernel's last block resets the per-call entries, so no memset runs between calls,
// and adds the call to the cumulative counters, so lookups replayed from a CUDA graph are counted too.
enum Ctrl : int64_t {
  kCtrlMissCount = 0,   // misses of the running call (reset by the last block)
  kCtrlBlocksDone = 1,  // blocks of the running call that finished (reset by the last block)
  kCtrlLookups = 2,     // cumulative: lookups (non-empty finds)
  kCtrlKeys = 3,        // cumulative: keys looked up
  kCtrlMisses = 4,      // cumulative: key positions the table did not hold
  kCtrlInserted = 5,    // cumulative insert counts of the cache (inserted, assigned, evicted, refused)
  kCtrlAssigned = 6,
  kCtrlEvicted = 7,
  kCtrlRefused = 8,
  kCtrlPending = 9,           // the last find's miss count (kept by its last block for the kernels after it)
  kCtrlSecondLevelHits = 10,  // cumulative: miss positions the GPU-direct second level answered
  kCtrlSize = 16,
};

// Host flag (pinned host memory the GPU writes through the bus): [misses of the call, the call's sequence
// number]. The last block of a find writes the count, then the sequence number; the host spins on the sequence
// number instead of synchronising the stream (a stream sync costs microseconds more on this hardware).
enum HostFlag : int64_t { kFlagMisses = 0, kFlagSeq = 1, kFlagSize = 8 };

// ---------------------------------------------------------------------------------------------------------------
// Resident index (static tables and caches whose capacity covers the table): key -> row of a dense row array.
// Buckets of kBucketSize slots as in the cache: keys (S,) int64, digests (S,) uint8 (0 = empty), rows (S,) int32
// (the row of each slot's key), plus spill (B,) uint8: 1 when a key whose primary bucket is this one lives in its
// secondary bucket. A key goes to its primary bucket while that has room, else to its secondary bucket; a find
// probes the secondary bucket only when the primary lacks the key and is marked spilled. The index is built and
// changed on the host (deterministic, the same on every device) and copied to the device.
//
// Secondary bucket: the high half of a second mix of the hash (independent of the primary bucket); never the
// primary itself when there are two buckets or more.
HPS_HD int64_t secondary_bucket_of(uint64_t h, int64_t num_buckets, int64_t primary) {
  const int64_t b = bucket_of(mix64(h ^ 0x9E3779B97F4A7C15ull), num_buckets);
  return b != primary ? b : (primary + 1 == num_buckets ? 0 : primary + 1);
}

// Load factor the index is built at: slots = keys / kResidentLoad, rounded up to whole buckets. At 0.8, ~6% of
// buckets spill a key and a find probes a second bucket for ~0.5% of the keys; index bytes per key: 13 / 0.8.
constexpr double kResidentLoad = 0.8;

// ---------------------------------------------------------------------------------------------------------------
// The element type a lookup writes its output in. The table keeps stored rows (row_codec.h); each is decoded to
// float32 and, for a lower-precision output, rounded (to nearest even) as it is written - the same on both devices
// - so a bf16 model gets its embeddings without a separate conversion pass over the output.
enum OutDtype : int32_t { kOutFloat32 = 0, kOutBFloat16 = 1, kOutFloat16 = 2 };

// ---------------------------------------------------------------------------------------------------------------
// What a find probes: the dynamic cache (scores by policy, clock bumped) or the resident index (read only).
enum FindMode : int { kFindCacheLRU = 0, kFindCacheLFU = 1, kFindResident = 2 };

// Kernel arguments of one find. Table pointers for the kind being probed (the others null); misses go to
// miss_pos/miss_keys (capacity n) or, when those are null, are only counted.
struct FindArgs {
  // dynamic cache
  const int64_t* slot_keys = nullptr;
  const uint8_t* digests = nullptr;
  int32_t* scores = nullptr;
  const void* values = nullptr;  // stored rows: cache (S, W) by slot; resident (R, W) dense rows
  int64_t* clock = nullptr;      // cache only: bumped once per find by the last block
  // resident index
  const int32_t* slot_rows = nullptr;
  const uint8_t* spill = nullptr;
  int64_t num_buckets = 0;
  int64_t dim = 0;
  int32_t storage = kStoreFloat32;  // of `values`
  bool vec4 = false;                // set by the CUDA launcher: rows move 4 elements per access
  // query
  const void* keys = nullptr;  // (n,) int32 or int64 (key_is_int64)
  bool key_is_int64 = true;
  int64_t n = 0;
  float default_value = 0.f;
  void* out = nullptr;  // (n, D) of out_dtype: hits' rows, the default row for misses
  int32_t out_dtype = kOutFloat32;
  // misses
  int32_t* miss_pos = nullptr;   // (n,) positions of the misses, in no particular order
  int64_t* miss_keys = nullptr;  // (n,) their keys, widened to int64
  int64_t* ctrl = nullptr;       // kCtrlSize entries on the table's device
  int64_t* host_flag = nullptr;  // kFlagSize entries of pinned host memory, or null
  int64_t seq = 0;
};

// Kernel arguments of one miss application: the fetched rows of the u distinct missed keys (stored rows, encoded
// on the host) decoded into the output, then stored in the table as they are - inserted into the cache (keys grouped by bucket) or, for a resident table,
// written to the rows the host index gave them, with the index buckets that changed copied over. Every pointer is
// device memory or pinned host memory the kernel reads through the bus; unused parts are null / zero.
struct ApplyArgs {
  void* out = nullptr;  // (n, D) of out_dtype
  int32_t out_dtype = kOutFloat32;
  int64_t dim = 0;
  int32_t storage = kStoreFloat32;  // of rows, values and table_rows
  const int32_t* pos = nullptr;  // (m,) positions in out
  const int32_t* inv = nullptr;  // (m,) row of each position in `rows`
  int64_t m = 0;
  const void* rows = nullptr;  // (u, W) stored rows
  int64_t u = 0;
  // dynamic cache: insert ukeys[k] -> rows[k] (keys in non-decreasing bucket order)
  const int64_t* ukeys = nullptr;
  int64_t* slot_keys = nullptr;
  uint8_t* digests = nullptr;
  int32_t* scores = nullptr;
  void* values = nullptr;
  const int64_t* clock = nullptr;
  int64_t num_buckets = 0;
  bool lru = true;
  int64_t* counts = nullptr;  // ctrl + kCtrlInserted
  const int32_t* sketch = nullptr;  // admission sketch (LFU caches), or null
  int64_t sketch_width = 0;
  // resident table: table_rows[row_ids[k]] = rows[k] where row_ids[k] >= 0
  const int32_t* row_ids = nullptr;
  void* table_rows = nullptr;
  // resident index buckets to overwrite: push_buckets (k,), and their slots (k * kBucketSize each) and spill flags
  int64_t num_push = 0;
  const int64_t* push_buckets = nullptr;
  const int64_t* push_keys = nullptr;
  const int32_t* push_rows = nullptr;
  const uint8_t* push_digests = nullptr;
  const uint8_t* push_spill = nullptr;
  int64_t* index_keys = nullptr;
  int32_t* index_rows = nullptr;
  uint8_t* index_digests = nullptr;
  uint8_t* index_spill = nullptr;
};

// GPU-direct second level (a dynamic cache over a host-mapped table that holds every key): the misses of the find
// just launched (its list and ctrl[kCtrlPending] on the device) are probed in the second level's device index and
// each miss's (row id, cache bucket, key, position) staged - row kNoRow for a key the second level lacks (it keeps
// its default row, and is cached as the host path does); entries past the miss count get row kNoRow and bucket =
// cache_buckets (nothing to insert). The gather then copies the rows from pinned host memory into the output in
// ascending row id (sorted_row, order).
constexpr int64_t kNoRow = INT64_MAX;  // sorts after every row id

struct SecondLevelArgs {
  const int32_t* miss_pos = nullptr;  // (n,)
  const int64_t* miss_keys = nullptr;  // (n,)
  int64_t* ctrl = nullptr;             // the cache's control block: kCtrlPending in, kCtrlSecondLevelHits out
  int64_t n = 0;                       // the batch's keys: capacity of the list and the staging arrays
  FindArgs index;                      // the second level: slot_keys, digests, slot_rows, spill, num_buckets,
                                       // values = its host-mapped rows, dim
  void* out = nullptr;                 // (n, dim) of out_dtype
  int32_t out_dtype = kOutFloat32;
  int64_t cache_buckets = 0;
  int64_t* stage_row = nullptr;        // (n,) probe out
  int64_t* stage_bucket = nullptr;     // (n,) probe out
  int64_t* stage_key = nullptr;        // (n,) probe out
  int64_t* stage_pos = nullptr;        // (n,) probe out, gather in
  const int64_t* sorted_row = nullptr;  // (n,) gather in: stage_row sorted
  const int64_t* order = nullptr;       // (n,) gather in: sorted_row[q] = stage_row[order[q]]
};

// The insert of staged rows in (bucket, key) order: keys[perm[q]] -> the stored row rows + perm[q] * row_bytes for
// q < n, runs of one bucket each; entries whose bucket is num_buckets are skipped. Counts added to
// counts[kInserted..kRefused].
struct InsertSortedArgs {
  int64_t* slot_keys = nullptr;
  uint8_t* digests = nullptr;
  int32_t* scores = nullptr;
  void* values = nullptr;
  const int64_t* clock = nullptr;
  const void* keys = nullptr;  // int32 or int64 (key_is_int64)
  bool key_is_int64 = true;
  const void* rows = nullptr;
  const int64_t* sorted_bucket = nullptr;
  const int64_t* perm = nullptr;
  int64_t n = 0;
  int64_t row_bytes = 0;  // of a stored row
  int32_t storage = kStoreFloat32;
  bool lru = true;
  int64_t num_buckets = 0;
  int64_t* counts = nullptr;
  // optional: entry i's row is rows + row_of[i] * row_bytes, or the stored row fill_row when row_of[i] is kNoRow
  const int64_t* row_of = nullptr;
  const void* fill_row = nullptr;
  const int32_t* sketch = nullptr;  // admission sketch (LFU caches), or null
  int64_t sketch_width = 0;
};

}  // namespace hps
