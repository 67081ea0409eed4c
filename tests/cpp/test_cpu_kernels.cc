// C++ tests of the CPU kernels' building blocks, each against a plain scalar
// computation written here: the SIMD helpers of cpu_simd.h (in whichever variant
// NDF_CPU_ISA selects; ctest runs this binary once per variant) and the exact tail
// of TailQuantileCPU against sorting. Run by `ctest` in CI under AddressSanitizer.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cpu_simd.h"
#include "ndf/common.h"
#include "ndf/interp.h"
#include "ndf/quantile.h"

namespace {

int failures = 0;

#define CHECK(cond, ...)                                        \
  do {                                                          \
    if (!(cond)) {                                              \
      ++failures;                                               \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                        \
      std::fprintf(stderr, "\n");                               \
    }                                                           \
  } while (0)

std::mt19937 rng(12345);

std::vector<float> random_values(size_t n, int ties) {
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<float> v(n);
  for (float& x : v) x = ties ? std::round(normal(rng) * float(ties)) / float(ties) : normal(rng);
  return v;
}

// select_top: the keep largest values end up in front (as a multiset) and the
// returned value is the keep-th largest, for sizes around the vector width and
// with heavy ties.
void test_select_top() {
  const ndf::SelectTopFn select = ndf::select_top();
  for (size_t n : {1, 2, 15, 16, 17, 63, 64, 65, 100, 1000, 5000}) {
    for (int ties : {0, 1, 4}) {
      const std::vector<float> orig = random_values(n, ties);
      std::vector<float> sorted = orig;
      std::sort(sorted.begin(), sorted.end(), std::greater<float>());
      for (size_t keep : {size_t(1), n / 3 + 1, n / 2 + 1, n}) {
        if (keep == 0 || keep > n) continue;
        std::vector<float> v = orig, tmp(n);
        const float got = select(v.data(), int64_t(n), int64_t(keep), tmp.data());
        CHECK(got == sorted[keep - 1], "n=%zu keep=%zu ties=%d: %g vs %g", n, keep, ties, got, sorted[keep - 1]);
        std::vector<float> front(v.begin(), v.begin() + long(keep));
        std::sort(front.begin(), front.end(), std::greater<float>());
        CHECK(std::equal(front.begin(), front.end(), sorted.begin()), "n=%zu keep=%zu: wrong multiset", n, keep);
        std::sort(v.begin(), v.end(), std::greater<float>());
        CHECK(v == sorted, "n=%zu keep=%zu: values lost or duplicated", n, keep);
      }
    }
  }
}

// scan_append: for every map, the values > its bound are appended (in order) to
// its tail, the maximum is reported, and the scan stops after the first tail
// above `limit`.
void test_scan_append() {
  const ndf::ScanAppendFn scan = ndf::scan_append();
  for (int64_t n : {1, 5, 16, 17, 33, 49, 64, 65, 100, 196}) {
    const int64_t count = 40, stride = n + 3, tstride = 4 * n + 8;
    std::vector<float> maps = random_values(size_t(count * stride), 0);
    std::vector<float> bound(static_cast<size_t>(count));
    for (int64_t i = 0; i < count; ++i) bound[size_t(i)] = i % 5 == 0 ? -INFINITY : float(i % 3) - 0.5f;
    std::vector<float> tails(static_cast<size_t>(count * tstride), 0.0f), mx(static_cast<size_t>(count));
    std::vector<int64_t> held(static_cast<size_t>(count), 0);
    for (int64_t i = 0; i < count; ++i) held[size_t(i)] = i % 4;  // tails already holding values
    const int64_t limit = 2 * n + 4;  // above what the tails hold at the start, as in the caller
    int64_t done = 0;
    while (done < count) {
      bool bad = true;
      const int64_t k = scan(maps.data() + done * stride, count - done, stride, n, bound.data() + done,
                             tails.data() + done * tstride, tstride, held.data() + done, limit, mx.data() + done, &bad);
      CHECK(k >= 1 && k <= count - done, "n=%lld: returned %lld", (long long)n, (long long)k);
      CHECK(!bad, "n=%lld: finite values reported as bad", (long long)n);
      for (int64_t i = done; i < done + k - 1; ++i)
        CHECK(held[size_t(i)] <= limit, "n=%lld: did not stop after map %lld", (long long)n, (long long)i);
      done += k;
    }
    for (int64_t i = 0; i < count; ++i) {
      const float* m = maps.data() + i * stride;
      std::vector<float> want;
      float top = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        if (m[j] > bound[size_t(i)]) want.push_back(m[j]);
        top = std::max(top, m[j]);
      }
      const int64_t before = i % 4;
      CHECK(held[size_t(i)] == before + int64_t(want.size()), "n=%lld map %lld: %lld values held", (long long)n,
            (long long)i, (long long)held[size_t(i)]);
      const float* t = tails.data() + i * tstride + before;
      CHECK(std::equal(want.begin(), want.end(), t), "n=%lld map %lld: wrong values appended", (long long)n,
            (long long)i);
      CHECK(mx[size_t(i)] == top, "n=%lld map %lld: max %g vs %g", (long long)n, (long long)i, mx[size_t(i)], top);
    }
    // A NaN or an infinity anywhere is reported.
    for (float poison : {std::numeric_limits<float>::quiet_NaN(), INFINITY, -INFINITY}) {
      std::vector<float> p = maps;
      p[size_t(7 * stride + n - 1)] = poison;
      std::vector<int64_t> h(static_cast<size_t>(count), 0);
      bool bad = false;
      int64_t at = 0;
      while (at < count && !bad)
        at += scan(p.data() + at * stride, count - at, stride, n, bound.data() + at, tails.data() + at * tstride,
                   tstride, h.data() + at, 4 * n, nullptr, &bad);
      CHECK(bad, "n=%lld: non-finite value %g not reported", (long long)n, poison);
    }
  }
}

