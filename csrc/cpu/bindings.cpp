// pybind11 bindings of ptcore._C. Python validates tensors and passes data pointers, sizes and
// strides; the kernels check again and throw, which pybind11 turns into a Python exception.
#include <pybind11/pybind11.h>

#include "ptcore/cross_entropy_rows.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "ptcore CPU kernels (C++17, OpenMP); pointers in, no torch headers";
  m.def(
      "cross_entropy_rows",
      [](uintptr_t logits, const std::string& dtype, int64_t rows, int64_t vocab, int64_t row_stride,
         uintptr_t target, int64_t target_stride, uintptr_t loss, uintptr_t lse, uintptr_t scale,
         int64_t scale_stride, int64_t ignore_index, double label_smoothing, double z_loss,
         double softcap, bool write_grad) {
        const auto a = ptcore::make_cross_entropy_rows_args(
            logits, dtype, rows, vocab, row_stride, target, target_stride, loss, lse, scale,
            scale_stride, ignore_index, label_smoothing, z_loss, softcap, write_grad);
        py::gil_scoped_release no_gil;
        ptcore::cross_entropy_rows(a);
      },
      py::arg("logits"), py::arg("dtype"), py::arg("rows"), py::arg("vocab"), py::arg("row_stride"),
      py::arg("target"), py::arg("target_stride"), py::arg("loss"), py::arg("lse"), py::arg("scale"),
      py::arg("scale_stride"), py::arg("ignore_index"), py::arg("label_smoothing"), py::arg("z_loss"),
      py::arg("softcap"), py::arg("write_grad"),
      "Per-row loss, log-sum-exp and (optionally) in-place logits gradient of a cross-entropy chunk.");
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
