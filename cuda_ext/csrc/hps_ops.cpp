// THE schema file: every op of the `hps` library is declared here, once. CPU kernels register in
// cpu/<op>_cpu.cpp (TORCH_LIBRARY_IMPL(hps, CPU, m)), CUDA kernels in cuda/<op>_cuda.cu
// (TORCH_LIBRARY_IMPL(hps, CUDA, m)); fake (meta) kernels live in hps_core/ops.py.
//
// The cache op contract (identical results on CPU and CUDA), state as in cache_state.h:
//  * A key lives in bucket bucket_of(mix64(key)) of kBucketSize slots; a bucket is searched whole.
//  * values are stored rows of any storage (row_codec.h; (S, W) for dim D). new_values (insert_or_assign,
//           insert_grouped, assign) are stored rows of values' dtype and width, encoded by the caller and copied as
//           they are; rows never enter the key / score / eviction decisions.
//  * find:  hits decoded out as float32 (n, D) (misses -> 0), found mask. If n > 0 the clock is bumped by one
//           first; LRU hits get score = the new clock, LFU hits get +1 per occurrence (saturating). Duplicates are
//           all served.
//  * insert_or_assign: keys are applied in input order as if one at a time (the CUDA twin sorts by bucket,
//           stably, and walks each bucket's keys in order, so the result is the same). A present key gets the
//           new value (score untouched). A new key takes the lowest free slot of its bucket; in a full bucket it
//           evicts the slot with the lowest score, ties to the lowest slot index, never a slot written by this
//           same call; if every slot was written by this call the key is refused. New keys get score = clock
//           (LRU) or 1 (LFU). Later duplicates of a key in one call assign (last value wins).
//           With an admission sketch (LFU only; cache_layout.h): a new key that would evict is refused unless its
//           estimate (min of its counters) is above the victim's score, and a new key's score is
//           max(estimate, 1). Returns counts (4,) int64: [inserted, assigned, evicted, refused].
//  * sketch_add(sketch, keys, skip): +1 on the kSketchDepth counters of each key with skip false (every key
//           without skip); duplicates count each time (what a find's misses add: `skip` = found).
//  * insert_grouped: insert_or_assign for keys already in non-decreasing bucket order (so the CUDA twin needs no
//           sort: one launch); the counts are ADDED to `counts` (4,) instead of returned. The CPU twin raises on
//           keys out of bucket order; the CUDA twin does not check (a key out of order still lands in its own
//           bucket, but two warps may then walk that bucket at once).
//  * assign: only present keys change value (last duplicate wins); scores untouched. Returns count (0-d int64).
//  * erase: present keys' slots freed. Returns count of keys erased (0-d int64).
//  * contains: found mask, no score change.
//  * export_batch: occupied slots of [start, end) in slot order, as fixed-capacity (end - start) buffers + count;
//           the rows as stored (values' dtype and width).
//  * clear: every slot empty, scores and clock zero.  size: occupied slot count (0-d int64).
//  * decay: scores halved (LFU ageing; for LRU the clock is halved too, which keeps the recency order).
//
// Lookup-pipeline ops (same on both devices; no host synchronisation needed between them):
//  * compact_misses(keys (n,), found (n,)) -> unique_keys (n,) int64: the distinct keys of the miss positions in
//           ascending order; positions (n,) int64: the miss positions in ascending order; inverse (n,) int64:
//           for each miss position the index of its key in unique_keys; counts (2,) int64 = [misses, unique].
//           Buffers are of capacity n; entries past the counts are unspecified.
//  * scatter_rows(out (n, D), positions, inverse, rows (u, D), counts): out[positions[i]] = rows[inverse[i]]
//           for i < counts[0].
//  * bag_reduce(values (n, D), offsets (B+1,) int64 with offsets[B] == n, weights (n,) float32 or None, mode)
//           -> (B, D): per bag the sum (mode 0), mean (1) or sqrtn (2) of w_i * v_i; mean divides by sum(w),
//           sqrtn by sqrt(sum(w^2)) (w = 1 without weights); an empty bag, or a zero divisor, gives zeros.
//  * gather_rows(table (N, D), rows (n,) int64) -> (n, D) on rows' device: out[i] = table[rows[i]]; a row id
//           outside [0, N) gives a zero row. On CUDA the table may live in device memory or in host memory
//           (HPS's "uvm" mode); `strategy` picks how host rows travel, never what they are: 1 = zero-copy reads
//           by the kernel (pinned tables only), 2 = CPU gather into pinned staging + copy engine (syncs the host),
//           0 = zero-copy for a pinned table, staged for a pageable one.
//
// Lookup-pipeline finds (lookup_cpu.cpp / lookup_cuda.cu; the LookupPipeline runs the same kernels):
//  * cache_find_misses(cache state, keys, policy, default_value) -> out (n, D): hits' rows (scores and clock as
//           cache_find), the default row for misses; miss_positions (n,) int32 and miss_keys (n,) int64: the
//           misses in no particular order, valid up to miss_count (0-d int64, on the keys' device); zeros after.
//  * resident_find(index_keys, index_digests, index_rows, index_spill, rows, keys, default_value) -> the same four
//           outputs for a resident table: keys (S,) / digests (S,) / rows (S,) int32 / spill (S/32,) of the index
//           (lookup_layout.h), rows (R, D) on the index's device (or pinned host memory for a GPU index).
//  * resident_index_build(keys (N,) int64 CPU) -> the resident index of row i = keys[i] as CPU tensors (the index
//           a pipeline builds while loading; a later duplicate's row wins).
//  * lookup(handle, keys) -> keys.shape + (D,): the whole lookup of a LookupPipeline (pipeline.h).
//
// Row codecs (row_codec.h; identical bits on both devices):
//  * encode_rows(rows (n, D) float32, storage) -> stored rows (n, W) in the storage's dtype: 0 float32, 1 float16,
//           2 bfloat16 (W = D), 3 int8 (W = D + 8: row-wise scale and bias), 4 fp8_e4m3 (W = D + 4: row-wise scale).
//  * decode_rows(stored (n, W), dtype=float32) -> (n, D) float32 / bfloat16 / float16.
#include <Python.h>
#include <torch/library.h>

