// The resident index on the host: key -> row of a table's dense row array (layout in lookup_layout.h). It is
// built and changed here, on the CPU, in key order of arrival - so it is the same on every device - and a device
// pipeline copies it (whole, or the buckets a change touched) to its device.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "checks.h"
#include "lookup_layout.h"
#include "stored_rows.h"

namespace hps {

// Checks of a resident index's tensors as the find ops take them: index_keys (S,) int64, index_digests (S,) uint8,
// index_rows (S,) int32, index_spill (S / kBucketSize,) uint8 on one device, and rows (R, W) stored rows
// (stored_rows.h) on that device or, for an index on a GPU, in pinned host memory. Returns the number of buckets.
inline int64_t check_resident_index(const at::Tensor& index_keys, const at::Tensor& index_digests,
                                    const at::Tensor& index_rows, const at::Tensor& index_spill,
                                    const at::Tensor& rows) {
  HPS_CHECK_DTYPE(index_keys, at::kLong);
  HPS_CHECK_DTYPE(index_digests, at::kByte);
  HPS_CHECK_DTYPE(index_rows, at::kInt);
  HPS_CHECK_DTYPE(index_spill, at::kByte);
  check_stored(rows, "rows");
  HPS_CHECK_DIM(index_keys, 1);
  const int64_t slots = index_keys.size(0);
  TORCH_CHECK_VALUE(slots > 0 && slots % kBucketSize == 0, "index slot count must be a positive multiple of ",
                    kBucketSize, ", found ", slots);
  for (const at::Tensor* t : {&index_digests, &index_rows}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == slots, "index tensors must have shape (", slots, ",), found ",
                      t->sizes());
  }
  TORCH_CHECK_VALUE(index_spill.dim() == 1 && index_spill.size(0) == slots / kBucketSize,
                    "index_spill must have shape (", slots / kBucketSize, ",), found ", index_spill.sizes());
  for (const at::Tensor* t : {&index_keys, &index_digests, &index_rows, &index_spill, &rows}) {
    HPS_CHECK_CONTIGUOUS(*t);
  }
  for (const at::Tensor* t : {&index_digests, &index_rows, &index_spill}) HPS_CHECK_SAME_DEVICE(*t, index_keys);
  TORCH_CHECK_VALUE(rows.device() == index_keys.device() || (index_keys.is_cuda() && rows.is_pinned()),
                    "rows must be on the index's device ", index_keys.device(),
                    " (or in pinned host memory for a GPU index), found ", rows.device());
  return slots / kBucketSize;
}

class ResidentIndex {
 public:
  // An index sized for `expected_keys` keys at kResidentLoad (at least one bucket).
  explicit ResidentIndex(int64_t expected_keys);

  // Slot of `key`, or -1.
  int64_t find(int64_t key) const;
  // Row of `key`, or -1.
  int64_t row_of(int64_t key) const {
    const int64_t s = find(key);
    return s < 0 ? -1 : rows_[s];
  }
  // Map `key` to `row`: a present key gets the new row, a new key a slot of its primary bucket, else of its
  // secondary one; when both are full the index grows (every key re-placed) until it fits. Buckets whose slots or
  // spill flag changed are appended to `touched` (may repeat); `rebuilt` is set when the index grew.
  void put(int64_t key, int32_t row, std::vector<int64_t>* touched, bool* rebuilt);

  int64_t size() const { return size_; }
  int64_t num_buckets() const { return num_buckets_; }
  int64_t num_slots() const { return num_buckets_ * kBucketSize; }
  // Keys in their secondary bucket (a find of them probes two buckets).
  int64_t spilled_keys() const { return spilled_keys_; }
  int64_t memory_bytes() const { return num_slots() * (8 + 1 + 4) + num_buckets_; }

  // The state as CPU tensors sharing this object's memory (valid until the next put that grows the index):
  // keys (S,) int64, digests (S,) uint8, rows (S,) int32, spill (B,) uint8.
  at::Tensor keys_tensor();
  at::Tensor digests_tensor();
  at::Tensor rows_tensor();
  at::Tensor spill_tensor();
  const int64_t* keys() const { return keys_.data(); }
  const uint8_t* digests() const { return digests_.data(); }
  const int32_t* rows() const { return rows_.data(); }
  const uint8_t* spill() const { return spill_.data(); }

 private:
  // Place a key known to be absent; false if both of its buckets are full (nothing changed then).
  bool place(int64_t key, int32_t row, uint64_t h, std::vector<int64_t>* touched);
  void grow();

  int64_t num_buckets_ = 1;
  int64_t size_ = 0;
  int64_t spilled_keys_ = 0;
  std::vector<int64_t> keys_;
  std::vector<uint8_t> digests_;
  std::vector<int32_t> rows_;
  std::vector<uint8_t> spill_;
};

}  // namespace hps
