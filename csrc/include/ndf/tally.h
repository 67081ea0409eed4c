// The fused upsample + threshold + intersection/union tally (SPEC §1-§3),
// declared once for every backend.
#pragma once
#include <cstdint>
#include <vector>
#include "ndf/common.h"
#include "ndf/interp.h"
#include "ndf/tally_rules.h"

namespace ndf {

// The compact label form of a batch (python/netdissect_fast/labels.py).
struct LabelBatchView {
  const uint16_t* pixel_sets = nullptr;  // (B, sh, sw) local set id per pixel
  int64_t batch = 0, seg_h = 0, seg_w = 0;
  const int64_t* set_start = nullptr;          // B+1
  const int64_t* set_label_start = nullptr;    // S+1
  const int32_t* set_labels = nullptr;
  const int64_t* set_pixels = nullptr;         // S
  const int64_t* image_label_start = nullptr;  // B+1
  const int32_t* image_labels = nullptr;
};

struct LabelSpace {
  int64_t num_labels = 0;                    // L (label 0 = unlabelled)
  int32_t num_categories = 0;                // C <= 32
  const int16_t* primary_category = nullptr; // (L,), -1 = ignored
};

struct TallyConfig {
  Rule rule = Rule::Paper;
  UpsampleParams upsample;
  int64_t map_h = 0, map_w = 0;  // activation map size; map_size = map_h * map_w
};

// Accumulators (added to, never cleared): I (K, L), A per category (K, C), G (L).
struct TallyCounts {
  int64_t* intersection = nullptr;
  int64_t* cat_activation = nullptr;
  int64_t* label_pixels = nullptr;
};

// A run of consecutive output rows (or columns) that read the same two source
// rows (columns): the side of a "cell" between neighbouring activation samples.
struct Span {
  int32_t start, end, i0, i1;
};

inline std::vector<AxisWeight> axis_weights(const UpsampleParams& p, bool y_axis, int64_t in_size,
                                            int64_t out_size) {
  std::vector<AxisWeight> w(static_cast<size_t>(out_size));
  for (int64_t i = 0; i < out_size; ++i) w[size_t(i)] = axis_weight(p, y_axis, in_size, out_size, i);
  return w;
}

inline std::vector<Span> cell_spans(const std::vector<AxisWeight>& w) {
  std::vector<Span> spans;
  for (int32_t i = 0; i < int32_t(w.size()); ++i) {
    if (!spans.empty() && spans.back().i0 == w[size_t(i)].i0 && spans.back().i1 == w[size_t(i)].i1) {
      spans.back().end = i + 1;
    } else {
      spans.push_back(Span{i, i + 1, w[size_t(i)].i0, w[size_t(i)].i1});
    }
  }
  return spans;
}

// What the tally found wrong with its input (checked while it runs, so a bad
// batch costs nothing extra). `code` 0 means the batch was counted.
struct TallyStatus {
  enum Code : int { Ok = 0, NonFinite = 1, BadSetId = 2, BadLabel = 3, BadImageLabel = 4 };
  int code = Ok;
  int64_t image = -1;  // batch position
  int64_t unit = -1;   // NonFinite: the unit
  int64_t value = 0;   // the offending set id / label number
};

// Adds one batch to `out`. Label errors are found before anything is counted;
// a non-finite activation is found while counting, so after a NonFinite status
// `out` holds a partial batch and must be discarded (the Python layer does).
TallyStatus tally_cpu(const ActivationView& acts, const float* thresholds,
                      const LabelBatchView& labels, const LabelSpace& space,
                      const TallyConfig& cfg, TallyCounts out, int threads);

}  // namespace ndf
