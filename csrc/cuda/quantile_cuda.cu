// CUDA backend of the exact per-unit tail (same contract as quantile_cpu.cc).
// State stays on the device: a buffer of `capacity` floats per unit, its fill
// count and its lower bound. An update is: compact units whose buffers could
// overflow (block-wide radix select of the keep-th largest + ordered in-place
// compaction), then one thread per (image, unit) map appends values above the
// bound with an atomic cursor. Which duplicates of a tied value are kept may
// differ from the CPU; the kept multiset, and so every threshold, is identical.
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "cuda_common.cuh"
#include "ndf/cuda_backend.h"

namespace ndf {
namespace cuda {
namespace {

constexpr int kBlock = 256;

// The key of the rank-th largest (0-based) of n values, computed by one block.
__device__ uint32_t block_select_desc(const float* v, int64_t n, int64_t rank) {
  __shared__ unsigned int hist[256];
  __shared__ uint32_t prefix_s;
  __shared__ long long rank_s;
  __syncthreads();  // earlier readers of prefix_s are done
  if (threadIdx.x == 0) {
    prefix_s = 0;
    rank_s = rank;
  }
  uint32_t mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (unsigned i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    const uint32_t prefix = prefix_s;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const uint32_t key = order_key(v[i]);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      long long r = rank_s;
      int bin = 255;
      for (; bin > 0; --bin) {
        if (r < (long long)hist[bin]) break;
        r -= hist[bin];
      }
      prefix_s = prefix | (uint32_t(bin) << shift);
      rank_s = r;
    }
    __syncthreads();
    mask |= 255u << shift;
  }
  return prefix_s;
}

// Inclusive prefix sum of one int per thread over the block (blockDim.x == kBlock).
__device__ int block_inclusive_scan(int x, int* buf) {
  buf[threadIdx.x] = x;
  __syncthreads();
  for (unsigned off = 1; off < blockDim.x; off <<= 1) {
    const int add = threadIdx.x >= off ? buf[threadIdx.x - off] : 0;
    __syncthreads();
    buf[threadIdx.x] += add;
    __syncthreads();
  }
  const int r = buf[threadIdx.x];
  __syncthreads();
  return r;
}

// One block per unit: keep the `keep` largest values when the buffer holds more than `limit`.
__global__ void compact_kernel(float* values, int64_t* counts, float* bounds, int64_t capacity, int64_t keep,
                               int64_t limit) {
  const int64_t k = blockIdx.x;
  const int64_t n = counts[k];
  if (n <= limit || n <= keep) return;
  float* v = values + k * capacity;
  const uint32_t kth = block_select_desc(v, n, keep - 1);
  __shared__ int scan_buf[kBlock];
  __shared__ long long greater_s, out_s, ties_s;
  if (threadIdx.x == 0) greater_s = out_s = ties_s = 0;
  __syncthreads();
  long long greater = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) greater += order_key(v[i]) > kth;
  atomicAdd((unsigned long long*)&greater_s, (unsigned long long)greater);
  __syncthreads();
  const long long ties_needed = keep - greater_s;
  for (int64_t base = 0; base < n; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    float x = 0.0f;
    int above = 0, tie = 0;
    if (i < n) {
      x = v[i];
      const uint32_t key = order_key(x);
      above = key > kth;
      tie = key == kth;
    }
    const int ties_upto = block_inclusive_scan(tie, scan_buf);
    const int take = above || (tie && ties_s + ties_upto - 1 < ties_needed);
    const int taken_upto = block_inclusive_scan(take, scan_buf);
    if (take) v[out_s + taken_upto - 1] = x;  // never beyond i: in-place is safe
    __syncthreads();
    if (threadIdx.x == blockDim.x - 1) {
      out_s += taken_upto;
      ties_s += ties_upto;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    counts[k] = keep;
    bounds[k] = key_to_float(kth);
  }
}

template <DType D>
__device__ float load(const void* base, int64_t i) {
  return Elem<D>::load(static_cast<const typename Elem<D>::T*>(base), i);
}

template <DType D>
__global__ void filter_kernel(const void* data, int64_t B, int64_t K, int64_t n, int64_t sb, int64_t sk,
                              float* values, int64_t* counts, const float* bounds, int64_t capacity,
                              float* maxima, unsigned long long* bad) {
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (k >= K || b >= B) return;
  const int64_t off = b * sb + k * sk;
  float mx = -INFINITY, poison = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float x = load<D>(data, off + i);
    mx = x > mx ? x : mx;
    poison += x * 0.0f;
  }
  if (poison != 0.0f) {
    atomicMin(bad, (unsigned long long)(b * K + k));
    return;
  }
  if (maxima) maxima[b * K + k] = mx;
  const float bound = bounds[k];
  if (!(mx > bound)) return;
  for (int64_t i = 0; i < n; ++i) {
    const float x = load<D>(data, off + i);
    if (x > bound) {
      const unsigned long long pos = atomicAdd((unsigned long long*)&counts[k], 1ull);
      values[k * capacity + int64_t(pos)] = x;
    }
  }
}

// Appends host-provided values (already copied to the device) to one unit.
__global__ void append_kernel(const float* src, int64_t count, int64_t unit, float* values, int64_t* counts,
                              const float* bounds, int64_t capacity) {
  const float bound = bounds[unit];
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    const float x = src[i];
    if (x > bound) {
      const unsigned long long pos = atomicAdd((unsigned long long*)&counts[unit], 1ull);
      values[unit * capacity + int64_t(pos)] = x;
    }
  }
}

