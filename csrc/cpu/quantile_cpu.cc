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

TailQuantileCPU::TailQuantileCPU(int64_t units, int64_t keep)
    // Slack of at least `keep` values: compaction (O(capacity)) then costs O(1) per
    // appended value, and appends are rare once the bound has risen.
    : units_(units), keep_(keep), capacity_(keep + std::max<int64_t>(keep, 4096)) {
  values_.resize(size_t(units_ * capacity_));
  count_.assign(size_t(units_), 0);
  bound_.assign(size_t(units_), -std::numeric_limits<float>::infinity());
}

void TailQuantileCPU::compact(int64_t unit) {
  float* v = values_.data() + unit * capacity_;
  int64_t& c = count_[unit];
  if (c <= keep_) return;
  std::nth_element(v, v + (keep_ - 1), v + c, std::greater<float>());
  c = keep_;
  // Everything kept is >= v[keep-1]; a later value equal to it cannot change the
  // multiset of the `keep` largest, so strict '>' filtering stays exact.
  bound_[unit] = v[keep_ - 1];
}

void TailQuantileCPU::offer(int64_t unit, const float* v, int64_t n) {
  float* buf = values_.data() + unit * capacity_;
  int64_t& c = count_[unit];
  const int64_t room = capacity_ - keep_;
  for (int64_t s = 0; s < n; s += room) {  // chunks that always fit after a compaction
    const int64_t m = std::min(room, n - s);
    if (c + m > capacity_) compact(unit);
    c = append_greater()(v + s, m, bound_[unit], buf, c);
  }
}

void TailQuantileCPU::insert(int64_t unit, const float* values, int64_t count) {
  offer(unit, values, count);
}

namespace {

template <DType D>
BadValue scan_batch(TailQuantileCPU& self, const ActivationView& a, float* maxima, int threads) {
  const ScanMapsFn scan = scan_maps();
  const int64_t K = a.units, B = a.batch, n = a.map_size;
  std::vector<BadValue> bad(size_t(std::max(threads, 1)));
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t k0 = K * t / T, k1 = K * (t + 1) / T;
    std::vector<float> scratch(D == DType::F32 ? 0 : static_cast<size_t>((k1 - k0) * n));
    std::vector<float> mx(static_cast<size_t>(k1 - k0)), amax(static_cast<size_t>(k1 - k0));
    BadValue& my_bad = bad[size_t(t)];
    for (int64_t b = 0; b < B && k1 > k0; ++b) {
      int64_t stride;
      const float* base = unit_range_as_float<D>(a, b, k0, k1, scratch.data(), &stride);
      const int64_t first = scan(base, k1 - k0, stride, n, mx.data(), amax.data());
      if (first >= 0) {
        const float* v = base + first * stride;
        int64_t pos = 0;
        while (pos < n && std::isfinite(v[pos])) ++pos;
        my_bad = BadValue{k0 + first, b, pos};
        break;
      }
      for (int64_t i = 0; i < k1 - k0; ++i) {
        const int64_t k = k0 + i;
        if (maxima) maxima[b * K + k] = mx[size_t(i)];
        if (mx[size_t(i)] > self.bound(k)) self.offer(k, base + i * stride, n);
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
  const float* v = values_.data() + unit * capacity_;
  std::vector<float> out(v, v + count_[unit]);
  std::sort(out.begin(), out.end(), std::greater<float>());
  if (int64_t(out.size()) > keep_) out.resize(size_t(keep_));
  return out;
}

void TailQuantileCPU::order_statistic(int64_t rank, float* out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 8)
  for (int64_t k = 0; k < units_; ++k) {
    float* v = values_.data() + k * capacity_;
    const int64_t c = count_[k];
    if (rank < 0 || rank >= c || rank >= keep_) {
      out[k] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    std::nth_element(v, v + rank, v + c, std::greater<float>());
    out[k] = v[rank];
  }
}

}  // namespace ndf
