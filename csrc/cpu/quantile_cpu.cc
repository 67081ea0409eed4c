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
    // Slack of keep/2 values: compaction (a vectorized select, O(capacity)) stays
    // O(1) per appended value while the bound rises often enough that most maps
    // are rejected by one compare (a larger slack keeps a stale, low bound longer).
    : units_(units), keep_(keep), capacity_(keep + std::max<int64_t>(keep / 2, 256)) {
  values_.resize(size_t(units_ * capacity_));
  count_.assign(size_t(units_), 0);
  bound_.assign(size_t(units_), -std::numeric_limits<float>::infinity());
}

void TailQuantileCPU::compact(int64_t unit) {
  float* v = values_.data() + unit * capacity_;
  int64_t& c = count_[unit];
  if (c <= keep_) return;
  static thread_local std::vector<float> tmp;
  if (tmp.size() < size_t(c)) tmp.resize(size_t(capacity_));
  // Everything kept is >= the returned value; a later value equal to it cannot
  // change the multiset of the `keep` largest, so strict '>' filtering stays exact.
  bound_[unit] = select_top()(v, c, keep_, tmp.data());
  c = keep_;
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
    // Images in tiles: each unit's offers for a tile come back to back, so its
    // buffer stays in cache (as in the tally).
    constexpr int64_t kTile = 8;
    const int64_t R = k1 - k0;
    std::vector<float> scratch(D == DType::F32 ? 0 : static_cast<size_t>(kTile * R * n));
    std::vector<float> mx(static_cast<size_t>(kTile * R)), amax(static_cast<size_t>(kTile * R));
    const float* base[kTile];
    int64_t stride[kTile];
    BadValue& my_bad = bad[size_t(t)];
    for (int64_t b0 = 0; b0 < B && R > 0 && my_bad.unit < 0; b0 += kTile) {
      const int64_t nb = std::min(kTile, B - b0);
      for (int64_t j = 0; j < nb; ++j) {
        base[j] = unit_range_as_float<D>(a, b0 + j, k0, k1, scratch.data() + j * R * n, &stride[j]);
        const int64_t first = scan(base[j], R, stride[j], n, mx.data() + j * R, amax.data() + j * R);
        if (first >= 0) {
          const float* v = base[j] + first * stride[j];
          int64_t pos = 0;
          while (pos < n && std::isfinite(v[pos])) ++pos;
          my_bad = BadValue{k0 + first, b0 + j, pos};
          break;
        }
      }
      if (my_bad.unit >= 0) break;
      for (int64_t i = 0; i < R; ++i) {
        const int64_t k = k0 + i;
        for (int64_t j = 0; j < nb; ++j) {
          const float m = mx[size_t(j * R + i)];
          if (maxima) maxima[(b0 + j) * K + k] = m;
          if (m > self.bound(k)) self.offer(k, base[j] + i * stride[j], n);
        }
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
      out[k] = select(values_.data() + k * capacity_, c, rank + 1, tmp.data());
    }
  }
}

}  // namespace ndf