__global__ void order_statistic_kernel(float* values, const int64_t* counts, int64_t capacity, int64_t keep,
                                       int64_t rank, float* out) {
  const int64_t k = blockIdx.x;
  const int64_t n = counts[k];
  if (rank < 0 || rank >= n || rank >= keep) {
    if (threadIdx.x == 0) out[k] = NAN;
    return;
  }
  const uint32_t key = block_select_desc(values + k * capacity, n, rank);
  if (threadIdx.x == 0) out[k] = key_to_float(key);
}

__global__ void fill_kernel(float* p, int64_t n, float v) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    p[i] = v;
}

}  // namespace

TailQuantileCUDA::TailQuantileCUDA(int64_t units, int64_t keep)
    : units_(units), keep_(keep), capacity_(keep + std::max<int64_t>(keep / 2, 4096)) {
  NDF_CUDA_CHECK(cudaMalloc(&values_, size_t(units_ * capacity_) * sizeof(float)));
  NDF_CUDA_CHECK(cudaMalloc(&counts_, size_t(units_) * sizeof(int64_t)));
  NDF_CUDA_CHECK(cudaMalloc(&bounds_, size_t(units_) * sizeof(float)));
  NDF_CUDA_CHECK(cudaMemsetAsync(counts_, 0, size_t(units_) * sizeof(int64_t), nullptr));
  NDF_LAUNCH(fill_kernel, 64, kBlock, 0, bounds_, units_, -INFINITY);
  NDF_CUDA_CHECK(cudaDeviceSynchronize());
}

TailQuantileCUDA::~TailQuantileCUDA() {
  cudaFree(values_);
  cudaFree(counts_);
  cudaFree(bounds_);
}

void TailQuantileCUDA::compact(int64_t limit, uintptr_t stream) {
  NDF_LAUNCH(compact_kernel, dim3(unsigned(units_)), kBlock, stream, values_, counts_, bounds_, capacity_, keep_,
             limit);
}

