// Host-side preparation of a label batch, shared by the CPU and CUDA backends:
// validation of set ids and label numbers, the category bits of every set and
// image (SPEC §3), each image's labels numbered (CPU), and G (label sizes).
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
  // CPU only: an image's (label, occurrence within a set) pairs numbered 0, 1,
  // ... ("slots"), so a mask's counts gather per label in a small array before
  // one add per slot into I. A label that several planes give one pixel has a
  // slot per plane (it counts once per plane; the slot counter's pixel bits
  // could not count it twice otherwise). Image b's slot j holds label
  // slot_label[set_label_start[set_start[b]] + j] (an image has no more slots
  // than set entries) and has image_slots[b] slots; entry e of set_labels is
  // slot entry_slot[e] of its image.
  std::vector<int32_t> slot_label, entry_slot;
  std::vector<int64_t> image_slots;
  // CPU only: per global set, the bits of its slots below 64 (the slot
  // counter's pixel bits; images with more slots take the set counter).
  std::vector<uint64_t> set_slots;
  int64_t max_sets = 0, max_slots = 0;
  // G of the batch: per label, the pixels of every set holding it (once per
  // plane) + sh*sw per image-level label. Added to the tally's G only once the
  // whole batch is counted (add_label_pixels).
  std::vector<int64_t> label_pixels;
};

// The largest of n pixel set ids: the check prepare_labels makes on each image's
// pixels (one vectorizable pass) unless its caller's pixel pass makes it.
inline uint16_t max_set_id(const uint16_t* ps, int64_t n) {
  uint16_t top = 0;
  for (int64_t i = 0; i < n; ++i) top = std::max(top, ps[i]);
  return top;
}

