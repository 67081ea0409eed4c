// Host-side preparation of a label batch, shared by the CPU and CUDA backends:
// validation of set ids and label numbers, the category bits of every set and
// image (SPEC §3), runs of equal label sets along rows, and G (label sizes).
#pragma once
#include <omp.h>

#include <algorithm>
#include <vector>

#include "ndf/tally.h"

namespace ndf {

struct BatchLabels {
  std::vector<uint32_t> set_categories;          // per global set
  std::vector<uint32_t> image_categories;        // per image: categories of all its labels
  std::vector<uint32_t> image_level_categories;  // per image: of its image-level labels
  std::vector<uint16_t> run_end;                 // per pixel: end column of its run of equal sets
  int64_t max_sets = 0;
};

// OR of the category bits of labels[from, to). A label number outside 1..L-1
// sets *bad_at to its index (which is left alone otherwise) and is skipped.
inline uint32_t label_categories(const int32_t* labels, int64_t from, int64_t to, const LabelSpace& space,
                                 int64_t* bad_at) {
  uint32_t m = 0;
  for (int64_t j = from; j < to; ++j) {
    const int32_t l = labels[j];
    if (l < 1 || l >= space.num_labels) {
      *bad_at = j;
      continue;
    }
    m |= category_bit(space.primary_category, l);
  }
  return m;
}

// run_ends: also fill out.run_end (the CPU walk uses it; the CUDA kernels do not,
// and then set ids are only validated).
inline TallyStatus prepare_labels(const LabelBatchView& lb, const LabelSpace& space, int threads,
                                  BatchLabels& out, bool run_ends = true) {
  const int64_t B = lb.batch, sh = lb.seg_h, sw = lb.seg_w, S = lb.set_start[B];
  out.set_categories.assign(size_t(S), 0);
  out.image_categories.assign(size_t(B), 0);
  out.image_level_categories.assign(size_t(B), 0);
  out.run_end.resize(run_ends ? size_t(B * sh * sw) : 0);
  std::vector<TallyStatus> status(static_cast<size_t>(B));
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t b = 0; b < B; ++b) {
    TallyStatus& st = status[size_t(b)];
    uint32_t cats = 0, level = 0;
    const int64_t s0 = lb.set_start[b], s1 = lb.set_start[b + 1];
    int64_t bad_at = -1;
    for (int64_t s = s0; s < s1; ++s) {
      const uint32_t m =
          label_categories(lb.set_labels, lb.set_label_start[s], lb.set_label_start[s + 1], space, &bad_at);
      out.set_categories[size_t(s)] = m;
      if (lb.set_pixels[s] > 0) cats |= m;
    }
    if (bad_at >= 0) st = TallyStatus{TallyStatus::BadLabel, b, -1, lb.set_labels[bad_at]};
    bad_at = -1;
    level = label_categories(lb.image_labels, lb.image_label_start[b], lb.image_label_start[b + 1], space, &bad_at);
    if (bad_at >= 0 && st.code == TallyStatus::Ok)
      st = TallyStatus{TallyStatus::BadImageLabel, b, -1, lb.image_labels[bad_at]};
    out.image_categories[size_t(b)] = cats | level;
    out.image_level_categories[size_t(b)] = level;
    const int64_t nsets = s1 - s0;
    const uint16_t* ps = lb.pixel_sets + b * sh * sw;
    uint16_t top = 0;  // one vectorizable pass; the offender is looked for only if there is one
    for (int64_t i = 0; i < sh * sw; ++i) top = std::max(top, ps[i]);
    if (top >= nsets && st.code == TallyStatus::Ok)
      for (int64_t y = 0; y < sh && st.code == TallyStatus::Ok; ++y)  // named: the last offender of the first row
        for (int64_t x = sw - 1; x >= 0; --x)
          if (ps[y * sw + x] >= nsets) {
            st = TallyStatus{TallyStatus::BadSetId, b, -1, ps[y * sw + x]};
            break;
          }
    if (!run_ends || st.code != TallyStatus::Ok) continue;
    uint16_t* re = out.run_end.data() + b * sh * sw;
    for (int64_t y = 0; y < sh; ++y) {
      const uint16_t* row = ps + y * sw;
      uint16_t* rend = re + y * sw;
      uint16_t end = uint16_t(sw);
      rend[sw - 1] = end;
      for (int64_t x = sw - 2; x >= 0; --x) {  // branch-free (a branch here mispredicts at every run end)
        const uint16_t differs = uint16_t(-int(row[x + 1] != row[x]));
        end = uint16_t((uint16_t(x + 1) & differs) | (end & ~differs));
        rend[x] = end;
      }
    }
  }
  for (int64_t b = 0; b < B; ++b) {
    if (status[size_t(b)].code != TallyStatus::Ok) return status[size_t(b)];
    out.max_sets = std::max(out.max_sets, lb.set_start[b + 1] - lb.set_start[b]);
  }
  return TallyStatus{};
}

// G[l] += pixels of every set holding l (once per plane) + sh*sw per image-level label.
inline void add_label_pixels(const LabelBatchView& lb, int64_t* label_pixels) {
  const int64_t area = lb.seg_h * lb.seg_w;
  for (int64_t b = 0; b < lb.batch; ++b) {
    for (int64_t s = lb.set_start[b]; s < lb.set_start[b + 1]; ++s)
      for (int64_t j = lb.set_label_start[s]; j < lb.set_label_start[s + 1]; ++j)
        label_pixels[lb.set_labels[j]] += lb.set_pixels[s];
    for (int64_t j = lb.image_label_start[b]; j < lb.image_label_start[b + 1]; ++j)
      label_pixels[lb.image_labels[j]] += area;
  }
}

}  // namespace ndf
