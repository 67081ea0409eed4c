// SIMD helpers of the CPU backend, chosen once at run time (cpu_features.cc).
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "ndf/interp.h"
#include "ndf/tally.h"

namespace ndf {

using AppendGreaterFn = int64_t (*)(const float* v, int64_t n, float bound, float* out, int64_t count);
AppendGreaterFn append_greater();

// Reorders v[0, n) so that v[0, keep) holds the `keep` largest values (as a
// multiset) and returns the smallest of them. `tmp` has room for n floats.
// Quickselect with branch-free vector partitions where AVX-512 exists.
using SelectTopFn = float (*)(float* v, int64_t n, int64_t keep, float* tmp);
SelectTopFn select_top();

// For `count` maps of n floats at base + i * stride: the larger of 0 and the
// maximum (mx[i]: a bound on what the map's pixels can reach, exact unless
// every value is negative, which lets AVX-512 find it with integer maxima) and
// the largest magnitude (amax[i]) of each. Returns the index of the first map
// holding a NaN or an infinity, or -1 (then every output is valid).
using ScanMapsFn = int64_t (*)(const float* base, int64_t count, int64_t stride, int64_t n, float* mx,
                               float* amax);
ScanMapsFn scan_maps();

// The quantile scan, one pass per map: for maps i in [0, count) of n floats at
// base + i * stride, appends the values > bound[i] to tail i (tails + i * tstride,
// holding held[i] values) and writes the map's maximum to mx[i] when mx is not
// null. Stops after the first map whose tail then holds more than `limit` values
// (the caller compacts it); returns how many maps were done. *bad is set when
// any value seen was NaN or infinite.
using ScanAppendFn = int64_t (*)(const float* base, int64_t count, int64_t stride, int64_t n, const float* bound,
                                 float* tails, int64_t tstride, int64_t* held, int64_t limit, float* mx, bool* bad);
ScanAppendFn scan_append();

// rowbits[i] bit j = (m[i * mw + j] > t) for an mh x mw map, mw <= 64.
using HotRowsFn = void (*)(const float* m, int64_t mh, int64_t mw, float t, uint64_t* rowbits);
HotRowsFn hot_rows();

// Thresholds the `rows` output rows of one cell span over columns [xa, xb) --
// pixel px of row r is in the mask when fma(wy[r].w0, top[px], wy[r].w1 * bot[px])
// > T, the arithmetic of lerp_y in ndf/interp.h -- and counts the mask pixels per
// label set: for each pixel above T, cnt[set] += 1 where set = sets[r * sw + px]
// (sets: the pixel set ids of the span's first row). A set whose count leaves 0
// is appended to touched[*ntouched++]; touched has room for one entry more than
// there are sets (it is written branch-free). Returns the number of mask pixels.
// `skip` is a bound below T with room for rounding: the caller guarantees that a
// lerp_y whose exact value is <= skip computes <= T, so the columns and rows where
// every such value is <= skip may be left out.
using CountSpanFn = int64_t (*)(const float* top, const float* bot, const AxisWeight* wy, int64_t rows, float T,
                                float skip, int64_t xa, int64_t xb, const uint16_t* sets, int64_t sw, int32_t* cnt,
                                int32_t* touched, int64_t* ntouched);
CountSpanFn count_span();

// Where, in each aligned 16-column chunk of an output row, a source row's x-upsampled
// values peak: lerp_x is linear over a run of columns that read the same two
// source columns, so a run's largest value is at one of its two end columns (up
// to a few units of rounding). Lane k * P + c (P = 8 or 16 >= the chunk count)
// holds chunk c's k-th end column, its source columns and weights (a chunk with
// fewer ends repeats its last); one compare per 16 lanes then tells which
// chunks of a source row may exceed a bound. Empty (vectors 0) where the chunks
// are more than 16 or their ends more than 64 lanes.
struct ChunkEnds {
  std::vector<int32_t> j0, j1;
  std::vector<float> w0, w1;
  int vectors = 0;     // of 16 lanes
  bool fold8 = false;  // P = 8: lanes 8..15 of a vector hold chunks 0..7 again
  uint32_t chunks = 0;  // bit c: chunk c exists
};
inline ChunkEnds chunk_ends(const std::vector<int32_t>& x0, const std::vector<int32_t>& x1,
                            const std::vector<float>& wx0, const std::vector<float>& wx1) {
  ChunkEnds e;
  const int64_t sw = int64_t(x0.size()), nchunks = (sw + 15) / 16;
  if (nchunks > 16) return e;
  std::vector<std::vector<int64_t>> ends(static_cast<size_t>(nchunks));
  size_t most = 0;
  const auto same = [&](int64_t a, int64_t b) { return x0[size_t(a)] == x0[size_t(b)] && x1[size_t(a)] == x1[size_t(b)]; };
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t a = 16 * c, b = std::min(sw, a + 16);
    for (int64_t x = a; x < b; ++x)
      if (x == a || x == b - 1 || !same(x, x - 1) || !same(x, x + 1)) ends[size_t(c)].push_back(x);
    most = std::max(most, ends[size_t(c)].size());
  }
  const int64_t P = nchunks <= 8 ? 8 : 16;
  if (int64_t(most) * P > 64) return e;
  e.vectors = int((int64_t(most) * P + 15) / 16);
  e.fold8 = P == 8;
  e.chunks = uint32_t((uint64_t(1) << nchunks) - 1);
  const size_t lanes = size_t(16 * e.vectors);
  e.j0.assign(lanes, 0);
  e.j1.assign(lanes, 0);
  e.w0.assign(lanes, 0.0f);
  e.w1.assign(lanes, 0.0f);
  for (size_t l = 0; l < lanes; ++l) {
    const int64_t c = int64_t(l) % P, k = int64_t(l) / P;
    if (c >= nchunks) continue;  // masked off by `chunks`
    const std::vector<int64_t>& ce = ends[size_t(c)];
    const int64_t x = ce[std::min(size_t(k), ce.size() - 1)];
    e.j0[l] = x0[size_t(x)];
    e.j1[l] = x1[size_t(x)];
    e.w0[l] = wx0[size_t(x)];
    e.w1[l] = wx1[size_t(x)];
  }
  return e;
}

