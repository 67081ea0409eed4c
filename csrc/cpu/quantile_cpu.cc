// CPU backend of the exact tail: units are split among OpenMP threads, so each
// unit's buffer has one writer and results do not depend on the thread count.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "ndf/quantile.h"
#include "cpu_simd.h"
#include "map_range.h"

namespace ndf {

TailQuantileCPU::TailQuantileCPU(int64_t units, int64_t keep) : units_(units), keep_(keep) {
  count_.assign(size_t(units_), 0);
  bound_.assign(size_t(units_), -std::numeric_limits<float>::infinity());
  reserve_room(0);
}

void TailQuantileCPU::reserve_room(int64_t n) {
  // Slack of keep values: compaction (a vectorized select, O(capacity), mostly
  // cold in cache) stays O(1) per appended value. A smaller slack raises the bound
  // more often, so fewer maps hold a value above it, but compacts more: on
  // bench_quantile's data keep/2 gave 12.5 compactions and 4,700 hot maps per
  // unit, keep 7 and 5,100, ~4 % less time overall. The Python memory budget
  // counts these 2 * keep floats per unit. A whole map must fit after a
  // compaction, so the scan appends map by map. At least 512 of slack: with
  // few values kept (1,000 images of 7x7 at q = 0.995 keep 245) compactions
  // came every 256 appended values, and the quantile pass of bench_tally took
  // 28.8-29.6 ms per 1,000 images against 26.9-27.3 with 512 (768: 27.7-27.9).
  const int64_t capacity = keep_ + std::max({keep_, int64_t(512), n});
  if (capacity <= capacity_) return;
  std::unique_ptr<float[]> grown(new float[size_t(units_ * capacity)]);
  for (int64_t k = 0; k < units_; ++k)
    std::copy_n(values_.get() + k * capacity_, count_[size_t(k)], grown.get() + k * capacity);
  values_ = std::move(grown);
  capacity_ = capacity;
}

void TailQuantileCPU::compact(int64_t unit) {
  float* v = values_.get() + unit * capacity_;
  int64_t& c = count_[size_t(unit)];
  if (c <= keep_) return;
  static thread_local std::vector<float> tmp;
  if (tmp.size() < size_t(c)) tmp.resize(size_t(capacity_));
  // Everything kept is >= the returned value; a later value equal to it cannot
  // change the multiset of the `keep` largest, so strict '>' filtering stays exact.
  bound_[size_t(unit)] = select_top()(v, c, keep_, tmp.data());
  c = keep_;
}

void TailQuantileCPU::insert(int64_t unit, const float* values, int64_t n) {
  float* buf = values_.get() + unit * capacity_;
  int64_t& c = count_[size_t(unit)];
  const int64_t room = capacity_ - keep_;
  for (int64_t s = 0; s < n; s += room) {  // chunks that always fit after a compaction
    const int64_t m = std::min(room, n - s);
    if (c + m > capacity_) compact(unit);
    c = append_greater()(values + s, m, bound_[size_t(unit)], buf, c);
  }
}

namespace {

template <DType D>
BadValue scan_batch(TailQuantileCPU& self, const ActivationView& a, float* maxima, int threads) {
  const ScanAppendFn scan = scan_append();
  const int64_t K = a.units, B = a.batch, n = a.map_size;
  std::vector<BadValue> bad(size_t(std::max(threads, 1)));
#pragma omp parallel num_threads(threads)
  {
    // Each thread owns a fixed range of units, so a unit's tail has one writer
    // and the result cannot depend on the thread count. Images go in order; the
    // hot state of a range (bounds, counts, the end of each tail) stays in L2.
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t k0 = K * t / T, k1 = K * (t + 1) / T, R = k1 - k0;
    std::vector<float> scratch(D == DType::F32 ? 0 : static_cast<size_t>(R * n));
    const int64_t limit = self.capacity() - n;
    BadValue& my_bad = bad[size_t(t)];
    for (int64_t b = 0; b < B && R > 0; ++b) {
      int64_t stride = 0;
      const float* base = unit_range_as_float<D>(a, b, k0, k1, scratch.data(), &stride);
      float* mx = maxima ? maxima + b * K + k0 : nullptr;
      bool poisoned = false;
      for (int64_t i = 0; i < R && !poisoned;) {
        i += scan(base + i * stride, R - i, stride, n, self.bounds() + k0 + i, self.tail(k0 + i), self.capacity(),
                  self.counts() + k0 + i, limit, mx ? mx + i : nullptr, &poisoned);
        if (self.counts()[k0 + i - 1] > limit) self.compact(k0 + i - 1);
      }
      if (poisoned) {  // rare: locate the first non-finite value of this image
        std::vector<float> m(static_cast<size_t>(R)), am(static_cast<size_t>(R));
        const int64_t first = scan_maps()(base, R, stride, n, m.data(), am.data());
        const float* v = base + first * stride;
        int64_t pos = 0;
        while (pos < n && std::isfinite(v[pos])) ++pos;
        my_bad = BadValue{k0 + first, b, pos};
        break;
      }
    }
  }
  BadValue first;
  for (const BadValue& x : bad)
    if (x.unit >= 0 && (first.unit < 0 || x.batch_index < first.batch_index ||
                        (x.batch_index == first.batch_index && x.unit < first.unit)))
      first = x;
  return first;
}

}  // namespace

BadValue TailQuantileCPU::update(const ActivationView& view, float* maxima, int threads) {
  reserve_room(view.map_size);
  switch (view.dtype) {
    case DType::F32:
      return scan_batch<DType::F32>(*this, view, maxima, threads);
    case DType::F16:
      return scan_batch<DType::F16>(*this, view, maxima, threads);
    case DType::BF16:
      return scan_batch<DType::BF16>(*this, view, maxima, threads);
  }
  return BadValue{};
}

std::vector<float> TailQuantileCPU::sorted_tail(int64_t unit) {
  const float* v = values_.get() + unit * capacity_;
  std::vector<float> out(v, v + count_[unit]);
  std::sort(out.begin(), out.end(), std::greater<float>());
  if (int64_t(out.size()) > keep_) out.resize(size_t(keep_));
  return out;
}

void TailQuantileCPU::order_statistic(int64_t rank, float* out, int threads) {
  const SelectTopFn select = select_top();
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> tmp(static_cast<size_t>(capacity_));
#pragma omp for schedule(dynamic, 8)
    for (int64_t k = 0; k < units_; ++k) {
      const int64_t c = count_[k];
      if (rank < 0 || rank >= c || rank >= keep_) {
        out[k] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      // The (rank+1) largest, rearranged within the buffer: the kept multiset is unchanged.
      out[k] = select(values_.get() + k * capacity_, c, rank + 1, tmp.data());
    }
  }
}

}  // namespace ndf