// scan_maps: per map max(0, its maximum) and its largest magnitude (values of
// either sign dominating), for counts that are not a multiple of the 16 maps
// the AVX-512 scan takes at once; the first map holding a NaN or an infinity
// is reported, whichever value of which map it is. With values of both signs,
// with none below zero (rectified: AVX-512 then takes one maximum, not two),
// and with both signs in the first 16 maps only (AVX-512 goes on taking both
// maxima in the next 16).
void test_scan_maps() {
  const ndf::ScanMapsFn scan = ndf::scan_maps();
  // signs 0: both; 1: none below zero; 2: both in maps 0-15, none below zero from map 16
  for (int signs : {0, 1, 2})
  for (int64_t n : {1, 7, 16, 17, 49, 64, 196}) {
    for (int64_t count : {1, 5, 16, 23, 40}) {
      const int64_t stride = n + 2;
      std::vector<float> maps = random_values(size_t(count * stride), 0);
      if (signs != 1) {
        for (int64_t i = 0; i < count; i += 3) maps[size_t(i * stride + n / 2)] = -100.0f - float(i);  // |min| > max
        if (count > 2) maps[size_t(2 * stride)] = -0.0f;
        if (count > 3)  // an all-negative map: its max(0, maximum) is 0
          for (int64_t j = 0; j < n; ++j) maps[size_t(3 * stride + j)] = -1.0f - float(j % 5);
      }
      for (size_t i = signs == 1 ? 0 : signs == 2 ? size_t(16 * stride) : maps.size(); i < maps.size(); ++i)
        maps[i] = std::max(maps[i], 0.0f);
      if (count > 1) std::fill_n(maps.begin() + stride, n, 0.0f);  // an all-zero map
      std::vector<float> mx(static_cast<size_t>(count)), amax(static_cast<size_t>(count));
      const int64_t first = scan(maps.data(), count, stride, n, mx.data(), amax.data());
      CHECK(first == -1, "n=%lld count=%lld: finite maps reported bad at %lld", (long long)n, (long long)count,
            (long long)first);
      for (int64_t i = 0; i < count; ++i) {
        float top = -INFINITY, mag = 0.0f;
        for (int64_t j = 0; j < n; ++j) {
          top = std::max(top, maps[size_t(i * stride + j)]);
          mag = std::max(mag, std::fabs(maps[size_t(i * stride + j)]));
        }
        top = std::max(top, 0.0f);  // the contract: max(0, maximum)
        CHECK(mx[size_t(i)] == top && amax[size_t(i)] == mag, "n=%lld map %lld: max %g |max| %g, want %g %g",
              (long long)n, (long long)i, mx[size_t(i)], amax[size_t(i)], top, mag);
      }
      for (float poison : {std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::quiet_NaN(),
                           INFINITY, -INFINITY}) {
        for (int64_t at : {int64_t(0), count / 2, count - 1}) {
          std::vector<float> p = maps;
          p[size_t(at * stride + (at * 7) % n)] = poison;
          if (at + 1 < count) p[size_t((count - 1) * stride)] = poison;  // a later one too: the first is named
          const int64_t got = scan(p.data(), count, stride, n, mx.data(), amax.data());
          CHECK(got == at, "n=%lld count=%lld: %g in map %lld reported at %lld", (long long)n, (long long)count,
                poison, (long long)at, (long long)got);
        }
      }
    }
  }
}