// The upsampling grid of a tally call, as the fused map counter reads it (views
// of tally_cpu.cc's Geometry).
struct CellGeometry {
  int64_t mh, mw, sw;
  const Span* yspans;
  int64_t n_yspans;
  const AxisWeight* yw;      // per output row
  const Span* xspans;
  const int32_t *first_span, *last_span;  // per source column: x-spans touching it (first, last)
  const int32_t *x0, *x1;    // per output column: source columns
  const float *wx0, *wx1;    // and their weights
  const ChunkEnds* ends;     // for the slot counter's 16-column chunks (may be empty)
};

// One whole map (mh <= kFusedMaxRows, mw <= 16) through hot rows, x-upsampling,
// thresholding and the per-set count of count_span, in registers: the same
// arithmetic, without the per-span calls and scratch rows. Null where the CPU
// lacks AVX-512 BW/VL (the caller then takes the separate steps).
constexpr int64_t kFusedMaxRows = 32;
using CountMapFn = int64_t (*)(const float* m, float T, float skip, const CellGeometry& g, const uint16_t* sets,
                               int32_t* cnt, int32_t* touched, int64_t* ntouched);
CountMapFn count_map_fused();

// The map counter per "pixel slot": each image numbers the (label, plane) pairs
// its pixels hold, at most 32 * kMaxSlotGroups, and a pixel's slots are bits.
// Windows (SlotWindowsFn) hold, per window c (columns 16c..16c+15) and output
// row r, per group of 32 slots: lane j of windows[((c * sh + r) * G + g) * 32 + j]
// has bit i set when pixel (r, 16c + i) holds slot 32g + j (bits past the
// row's end are 0). A window's rows are consecutive, as a walk down a chunk
// reads them.
constexpr int kMaxSlotGroups = 2;
inline int64_t slot_window_count(int64_t sw) { return (sw + 15) / 16; }
// An image's windows with G groups of 32 slots take sh times this many uint16.
inline int64_t slot_window_row(int64_t sw, int64_t G) { return slot_window_count(sw) * 32 * G; }
// sets: an image's set ids (sh x sw); set_slots[s]: the slot bits of its set s,
// for s < nsets. Returns the largest set id seen; pixels whose id is nsets or
// more are read as holding no slot (the caller reports them).
using SlotWindowsFn = uint16_t (*)(const uint16_t* sets, int64_t sh, int64_t sw, const uint64_t* set_slots,
                                   int64_t nsets, int G, uint16_t* windows);
SlotWindowsFn slot_windows();  // null where count_map_slots is

// The adds a map's counts make into I, logged (a block of I's rows at `base`:
// base[off[i]] += val[i]) and applied by the caller in one tight loop, so a map
// costs no branch per label and the adds' cache misses overlap each other.
struct AddLog {
  uint32_t* off;
  uint32_t* val;
  int64_t n = 0;
};

// count_map_fused's thresholding, counted per slot instead of per set (slot
// counts are uint16: the caller keeps sh * sw < 65536) and logged: for each slot
// s with pixels under the mask, (row + slot_label[s], its pixels) is appended to
// `log` (which has room for 32 * groups + 16 more entries: whole vectors are
// stored), and slot_cats[s] is ORed into *overlap. slot_label and slot_cats have
// 32 * groups entries. Returns the mask size. Null unless the CPU has AVX-512
// BW/VL, BITALG, VBMI and GFNI (Ice Lake and later), and for groups outside
// 1..kMaxSlotGroups.
using CountMapSlotsFn = int64_t (*)(const float* m, float T, float skip, const CellGeometry& g,
                                    const uint16_t* windows, const int32_t* slot_label, const uint32_t* slot_cats,
                                    uint32_t row, AddLog& log, uint32_t* overlap);
CountMapSlotsFn count_map_slots(int groups);

// out[px] = fma(wx0[px], row[x0[px]], wx1[px] * row[x1[px]]) for px < n: one
// source row (mw values) upsampled along x (lerp_x of ndf/interp.h).
using InterpRowFn = void (*)(const float* row, int64_t mw, const int32_t* x0, const int32_t* x1, const float* wx0,
                             const float* wx1, int64_t n, float* out);
InterpRowFn interp_row();

}  // namespace ndf
