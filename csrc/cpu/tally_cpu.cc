// CPU backend of the fused tally. Images go in tiles of 4, each counted for
// every unit before the next (the tile's labels stay in cache); units go in
// blocks, thread t owning every nthreads-th block, so each row of I and A has
// one writer. The counts are integer sums: the same for every thread count,
// batch size and batch order.
//
// Per (image, unit): the map's maximum decides whether any pixel can exceed the
// threshold; if so, only cells whose corners can exceed it are upsampled (with
// AVX-512, a cell's rows are walked in from each hot edge until none can exceed
// it; the slot counter finds a source row's hot 16-column chunks from its
// values at the chunks' run ends, ChunkEnds), and the mask's pixels are counted
//  - per label slot (AVX-512 with BITALG/VBMI/GFNI, images with at most 64
//    (label, plane) pairs): each mask row is ANDed with the image's slot
//    windows and popcounted, 32 slots per instruction, so the map's counts come
//    out per label (count_map_slots);
//  - or per label set (a 16-pixel chunk costs one vector compare per distinct
//    set in it), then per label of the image (count_map_sets);
// and the adds into I are logged (AddLog) per unit block over the whole batch
// and applied in one branch-free loop, whose cache misses overlap and whose
// repeated lines are fetched once. Maps up to 32x16 take one
// call with their rows in registers (count_map_fused / count_map_slots); others
// go a cell span at a time (count_map_spans).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <memory>
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
  // For source column j: the first x-span reading a column >= j and the last
  // reading a column <= j (the x-spans touching hot columns jmin..jmax).
  std::vector<int32_t> first_span, last_span;
  ChunkEnds ends;
  CellGeometry cells;         // views of the above for the fused counter
  CountMapFn fused = nullptr;  // set when the map fits it (count_map_fused)
  CountMapSlotsFn fused_slots[kMaxSlotGroups] = {};  // set when the map and the CPU fit them
};

constexpr int kMaxSlots = 32 * kMaxSlotGroups;

// The batch's labels as the slot counter reads them (count_map_slots): the
// slots of prepare_labels as bits. An image with more than kMaxSlots slots
// takes the set counter.
struct SlotLabels {
  std::vector<int32_t> groups;  // per image: groups of 32 slots; 0 = the set counter
  // Image b's windows start at b * image_stride (room for kMaxSlotGroups
  // groups), in SlotWindowsFn's layout with groups[b] groups per window. Left
  // uninitialized: each image's windows are written whole before they are read,
  // and the room of groups an image does not use is never touched (so never
  // resident).
  int64_t image_stride = 0;
  std::unique_ptr<uint16_t[]> windows;
  int64_t windows_size = 0;
  // Per image, kMaxSlots entries each: slot s's label and its category bit (0
  // past the image's slots), as count_map_slots reads them.
  std::vector<int32_t> label;
  std::vector<uint32_t> cats;
  void resize(const LabelBatchView& lb) {
    const int64_t B = lb.batch;
    image_stride = lb.seg_h * slot_window_row(lb.seg_w, kMaxSlotGroups);
    groups.assign(size_t(B), 0);
    // Grown, never shrunk: a fresh multi-megabyte buffer per batch costs page
    // faults.
    if (windows_size < B * image_stride) {
      windows.reset(new uint16_t[size_t(B * image_stride)]);
      windows_size = B * image_stride;
    }
    label.resize(size_t(B * kMaxSlots));
    cats.resize(size_t(B * kMaxSlots));
  }
};

// Image b's share of SlotLabels, as prepare_labels' pixel pass (so the image's
// pixels are read once, its set slots still in cache): its windows, built while
// its set ids are checked. Returns the largest set id.
uint16_t prepare_image_slots(int64_t b, const LabelBatchView& lb, const LabelSpace& space, const BatchLabels& info,
                             SlotWindowsFn build, SlotLabels& out) {
  const int64_t n = info.image_slots[size_t(b)], s0 = lb.set_start[b];
  const uint16_t* ps = lb.pixel_sets + b * lb.seg_h * lb.seg_w;
  const int G = n <= 32 ? 1 : n <= kMaxSlots ? 2 : 0;
  out.groups[size_t(b)] = G;
  if (G == 0) return max_set_id(ps, lb.seg_h * lb.seg_w);
  const int32_t* slot_label = info.slot_label.data() + lb.set_label_start[s0];
  for (int64_t j = 0; j < kMaxSlots; ++j) {
    out.label[size_t(b * kMaxSlots + j)] = j < n ? slot_label[j] : 0;
    out.cats[size_t(b * kMaxSlots + j)] = j < n ? category_bit(space.primary_category, slot_label[j]) : 0;
  }
  return build(ps, lb.seg_h, lb.seg_w, info.set_slots.data() + s0, lb.set_start[b + 1] - s0, G,
               out.windows.get() + b * out.image_stride);
}

