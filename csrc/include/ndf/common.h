// Shared by the CPU and CUDA backends: the HOST_DEVICE macro, element types and
// the raw-pointer views that arrays cross the Python boundary as.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(NDF_CUDA_EMULATION)
#define NDF_HD __host__ __device__
#else
#define NDF_HD
#endif

namespace ndf {

// Element types of activations. The numbers are part of the binding API.
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

NDF_HD inline float bits_to_float(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

NDF_HD inline uint32_t float_to_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

// IEEE binary16 -> float32, exact (subnormals, inf and NaN included), branch-light
// so that loops over it vectorize.
NDF_HD inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t mag = h & 0x7fffu;
  // Shift exponent+mantissa into place and rescale by 2^112: correct for normal
  // and subnormal halves alike.
  float f = bits_to_float(mag << 13) * 5.192296858534828e+33f;  // 2^112
  uint32_t u = float_to_bits(f);
  if (mag >= 0x7c00u) u = 0x7f800000u | (mag & 0x3ffu) << 13;  // inf / NaN
  return bits_to_float(u | sign);
}

NDF_HD inline float bfloat16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

template <DType D> struct Elem;
template <> struct Elem<DType::F32> {
  using T = float;
  NDF_HD static float load(const float* p, int64_t i) { return p[i]; }
};
template <> struct Elem<DType::F16> {
  using T = uint16_t;
  NDF_HD static float load(const uint16_t* p, int64_t i) { return half_to_float(p[i]); }
};
template <> struct Elem<DType::BF16> {
  using T = uint16_t;
  NDF_HD static float load(const uint16_t* p, int64_t i) { return bfloat16_to_float(p[i]); }
};

// A batch of activations (B, K, h*w): the h*w map of one (image, unit) is
// contiguous; images and units may be strided (strides in elements).
struct ActivationView {
  const void* data = nullptr;
  DType dtype = DType::F32;
  int64_t batch = 0, units = 0, map_size = 0;
  int64_t stride_batch = 0, stride_unit = 0;
};

// Where the first non-finite value of a scan was seen (-1: none).
struct BadValue {
  int64_t unit = -1, batch_index = -1, position = -1;
};

}  // namespace ndf
