// CUDA backend of the fused tally (same contract as tally_cpu.cc). One block per
// (unit, image): the map is loaded into shared memory and reduced to its max; a
// map that cannot exceed T_k leaves at once. Otherwise every thread upsamples a
// strided share of the pixels with the shared interpolation math, counts mask
// pixels per label set in shared memory, and the block flushes the per-label
// sums with 64-bit atomics (integer adds: the order does not change the result).
#include <algorithm>
#include <vector>

#include "cuda_common.cuh"
#include "ndf/cuda_backend.h"
#include "ndf/label_prep.h"

namespace ndf {
namespace cuda {
namespace {

constexpr int kBlock = 256;
constexpr int64_t kSharedSets = 4096;

struct DeviceLabels {
  const uint16_t* pixel_sets;
  const int64_t* set_start;
  const int64_t* set_label_start;
  const int32_t* set_labels;
  const uint32_t* set_categories;
  const uint32_t* image_categories;
  const uint32_t* image_level_categories;
  const int64_t* image_label_start;
  const int32_t* image_labels;
};

template <DType D>
__global__ void tally_kernel(const void* data, int64_t K, int64_t mh, int64_t mw, int64_t sb, int64_t sk,
                             const float* thresholds, DeviceLabels lb, const AxisWeight* yw, const AxisWeight* xw,
                             int64_t sh, int64_t sw, int64_t L, int64_t C, int rule, unsigned long long* I,
                             unsigned long long* A, unsigned long long* bad) {
  const int64_t k = blockIdx.x, b = blockIdx.y, n = mh * mw;
  __shared__ float map[kMaxMapSize];
  __shared__ float red_max[kBlock], red_min[kBlock], red_poison[kBlock];
  __shared__ unsigned int counts[kSharedSets];
  __shared__ unsigned long long mask_pixels;
  __shared__ unsigned int overlap;

  const typename Elem<D>::T* src = static_cast<const typename Elem<D>::T*>(data) + b * sb + k * sk;
  float mx = -INFINITY, mn = INFINITY, poison = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float x = Elem<D>::load(src, i);
    map[i] = x;
    mx = x > mx ? x : mx;
    mn = x < mn ? x : mn;
    poison += x * 0.0f;
  }
  red_max[threadIdx.x] = mx;
  red_min[threadIdx.x] = mn;
  red_poison[threadIdx.x] = poison;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      red_max[threadIdx.x] = fmaxf(red_max[threadIdx.x], red_max[threadIdx.x + s]);
      red_min[threadIdx.x] = fminf(red_min[threadIdx.x], red_min[threadIdx.x + s]);
      red_poison[threadIdx.x] += red_poison[threadIdx.x + s];
    }
    __syncthreads();
  }
  mx = red_max[0];
  mn = red_min[0];
  if (red_poison[0] != 0.0f) {  // NaN or inf somewhere in this map
    if (threadIdx.x == 0) atomicMin(bad, (unsigned long long)(b * K + k));
    return;
  }
  const float T = thresholds[k];
  if (interp_upper_bound(mx, fmaxf(mx, -mn)) <= T) return;  // uniform across the block

  const int64_t s0 = lb.set_start[b], nsets = lb.set_start[b + 1] - s0;
  const bool shared_sets = nsets <= kSharedSets;
  if (shared_sets)
    for (int64_t s = threadIdx.x; s < nsets; s += blockDim.x) counts[s] = 0;
  if (threadIdx.x == 0) {
    mask_pixels = 0;
    overlap = 0;
  }
  __syncthreads();