// interp_row, and the masks count_span thresholds from its output: the formulas
// of ndf/interp.h, evaluated here one pixel at a time (every pixel its own label
// set, so the per-set counts are the mask).
void test_interp_and_span_masks() {
  const ndf::InterpRowFn interp = ndf::interp_row();
  const ndf::CountSpanFn count = ndf::count_span();
  for (int64_t mw : {1, 3, 7, 13, 16, 17, 28}) {
    for (int64_t sw : {7, 17, 112, 113}) {
      std::vector<ndf::AxisWeight> xw(static_cast<size_t>(sw));
      std::vector<int32_t> x0(static_cast<size_t>(sw)), x1(static_cast<size_t>(sw));
      std::vector<float> wx0(static_cast<size_t>(sw)), wx1(static_cast<size_t>(sw));
      for (int64_t x = 0; x < sw; ++x) {
        xw[size_t(x)] = ndf::bilinear_axis_weight(mw, sw, x);
        x0[size_t(x)] = xw[size_t(x)].i0;
        x1[size_t(x)] = xw[size_t(x)].i1;
        wx0[size_t(x)] = xw[size_t(x)].w0;
        wx1[size_t(x)] = xw[size_t(x)].w1;
      }
      const std::vector<float> row0 = random_values(size_t(mw), 0), row1 = random_values(size_t(mw), 0);
      std::vector<float> top(static_cast<size_t>(sw)), bot(static_cast<size_t>(sw));
      interp(row0.data(), mw, x0.data(), x1.data(), wx0.data(), wx1.data(), sw, top.data());
      interp(row1.data(), mw, x0.data(), x1.data(), wx0.data(), wx1.data(), sw, bot.data());
      for (int64_t x = 0; x < sw; ++x) {
        const ndf::AxisWeight& w = xw[size_t(x)];
        CHECK(top[size_t(x)] == ndf::lerp_x(w, row0[size_t(w.i0)], row0[size_t(w.i1)]), "mw=%lld sw=%lld x=%lld",
              (long long)mw, (long long)sw, (long long)x);
      }
      const int64_t rows = 5;
      std::vector<ndf::AxisWeight> wy(static_cast<size_t>(rows));
      for (int64_t r = 0; r < rows; ++r) wy[size_t(r)] = ndf::AxisWeight{0, 1, 1.0f - 0.2f * float(r), 0.2f * float(r)};
      std::vector<uint16_t> pixel_ids(static_cast<size_t>(rows * sw));
      for (size_t i = 0; i < pixel_ids.size(); ++i) pixel_ids[i] = uint16_t(i);
      for (float T : {-1.0f, 0.0f, top[0], 1.5f}) {
        for (int64_t xa : {int64_t(0), sw / 3}) {
          std::vector<int32_t> cnt(pixel_ids.size(), 0), touched(pixel_ids.size() + 1);
          int64_t nt = 0, want_m = 0;
          const int64_t m = count(top.data(), bot.data(), wy.data(), rows, T, T - 1e-3f, xa, sw, pixel_ids.data(), sw,
                                  cnt.data(), touched.data(), &nt);
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t x = 0; x < sw; ++x) {
              const bool want = x >= xa && ndf::lerp_y(wy[size_t(r)], top[size_t(x)], bot[size_t(x)]) > T;
              want_m += want;
              CHECK(cnt[size_t(r * sw + x)] == int32_t(want), "mw=%lld sw=%lld T=%g row %lld x %lld", (long long)mw,
                    (long long)sw, T, (long long)r, (long long)x);
            }
          CHECK(m == want_m, "mw=%lld sw=%lld T=%g: %lld mask pixels, want %lld", (long long)mw, (long long)sw, T,
                (long long)m, (long long)want_m);
        }
      }
    }
  }
}

