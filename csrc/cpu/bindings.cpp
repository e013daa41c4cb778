// pybind11 bindings of ptcore._C. Python validates tensors and passes data pointers, sizes and
// strides; the kernels check again and throw, which pybind11 turns into a Python exception.
#include <pybind11/pybind11.h>

#include "cross_entropy_rows.h"

namespace py = pybind11;

namespace {

template <typename T>
T* as_ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

void cross_entropy_rows_py(uintptr_t logits, const std::string& dtype, int64_t rows, int64_t vocab,
                           int64_t row_stride, uintptr_t target, int64_t target_stride,
                           uintptr_t loss, uintptr_t lse, uintptr_t scale, int64_t scale_stride,
                           int64_t ignore_index, double label_smoothing, double z_loss,
                           double softcap, bool write_grad) {
  ptcore::CrossEntropyRowsArgs a;
  a.logits = as_ptr<void>(logits);
  a.dtype = dtype;
  a.rows = rows;
  a.vocab = vocab;
  a.row_stride = row_stride;
  a.target = as_ptr<const int64_t>(target);
  a.target_stride = target_stride;
  a.loss = as_ptr<void>(loss);
  a.lse = as_ptr<void>(lse);
  a.scale = as_ptr<const void>(scale);
  a.scale_stride = scale_stride;
  a.ignore_index = ignore_index;
  a.label_smoothing = label_smoothing;
  a.z_loss = z_loss;
  a.softcap = softcap;
  a.write_grad = write_grad;
  py::gil_scoped_release no_gil;
  ptcore::cross_entropy_rows(a);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ptcore CPU kernels (C++17, OpenMP); pointers in, no torch headers";
  m.def("cross_entropy_rows", &cross_entropy_rows_py, py::arg("logits"), py::arg("dtype"),
        py::arg("rows"), py::arg("vocab"), py::arg("row_stride"), py::arg("target"),
        py::arg("target_stride"), py::arg("loss"), py::arg("lse"), py::arg("scale"),
        py::arg("scale_stride"), py::arg("ignore_index"), py::arg("label_smoothing"),
        py::arg("z_loss"), py::arg("softcap"), py::arg("write_grad"),
        "Per-row loss, log-sum-exp and (optionally) in-place logits gradient of a cross-entropy chunk.");
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
