// Shared by the .cu files: launch syntax and error checks that also compile in
// the CPU emulation build (csrc/cuda_emulation).
#pragma once
#include <stdexcept>
#include <string>

#ifndef NDF_CUDA_EMULATION
#include <cuda_runtime.h>
#define NDF_LAUNCH(kernel, grid, block, stream, ...) \
  kernel<<<(grid), (block), 0, (cudaStream_t)(stream)>>>(__VA_ARGS__)
#endif

#include "ndf/common.h"

namespace ndf {
namespace cuda {

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(e));
}
#define NDF_CUDA_CHECK(expr) ::ndf::cuda::check((expr), #expr)

// Floats as unsigned keys whose order is the floats' order (radix selection).
NDF_HD inline uint32_t order_key(float f) {
  const uint32_t u = float_to_bits(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
NDF_HD inline float key_to_float(uint32_t k) {
  return bits_to_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

template <class T>
struct DeviceBuffer {  // RAII device allocation
  T* ptr = nullptr;
  explicit DeviceBuffer(size_t n) { NDF_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&ptr), (n ? n : 1) * sizeof(T))); }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

}  // namespace cuda
}  // namespace ndf
