// Host helper of the CPU kernels: one image's maps of a unit range as floats.
#pragma once
#include "ndf/common.h"

namespace ndf {

// The maps of units [k0, k1) of image b as floats: in place for float32,
// converted into `scratch` (stride n) for the 16-bit types.
template <DType D>
inline const float* unit_range_as_float(const ActivationView& a, int64_t b, int64_t k0, int64_t k1, float* scratch,
                                 int64_t* stride) {
  using T = typename Elem<D>::T;
  const T* p = static_cast<const T*>(a.data) + b * a.stride_batch;
  if constexpr (D == DType::F32) {
    *stride = a.stride_unit;
    return p + k0 * a.stride_unit;
  } else {
    const int64_t n = a.map_size;
    for (int64_t k = k0; k < k1; ++k)
      for (int64_t i = 0; i < n; ++i) scratch[(k - k0) * n + i] = Elem<D>::load(p + k * a.stride_unit, i);
    *stride = n;
    return scratch;
  }
}

}  // namespace ndf
