// Per-element upsampling math shared by the CPU and CUDA tally kernels.
//
// Every output row (and column) of the segmentation grid reads two source rows
// i0, i1 of the activation map with weights w0, w1. The value of output pixel
// (y, x) is
//     top = fma(wx0, a[y0][x0], wx1 * a[y0][x1])
//     bot = fma(wx0, a[y1][x0], wx1 * a[y1][x1])
//     v   = fma(wy0, top, wy1 * bot)
// which is bit for bit what torch's CPU kernel computes for
// interpolate(mode="bilinear", align_corners=False) in float32 (checked by
// tests/test_tally.py against torch itself for output widths >= 17; torch takes a
// different loop for narrower outputs).
#pragma once
#include <cmath>
#include "ndf/common.h"

namespace ndf {

enum class Upsample : int { Bilinear = 0, ReceptiveField = 1 };

struct AxisWeight {
  int32_t i0, i1;
  float w0, w1;
};

// Bilinear, half-pixel centres, edge clamping: torch's
// area_pixel_compute_source_index + guard_index_and_lambda, with the source index
// computed in double and rounded to float as torch does.
NDF_HD inline AxisWeight bilinear_axis_weight(int64_t in_size, int64_t out_size, int64_t out_index) {
  AxisWeight r;
  if (in_size == out_size) {
    r.i0 = r.i1 = int32_t(out_index);
    r.w0 = 1.0f;
    r.w1 = 0.0f;
    return r;
  }
  const float scale = float(in_size) / float(out_size);
  const double prod = double(scale) * (double(out_index) + 0.5);
  float src = float(prod - 0.5);
  if (src < 0.0f) src = 0.0f;
  int64_t i0 = int64_t(floorf(src));
  if (i0 > in_size - 1) i0 = in_size - 1;
  float l1 = src - float(i0);
  l1 = l1 < 0.0f ? 0.0f : (l1 > 1.0f ? 1.0f : l1);
  r.i0 = int32_t(i0);
  r.i1 = int32_t(i0 < in_size - 1 ? i0 + 1 : i0);
  r.w1 = l1;
  r.w0 = 1.0f - l1;
  return r;
}

// Receptive-field anchored: source unit i sits at offset + stride * i in output
// pixel coordinates (pixel p at coordinate p); outside the outermost centres the
// value is clamped.
NDF_HD inline AxisWeight receptive_field_axis_weight(int64_t in_size, float stride, float offset,
                                                     int64_t out_index) {
  AxisWeight r;
  float t = (float(out_index) - offset) / stride;
  if (t <= 0.0f || in_size == 1) {
    r.i0 = r.i1 = 0;
    r.w0 = 1.0f;
    r.w1 = 0.0f;
    return r;
  }
  if (t >= float(in_size - 1)) {
    r.i0 = r.i1 = int32_t(in_size - 1);
    r.w0 = 1.0f;
    r.w1 = 0.0f;
    return r;
  }
  int64_t i0 = int64_t(floorf(t));
  if (i0 > in_size - 2) i0 = in_size - 2;
  float l1 = t - float(i0);
  l1 = l1 < 0.0f ? 0.0f : (l1 > 1.0f ? 1.0f : l1);
  r.i0 = int32_t(i0);
  r.i1 = int32_t(i0 + 1);
  r.w1 = l1;
  r.w0 = 1.0f - l1;
  return r;
}

struct UpsampleParams {
  Upsample mode = Upsample::Bilinear;
  float stride_y = 1, stride_x = 1, offset_y = 0, offset_x = 0;  // receptive_field only
};

NDF_HD inline AxisWeight axis_weight(const UpsampleParams& p, bool y_axis, int64_t in_size,
                                     int64_t out_size, int64_t out_index) {
  if (p.mode == Upsample::Bilinear) return bilinear_axis_weight(in_size, out_size, out_index);
  return y_axis ? receptive_field_axis_weight(in_size, p.stride_y, p.offset_y, out_index)
                : receptive_field_axis_weight(in_size, p.stride_x, p.offset_x, out_index);
}

// One horizontal lerp and the vertical combination, in the order fixed above.
NDF_HD inline float lerp_x(const AxisWeight& wx, float a, float b) {
  return fmaf(wx.w0, a, wx.w1 * b);
}
NDF_HD inline float lerp_y(const AxisWeight& wy, float top, float bot) {
  return fmaf(wy.w0, top, wy.w1 * bot);
}

// A value that is certainly >= every interpolated value of corners whose maximum
// is vmax and largest magnitude is amax: fma-based convex combinations can round
// above the largest corner by a few ulps, so cells are skipped only when this
// bound is <= the threshold (SPEC §2: skipping must not change counts).
NDF_HD inline float interp_upper_bound(float vmax, float amax) {
  return vmax + amax * 1e-6f;  // ~17 units of 2^-24, several times the worst rounding
}

}  // namespace ndf