#include "cache_layout.h"
#include "pipeline.h"

namespace hps {
// Defined in cpu/host_map_cpu.cpp: the host-memory tier's hash map, a torch custom class.
void register_host_map_class(torch::Library& m);
}  // namespace hps

TORCH_LIBRARY(hps, m) {
  // Where the fake (meta) kernels live: torch accepts their registration from this module only, and names it when
  // a fake is missing (it does not import it itself: Python code loads the ops through hps_core.ops).
  m.set_python_module("hps_core.ops");
  // Constants shared with Python come from here, not copied.
  m.def("bucket_size() -> int", []() -> int64_t { return hps::kBucketSize; });
  m.def("clock_limit() -> int", []() -> int64_t { return hps::kClockLimit; });
  m.def("sketch_width(int slots) -> int", [](int64_t slots) -> int64_t { return hps::sketch_width_for(slots); });

  // (n,) keys -> bucket (n,) int64, digest (n,) uint8. For tests and tools; the kernels inline the same hash.
  m.def("hash_keys(Tensor keys, int num_buckets) -> (Tensor bucket, Tensor digest)");

  m.def(
      "cache_find(Tensor slot_keys, Tensor digests, Tensor(a!) scores, Tensor values, Tensor(b!) clock, "
      "Tensor keys, int policy) -> (Tensor out, Tensor found)");
  m.def("cache_contains(Tensor slot_keys, Tensor digests, Tensor keys) -> Tensor");
  m.def(
      "cache_insert_or_assign(Tensor(a!) slot_keys, Tensor(b!) digests, Tensor(c!) scores, Tensor(d!) values, "
      "Tensor clock, Tensor keys, Tensor new_values, int policy, Tensor? sketch=None) -> Tensor");
  m.def(
      "cache_insert_grouped(Tensor(a!) slot_keys, Tensor(b!) digests, Tensor(c!) scores, Tensor(d!) values, "
      "Tensor clock, Tensor keys, Tensor new_values, Tensor(e!) counts, int policy, Tensor? sketch=None) -> ()");
  m.def("cache_assign(Tensor slot_keys, Tensor digests, Tensor(a!) values, Tensor keys, Tensor new_values) -> Tensor");
  m.def("cache_erase(Tensor slot_keys, Tensor(a!) digests, Tensor(b!) scores, Tensor keys) -> Tensor");
  m.def(
      "cache_export_batch(Tensor slot_keys, Tensor digests, Tensor values, int start, int end) "
      "-> (Tensor keys, Tensor values, Tensor count)");
  m.def("cache_clear(Tensor(a!) digests, Tensor(b!) scores, Tensor(c!) clock) -> ()");
  m.def("cache_size(Tensor digests) -> Tensor");
  m.def("cache_decay(Tensor(a!) scores, Tensor(b!) clock, int policy) -> ()");
  // Admission sketch (cache_layout.h): add one to the counters of every key whose `skip` entry is false (all keys
  // without `skip`) - what a find's misses add - duplicates counted each time.
  m.def("sketch_add(Tensor(a!) sketch, Tensor keys, Tensor? skip=None) -> ()");

  m.def("compact_misses(Tensor keys, Tensor found) -> (Tensor unique_keys, Tensor positions, Tensor inverse, Tensor counts)");
  m.def("scatter_rows(Tensor(a!) out, Tensor positions, Tensor inverse, Tensor rows, Tensor counts) -> ()");
  m.def("bag_reduce(Tensor values, Tensor offsets, Tensor? weights, int mode) -> Tensor");
  m.def("gather_rows(Tensor table, Tensor rows, int strategy=0) -> Tensor");

  m.def(
      "cache_find_misses(Tensor slot_keys, Tensor digests, Tensor(a!) scores, Tensor values, Tensor(b!) clock, "
      "Tensor keys, int policy, float default_value) -> (Tensor out, Tensor miss_positions, Tensor miss_keys, "
      "Tensor miss_count)");
  m.def(
      "resident_find(Tensor index_keys, Tensor index_digests, Tensor index_rows, Tensor index_spill, Tensor rows, "
      "Tensor keys, float default_value) -> (Tensor out, Tensor miss_positions, Tensor miss_keys, Tensor miss_count)");
  m.def("resident_index_build(Tensor keys) -> (Tensor keys, Tensor digests, Tensor rows, Tensor spill)");
  // A pipeline by handle, not by object: an int passes the dispatcher for nothing, the object itself costs more.
  // Kernels in pipeline.cpp; the class is registered by register_pipeline below.
  m.def("lookup(int handle, Tensor keys, ScalarType? dtype=None) -> Tensor");

  m.def("encode_rows(Tensor rows, int storage) -> Tensor");
  m.def("decode_rows(Tensor stored, ScalarType? dtype=None) -> Tensor");

  hps::register_host_map_class(m);
  hps::register_pipeline(m);
}

// The extension is imported as the Python module hps_core._C; loading it runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "hps native ops (torch.ops.hps)", -1, nullptr};
  return PyModule_Create(&module_def);
}
