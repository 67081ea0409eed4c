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
  py::class_<TailQuantileCUDA>(m, "TailQuantile", py::module_local())
      .def(py::init<int64_t, int64_t>(), py::arg("units"), py::arg("keep"))
      .def_property_readonly("units", &TailQuantileCUDA::units)
      .def_property_readonly("keep", &TailQuantileCUDA::keep)
      .def("update",
           [](TailQuantileCUDA& self, uintptr_t data, int dtype, int64_t batch, int64_t units, int64_t map_size,
              int64_t stride_batch, int64_t stride_unit, uintptr_t maxima, uintptr_t stream) {
             const ActivationView v =
                 activation_view(data, dtype, batch, units, map_size, stride_batch, stride_unit);
             BadValue bad;
             {
               py::gil_scoped_release release;
               bad = self.update(v, ptr<float>(maxima), stream);
             }
             return py::make_tuple(bad.unit, bad.batch_index, bad.position);
           })
      .def("insert",
           [](TailQuantileCUDA& self, int64_t unit, uintptr_t values, int64_t count) {
             py::gil_scoped_release release;
             self.insert(unit, ptr<const float>(values), count);
           })
      .def("order_statistic",
           [](TailQuantileCUDA& self, int64_t rank, uintptr_t out, int /*threads*/) {
             py::gil_scoped_release release;
             self.order_statistic(rank, ptr<float>(out));
           })
      .def("kept", &TailQuantileCUDA::kept)
      .def("tail", [](TailQuantileCUDA& self, int64_t unit) {
        std::vector<float> v = self.sorted_tail(unit);
        py::array_t<float> out(py::ssize_t(v.size()));
        std::copy(v.begin(), v.end(), out.mutable_data());
        return out;
      });

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
