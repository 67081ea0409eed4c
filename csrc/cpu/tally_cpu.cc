// CPU backend of the fused tally. Units are split among OpenMP threads (each
// unit's rows of I and A have one writer), images are visited in order, so the
// counts are the same for every thread count, batch size and batch order.
//
// Per (image, unit): the map's maximum decides whether any pixel can exceed the
// threshold; if so, only cells whose corners can exceed it are upsampled, and
// the mask is counted a block at a time (a row span of cells x 16 columns)
// against per-label bitmaps of that block made once per batch: a few popcounts
// per label present, whatever the shapes of the label regions.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#include "ndf/quantile.h"
#include "cpu_simd.h"
#include "ndf/label_prep.h"
#include "map_range.h"
#include "ndf/tally.h"

namespace ndf {
namespace {

constexpr int64_t kChunk = 16;  // columns per block: one uint16 of mask per row

struct Geometry {
  int64_t mh, mw, sh, sw;
  int64_t nchunks;  // 16-column chunks per output row
  std::vector<AxisWeight> yw;
  std::vector<Span> yspans, xspans;
  std::vector<int64_t> words;  // per y-span: its rows as 64-bit words (4 rows each, zero-padded)
  std::vector<int32_t> x0, x1;
  std::vector<float> wx0, wx1;
  // For source column j: the first x-span reading a column >= j and the last
  // reading a column <= j (the x-spans touching hot columns jmin..jmax).
  std::vector<int32_t> first_span, last_span;
};

// One image's labels by block (y-span x 16-column chunk): the labels present,
// each with a bitmap of its pixels in the block (one uint16 per row, rows padded
// to whole 64-bit words). A label held twice by a pixel's set (two planes) has a
// second entry, so it is counted twice, as the set lists it.
struct BlockLabels {
  std::vector<int32_t> begin;  // per block + 1: its first entry
  std::vector<int64_t> bits_at;  // per block: its first bitmap word
  std::vector<int32_t> label;  // per entry
  std::vector<uint32_t> category;  // per entry: category bit of the label
  std::vector<uint64_t> bits;
  int32_t max_entries = 0;  // in one block
};

// Bit i (i < n <= 16) set where v[i] != v[i + 1] or i == n - 1: the last pixel of
// each run of equal set ids in a chunk of n pixels.
inline uint32_t run_ends(const uint16_t* v, int64_t n) {
#ifdef __SSE2__
  if (n == kChunk) {  // SSE2 is part of x86-64: no dispatch needed
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v + 8));
    const __m128i a_next = _mm_or_si128(_mm_srli_si128(a, 2), _mm_slli_si128(b, 14));
    const __m128i same = _mm_packs_epi16(_mm_cmpeq_epi16(a, a_next), _mm_cmpeq_epi16(b, _mm_srli_si128(b, 2)));
    return (~uint32_t(_mm_movemask_epi8(same)) & 0x7fffu) | 0x8000u;
  }
#endif
  uint32_t ends = 1u << (n - 1);
  for (int64_t i = 0; i + 1 < n; ++i) ends |= uint32_t(v[i] != v[i + 1]) << i;
  return ends;
}

// Scratch of build_block_labels, one per thread.
struct BlockBuilder {
  std::vector<std::vector<int32_t>> slots;  // [occurrence][label]: entry within the block, or -1
  std::vector<int32_t> set_slot;            // per local set: its place among the block's sets, or -1
  std::vector<int32_t> sets;                // the block's sets
  std::vector<uint64_t> set_bits;           // their bitmaps
  std::vector<int32_t> occ;                 // per entry of the block: occurrence of its label
};

