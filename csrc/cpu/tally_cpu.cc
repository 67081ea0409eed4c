// CPU backend of the fused tally. Units are split among OpenMP threads (each
// unit's rows of I and A have one writer), images are visited in order, so the
// counts are the same for every thread count, batch size and batch order.
//
// Per (image, unit): the map's maximum decides whether any pixel can exceed the
// threshold; if so, only cells whose corners can exceed it are upsampled, a row
// segment at a time, and the mask is walked as runs against runs of equal label
// sets, so the cost grows with the runs, not the pixels.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ndf/quantile.h"
#include "cpu_simd.h"
#include "ndf/label_prep.h"
#include "map_range.h"
#include "ndf/tally.h"

namespace ndf {
namespace {

struct Geometry {
  int64_t mh, mw, sh, sw;
  std::vector<AxisWeight> yw;
  std::vector<Span> yspans, xspans;
  std::vector<int32_t> x0, x1;
  std::vector<float> wx0, wx1;
};

struct Scratch {
  std::vector<float> map, hrows;
  std::vector<int64_t> hlo, hhi;  // per source row: columns [lo, hi) of hrows are valid
  std::vector<uint64_t> bits;
  std::vector<int64_t> cnt;
  std::vector<int32_t> touched;
  Scratch(const Geometry& g, int64_t max_sets)
      : map(size_t(g.mh * g.mw)), hrows(size_t(g.mh * g.sw)), hlo(size_t(g.mh)), hhi(size_t(g.mh)),
        bits(size_t(g.sw / 64 + 2)), cnt(size_t(max_sets), 0) {
    touched.reserve(size_t(max_sets));
  }
};

// Counts one (image b, unit k) map `m` (floats, row-major mh x mw) that may
// exceed T somewhere.
void count_map(int64_t b, int64_t k, const float* m, float T, const LabelBatchView& lb,
                const LabelSpace& space, const BatchLabels& info, const Geometry& g, Rule rule,
                TallyCounts out, Scratch& sc) {
  const ThresholdRowFn threshold_row = threshold_row_bits();
  const InterpRowFn interp = interp_row();
  const int64_t L = space.num_labels, C = space.num_categories, sw = g.sw;
  int64_t* Ik = out.intersection + k * L;
  int64_t* Ak = out.cat_activation + k * C;
  {
    std::fill(sc.hlo.begin(), sc.hlo.end(), int64_t(0));
    std::fill(sc.hhi.begin(), sc.hhi.end(), int64_t(0));
    const uint16_t* ps = lb.pixel_sets + b * g.sh * sw;
    const uint16_t* re = info.run_end.data() + b * g.sh * sw;
    int64_t M = 0;
    for (const Span& ys : g.yspans) {
      const float* r0 = m + int64_t(ys.i0) * g.mw;
      const float* r1 = m + int64_t(ys.i1) * g.mw;
      int64_t xa = -1, xb = -1;
      for (const Span& xs : g.xspans) {
        const float c00 = r0[xs.i0], c01 = r0[xs.i1], c10 = r1[xs.i0], c11 = r1[xs.i1];
        const float cmax = std::max(std::max(c00, c01), std::max(c10, c11));
        const float cmin = std::min(std::min(c00, c01), std::min(c10, c11));
        if (interp_upper_bound(cmax, std::max(cmax, -cmin)) > T) {
          if (xa < 0) xa = xs.start;
          xb = xs.end;
        }
      }
      if (xa < 0) continue;
      for (int32_t src : {ys.i0, ys.i1}) {  // upsample along x only the columns needed
        int64_t& lo = sc.hlo[size_t(src)];
        int64_t& hi = sc.hhi[size_t(src)];
        if (xa < lo || xb > hi) {
          interp(m + int64_t(src) * g.mw, g.x0.data() + xa, g.x1.data() + xa, g.wx0.data() + xa,
                 g.wx1.data() + xa, xb - xa, sc.hrows.data() + int64_t(src) * sw + xa);
          if (xb < lo || xa > hi || lo >= hi) {
            lo = xa;
            hi = xb;
          } else {
            lo = std::min(lo, xa);
            hi = std::max(hi, xb);
          }
        }
      }
      const float* top = sc.hrows.data() + int64_t(ys.i0) * sw;
      const float* bot = sc.hrows.data() + int64_t(ys.i1) * sw;
      uint64_t* bits = sc.bits.data();
      for (int32_t py = ys.start; py < ys.end; ++py) {
        threshold_row(top, bot, g.yw[size_t(py)].w0, g.yw[size_t(py)].w1, T, xa, xb, bits);
        const uint16_t* prow = ps + int64_t(py) * sw;
        const uint16_t* rrow = re + int64_t(py) * sw;
        for (int64_t wi = xa >> 6; wi <= (xb - 1) >> 6; ++wi) {
          uint64_t w = bits[wi];
          while (w) {  // each run of set bits is a run of mask pixels
            const int s0 = __builtin_ctzll(w);
            const uint64_t rest = ~(w >> s0);
            const int len = rest ? __builtin_ctzll(rest) : 64 - s0;
            int64_t p = wi * 64 + s0;
            const int64_t q = p + len;
            M += len;
            while (p < q) {  // split the mask run at label-set boundaries
              const int64_t r = std::min<int64_t>(rrow[p], q);
              const uint16_t s = prow[p];
              if (sc.cnt[s] == 0) sc.touched.push_back(s);
              sc.cnt[s] += r - p;
              p = r;
            }
            w = (s0 + len >= 64) ? 0 : (w & (~0ull << (s0 + len)));
          }
        }
      }
    }
    if (M == 0) return;
    uint32_t overlap = 0;
    const int64_t s0 = lb.set_start[b];
    for (int32_t s : sc.touched) {
      const int64_t c = sc.cnt[size_t(s)];
      sc.cnt[size_t(s)] = 0;
      const int64_t gs = s0 + s;
      overlap |= info.set_categories[size_t(gs)];
      for (int64_t j = lb.set_label_start[gs]; j < lb.set_label_start[gs + 1]; ++j) Ik[lb.set_labels[j]] += c;
    }
    sc.touched.clear();
    for (int64_t j = lb.image_label_start[b]; j < lb.image_label_start[b + 1]; ++j) Ik[lb.image_labels[j]] += M;
    uint32_t cats = counted_categories(rule, info.image_categories[size_t(b)], overlap,
                                       info.image_level_categories[size_t(b)]);
    for (int32_t c = 0; cats; ++c, cats >>= 1)
      if (cats & 1u) Ak[c] += M;
  }
}

template <DType D>
TallyStatus run_tally(const ActivationView& a, const float* thresholds, const LabelBatchView& lb,
                      const LabelSpace& space, const TallyConfig& cfg, TallyCounts out, int threads) {
  Geometry g;
  g.mh = cfg.map_h;
  g.mw = cfg.map_w;
  g.sh = lb.seg_h;
  g.sw = lb.seg_w;
  g.yw = axis_weights(cfg.upsample, true, g.mh, g.sh);
  const std::vector<AxisWeight> xw = axis_weights(cfg.upsample, false, g.mw, g.sw);
  g.yspans = cell_spans(g.yw);
  g.xspans = cell_spans(xw);
  for (const AxisWeight& w : xw) {
    g.x0.push_back(w.i0);
    g.x1.push_back(w.i1);
    g.wx0.push_back(w.w0);
    g.wx1.push_back(w.w1);
  }
  // Reused across calls: fresh multi-megabyte buffers every batch cost page faults.
  // (A reference, so OpenMP threads see the caller's buffers, not their own.)
  static thread_local BatchLabels cache;
  BatchLabels& info = cache;
  TallyStatus st = prepare_labels(lb, space, threads, info);
  if (st.code != TallyStatus::Ok) return st;

  const int64_t K = a.units;
  std::vector<TallyStatus> bad(size_t(std::max(threads, 1)));
#pragma omp parallel num_threads(threads)
  {
    Scratch sc(g, std::max<int64_t>(info.max_sets, 1));
    TallyStatus& my_bad = bad[size_t(omp_get_thread_num())];
    const ScanMapsFn scan = scan_maps();
    // Each thread owns a range of units (their rows of I and A have one writer)
    // and walks the images in order, so one image's labels stay in cache while
    // all its units are counted.
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t k0 = K * t / T, k1 = K * (t + 1) / T;
    std::vector<float> conv(D == DType::F32 ? 0 : static_cast<size_t>((k1 - k0) * a.map_size));
    std::vector<float> mx(static_cast<size_t>(k1 - k0)), amax(static_cast<size_t>(k1 - k0));
    for (int64_t b = 0; b < a.batch && k1 > k0; ++b) {
      int64_t stride;
      const float* base = unit_range_as_float<D>(a, b, k0, k1, conv.data(), &stride);
      const int64_t first = scan(base, k1 - k0, stride, a.map_size, mx.data(), amax.data());
      if (first >= 0) {
        my_bad = TallyStatus{TallyStatus::NonFinite, b, k0 + first, 0};
        break;
      }
      for (int64_t i = 0; i < k1 - k0; ++i) {
        const float T = thresholds[k0 + i];
        if (interp_upper_bound(mx[size_t(i)], amax[size_t(i)]) <= T) continue;  // no pixel can exceed T
        count_map(b, k0 + i, base + i * stride, T, lb, space, info, g, cfg.rule, out, sc);
      }
    }
  }
  for (const TallyStatus& b : bad)
    if (b.code != TallyStatus::Ok &&
        (st.code == TallyStatus::Ok || b.image < st.image || (b.image == st.image && b.unit < st.unit)))
      st = b;
  if (st.code != TallyStatus::Ok) return st;

  add_label_pixels(lb, out.label_pixels);
  return st;
}

}  // namespace

TallyStatus tally_cpu(const ActivationView& acts, const float* thresholds, const LabelBatchView& labels,
                      const LabelSpace& space, const TallyConfig& cfg, TallyCounts out, int threads) {
  switch (acts.dtype) {
    case DType::F32: return run_tally<DType::F32>(acts, thresholds, labels, space, cfg, out, threads);
    case DType::F16: return run_tally<DType::F16>(acts, thresholds, labels, space, cfg, out, threads);
    case DType::BF16: return run_tally<DType::BF16>(acts, thresholds, labels, space, cfg, out, threads);
  }
  return TallyStatus{};
}

}  // namespace ndf