  const uint16_t* sets = lb.pixel_sets + b * sh * sw;
  unsigned long long my_pixels = 0;
  for (int64_t p = threadIdx.x; p < sh * sw; p += blockDim.x) {
    const AxisWeight wy = yw[p / sw], wx = xw[p % sw];
    const float top = lerp_x(wx, map[wy.i0 * mw + wx.i0], map[wy.i0 * mw + wx.i1]);
    const float bot = lerp_x(wx, map[wy.i1 * mw + wx.i0], map[wy.i1 * mw + wx.i1]);
    if (!(lerp_y(wy, top, bot) > T)) continue;
    ++my_pixels;
    const uint16_t s = sets[p];
    if (shared_sets) {
      atomicAdd(&counts[s], 1u);
    } else {  // rare: more label sets than shared memory holds
      const int64_t gs = s0 + s;
      atomicOr(&overlap, lb.set_categories[gs]);
      for (int64_t j = lb.set_label_start[gs]; j < lb.set_label_start[gs + 1]; ++j)
        atomicAdd(&I[k * L + lb.set_labels[j]], 1ull);
    }
  }
  atomicAdd(&mask_pixels, my_pixels);
  __syncthreads();
  if (shared_sets) {
    for (int64_t s = threadIdx.x; s < nsets; s += blockDim.x) {
      const unsigned int c = counts[s];
      if (!c) continue;
      const int64_t gs = s0 + s;
      atomicOr(&overlap, lb.set_categories[gs]);
      for (int64_t j = lb.set_label_start[gs]; j < lb.set_label_start[gs + 1]; ++j)
        atomicAdd(&I[k * L + lb.set_labels[j]], (unsigned long long)c);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0 && mask_pixels) {
    const unsigned long long M = mask_pixels;
    for (int64_t j = lb.image_label_start[b]; j < lb.image_label_start[b + 1]; ++j)
      atomicAdd(&I[k * L + lb.image_labels[j]], M);
    uint32_t cats = counted_categories(Rule(rule), lb.image_categories[b], overlap, lb.image_level_categories[b]);
    for (int64_t c = 0; cats; ++c, cats >>= 1)
      if (cats & 1u) atomicAdd(&A[k * C + c], M);
  }
}

template <class T>
T* upload(std::vector<DeviceBuffer<char>*>& keep, const T* host, int64_t n, cudaStream_t stream) {
  auto* buf = new DeviceBuffer<char>(size_t(std::max<int64_t>(n, 1)) * sizeof(T));
  keep.push_back(buf);
  if (n) NDF_CUDA_CHECK(cudaMemcpyAsync(buf->ptr, host, size_t(n) * sizeof(T), cudaMemcpyHostToDevice, stream));
  return reinterpret_cast<T*>(buf->ptr);
}

}  // namespace

DeviceCounts::DeviceCounts(int64_t units, int64_t labels, int64_t categories)
    : units_(units), labels_(labels), categories_(categories) {
  NDF_CUDA_CHECK(cudaMalloc(&intersection_, size_t(units * labels) * sizeof(int64_t)));
  NDF_CUDA_CHECK(cudaMalloc(&cat_activation_, size_t(std::max<int64_t>(units * categories, 1)) * sizeof(int64_t)));
  NDF_CUDA_CHECK(cudaMemsetAsync(intersection_, 0, size_t(units * labels) * sizeof(int64_t), nullptr));
  NDF_CUDA_CHECK(cudaMemsetAsync(cat_activation_, 0, size_t(units * categories) * sizeof(int64_t), nullptr));
  NDF_CUDA_CHECK(cudaDeviceSynchronize());
}

DeviceCounts::~DeviceCounts() {
  cudaFree(intersection_);
  cudaFree(cat_activation_);
}

void DeviceCounts::download(int64_t* intersection, int64_t* cat_activation) const {
  NDF_CUDA_CHECK(cudaMemcpy(intersection, intersection_, size_t(units_ * labels_) * sizeof(int64_t),
                            cudaMemcpyDeviceToHost));
  NDF_CUDA_CHECK(cudaMemcpy(cat_activation, cat_activation_, size_t(units_ * categories_) * sizeof(int64_t),
                            cudaMemcpyDeviceToHost));
}

void DeviceCounts::upload(const int64_t* intersection, const int64_t* cat_activation) {
  NDF_CUDA_CHECK(cudaMemcpy(intersection_, intersection, size_t(units_ * labels_) * sizeof(int64_t),
                            cudaMemcpyHostToDevice));
  NDF_CUDA_CHECK(cudaMemcpy(cat_activation_, cat_activation, size_t(units_ * categories_) * sizeof(int64_t),
                            cudaMemcpyHostToDevice));
}