// A block is read as runs of equal sets: each run ORs into its set's bitmap; then
// each set's bitmap is ORed into the entries of its labels (a few per set), so
// the per-pixel work does not grow with the labels per pixel.
void build_block_labels(int64_t b, const LabelBatchView& lb, const LabelSpace& space, const Geometry& g,
                        BlockLabels& out, BlockBuilder& w) {
  out.max_entries = 0;
  out.begin.clear();
  out.bits_at.clear();
  out.label.clear();
  out.category.clear();
  out.bits.clear();
  const uint16_t* ps = lb.pixel_sets + b * g.sh * g.sw;
  const int64_t s0 = lb.set_start[b];
  w.set_slot.assign(size_t(lb.set_start[b + 1] - s0), -1);
  for (size_t y = 0; y < g.yspans.size(); ++y) {
    const Span& ys = g.yspans[y];
    const int64_t words = g.words[y];
    for (int64_t c = 0; c < g.nchunks; ++c) {
      const int64_t x0 = c * kChunk, x1 = std::min(g.sw, x0 + kChunk);
      w.sets.clear();
      w.set_bits.clear();
      for (int64_t py = ys.start; py < ys.end; ++py) {
        const uint16_t* row = ps + py * g.sw;
        const int64_t word = (py - ys.start) / 4, shift = 16 * ((py - ys.start) % 4);
        // bit i: pixel x0 + i ends a run (its right neighbour in the chunk differs)
        const uint32_t ends = run_ends(row + x0, x1 - x0);
        for (int64_t x = 0; x < x1 - x0;) {
          const int64_t e = __builtin_ctz(ends >> x) + x + 1;
          const uint16_t s = row[x0 + x];
          int32_t& slot = w.set_slot[s];
          if (slot < 0) {
            slot = int32_t(w.sets.size());
            w.sets.push_back(s);
            w.set_bits.resize(w.set_bits.size() + size_t(words), 0);
          }
          w.set_bits[size_t(slot * words + word)] |= uint64_t(((1u << (e - x)) - 1u) << x) << shift;
          x = e;
        }
      }
      const int32_t first = int32_t(out.label.size());
      const int64_t bits0 = int64_t(out.bits.size());
      out.begin.push_back(first);
      out.bits_at.push_back(bits0);
      w.occ.clear();
      for (size_t i = 0; i < w.sets.size(); ++i) {
        const int64_t gs = s0 + w.sets[i];
        w.set_slot[size_t(w.sets[i])] = -1;
        const uint64_t* sb = w.set_bits.data() + i * size_t(words);
        int32_t o = 0;  // occurrence of the label within the set (labels ascending)
        for (int64_t j = lb.set_label_start[gs]; j < lb.set_label_start[gs + 1]; ++j) {
          const int32_t l = lb.set_labels[j];
          o = (j > lb.set_label_start[gs] && lb.set_labels[j - 1] == l) ? o + 1 : 0;
          if (size_t(o) >= w.slots.size()) w.slots.emplace_back(size_t(space.num_labels), -1);
          int32_t& slot = w.slots[size_t(o)][size_t(l)];
          if (slot < 0) {
            slot = int32_t(out.label.size()) - first;
            out.label.push_back(l);
            out.category.push_back(category_bit(space.primary_category, l));
            out.bits.resize(out.bits.size() + size_t(words), 0);
            w.occ.push_back(o);
          }
          uint64_t* eb = out.bits.data() + bits0 + slot * words;
          for (int64_t k = 0; k < words; ++k) eb[k] |= sb[k];
        }
      }
      for (size_t e = 0; e < w.occ.size(); ++e) w.slots[size_t(w.occ[e])][size_t(out.label[size_t(first) + e])] = -1;
      out.max_entries = std::max(out.max_entries, int32_t(w.occ.size()));
    }
  }
  out.begin.push_back(int32_t(out.label.size()));
}

struct Scratch {
  std::vector<float> hrows;       // source rows upsampled along x (mh x sw)
  std::vector<int64_t> hlo, hhi;  // per source row: columns [lo, hi) of hrows are valid
  std::vector<uint16_t> masks;    // one span's mask rows, chunk after chunk, padded as in BlockLabels
  std::vector<uint64_t> words;    // one block's mask as 64-bit words
  std::vector<uint64_t> rowbits;
  std::vector<int64_t> counts;    // per entry of a block
  Scratch(const Geometry& g, int64_t max_words, int64_t max_entries)
      : hrows(size_t(g.mh * g.sw)), hlo(size_t(g.mh)), hhi(size_t(g.mh)),
        masks(size_t(g.nchunks * 4 * max_words)), words(size_t(max_words)), rowbits(size_t(g.mh)),
        counts(size_t(max_entries)) {}
};

