// The CUDA backend's host API. Plain C++ types only, so the bindings compile with
// the host compiler and never see CUDA headers. Pointers named *_device point to
// device memory (host memory in the CPU emulation build).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "ndf/common.h"
#include "ndf/tally.h"

namespace ndf {
namespace cuda {

// Number of usable devices; never throws (no driver = 0 devices, with the reason).
int device_count(std::string* why);
std::string device_name(int device);
std::vector<int> compiled_architectures();

class TailQuantileCUDA {
 public:
  TailQuantileCUDA(int64_t units, int64_t keep);
  ~TailQuantileCUDA();
  TailQuantileCUDA(const TailQuantileCUDA&) = delete;
  TailQuantileCUDA& operator=(const TailQuantileCUDA&) = delete;

  int64_t units() const { return units_; }
  int64_t keep() const { return keep_; }
  // `view` and `maxima_device` (B*K floats or null) live on the device.
  BadValue update(const ActivationView& view, float* maxima_device, uintptr_t stream);
  void insert(int64_t unit, const float* host_values, int64_t count);
  void order_statistic(int64_t rank, float* host_out);
  std::vector<float> sorted_tail(int64_t unit);
  int64_t kept(int64_t unit);

 private:
  void compact(int64_t limit, uintptr_t stream);
  int64_t units_, keep_, capacity_;
  float* values_ = nullptr;   // units * capacity
  int64_t* counts_ = nullptr; // units
  float* bounds_ = nullptr;   // units
};

// Device-resident I (K*L) and per-category A (K*C).
class DeviceCounts {
 public:
  DeviceCounts(int64_t units, int64_t labels, int64_t categories);
  ~DeviceCounts();
  DeviceCounts(const DeviceCounts&) = delete;
  DeviceCounts& operator=(const DeviceCounts&) = delete;
  void download(int64_t* intersection, int64_t* cat_activation) const;
  void upload(const int64_t* intersection, const int64_t* cat_activation);
  int64_t* intersection() { return intersection_; }
  int64_t* cat_activation() { return cat_activation_; }

 private:
  int64_t units_, labels_, categories_;
  int64_t* intersection_ = nullptr;
  int64_t* cat_activation_ = nullptr;
};

// Activations on the device; labels, thresholds (float32, K) and G on the host.
TallyStatus tally_cuda(const ActivationView& acts, const float* thresholds, const LabelBatchView& labels,
                       const LabelSpace& space, const TallyConfig& cfg, DeviceCounts& counts,
                       int64_t* label_pixels, uintptr_t stream);

// Largest activation map the CUDA tally holds in shared memory.
constexpr int64_t kMaxMapSize = 4096;

}  // namespace cuda
}  // namespace ndf