// bilinear_axis_weight: torch's half-pixel source index, written out in double.
// count_span: the masks of lerp_y, counted per label set. Set ids
// are drawn from a few values (runs and mixes inside one 16-pixel chunk); the
// pixel-set array ends right after the span's last row, so a read past the mask
// is caught by AddressSanitizer.
void test_count_span() {
  const ndf::CountSpanFn count = ndf::count_span();
  for (int64_t sw : {7, 16, 17, 112, 113}) {
    const int64_t rows = 6;
    std::vector<float> top = random_values(size_t(sw), 0), bot = random_values(size_t(sw), 0);
    std::vector<ndf::AxisWeight> wy(static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r) wy[size_t(r)] = ndf::AxisWeight{0, 1, 1.0f - 0.17f * float(r), 0.17f * float(r)};
    for (int nsets : {1, 3, 300}) {
      std::uniform_int_distribution<int> pick(0, nsets - 1);
      std::vector<uint16_t> sets(static_cast<size_t>(rows * sw));
      for (size_t i = 0; i < sets.size(); ++i) sets[i] = uint16_t(i % 5 == 0 ? pick(rng) : (i / 8) % size_t(nsets));
      for (float T : {-10.0f, 0.0f, 1.0f, 10.0f}) {
        for (int64_t xa : {int64_t(0), sw / 3}) {
          std::vector<int32_t> cnt(size_t(nsets), 0), touched(size_t(nsets) + 1, -1), want(size_t(nsets), 0);
          int64_t nt = 0, want_m = 0;
          const int64_t m = count(top.data(), bot.data(), wy.data(), rows, T, T - 1e-3f, xa, sw, sets.data(), sw, cnt.data(),
                                  touched.data(), &nt);
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t x = xa; x < sw; ++x)
              if (ndf::lerp_y(wy[size_t(r)], top[size_t(x)], bot[size_t(x)]) > T) {
                ++want[sets[size_t(r * sw + x)]];
                ++want_m;
              }
          CHECK(m == want_m, "sw=%lld sets=%d T=%g xa=%lld: %lld mask pixels, want %lld", (long long)sw, nsets, T,
                (long long)xa, (long long)m, (long long)want_m);
          CHECK(cnt == want, "sw=%lld sets=%d T=%g xa=%lld: per-set counts differ", (long long)sw, nsets, T,
                (long long)xa);
          std::vector<int32_t> seen(touched.begin(), touched.begin() + nt), nonzero;
          std::sort(seen.begin(), seen.end());
          for (int s = 0; s < nsets; ++s)
            if (want[size_t(s)]) nonzero.push_back(s);
          CHECK(seen == nonzero, "sw=%lld sets=%d T=%g: touched list is not the sets counted", (long long)sw, nsets,
                T);
        }
      }
    }
  }
}

// hot_rows: bit j of row i is (m[i][j] > t), for widths on both sides of a
// vector; values equal to t are not hot.
void test_hot_rows() {
  const ndf::HotRowsFn hot = ndf::hot_rows();
  for (int64_t mw : {1, 7, 8, 9, 13, 16, 17, 28, 64}) {
    const int64_t mh = 5;
    std::vector<float> m = random_values(size_t(mh * mw), 1);
    for (float t : {m[0], -0.5f, 0.0f, 0.5f}) {  // t < 0: lanes past the row (read as 0) must stay cold
      std::vector<uint64_t> bits(static_cast<size_t>(mh), ~uint64_t(0));
      hot(m.data(), mh, mw, t, bits.data());
      for (int64_t i = 0; i < mh; ++i) {
        uint64_t want = 0;
        for (int64_t j = 0; j < mw; ++j) want |= uint64_t(m[size_t(i * mw + j)] > t) << j;
        CHECK(bits[size_t(i)] == want, "mw=%lld t=%g row %lld: hot columns differ", (long long)mw, t, (long long)i);
      }
    }
  }
}

void test_bilinear_weights() {
  for (int64_t in : {1, 2, 7, 13, 14, 28}) {
    for (int64_t out : {1, 7, 17, 112, 113, 224}) {
      for (int64_t o = 0; o < out; ++o) {
        const ndf::AxisWeight w = ndf::bilinear_axis_weight(in, out, o);
        CHECK(w.i0 >= 0 && w.i1 < in && w.i0 <= w.i1 && w.w0 >= 0 && w.w1 >= 0 && w.w0 + w.w1 == 1.0f,
              "in=%lld out=%lld o=%lld", (long long)in, (long long)out, (long long)o);
        const double src = std::max(0.0, (double(o) + 0.5) * double(in) / double(out) - 0.5);
        const double pos = double(w.i0) * double(w.w0) + double(w.i1) * double(w.w1);
        CHECK(std::fabs(pos - std::min(src, double(in - 1))) < 1e-5, "in=%lld out=%lld o=%lld: %g vs %g",
              (long long)in, (long long)out, (long long)o, pos, src);
      }
    }
  }
}

