// Test-only: lets csrc/cuda/*.cu compile as C++ and run on the CPU, so kernels
// that no machine here can execute are still exercised and compared with the CPU
// backend exactly (tests/test_cuda_emulated.py).
//
// Supported, and all the kernels may use:
//   __global__/__device__/__host__, blockIdx/threadIdx/blockDim/gridDim (x, y, z),
//   static __shared__ arrays, __syncthreads() (a real barrier among the threads of
//   a block: each CUDA thread is a coroutine, switched at the barrier),
//   atomicAdd (int, unsigned, unsigned long long, float), atomicMin/atomicMax (int,
//   long long via unsigned long long), atomicOr (unsigned), atomicCAS (unsigned long long),
//   the runtime calls in cuda_runtime_emu below, and NDF_LAUNCH(kernel, grid, block,
//   stream, args...).
// Not supported (kernels must not use them): warp intrinsics (__shfl*, __ballot*,
//   cooperative groups), dynamic (extern) shared memory, textures, streams that
//   overlap (work runs in order at launch), device-side printf.
#pragma once
#include <ucontext.h>

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__
// One block runs at a time per OS thread, so per-thread statics are per-block shared memory.
#define __shared__ static thread_local

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace ndf_emu {
extern thread_local dim3 block_idx, thread_idx, block_dim, grid_dim;
void sync_threads();
// Runs fn(block-local thread) for every thread of every block.
void run_grid(dim3 grid, dim3 block, void (*trampoline)(void*), void* payload);
}  // namespace ndf_emu

#define blockIdx (ndf_emu::block_idx)
#define threadIdx (ndf_emu::thread_idx)
#define blockDim (ndf_emu::block_dim)
#define gridDim (ndf_emu::grid_dim)
#define __syncthreads() ndf_emu::sync_threads()

// ---- atomics: real atomics, since blocks run on several OS threads -------------
template <class T>
inline T atomicAdd(T* addr, T v) {
  return __atomic_fetch_add(addr, v, __ATOMIC_RELAXED);
}
inline float atomicAdd(float* addr, float v) {
  float old = *addr, desired;
  do {
    desired = old + v;
  } while (!__atomic_compare_exchange(addr, &old, &desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  return old;
}
template <class T>
inline T atomicOr(T* addr, T v) {
  return __atomic_fetch_or(addr, v, __ATOMIC_RELAXED);
}
template <class T>
inline T atomicMin(T* addr, T v) {
  T old = __atomic_load_n(addr, __ATOMIC_RELAXED);
  while (v < old && !__atomic_compare_exchange_n(addr, &old, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
template <class T>
inline T atomicMax(T* addr, T v) {
  T old = __atomic_load_n(addr, __ATOMIC_RELAXED);
  while (v > old && !__atomic_compare_exchange_n(addr, &old, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
template <class T>
inline T atomicCAS(T* addr, T compare, T v) {
  __atomic_compare_exchange_n(addr, &compare, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return compare;
}

// ---- runtime ---------------------------------------------------------------------
typedef int cudaError_t;
typedef void* cudaStream_t;
enum : int { cudaSuccess = 0, cudaErrorMemoryAllocation = 2, cudaErrorNoDevice = 100 };
enum cudaMemcpyKind { cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost,
                      cudaMemcpyDeviceToDevice, cudaMemcpyDefault };
inline cudaError_t cudaMalloc(void** p, size_t n) {
  *p = std::malloc(n ? n : 1);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
template <class T>
inline cudaError_t cudaMalloc(T** p, size_t n) {
  return cudaMalloc(reinterpret_cast<void**>(p), n);
}
inline cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind, cudaStream_t = nullptr) {
  if (n) std::memmove(d, s, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind k) { return cudaMemcpyAsync(d, s, n, k); }
inline cudaError_t cudaMemsetAsync(void* d, int v, size_t n, cudaStream_t = nullptr) {
  if (n) std::memset(d, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) { return e ? "emulated CUDA error" : "no error"; }

namespace ndf_emu {
template <class... P>
struct Payload {
  void (*kernel)(P...);
  std::tuple<P...> args;
  static void call(void* self) {
    auto* p = static_cast<Payload*>(self);
    std::apply(p->kernel, p->args);
  }
};
template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, A&&... args) {
  Payload<P...> payload{kernel, std::tuple<P...>(std::forward<A>(args)...)};
  run_grid(grid, block, &Payload<P...>::call, &payload);
}
}  // namespace ndf_emu

#define NDF_LAUNCH(kernel, grid, block, stream, ...) ndf_emu::launch(kernel, dim3(grid), dim3(block), __VA_ARGS__)
