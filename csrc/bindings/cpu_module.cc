// _C: the CPU backend. Arrays arrive as raw addresses + shapes + strides that the
// Python layer read from numpy / torch (no libtorch link, one build for every
// torch version); all checks of shapes and dtypes happen in Python before this.
#include <omp.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "ndf/quantile.h"
#include "ndf/tally.h"
#include "views.h"

namespace py = pybind11;
using namespace ndf;
using namespace ndf::bindings;

namespace ndf {
inline void order_statistic_of(TailQuantileCPU& t, int64_t rank, float* out, int threads) {
  t.order_statistic(rank, out, int(threads));
}
}  // namespace ndf

PYBIND11_MODULE(_C, m) {
  m.doc() = "netdissect_fast CPU kernels (C++17 + OpenMP)";
  m.def("isa", &cpu_isa_name, "SIMD variant chosen at run time");
  m.def("max_threads", []() { return omp_get_max_threads(); });

  bind_tail_quantile<TailQuantileCPU>(m);

  // The kernels' upsampling along one axis as a dense (out_size, in_size) matrix
  // (ndf/interp.h's weights), so the report draws masks the way they were counted.
  m.def("upsample_matrix", [](int upsample, bool y_axis, int64_t in_size, int64_t out_size, py::tuple rf) {
    if (in_size <= 0 || out_size <= 0) throw py::value_error("upsample_matrix: sizes must be positive");
    const TallyConfig cfg = tally_config(0, upsample, rf, in_size, in_size);
    py::array_t<float> w({out_size, in_size});
    auto v = w.mutable_unchecked<2>();
    for (int64_t o = 0; o < out_size; ++o) {
      for (int64_t i = 0; i < in_size; ++i) v(o, i) = 0.0f;
      const AxisWeight a = axis_weight(cfg.upsample, y_axis, in_size, out_size, o);
      v(o, a.i0) += a.w0;
      v(o, a.i1) += a.w1;
    }
    return w;
  });

  m.def(
      "tally",
      [](uintptr_t data, int dtype, int64_t batch, int64_t units, int64_t map_h, int64_t map_w,
         int64_t stride_batch, int64_t stride_unit, uintptr_t thresholds, py::tuple labels, int64_t seg_h,
         int64_t seg_w, uintptr_t primary_category, int64_t num_labels, int num_categories, int rule,
         int upsample, py::tuple rf, uintptr_t intersection, uintptr_t cat_activation, uintptr_t label_pixels,
         int threads) {
        const LabelBatchView lb = label_view(labels, batch, seg_h, seg_w);
        LabelSpace space{num_labels, num_categories, ptr<const int16_t>(primary_category)};
        const TallyConfig cfg = tally_config(rule, upsample, rf, map_h, map_w);
        TallyCounts out{ptr<int64_t>(intersection), ptr<int64_t>(cat_activation), ptr<int64_t>(label_pixels)};
        const ActivationView a =
            activation_view(data, dtype, batch, units, map_h * map_w, stride_batch, stride_unit);
        TallyStatus st;
        {
          py::gil_scoped_release release;
          st = tally_cpu(a, ptr<const float>(thresholds), lb, space, cfg, out, threads);
        }
        return status_tuple(st);
      });
}