// TailQuantileCPU: after streaming many batches (many compactions), the kept
// values are exactly the `keep` largest, for 1 and 3 threads and odd batch sizes.
void test_tail_quantile() {
  for (int threads : {1, 3}) {
    const int64_t K = 5, n = 49, keep = 300;
    ndf::TailQuantileCPU tail(K, keep);
    std::vector<std::vector<float>> all(static_cast<size_t>(K));
    for (int64_t b0 = 0; b0 < 700; b0 += 23) {
      const int64_t B = 23;
      std::vector<float> batch = random_values(size_t(B * K * n), b0 % 46 == 0 ? 2 : 0);
      ndf::ActivationView view;
      view.data = batch.data();
      view.dtype = ndf::DType::F32;
      view.batch = B;
      view.units = K;
      view.map_size = n;
      view.stride_batch = K * n;
      view.stride_unit = n;
      const ndf::BadValue bad = tail.update(view, nullptr, threads);
      CHECK(bad.unit < 0, "finite batch reported bad");
      for (int64_t b = 0; b < B; ++b)
        for (int64_t k = 0; k < K; ++k)
          all[size_t(k)].insert(all[size_t(k)].end(), batch.begin() + (b * K + k) * n,
                                batch.begin() + (b * K + k + 1) * n);
    }
    for (int64_t k = 0; k < K; ++k) {
      std::vector<float> want = all[size_t(k)];
      std::sort(want.begin(), want.end(), std::greater<float>());
      want.resize(size_t(keep));
      CHECK(tail.sorted_tail(k) == want, "threads=%d unit %lld: kept values differ", threads, (long long)k);
    }
  }
}

// slot_windows: window c, row r, lane j of group g, bit i = pixel (r, 16c + i)
// holds slot 32g + j, i.e. its set's slot mask has that bit (0 past the row's
// end and for ids past the image's sets), for row widths around the 16-pixel
// grid; it returns the largest id. Null where the CPU lacks AVX-512 BITALG
// (then the tally never takes the slot counter).
void test_slot_windows() {
  const ndf::SlotWindowsFn build = ndf::slot_windows();
  if (!build) return;
  std::uniform_int_distribution<int> pick_set(0, 5);
  for (int G = 1; G <= ndf::kMaxSlotGroups; ++G)
    for (int64_t sw : {1, 7, 8, 15, 16, 17, 57, 113}) {
      const int64_t sh = 3, nwin = ndf::slot_window_count(sw);
      std::vector<uint64_t> set_slots(6);
      for (uint64_t& m : set_slots) m = (uint64_t(rng()) << 32 | rng()) & (G == 1 ? 0xffffffffull : ~0ull);
      set_slots[0] = 0;  // a set with no labels
      std::vector<uint16_t> sets(size_t(sh * sw));
      for (uint16_t& s : sets) s = uint16_t(pick_set(rng));
      // For some widths one pixel's id is past the 6 sets (here: as far as
      // the gather could reach, were it not masked).
      if (sw >= 16) sets[size_t(sw + sw / 2)] = uint16_t(sw == 57 ? 65535 : 6 + sw);
      uint16_t top = 0;
      for (uint16_t s : sets) top = std::max(top, s);
      std::vector<uint16_t> windows(size_t(sh * nwin * 32 * G), 0xdead);
      const uint16_t got_top = build(sets.data(), sh, sw, set_slots.data(), 6, G, windows.data());
      CHECK(got_top == top, "G=%d sw=%lld: largest set id %u, want %u", G, (long long)sw, got_top, top);
      for (int64_t r = 0; r < sh; ++r)
        for (int64_t c = 0; c < nwin; ++c)
          for (int g = 0; g < G; ++g)
            for (int j = 0; j < 32; ++j) {
              uint16_t want = 0;
              for (int i = 0; i < 16; ++i) {
                const int64_t x = 16 * c + i;
                if (x < sw && sets[size_t(r * sw + x)] < 6 && (set_slots[sets[size_t(r * sw + x)]] >> (32 * g + j) & 1))
                  want |= uint16_t(1u << i);
              }
              const uint16_t got = windows[size_t(((c * sh + r) * G + g) * 32 + j)];
              CHECK(got == want, "G=%d sw=%lld row %lld window %lld slot %d: %04x, want %04x", G, (long long)sw,
                    (long long)r, (long long)c, 32 * g + j, got, want);
            }
    }
}

}  // namespace

int main() {
  std::printf("SIMD variant: %s\n", ndf::cpu_isa_name());
  test_select_top();
  test_scan_append();
  test_scan_maps();
  test_interp_and_span_masks();
  test_count_span();
  test_hot_rows();
  test_slot_windows();
  test_bilinear_weights();
  test_tail_quantile();
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}
