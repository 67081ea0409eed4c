// _cuda (real GPU) and _cuda_emu (the same CUDA sources run on the CPU, for
// tests): one binding file, compiled twice. Same call shapes as the CPU module,
// except that activations and maxima are device addresses and the tally's I/A
// accumulators live in a DeviceCounts object.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "ndf/cuda_backend.h"
#include "views.h"

#ifndef NDF_CUDA_ARCHS
#define NDF_CUDA_ARCHS ""
#endif

namespace py = pybind11;
using namespace ndf;
using namespace ndf::bindings;
using namespace ndf::cuda;

namespace {

std::vector<int> parse_archs() {
  std::vector<int> out;
  std::string s = NDF_CUDA_ARCHS, cur;
  for (char c : s + ",") {
    if (c == ',') {
      if (!cur.empty()) out.push_back(std::stoi(cur));
      cur.clear();
    } else {
      cur += c;
    }
  }
  return out;
}

}  // namespace

namespace ndf {
namespace cuda {
std::vector<int> compiled_architectures() { return parse_archs(); }
// The device select runs one block per unit; there is no thread count to pass.
inline void order_statistic_of(TailQuantileCUDA& t, int64_t rank, float* out, int /*threads*/) {
  t.order_statistic(rank, out);
}
}  // namespace cuda
}  // namespace ndf

PYBIND11_MODULE(NDF_CUDA_MODULE_NAME, m) {
  m.doc() = "netdissect_fast CUDA kernels";
  m.def("device_count", []() {
    std::string why;
    const int n = device_count(&why);
    return py::make_tuple(n, why);
  });
  m.def("device_name", &device_name);
  m.def("compiled_architectures", &compiled_architectures);
#ifdef NDF_CUDA_EMULATION
  m.attr("emulated") = true;
#else
  m.attr("emulated") = false;
#endif

  // module_local: _cuda and _cuda_emu bind the same C++ types and may both be loaded.
  bind_tail_quantile<TailQuantileCUDA>(m, py::module_local());

  py::class_<DeviceCounts>(m, "DeviceCounts", py::module_local())
      .def(py::init<int64_t, int64_t, int64_t>())
      .def("download", [](const DeviceCounts& self, uintptr_t I, uintptr_t A) {
        self.download(ptr<int64_t>(I), ptr<int64_t>(A));
      })
      .def("upload", [](DeviceCounts& self, uintptr_t I, uintptr_t A) {
        self.upload(ptr<const int64_t>(I), ptr<const int64_t>(A));
      });

  m.def(
      "tally",
      [](uintptr_t data, int dtype, int64_t batch, int64_t units, int64_t map_h, int64_t map_w,
         int64_t stride_batch, int64_t stride_unit, uintptr_t thresholds, py::tuple labels, int64_t seg_h,
         int64_t seg_w, uintptr_t primary_category, int64_t num_labels, int num_categories, int rule,
         int upsample, py::tuple rf, DeviceCounts& counts, uintptr_t label_pixels, uintptr_t stream) {
        const LabelBatchView lb = label_view(labels, batch, seg_h, seg_w);
        LabelSpace space{num_labels, num_categories, ptr<const int16_t>(primary_category)};
        const TallyConfig cfg = tally_config(rule, upsample, rf, map_h, map_w);
        const ActivationView a =
            activation_view(data, dtype, batch, units, map_h * map_w, stride_batch, stride_unit);
        TallyStatus st;
        {
          py::gil_scoped_release release;
          st = tally_cuda(a, ptr<const float>(thresholds), lb, space, cfg, counts, ptr<int64_t>(label_pixels),
                          stream);
        }
        return status_tuple(st);
      });
}