// Validates a batch's labels and derives BatchLabels from them, an image per
// OpenMP iteration, each image's set entries in one loop. `slots`: also number
// each image's labels (the CPU kernel uses them; the CUDA kernels do not).
// pixel_pass(b) returns the largest set id among image b's pixels; it is called
// once image b's labels are numbered, from the OpenMP threads, so a backend can
// do its own per-pixel work there and read the pixels only once (the CPU
// kernel's slot windows). Ids it returns at or past the image's set count are
// reported as BadSetId.
template <class PixelPass>
inline TallyStatus prepare_labels(const LabelBatchView& lb, const LabelSpace& space, int threads,
                                  BatchLabels& out, bool slots, const PixelPass& pixel_pass) {
  const int64_t B = lb.batch, sh = lb.seg_h, sw = lb.seg_w, S = lb.set_start[B], L = space.num_labels;
  out.set_categories.resize(size_t(S));
  out.image_categories.resize(size_t(B));
  out.image_level_categories.resize(size_t(B));
  out.max_sets = out.max_slots = 0;
  const int64_t E = lb.set_label_start[S];
  out.slot_label.resize(slots ? size_t(E) : 0);
  out.entry_slot.resize(slots ? size_t(E) : 0);
  out.set_slots.resize(slots ? size_t(S) : 0);
  out.image_slots.assign(slots ? size_t(B) : 0, 0);
  out.label_pixels.assign(size_t(L), 0);
  std::vector<TallyStatus> status(static_cast<size_t>(B));
#pragma omp parallel num_threads(threads)
  {
    // label -> its slot of occurrence 0 (-1 between images); per slot, its occurrence
    std::vector<int32_t> slot_of(slots ? size_t(L) : 0, -1), occurrence;
    std::vector<int64_t> last_set(slots ? size_t(L) : 0, -1);  // label -> the last set it was seen in
    std::vector<int64_t> pixels(size_t(L), 0);  // this thread's share of G
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t b = 0; b < B; ++b) {
      TallyStatus& st = status[size_t(b)];
      const int64_t s0 = lb.set_start[b], s1 = lb.set_start[b + 1];
      int32_t* labels_of = slots ? out.slot_label.data() + lb.set_label_start[s0] : nullptr;
      if (slots) occurrence.resize(size_t(lb.set_label_start[s1] - lb.set_label_start[s0]));
      int64_t bad_at = -1;  // the image's last entry outside 1..L-1 (skipped)
      uint32_t cats = 0;
      int32_t n = 0;  // the image's slots so far
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t f0 = lb.set_label_start[s], f1 = lb.set_label_start[s + 1], set_pixels = lb.set_pixels[s];
        uint32_t m = 0;
        uint64_t bits = 0;
        for (int64_t e = f0; e < f1; ++e) {
          const int32_t l = lb.set_labels[e];
          if (l < 1 || l >= L) {
            bad_at = e;
            continue;
          }
          m |= category_bit(space.primary_category, l);
          pixels[size_t(l)] += set_pixels;
          if (!slots) continue;
          int32_t k = 0;  // earlier entries of this set with the same label (rare: counted only then)
          if (last_set[size_t(l)] == s)
            for (int64_t f = f0; f < e; ++f) k += lb.set_labels[f] == l;
          last_set[size_t(l)] = s;
          int32_t j = slot_of[size_t(l)];
          if (k > 0) {  // a repeat within its set: the slot of (l, k), found by search (rare)
            const int32_t first = j;
            j = -1;
            for (int32_t q = first + 1; q < n && j < 0; ++q)
              if (labels_of[q] == l && occurrence[size_t(q)] == k) j = q;
          }
          if (j < 0) {
            j = n++;
            labels_of[j] = l;
            occurrence[size_t(j)] = k;
            if (k == 0) slot_of[size_t(l)] = j;
          }
          out.entry_slot[size_t(e)] = j;
          bits |= j < 64 ? uint64_t(1) << j : 0;
        }
        out.set_categories[size_t(s)] = m;
        if (set_pixels > 0) cats |= m;
        if (slots) out.set_slots[size_t(s)] = bits;
      }
      for (int32_t j = 0; j < n; ++j)
        if (occurrence[size_t(j)] == 0) slot_of[size_t(labels_of[j])] = -1;
      if (slots) out.image_slots[size_t(b)] = n;
      if (bad_at >= 0) st = TallyStatus{TallyStatus::BadLabel, b, -1, lb.set_labels[bad_at]};
      uint32_t level = 0;
      bad_at = -1;
      for (int64_t j = lb.image_label_start[b]; j < lb.image_label_start[b + 1]; ++j) {
        const int32_t l = lb.image_labels[j];
        if (l < 1 || l >= L) {
          bad_at = j;
          continue;
        }
        level |= category_bit(space.primary_category, l);
        pixels[size_t(l)] += sh * sw;
      }
      if (bad_at >= 0 && st.code == TallyStatus::Ok)
        st = TallyStatus{TallyStatus::BadImageLabel, b, -1, lb.image_labels[bad_at]};
      out.image_categories[size_t(b)] = cats | level;
      out.image_level_categories[size_t(b)] = level;
      if (st.code != TallyStatus::Ok) continue;
      const int64_t nsets = s1 - s0;
      if (pixel_pass(b) >= nsets) {
        const uint16_t* ps = lb.pixel_sets + b * sh * sw;
        for (int64_t y = 0; y < sh && st.code == TallyStatus::Ok; ++y)  // named: the last offender of the first row
          for (int64_t x = sw - 1; x >= 0; --x)
            if (ps[y * sw + x] >= nsets) {
              st = TallyStatus{TallyStatus::BadSetId, b, -1, ps[y * sw + x]};
              break;
            }
      }
    }
#pragma omp critical(ndf_label_pixels)
    for (size_t l = 0; l < pixels.size(); ++l) out.label_pixels[l] += pixels[l];
  }
  for (int64_t b = 0; b < B; ++b) {
    if (status[size_t(b)].code != TallyStatus::Ok) return status[size_t(b)];
    out.max_sets = std::max(out.max_sets, lb.set_start[b + 1] - lb.set_start[b]);
    if (slots) out.max_slots = std::max(out.max_slots, out.image_slots[size_t(b)]);
  }
  return TallyStatus{};
}

// prepare_labels with its own pixel check (max_set_id).
inline TallyStatus prepare_labels(const LabelBatchView& lb, const LabelSpace& space, int threads, BatchLabels& out,
                                  bool slots = true) {
  return prepare_labels(lb, space, threads, out, slots, [&](int64_t b) {
    return max_set_id(lb.pixel_sets + b * lb.seg_h * lb.seg_w, lb.seg_h * lb.seg_w);
  });
}

// G += the batch's label sizes (prepare_labels), once the batch is counted.
inline void add_label_pixels(const BatchLabels& info, int64_t* label_pixels) {
  for (size_t l = 0; l < info.label_pixels.size(); ++l) label_pixels[l] += info.label_pixels[l];
}

}  // namespace ndf
