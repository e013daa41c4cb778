// pybind11 bindings of ptcore._cuda (compiled by the host compiler, linked with the statically
// linked CUDA runtime so that the module needs no CUDA library from whichever torch is installed).
#include <pybind11/pybind11.h>

#include "ptcore/cross_entropy_rows.h"

namespace py = pybind11;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "ptcore CUDA kernels; pointers and the caller's stream in, no torch headers";
  m.def(
      "cross_entropy_rows",
      [](uintptr_t logits, const std::string& dtype, int64_t rows, int64_t vocab, int64_t row_stride,
         uintptr_t target, int64_t target_stride, uintptr_t loss, uintptr_t lse, uintptr_t scale,
         int64_t scale_stride, int64_t ignore_index, double label_smoothing, double z_loss,
         double softcap, bool write_grad, uintptr_t stream) {
        const auto a = ptcore::make_cross_entropy_rows_args(
            logits, dtype, rows, vocab, row_stride, target, target_stride, loss, lse, scale,
            scale_stride, ignore_index, label_smoothing, z_loss, softcap, write_grad, stream);
        py::gil_scoped_release no_gil;
        ptcore::cross_entropy_rows_cuda(a);
      },
      py::arg("logits"), py::arg("dtype"), py::arg("rows"), py::arg("vocab"), py::arg("row_stride"),
      py::arg("target"), py::arg("target_stride"), py::arg("loss"), py::arg("lse"), py::arg("scale"),
      py::arg("scale_stride"), py::arg("ignore_index"), py::arg("label_smoothing"), py::arg("z_loss"),
      py::arg("softcap"), py::arg("write_grad"), py::arg("stream"),
      "Per-row loss, log-sum-exp and (optionally) in-place logits gradient, on the given stream.");
  m.def("device_count", [] {
    std::string why;
    const int n = ptcore::cuda_device_count(&why);
    return py::make_tuple(n, why);
  }, "(number of CUDA devices, reason when 0)");
  m.def("runtime_version", &ptcore::cuda_runtime_version);
}
