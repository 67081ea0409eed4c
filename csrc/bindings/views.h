// What both binding modules do with their arguments: turn the addresses, shapes
// and strides the Python layer read from numpy / torch into the kernels' views.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <vector>

#include "ndf/common.h"
#include "ndf/tally.h"

namespace ndf {
namespace bindings {

namespace py = pybind11;

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

inline ActivationView activation_view(uintptr_t data, int dtype, int64_t batch, int64_t units, int64_t map_size,
                                      int64_t stride_batch, int64_t stride_unit) {
  ActivationView v;
  v.data = ptr<const void>(data);
  v.dtype = DType(dtype);
  v.batch = batch;
  v.units = units;
  v.map_size = map_size;
  v.stride_batch = stride_batch;
  v.stride_unit = stride_unit;
  return v;
}

// `labels`: the addresses of LabelBatch's seven arrays, in labels.py's order.
inline LabelBatchView label_view(const py::tuple& labels, int64_t batch, int64_t seg_h, int64_t seg_w) {
  LabelBatchView lb;
  lb.pixel_sets = ptr<const uint16_t>(labels[0].cast<uintptr_t>());
  lb.set_start = ptr<const int64_t>(labels[1].cast<uintptr_t>());
  lb.set_label_start = ptr<const int64_t>(labels[2].cast<uintptr_t>());
  lb.set_labels = ptr<const int32_t>(labels[3].cast<uintptr_t>());
  lb.set_pixels = ptr<const int64_t>(labels[4].cast<uintptr_t>());
  lb.image_label_start = ptr<const int64_t>(labels[5].cast<uintptr_t>());
  lb.image_labels = ptr<const int32_t>(labels[6].cast<uintptr_t>());
  lb.batch = batch;
  lb.seg_h = seg_h;
  lb.seg_w = seg_w;
  return lb;
}

// `rf`: (stride_y, stride_x, offset_y, offset_x) of receptive-field upsampling.
inline TallyConfig tally_config(int rule, int upsample, const py::tuple& rf, int64_t map_h, int64_t map_w) {
  TallyConfig cfg;
  cfg.rule = Rule(rule);
  cfg.upsample.mode = Upsample(upsample);
  cfg.upsample.stride_y = rf[0].cast<float>();
  cfg.upsample.stride_x = rf[1].cast<float>();
  cfg.upsample.offset_y = rf[2].cast<float>();
  cfg.upsample.offset_x = rf[3].cast<float>();
  cfg.map_h = map_h;
  cfg.map_w = map_w;
  return cfg;
}

inline py::tuple status_tuple(const TallyStatus& st) { return py::make_tuple(st.code, st.image, st.unit, st.value); }

// Binds a backend's exact-tail class as `TailQuantile`, with the same Python
// signatures on every backend. `last` in update() is the thread count on the CPU
// and the CUDA stream on the GPU; order_statistic_of() (found by ADL beside each
// class) adapts the one call whose arguments differ.
template <class Tail, class... Extra>
void bind_tail_quantile(py::module_& m, const Extra&... extra) {
  py::class_<Tail>(m, "TailQuantile", extra...)
      .def(py::init<int64_t, int64_t>(), py::arg("units"), py::arg("keep"))
      .def_property_readonly("units", &Tail::units)
      .def_property_readonly("keep", &Tail::keep)
      .def("update",
           [](Tail& self, uintptr_t data, int dtype, int64_t batch, int64_t units, int64_t map_size,
              int64_t stride_batch, int64_t stride_unit, uintptr_t maxima, uintptr_t last) {
             const ActivationView v =
                 activation_view(data, dtype, batch, units, map_size, stride_batch, stride_unit);
             BadValue bad;
             {
               py::gil_scoped_release release;
               bad = self.update(v, ptr<float>(maxima), last);
             }
             return py::make_tuple(bad.unit, bad.batch_index, bad.position);
           })
      .def("insert",
           [](Tail& self, int64_t unit, uintptr_t values, int64_t count) {
             py::gil_scoped_release release;
             self.insert(unit, ptr<const float>(values), count);
           })
      .def("order_statistic",
           [](Tail& self, int64_t rank, uintptr_t out, int threads) {
             py::gil_scoped_release release;
             order_statistic_of(self, rank, ptr<float>(out), threads);
           })
      .def("kept", &Tail::kept)
      .def("tail", [](Tail& self, int64_t unit) {
        std::vector<float> v = self.sorted_tail(unit);
        py::array_t<float> out(py::ssize_t(v.size()));
        std::copy(v.begin(), v.end(), out.mutable_data());
        return out;
      });
}

}  // namespace bindings
}  // namespace ndf