// Counts one (image b, unit k) map `m` (floats, row-major mh x mw) that may
// exceed T somewhere.
void count_map(int64_t b, int64_t k, const float* m, float T, float amax, const LabelBatchView& lb,
               const LabelSpace& space, const BatchLabels& info, const BlockLabels& blocks, const Geometry& g,
               Rule rule, TallyCounts out, Scratch& sc) {
  const ThresholdSpanFn threshold = threshold_span();
  const InterpRowFn interp = interp_row();
  const MaskCountsFn popcounts = mask_counts();
  const int64_t L = space.num_labels, C = space.num_categories, sw = g.sw;
  int64_t* Ik = out.intersection + k * L;
  int64_t* Ak = out.cat_activation + k * C;
  std::fill(sc.hlo.begin(), sc.hlo.end(), int64_t(0));
  std::fill(sc.hhi.begin(), sc.hhi.end(), int64_t(0));
  int64_t M = 0;
  uint32_t overlap = 0;
  // Samples that can lift a pixel above T: a cell whose four corners are all
  // <= T - amax*2e-6 stays <= T after rounding (see interp_upper_bound).
  const float Tm = T - amax * 2e-6f;
  const bool narrow = g.mw <= 64;
  if (narrow) hot_rows()(m, g.mh, g.mw, Tm, sc.rowbits.data());
  for (size_t y = 0; y < g.yspans.size(); ++y) {
    const Span& ys = g.yspans[y];
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
    // Widen to whole blocks: the extra pixels are computed exactly like the
    // others (they are just below T), so the counts do not change.
    const int64_t ca = xa / kChunk, cb = (xb + kChunk - 1) / kChunk;
    xa = ca * kChunk;
    xb = std::min(sw, cb * kChunk);
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
    const int64_t rows = ys.end - ys.start, words = g.words[y];
    uint16_t* masks = sc.masks.data();
    for (int64_t c = 0; c < cb - ca; ++c)  // padding rows stay zero
      std::fill(masks + c * 4 * words + rows, masks + (c + 1) * 4 * words, uint16_t(0));
    threshold(sc.hrows.data() + int64_t(ys.i0) * sw, sc.hrows.data() + int64_t(ys.i1) * sw,
              g.yw.data() + ys.start, rows, T, xa, xb, masks, 1, 4 * words);
    for (int64_t c = ca; c < cb; ++c) {
      uint64_t* mk = sc.words.data();
      std::memcpy(mk, masks + (c - ca) * 4 * words, size_t(words) * sizeof(uint64_t));
      uint64_t any = 0;
      for (int64_t w = 0; w < words; ++w) any |= mk[w];
      if (!any) continue;  // most blocks of a hot span: cells just below T
      const int64_t blk = int64_t(y) * g.nchunks + c;
      const int32_t e0 = blocks.begin[size_t(blk)], e1 = blocks.begin[size_t(blk) + 1];
      M += popcounts(mk, words, blocks.bits.data() + blocks.bits_at[size_t(blk)], e1 - e0, sc.counts.data());
      for (int32_t e = e0; e < e1; ++e) {  // branch-free: about half the labels of a block are missed
        const int64_t cnt = sc.counts[size_t(e - e0)];
        Ik[blocks.label[size_t(e)]] += cnt;
        overlap |= cnt ? blocks.category[size_t(e)] : 0u;
      }
    }
  }
  if (M == 0) return;
  for (int64_t j = lb.image_label_start[b]; j < lb.image_label_start[b + 1]; ++j) Ik[lb.image_labels[j]] += M;
  uint32_t cats = counted_categories(rule, info.image_categories[size_t(b)], overlap,
                                     info.image_level_categories[size_t(b)]);
  for (int32_t c = 0; cats; ++c, cats >>= 1)
    if (cats & 1u) Ak[c] += M;
}