struct Scratch {
  std::vector<float> hrows;       // source rows upsampled along x (mh x sw)
  std::vector<int64_t> hlo, hhi;  // per source row: columns [lo, hi) of hrows are valid
  std::vector<uint64_t> rowbits;
  // Per local label set: mask pixels, and the sets with cnt > 0; per local label
  // (slot) the same. The touched lists have one spare entry: they are written
  // branch-free, one past their end once every set (slot) is in.
  std::vector<int32_t> cnt, touched;
  std::vector<int64_t> slot_cnt;
  std::vector<int32_t> slot_touched;
  // The adds into I, logged per unit block this thread owns (offsets from the
  // block's first row) and applied when the block's log is full or the batch is
  // done, in one loop without branches whose cache misses overlap. A block's
  // adds over the whole batch then share the lines of its rows they meet (a
  // unit's labels recur from image to image) in cache, fetched once; applied
  // after every tile of 4 images, nearly every add fetched its line again.
  struct BlockLog {
    std::vector<uint32_t> off, val;
    int64_t n = 0;
  };
  // Kept by each (pool) thread across calls: fresh buffers of this size cost
  // page faults every batch.
  std::vector<BlockLog>& logs;
  AddLog log;             // the block being counted (its BlockLog's arrays)
  int64_t log_limit = 0;  // apply a block's log before a map when it holds more entries than this
  Scratch(const Geometry& g, int64_t max_sets, int64_t max_slots, int64_t max_image_labels, int64_t blocks)
      : hrows(size_t(g.mh * g.sw)), hlo(size_t(g.mh)), hhi(size_t(g.mh)),
        rowbits(size_t(g.mh)), cnt(size_t(max_sets), 0), touched(size_t(max_sets) + 1),
        slot_cnt(size_t(max_slots), 0), slot_touched(size_t(max_slots) + 1), logs(log_pool()) {
    // A map logs at most max(max_slots, kMaxSlots) + max_image_labels entries,
    // and the slot counter stores 16 past its last.
    const int64_t per_map = std::max<int64_t>(max_slots, kMaxSlots) + max_image_labels + 16;
    // 16,384 entries hold a 64-unit block's adds over a batch of ~190 images of
    // bench_tally's data (~5,300 for 64); at most ~1M entries (8 MB) per thread
    // however many blocks it owns. NDF_ADD_LOG_LIMIT moves the bar (tests set 1
    // to apply the logs between maps).
    const char* limit = std::getenv("NDF_ADD_LOG_LIMIT");
    log_limit = limit ? std::max<int64_t>(0, std::atoll(limit))
                      : std::clamp<int64_t>((int64_t(1) << 20) / std::max<int64_t>(blocks, 1), 2048, 16384);
    if (logs.size() < size_t(blocks)) logs.resize(size_t(blocks));
    for (int64_t j = 0; j < blocks; ++j) {
      BlockLog& l = logs[size_t(j)];
      l.n = 0;
      if (l.off.size() < size_t(log_limit + per_map)) {
        l.off.resize(size_t(log_limit + per_map));
        l.val.resize(size_t(log_limit + per_map));
      }
    }
  }
  static std::vector<BlockLog>& log_pool() {
    static thread_local std::vector<BlockLog> pool;
    return pool;
  }
  void begin_block(int64_t j) {
    BlockLog& l = logs[size_t(j)];
    log = AddLog{l.off.data(), l.val.data(), l.n};
  }
  void end_block(int64_t j) { logs[size_t(j)].n = log.n; }
  void add(uint32_t off, int64_t v) {
    log.off[log.n] = off;
    log.val[log.n++] = uint32_t(v);
  }
  // The log of the block being counted into the block's rows at `base`.
  void apply(int64_t* base) {
    const int64_t n = log.n;
    const uint32_t* off = log.off;
    const uint32_t* val = log.val;
    // Far enough ahead for L3's latency: an entry's add takes ~1 ns once its
    // line is in (32 ahead: ~2 ms more per 1,000 images on bench_tally's data
    // than 64-256 ahead).
    constexpr int64_t kAhead = 128;
    for (int64_t i = 0; i < std::min(n, kAhead); ++i) __builtin_prefetch(base + off[i], 1, 3);
    for (int64_t i = 0; i < n; ++i) {
      if (i + kAhead < n) __builtin_prefetch(base + off[i + kAhead], 1, 3);
      base[off[i]] += val[i];
    }
    log.n = 0;
  }
};

