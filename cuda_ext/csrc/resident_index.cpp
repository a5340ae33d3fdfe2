// ResidentIndex (resident_index.h): built on the host, one key at a time: the primary bucket while it has room,
// else the secondary one, else one key of either bucket moves to its own other bucket to make room (one cuckoo
// step); only when none can move does the index grow. At load 0.8 with 32-slot buckets a primary overflows for
// ~1% of keys, and a cuckoo step almost always finds room, so finds rarely probe twice and the index rarely grows.
#include "resident_index.h"

#include <cmath>

namespace hps {
namespace {

int64_t buckets_for(int64_t keys) {
  const double slots = std::ceil(static_cast<double>(keys < 1 ? 1 : keys) / kResidentLoad);
  const int64_t b = (static_cast<int64_t>(slots) + kBucketSize - 1) / kBucketSize;
  return b < 1 ? 1 : b;
}

// Lowest free slot of the bucket starting at `base`, or -1.
int64_t free_slot(const std::vector<uint8_t>& digests, int64_t base) {
  for (int64_t j = 0; j < kBucketSize; ++j) {
    if (digests[base + j] == kEmptyDigest) return base + j;
  }
  return -1;
}

}  // namespace

ResidentIndex::ResidentIndex(int64_t expected_keys) : num_buckets_(buckets_for(expected_keys)) {
  TORCH_CHECK_VALUE(num_buckets_ < (int64_t{1} << 31), "resident index: ", expected_keys, " keys need too many buckets");
  keys_.assign(num_slots(), 0);
  digests_.assign(num_slots(), kEmptyDigest);
  rows_.assign(num_slots(), 0);
  spill_.assign(num_buckets_, 0);
}

int64_t ResidentIndex::find(int64_t key) const {
  const uint64_t h = mix64(key_bits(key));
  const uint8_t d = digest_of(h);
  const int64_t b1 = bucket_of(h, num_buckets_);
  for (int pass = 0; pass < 2; ++pass) {
    const int64_t b = pass == 0 ? b1 : secondary_bucket_of(h, num_buckets_, b1);
    const int64_t base = b * kBucketSize;
    for (int64_t j = 0; j < kBucketSize; ++j) {
      if (digests_[base + j] == d && keys_[base + j] == key) return base + j;
    }
    if (!spill_[b1]) return -1;
  }
  return -1;
}

bool ResidentIndex::place(int64_t key, int32_t row, uint64_t h, std::vector<int64_t>* touched) {
  const int64_t b1 = bucket_of(h, num_buckets_);
  const int64_t b2 = secondary_bucket_of(h, num_buckets_, b1);
  int64_t b = b1;
  int64_t s = free_slot(digests_, b1 * kBucketSize);
  if (s < 0 && b2 != b1) {
    b = b2;
    s = free_slot(digests_, b2 * kBucketSize);
  }
  // Both full: move one of their keys to its other bucket if that has room (one cuckoo step), freeing a slot.
  for (int pass = 0; s < 0 && pass < 2 && b2 != b1; ++pass) {
    b = pass == 0 ? b1 : b2;
    for (int64_t j = 0; j < kBucketSize && s < 0; ++j) {
      const int64_t from = b * kBucketSize + j;
      const uint64_t hk = mix64(key_bits(keys_[from]));
      const int64_t p = bucket_of(hk, num_buckets_);
      const int64_t alt = b == p ? secondary_bucket_of(hk, num_buckets_, p) : p;
      if (alt == b) continue;
      const int64_t to = free_slot(digests_, alt * kBucketSize);
      if (to < 0) continue;
      keys_[to] = keys_[from];
      rows_[to] = rows_[from];
      digests_[to] = digests_[from];
      digests_[from] = kEmptyDigest;
      if (alt != p) {  // it now lives in its secondary bucket
        ++spilled_keys_;
        if (!spill_[p]) {
          spill_[p] = 1;
          if (touched) touched->push_back(p);
        }
      } else {
        --spilled_keys_;
      }
      if (touched) touched->push_back(alt);
      s = from;
    }
  }
  if (s < 0) return false;
  if (b != b1) {
    ++spilled_keys_;
    if (!spill_[b1]) {
      spill_[b1] = 1;
      if (touched) touched->push_back(b1);
    }
  }
  keys_[s] = key;
  rows_[s] = row;
  digests_[s] = digest_of(h);
  ++size_;
  if (touched) touched->push_back(b);
  return true;
}

void ResidentIndex::put(int64_t key, int32_t row, std::vector<int64_t>* touched, bool* rebuilt) {
  const int64_t s = find(key);
  if (s >= 0) {
    rows_[s] = row;
    if (touched) touched->push_back(s / kBucketSize);
    return;
  }
  const uint64_t h = mix64(key_bits(key));
  while (!place(key, row, h, touched)) {
    grow();
    if (rebuilt) *rebuilt = true;
  }
}

// Re-place every key into 1.25x the buckets (rows unchanged) until all of them fit.
void ResidentIndex::grow() {
  std::vector<int64_t> old_keys;
  std::vector<int32_t> old_rows;
  old_keys.reserve(size_);
  old_rows.reserve(size_);
  for (int64_t s = 0; s < num_slots(); ++s) {
    if (digests_[s] != kEmptyDigest) {
      old_keys.push_back(keys_[s]);
      old_rows.push_back(rows_[s]);
    }
  }
  int64_t buckets = num_buckets_;
  for (;;) {
    buckets = buckets + buckets / 4 + 1;
    TORCH_CHECK_VALUE(buckets < (int64_t{1} << 31), "resident index: cannot place ", old_keys.size() + 1, " keys");
    num_buckets_ = buckets;
    size_ = 0;
    spilled_keys_ = 0;
    keys_.assign(num_slots(), 0);
    digests_.assign(num_slots(), kEmptyDigest);
    rows_.assign(num_slots(), 0);
    spill_.assign(num_buckets_, 0);
    bool ok = true;
    for (size_t i = 0; i < old_keys.size() && ok; ++i) {
      ok = place(old_keys[i], old_rows[i], mix64(key_bits(old_keys[i])), nullptr);
    }
    if (ok) return;
  }
}

at::Tensor ResidentIndex::keys_tensor() { return at::from_blob(keys_.data(), {num_slots()}, at::kLong); }
at::Tensor ResidentIndex::digests_tensor() { return at::from_blob(digests_.data(), {num_slots()}, at::kByte); }
at::Tensor ResidentIndex::rows_tensor() { return at::from_blob(rows_.data(), {num_slots()}, at::kInt); }
at::Tensor ResidentIndex::spill_tensor() { return at::from_blob(spill_.data(), {num_buckets_}, at::kByte); }

}  // namespace hps