TallyStatus tally_cuda(const ActivationView& a, const float* thresholds, const LabelBatchView& lb,
                       const LabelSpace& space, const TallyConfig& cfg, DeviceCounts& counts,
                       int64_t* label_pixels, uintptr_t stream_handle) {
  if (cfg.map_h * cfg.map_w > kMaxMapSize)
    throw std::invalid_argument("activation maps larger than 4096 elements are not supported on CUDA");
  BatchLabels info;
  TallyStatus st = prepare_labels(lb, space, 1, info, /*slots=*/false);
  if (st.code != TallyStatus::Ok) return st;
  const cudaStream_t stream = (cudaStream_t)stream_handle;
  const std::vector<AxisWeight> yw = axis_weights(cfg.upsample, true, cfg.map_h, lb.seg_h);
  const std::vector<AxisWeight> xw = axis_weights(cfg.upsample, false, cfg.map_w, lb.seg_w);
  const int64_t B = lb.batch, S = lb.set_start[B];
  std::vector<DeviceBuffer<char>*> keep;
  struct Free {
    std::vector<DeviceBuffer<char>*>& v;
    ~Free() {
      for (auto* p : v) delete p;
    }
  } free_all{keep};
  DeviceLabels d;
  d.pixel_sets = upload(keep, lb.pixel_sets, B * lb.seg_h * lb.seg_w, stream);
  d.set_start = upload(keep, lb.set_start, B + 1, stream);
  d.set_label_start = upload(keep, lb.set_label_start, S + 1, stream);
  d.set_labels = upload(keep, lb.set_labels, lb.set_label_start[S], stream);
  d.set_categories = upload(keep, info.set_categories.data(), S, stream);
  d.image_categories = upload(keep, info.image_categories.data(), B, stream);
  d.image_level_categories = upload(keep, info.image_level_categories.data(), B, stream);
  d.image_label_start = upload(keep, lb.image_label_start, B + 1, stream);
  d.image_labels = upload(keep, lb.image_labels, lb.image_label_start[B], stream);
  const AxisWeight* dyw = upload(keep, yw.data(), int64_t(yw.size()), stream);
  const AxisWeight* dxw = upload(keep, xw.data(), int64_t(xw.size()), stream);
  const float* dthr = upload(keep, thresholds, a.units, stream);
  const unsigned long long none = ~0ull;
  unsigned long long* bad = upload(keep, &none, 1, stream);
  const dim3 grid(unsigned(a.units), unsigned(B));
  auto* I = reinterpret_cast<unsigned long long*>(counts.intersection());
  auto* A = reinterpret_cast<unsigned long long*>(counts.cat_activation());
  switch (a.dtype) {
    case DType::F32:
      NDF_LAUNCH(tally_kernel<DType::F32>, grid, kBlock, stream, a.data, a.units, cfg.map_h, cfg.map_w,
                 a.stride_batch, a.stride_unit, dthr, d, dyw, dxw, lb.seg_h, lb.seg_w, space.num_labels,
                 int64_t(space.num_categories), int(cfg.rule), I, A, bad);
      break;
    case DType::F16:
      NDF_LAUNCH(tally_kernel<DType::F16>, grid, kBlock, stream, a.data, a.units, cfg.map_h, cfg.map_w,
                 a.stride_batch, a.stride_unit, dthr, d, dyw, dxw, lb.seg_h, lb.seg_w, space.num_labels,
                 int64_t(space.num_categories), int(cfg.rule), I, A, bad);
      break;
    case DType::BF16:
      NDF_LAUNCH(tally_kernel<DType::BF16>, grid, kBlock, stream, a.data, a.units, cfg.map_h, cfg.map_w,
                 a.stride_batch, a.stride_unit, dthr, d, dyw, dxw, lb.seg_h, lb.seg_w, space.num_labels,
                 int64_t(space.num_categories), int(cfg.rule), I, A, bad);
      break;
  }
  NDF_CUDA_CHECK(cudaGetLastError());
  unsigned long long first = none;
  NDF_CUDA_CHECK(cudaMemcpyAsync(&first, bad, sizeof(first), cudaMemcpyDeviceToHost, stream));
  NDF_CUDA_CHECK(cudaStreamSynchronize(stream));
  if (first != none) {
    st.code = TallyStatus::NonFinite;
    st.image = int64_t(first) / a.units;
    st.unit = int64_t(first) % a.units;
    return st;
  }
  add_label_pixels(info, label_pixels);
  return st;
}

}  // namespace cuda
}  // namespace ndf