// Thresholds and counts map `m` per label set a cell span at a time (the steps
// count_map_fused does in registers); returns the mask size.
int64_t count_map_spans(const float* m, float T, float Tm, const Geometry& g, const uint16_t* ps, Scratch& sc,
                        int64_t* ntouched) {
  const InterpRowFn interp = interp_row();
  const CountSpanFn count = count_span();
  const int64_t sw = g.sw;
  std::fill(sc.hlo.begin(), sc.hlo.end(), int64_t(0));
  std::fill(sc.hhi.begin(), sc.hhi.end(), int64_t(0));
  int64_t M = 0;
  const bool narrow = g.mw <= 64;
  if (narrow) hot_rows()(m, g.mh, g.mw, Tm, sc.rowbits.data());
  for (const Span& ys : g.yspans) {
    int64_t xa = -1, xb = -1;
    if (narrow) {
      const uint64_t hot = sc.rowbits[size_t(ys.i0)] | sc.rowbits[size_t(ys.i1)];
      if (!hot) continue;
      xa = g.xspans[size_t(g.first_span[size_t(__builtin_ctzll(hot))])].start;
      xb = g.xspans[size_t(g.last_span[size_t(63 - __builtin_clzll(hot))])].end;
    } else {
      const float* r0 = m + int64_t(ys.i0) * g.mw;
      const float* r1 = m + int64_t(ys.i1) * g.mw;
      for (const Span& xs : g.xspans) {
        const float cmax = std::max(std::max(r0[xs.i0], r0[xs.i1]), std::max(r1[xs.i0], r1[xs.i1]));
        if (cmax > Tm) {
          if (xa < 0) xa = xs.start;
          xb = xs.end;
        }
      }
      if (xa < 0) continue;
    }
    for (int32_t src : {ys.i0, ys.i1}) {  // upsample along x only the columns needed
      int64_t& lo = sc.hlo[size_t(src)];
      int64_t& hi = sc.hhi[size_t(src)];
      if (xa < lo || xb > hi) {
        interp(m + int64_t(src) * g.mw, g.mw, g.x0.data() + xa, g.x1.data() + xa, g.wx0.data() + xa,
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
    M += count(sc.hrows.data() + int64_t(ys.i0) * sw, sc.hrows.data() + int64_t(ys.i1) * sw,
               g.yw.data() + ys.start, ys.end - ys.start, T, Tm, xa, xb, ps + int64_t(ys.start) * sw, sw,
               sc.cnt.data(), sc.touched.data(), ntouched);
  }
  return M;
}

// The set counter's mask: its pixels per label set, then per label of the
// image (slot_label), logged as adds into I's row `row` (one per distinct
// label); returns the mask size and ORs the categories of the labels under it
// into *overlap.
int64_t count_map_sets(int64_t b, const float* m, float T, float Tm, const LabelBatchView& lb,
                       const BatchLabels& info, const Geometry& g, uint32_t row, Scratch& sc, uint32_t* overlap) {
  const uint16_t* ps = lb.pixel_sets + b * g.sh * g.sw;
  int64_t ntouched = 0;
  const int64_t M = g.fused ? g.fused(m, T, Tm, g.cells, ps, sc.cnt.data(), sc.touched.data(), &ntouched)
                            : count_map_spans(m, T, Tm, g, ps, sc, &ntouched);
  if (M == 0) return 0;
  const int64_t s0 = lb.set_start[b];
  const int32_t* slot_label = info.slot_label.data() + lb.set_label_start[s0];
  int64_t nslots = 0;
  for (int64_t i = 0; i < ntouched; ++i) {
    const int32_t s = sc.touched[size_t(i)];
    const int64_t c = sc.cnt[size_t(s)];
    sc.cnt[size_t(s)] = 0;
    const int64_t gs = s0 + s;
    *overlap |= info.set_categories[size_t(gs)];
    for (int64_t e = lb.set_label_start[gs]; e < lb.set_label_start[gs + 1]; ++e) {
      const int32_t j = info.entry_slot[size_t(e)];
      const int64_t v = sc.slot_cnt[size_t(j)];
      sc.slot_touched[size_t(nslots)] = j;  // kept only when j is new (branch-free)
      nslots += v == 0;
      sc.slot_cnt[size_t(j)] = v + c;
    }
  }
  for (int64_t i = 0; i < nslots; ++i) {
    const int32_t j = sc.slot_touched[size_t(i)];
    sc.add(row + uint32_t(slot_label[j]), sc.slot_cnt[size_t(j)]);
    sc.slot_cnt[size_t(j)] = 0;
  }
  return M;
}

// Counts one (image b, unit k) map `m` (floats, row-major mh x mw) that may
// exceed T somewhere; its adds into I go to sc.log, at row `row` of the block.
void count_map(int64_t b, int64_t k, uint32_t row, const float* m, float T, float amax, const LabelBatchView& lb,
               const LabelSpace& space, const BatchLabels& info, const SlotLabels& slots, const Geometry& g,
               Rule rule, TallyCounts out, Scratch& sc) {
  const int64_t C = space.num_categories;
  int64_t* Ak = out.cat_activation + k * C;
  // The counters' `skip`: an interpolated value whose exact value is <= Tm
  // computes <= T (rounding moves it by a few units of 2^-24 * amax; see
  // interp_upper_bound), so cells, columns and rows that stay <= Tm are left out.
  const float Tm = T - amax * 2e-6f;
  uint32_t overlap = 0;
  int64_t M;
  const int G = slots.groups.empty() ? 0 : slots.groups[size_t(b)];
  if (G > 0) {  // per slot: the counts come per label already
    M = g.fused_slots[G - 1](m, T, Tm, g.cells, slots.windows.get() + b * slots.image_stride,
                             slots.label.data() + b * kMaxSlots, slots.cats.data() + b * kMaxSlots, row, sc.log,
                             &overlap);
  } else {
    M = count_map_sets(b, m, T, Tm, lb, info, g, row, sc, &overlap);
  }
  if (M == 0) return;
  for (int64_t j = lb.image_label_start[b]; j < lb.image_label_start[b + 1]; ++j)
    sc.add(row + uint32_t(lb.image_labels[j]), M);
  const uint32_t cats = counted_categories(rule, info.image_categories[size_t(b)], overlap,
                                           info.image_level_categories[size_t(b)]);
  for (int64_t c = 0; c < C; ++c) Ak[c] += (cats >> c & 1u) ? M : 0;
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
  g.first_span.assign(size_t(g.mw), int32_t(g.xspans.size()) - 1);
  g.last_span.assign(size_t(g.mw), 0);
  for (int32_t j = 0; j < int32_t(g.mw); ++j) {
    for (int32_t s = 0; s < int32_t(g.xspans.size()); ++s)
      if (g.xspans[size_t(s)].i1 >= j) {
        g.first_span[size_t(j)] = s;
        break;
      }
    for (int32_t s = int32_t(g.xspans.size()) - 1; s >= 0; --s)
      if (g.xspans[size_t(s)].i0 <= j) {
        g.last_span[size_t(j)] = s;
        break;
      }
  }
  for (const AxisWeight& w : xw) {
    g.x0.push_back(w.i0);
    g.x1.push_back(w.i1);
    g.wx0.push_back(w.w0);
    g.wx1.push_back(w.w1);
  }
  g.ends = chunk_ends(g.x0, g.x1, g.wx0, g.wx1);
  g.cells = CellGeometry{g.mh, g.mw, g.sw, g.yspans.data(), int64_t(g.yspans.size()), g.yw.data(),
                         g.xspans.data(), g.first_span.data(), g.last_span.data(), g.x0.data(), g.x1.data(),
                         g.wx0.data(), g.wx1.data(), &g.ends};
  if (g.mw <= 16 && g.mh <= kFusedMaxRows) {
    g.fused = count_map_fused();
    if (g.sh * g.sw < 65536)  // the slot counts are uint16
      for (int G = 1; G <= kMaxSlotGroups; ++G) g.fused_slots[G - 1] = count_map_slots(G);
  }
  // Reused across calls: fresh multi-megabyte buffers every batch cost page faults.
  // (A reference, so OpenMP threads see the caller's buffers, not their own.)
  static thread_local BatchLabels cache;
  BatchLabels& info = cache;
  static thread_local SlotLabels slot_cache;
  SlotLabels& slots = slot_cache;
  slots.groups.clear();  // empty: every image takes the set counter
  // The windows cost ~5 us per image whatever K is; each map then saves ~30 ns
  // over the set counter, which pays off from about a thousand units (measured
  // at 7x7: equal at K=1024, the set counter 10 % faster at K=512 and at
  // 256x13x13). NDF_SLOT_MIN_UNITS moves the bar (tests set 0 to reach it).
  const char* min_units = std::getenv("NDF_SLOT_MIN_UNITS");
  const int64_t slot_min_units = min_units ? std::atoll(min_units) : 1024;
  TallyStatus st;
  if (g.fused_slots[0] && a.units >= slot_min_units) {
    slots.resize(lb);
    const SlotWindowsFn build = slot_windows();
    st = prepare_labels(lb, space, threads, info, true,
                        [&](int64_t b) { return prepare_image_slots(b, lb, space, info, build, slots); });
  } else {
    st = prepare_labels(lb, space, threads, info);
  }
  if (st.code != TallyStatus::Ok) return st;

  const int64_t K = a.units;
  const char* raw = static_cast<const char*>(a.data);
  const int64_t elem = D == DType::F32 ? 4 : 2, map_bytes = a.map_size * elem;
  int64_t max_image_labels = 0;
  for (int64_t b = 0; b < lb.batch; ++b)
    max_image_labels = std::max(max_image_labels, lb.image_label_start[b + 1] - lb.image_label_start[b]);
  std::vector<TallyStatus> bad(size_t(std::max(threads, 1)));
  // Images go in tiles, and each tile is counted for every unit before the
  // next: the tile's labels (set ids, slot windows: ~75 KB per 112x112 image) stay in
  // cache across all units, where a unit-major order streamed the batch's
  // labels from memory once per unit block. Units go in blocks, thread t
  // owning blocks t, t + nthreads, ... in every tile: each row of I and A has
  // one writer, and the threads never wait for each other until the batch ends.
  constexpr int64_t kTile = 4;
  // Blocks of up to 64 units: on bench_tally's data 64 beat 128 by ~2 ms per
  // 1,000 images at 2 threads (and 3 at 1), 32, 48 and 256 did no better.
  // (The log's offsets into a block of I are uint32: block * L < 2^32.)
  const int64_t L = space.num_labels;
  const int64_t wanted = std::max<int64_t>(16, std::min<int64_t>(64, K / (int64_t(std::max(threads, 1)) * 4)));
  const int64_t block = std::min<int64_t>(wanted, std::max<int64_t>(1, int64_t(UINT32_MAX) / L));
#pragma omp parallel num_threads(threads)
  {
    const int64_t nthreads = omp_get_num_threads(), first_block = omp_get_thread_num() * block;
    const int64_t my_blocks = first_block < K ? (K - first_block + nthreads * block - 1) / (nthreads * block) : 0;
    Scratch sc(g, std::max<int64_t>(info.max_sets, 1), std::max<int64_t>(info.max_slots, 1), max_image_labels,
               my_blocks);
    TallyStatus& my_bad = bad[size_t(omp_get_thread_num())];
    const ScanMapsFn scan = scan_maps();
    std::vector<float> conv(D == DType::F32 ? 0 : static_cast<size_t>(kTile * block * a.map_size));
    std::vector<float> mx(static_cast<size_t>(kTile * block)), amax(static_cast<size_t>(kTile * block));
    std::vector<uint32_t> fires(static_cast<size_t>(block));
    const float* base[kTile];
    int64_t stride[kTile];
    for (int64_t b0 = 0; b0 < a.batch && my_bad.code == TallyStatus::Ok; b0 += kTile) {
      const int64_t nb = std::min(kTile, a.batch - b0);
      for (int64_t k0 = first_block; k0 < K && my_bad.code == TallyStatus::Ok; k0 += nthreads * block) {
        const int64_t k1 = std::min(K, k0 + block), R = k1 - k0;
        int64_t* const Ib = out.intersection + k0 * L;  // the block's rows of I, where sc.log's offsets point
        const int64_t my_block = (k0 - first_block) / (nthreads * block);
        sc.begin_block(my_block);
        for (int64_t t = 0; t < nb; ++t) {
          base[t] = unit_range_as_float<D>(a, b0 + t, k0, k1, conv.data() + t * R * a.map_size, &stride[t]);
          const int64_t first = scan(base[t], R, stride[t], a.map_size, mx.data() + t * R, amax.data() + t * R);
          if (first >= 0) {
            my_bad = TallyStatus{TallyStatus::NonFinite, b0 + t, k0 + first, 0};
            break;
          }
        }
        if (my_bad.code != TallyStatus::Ok) break;
        // Bit t of fires[i]: some pixel of image t's map of unit i may exceed T (a
        // bit loop below instead of a branch per map that mispredicts at random).
        std::fill(fires.begin(), fires.begin() + R, 0u);
        for (int64_t t = 0; t < nb; ++t)
          for (int64_t i = 0; i < R; ++i)
            fires[size_t(i)] |= uint32_t(interp_upper_bound(mx[size_t(t * R + i)], amax[size_t(t * R + i)]) >
                                         thresholds[k0 + i])
                                << t;
        // This thread's next block goes to cache while this one is counted, so
        // its scan does not wait on memory: the tile's next block, or after the
        // tile's last the next tile's first.
        int64_t next0 = k0 + nthreads * block, nb0 = b0, nnb = nb;
        if (next0 >= K) {
          next0 = first_block;
          nb0 = b0 + kTile;
          nnb = std::max<int64_t>(0, std::min(kTile, a.batch - nb0));
        }
        const int64_t next1 = std::min(K, next0 + block);
        for (int64_t i = 0; i < R; ++i) {
          const int64_t kn = next0 + i;
          if (kn < next1)
            for (int64_t t = 0; t < nnb; ++t) {
              const uintptr_t from = uintptr_t(raw + ((nb0 + t) * a.stride_batch + kn * a.stride_unit) * elem);
              for (uintptr_t line = from & ~uintptr_t(63); line < from + map_bytes; line += 64)
                __builtin_prefetch(reinterpret_cast<const void*>(line), 0, 2);
            }
          const float T = thresholds[k0 + i];
          for (uint32_t f = fires[size_t(i)]; f; f &= f - 1u) {
            const int64_t t = __builtin_ctz(f);
            const size_t j = size_t(t * R + i);
            if (sc.log.n > sc.log_limit) sc.apply(Ib);
            count_map(b0 + t, k0 + i, uint32_t(i * L), base[t] + i * stride[t], T, amax[j], lb, space, info, slots,
                      g, cfg.rule, out, sc);
          }
        }
        sc.end_block(my_block);
      }
    }
    for (int64_t j = 0; j < my_blocks && my_bad.code == TallyStatus::Ok; ++j) {
      sc.begin_block(j);
      sc.apply(out.intersection + (first_block + j * nthreads * block) * L);
      sc.end_block(j);
    }
  }
  for (const TallyStatus& b : bad)
    if (b.code != TallyStatus::Ok &&
        (st.code == TallyStatus::Ok || b.image < st.image || (b.image == st.image && b.unit < st.unit)))
      st = b;
  if (st.code != TallyStatus::Ok) return st;

  add_label_pixels(info, out.label_pixels);
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
