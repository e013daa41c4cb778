// pybind11 bindings of ptcore._cuda (compiled by the host compiler, linked with the statically
// linked CUDA runtime so that the module needs no CUDA library from whichever torch is installed).
#include <pybind11/pybind11.h>

#include "cross_entropy_rows_cuda.h"

namespace py = pybind11;

namespace {

void cross_entropy_rows_py(uintptr_t logits, const std::string& dtype, int64_t rows, int64_t vocab,
                           int64_t row_stride, uintptr_t target, int64_t target_stride,
                           uintptr_t loss, uintptr_t lse, uintptr_t scale, int64_t scale_stride,
                           int64_t ignore_index, double label_smoothing, double z_loss,
                           double softcap, bool write_grad, uintptr_t stream) {
  ptcore::CrossEntropyRowsCudaArgs a;
  a.logits = reinterpret_cast<void*>(logits);
  a.dtype = dtype;
  a.rows = rows;
  a.vocab = vocab;
  a.row_stride = row_stride;
  a.target = reinterpret_cast<const int64_t*>(target);
  a.target_stride = target_stride;
  a.loss = reinterpret_cast<float*>(loss);
  a.lse = reinterpret_cast<float*>(lse);
  a.scale = reinterpret_cast<const float*>(scale);
  a.scale_stride = scale_stride;
  a.ignore_index = ignore_index;
  a.label_smoothing = label_smoothing;
  a.z_loss = z_loss;
  a.softcap = softcap;
  a.write_grad = write_grad;
  a.stream = stream;
  py::gil_scoped_release no_gil;
  ptcore::cross_entropy_rows_cuda(a);
}

py::tuple device_count() {
  std::string why;
  const int n = ptcore::cuda_device_count(&why);
  return py::make_tuple(n, why);
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "ptcore CUDA kernels; pointers and the caller's stream in, no torch headers";
  m.def("cross_entropy_rows", &cross_entropy_rows_py, py::arg("logits"), py::arg("dtype"),
        py::arg("rows"), py::arg("vocab"), py::arg("row_stride"), py::arg("target"),
        py::arg("target_stride"), py::arg("loss"), py::arg("lse"), py::arg("scale"),
        py::arg("scale_stride"), py::arg("ignore_index"), py::arg("label_smoothing"),
        py::arg("z_loss"), py::arg("softcap"), py::arg("write_grad"), py::arg("stream"),
        "Per-row loss, log-sum-exp and (optionally) in-place logits gradient, on the given stream.");
  m.def("device_count", &device_count, "(number of CUDA devices, reason when 0)");
  m.def("runtime_version", &ptcore::cuda_runtime_version);
}
