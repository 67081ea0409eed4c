// Streaming per-unit tail of the largest values: the state behind exact
// thresholds (SPEC §1.1). Each unit keeps its `keep` largest values seen so far;
// a running lower bound (the smallest kept value once the buffer has been full)
// lets a vector compare reject almost every value without touching the buffer.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>
#include "ndf/common.h"

namespace ndf {

class TailQuantileCPU {
 public:
  TailQuantileCPU(int64_t units, int64_t keep);

  int64_t units() const { return units_; }
  int64_t keep() const { return keep_; }

  // Scans a batch. Writes per-(image, unit) maxima to `maxima` (B*K floats,
  // row-major) when not null. Returns the first non-finite value's location
  // (unit == -1 when all values are finite); the state is then partly updated
  // and must not be used further (the Python layer refuses to).
  BadValue update(const ActivationView& view, float* maxima, int threads);

  // Adds `count` values to unit k's tail (merging shards, restoring state).
  void insert(int64_t unit, const float* values, int64_t count);

  // The kept values of unit k, largest first (at most keep()).
  std::vector<float> sorted_tail(int64_t unit);
  // The rank-th largest value (0-based) of every unit (K floats), NaN where the
  // tail holds fewer than rank+1 values.
  void order_statistic(int64_t rank, float* out, int threads);
  int64_t kept(int64_t unit) const { return count_[unit]; }

  // The scan's view of the state (quantile_cpu.cc): a tail of capacity() values
  // per unit, back to back, and counts and bounds per unit.
  int64_t capacity() const { return capacity_; }
  float* tail(int64_t unit) { return values_.get() + unit * capacity_; }
  int64_t* counts() { return count_.data(); }
  const float* bounds() const { return bound_.data(); }
  // Keeps the `keep` largest values of a unit's tail and raises its bound.
  void compact(int64_t unit);

 private:
  // Grows the tails, if needed, so that n values fit after a compaction.
  void reserve_room(int64_t n);

  int64_t units_, keep_, capacity_ = 0;
  // units_ * capacity_, left uninitialized (only each unit's first count_ are
  // read): zeroing a fresh sketch's megabytes cost more than its first batch.
  std::unique_ptr<float[]> values_;
  std::vector<int64_t> count_;  // values held per unit
  std::vector<float> bound_;    // values <= bound_ can never enter the tail
};

const char* cpu_isa_name();  // "avx512", "avx2" or "baseline"

}  // namespace ndf