template <DType D>
TallyStatus run_tally(const ActivationView& a, const float* thresholds, const LabelBatchView& lb,
                      const LabelSpace& space, const TallyConfig& cfg, TallyCounts out, int threads) {
  Geometry g;
  g.mh = cfg.map_h;
  g.mw = cfg.map_w;
  g.sh = lb.seg_h;
  g.sw = lb.seg_w;
  g.nchunks = (g.sw + kChunk - 1) / kChunk;
  g.yw = axis_weights(cfg.upsample, true, g.mh, g.sh);
  const std::vector<AxisWeight> xw = axis_weights(cfg.upsample, false, g.mw, g.sw);
  g.yspans = cell_spans(g.yw);
  g.xspans = cell_spans(xw);
  int64_t max_words = 1;
  for (const Span& ys : g.yspans) {
    g.words.push_back((ys.end - ys.start + 3) / 4);
    max_words = std::max(max_words, g.words.back());
  }
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
  // Reused across calls: fresh multi-megabyte buffers every batch cost page faults.
  // (References, so OpenMP threads see the caller's buffers, not their own.)
  static thread_local BatchLabels cache;
  static thread_local std::vector<BlockLabels> block_cache;
  BatchLabels& info = cache;
  TallyStatus st = prepare_labels(lb, space, threads, info);
  if (st.code != TallyStatus::Ok) return st;
  std::vector<BlockLabels>& blocks = block_cache;
  if (blocks.size() < size_t(a.batch)) blocks.resize(size_t(a.batch));
#pragma omp parallel num_threads(threads)
  {
    BlockBuilder builder;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < a.batch; ++b) build_block_labels(b, lb, space, g, blocks[size_t(b)], builder);
  }
  int64_t max_entries = 1;
  for (int64_t b = 0; b < a.batch; ++b) max_entries = std::max<int64_t>(max_entries, blocks[size_t(b)].max_entries);

  const int64_t K = a.units;
  std::vector<TallyStatus> bad(size_t(std::max(threads, 1)));
#pragma omp parallel num_threads(threads)
  {
    Scratch sc(g, max_words, max_entries);
    TallyStatus& my_bad = bad[size_t(omp_get_thread_num())];
    const ScanMapsFn scan = scan_maps();
    // Units go in blocks handed out dynamically (firing, and so cost, varies by
    // unit); a block's rows of I and A have one writer.
    const int64_t block = std::max<int64_t>(16, K / (int64_t(omp_get_num_threads()) * 8));
    // Images go in tiles: within a tile each unit's maps are counted back to back
    // (its rows of I stay in cache) and the tile's labels stay in cache across units.
    constexpr int64_t kTile = 8;
    std::vector<float> conv(D == DType::F32 ? 0 : static_cast<size_t>(kTile * block * a.map_size));
    std::vector<float> mx(static_cast<size_t>(kTile * block)), amax(static_cast<size_t>(kTile * block));
    const float* base[kTile];
    int64_t stride[kTile];
#pragma omp for schedule(dynamic, 1)
    for (int64_t k0 = 0; k0 < K; k0 += block) {
      if (my_bad.code != TallyStatus::Ok) continue;  // this thread already failed: skip its blocks
      const int64_t k1 = std::min(K, k0 + block), R = k1 - k0;
      for (int64_t b0 = 0; b0 < a.batch && my_bad.code == TallyStatus::Ok; b0 += kTile) {
        const int64_t nb = std::min(kTile, a.batch - b0);
        for (int64_t t = 0; t < nb; ++t) {
          base[t] = unit_range_as_float<D>(a, b0 + t, k0, k1, conv.data() + t * R * a.map_size, &stride[t]);
          const int64_t first =
              scan(base[t], R, stride[t], a.map_size, mx.data() + t * R, amax.data() + t * R);
          if (first >= 0) {
            my_bad = TallyStatus{TallyStatus::NonFinite, b0 + t, k0 + first, 0};
            break;
          }
        }
        if (my_bad.code != TallyStatus::Ok) break;
        for (int64_t i = 0; i < R; ++i) {
          const float T = thresholds[k0 + i];
          for (int64_t t = 0; t < nb; ++t) {
            const size_t j = size_t(t * R + i);
            if (interp_upper_bound(mx[j], amax[j]) <= T) continue;  // no pixel can exceed T
            count_map(b0 + t, k0 + i, base[t] + i * stride[t], T, amax[j], lb, space, info,
                      blocks[size_t(b0 + t)], g, cfg.rule, out, sc);
          }
        }
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