BadValue TailQuantileCUDA::update(const ActivationView& a, float* maxima, uintptr_t stream) {
  const int64_t slack = capacity_ - keep_;
  const int64_t chunk = std::max<int64_t>(1, slack / std::max<int64_t>(a.map_size, 1));
  DeviceBuffer<unsigned long long> bad(1);
  const unsigned long long none = ~0ull;
  NDF_CUDA_CHECK(cudaMemcpyAsync(bad.ptr, &none, sizeof(none), cudaMemcpyHostToDevice, (cudaStream_t)stream));
  if (a.map_size > slack) throw std::runtime_error("activation maps larger than the CUDA tail slack");
  for (int64_t b0 = 0; b0 < a.batch; b0 += chunk) {
    const int64_t nb = std::min(chunk, a.batch - b0);
    compact(capacity_ - nb * a.map_size, stream);
    const dim3 grid(unsigned((a.units + 127) / 128), unsigned(nb));
    const int64_t elem = a.dtype == DType::F32 ? 4 : 2;
    const void* base = static_cast<const char*>(a.data) + b0 * a.stride_batch * elem;
    float* mx = maxima ? maxima + b0 * a.units : nullptr;
    unsigned long long* bad_chunk = bad.ptr;
    switch (a.dtype) {
      case DType::F32:
        NDF_LAUNCH(filter_kernel<DType::F32>, grid, 128, stream, base, nb, a.units, a.map_size, a.stride_batch,
                   a.stride_unit, values_, counts_, (const float*)bounds_, capacity_, mx, bad_chunk);
        break;
      case DType::F16:
        NDF_LAUNCH(filter_kernel<DType::F16>, grid, 128, stream, base, nb, a.units, a.map_size, a.stride_batch,
                   a.stride_unit, values_, counts_, (const float*)bounds_, capacity_, mx, bad_chunk);
        break;
      case DType::BF16:
        NDF_LAUNCH(filter_kernel<DType::BF16>, grid, 128, stream, base, nb, a.units, a.map_size, a.stride_batch,
                   a.stride_unit, values_, counts_, (const float*)bounds_, capacity_, mx, bad_chunk);
        break;
    }
    NDF_CUDA_CHECK(cudaGetLastError());
    unsigned long long first = none;
    NDF_CUDA_CHECK(cudaMemcpyAsync(&first, bad.ptr, sizeof(first), cudaMemcpyDeviceToHost, (cudaStream_t)stream));
    NDF_CUDA_CHECK(cudaStreamSynchronize((cudaStream_t)stream));
    if (first != none) {  // find the element on the host: one map's worth of copying
      BadValue r;
      r.batch_index = b0 + int64_t(first) / a.units;
      r.unit = int64_t(first) % a.units;
      std::vector<uint16_t> raw(static_cast<size_t>(a.map_size * 2));
      const char* map = static_cast<const char*>(a.data) + (r.batch_index * a.stride_batch + r.unit * a.stride_unit) * elem;
      NDF_CUDA_CHECK(cudaMemcpy(raw.data(), map, size_t(a.map_size * elem), cudaMemcpyDeviceToHost));
      r.position = 0;
      for (int64_t i = 0; i < a.map_size; ++i) {
        float x = a.dtype == DType::F32 ? reinterpret_cast<const float*>(raw.data())[i]
                  : a.dtype == DType::F16 ? half_to_float(raw[size_t(i)]) : bfloat16_to_float(raw[size_t(i)]);
        if (!std::isfinite(x)) {
          r.position = i;
          break;
        }
      }
      return r;
    }
  }
  return BadValue{};
}

void TailQuantileCUDA::insert(int64_t unit, const float* host_values, int64_t count) {
  const int64_t slack = capacity_ - keep_;
  DeviceBuffer<float> staging(size_t(std::min(count, slack)));
  for (int64_t s = 0; s < count; s += slack) {
    const int64_t n = std::min(slack, count - s);
    NDF_CUDA_CHECK(cudaMemcpy(staging.ptr, host_values + s, size_t(n) * sizeof(float), cudaMemcpyHostToDevice));
    compact(capacity_ - n, 0);
    NDF_LAUNCH(append_kernel, 1, kBlock, 0, (const float*)staging.ptr, n, unit, values_, counts_,
               (const float*)bounds_, capacity_);
  }
  NDF_CUDA_CHECK(cudaDeviceSynchronize());
}

void TailQuantileCUDA::order_statistic(int64_t rank, float* host_out) {
  DeviceBuffer<float> out(static_cast<size_t>(units_));
  NDF_LAUNCH(order_statistic_kernel, dim3(unsigned(units_)), kBlock, 0, values_, (const int64_t*)counts_,
             capacity_, keep_, rank, out.ptr);
  NDF_CUDA_CHECK(cudaMemcpy(host_out, out.ptr, size_t(units_) * sizeof(float), cudaMemcpyDeviceToHost));
}

int64_t TailQuantileCUDA::kept(int64_t unit) {
  int64_t n = 0;
  NDF_CUDA_CHECK(cudaMemcpy(&n, counts_ + unit, sizeof(n), cudaMemcpyDeviceToHost));
  return n;
}

std::vector<float> TailQuantileCUDA::sorted_tail(int64_t unit) {
  const int64_t n = kept(unit);
  std::vector<float> v(static_cast<size_t>(n));
  NDF_CUDA_CHECK(cudaMemcpy(v.data(), values_ + unit * capacity_, size_t(n) * sizeof(float), cudaMemcpyDeviceToHost));
  std::sort(v.begin(), v.end(), std::greater<float>());
  if (int64_t(v.size()) > keep_) v.resize(size_t(keep_));
  return v;
}

}  // namespace cuda
}  // namespace ndf
