// The pybind11 signatures of the row kernels, shared by ptcore._C and ptcore._cuda so that both
// modules take the same arguments (pointers as ints; `stream` is ignored on the CPU).
#pragma once

#include <pybind11/pybind11.h>

#include "ptcore/cross_entropy_rows.h"
#include "ptcore/logprob_rows.h"

namespace ptcore {

using CrossEntropyFn = void (*)(const CrossEntropyRowsArgs&);
using LogprobFn = void (*)(const LogprobRowsArgs&);

inline void bind_row_kernels(pybind11::module_& m, CrossEntropyFn cross_entropy, LogprobFn stats,
                             LogprobFn grad) {
  namespace py = pybind11;
  m.def(
      "cross_entropy_rows",
      [cross_entropy](uintptr_t logits, const std::string& dtype, int64_t rows, int64_t vocab,
                      int64_t row_stride, uintptr_t target, int64_t target_stride, uintptr_t loss,
                      uintptr_t lse, uintptr_t scale, int64_t scale_stride, int64_t ignore_index,
                      double label_smoothing, double z_loss, double softcap, bool write_grad,
                      uintptr_t stream) {
        const auto a = make_cross_entropy_rows_args(
            logits, dtype, rows, vocab, row_stride, target, target_stride, loss, lse, scale,
            scale_stride, ignore_index, label_smoothing, z_loss, softcap, write_grad, stream);
        py::gil_scoped_release no_gil;
        cross_entropy(a);
      },
      py::arg("logits"), py::arg("dtype"), py::arg("rows"), py::arg("vocab"), py::arg("row_stride"),
      py::arg("target"), py::arg("target_stride"), py::arg("loss"), py::arg("lse"), py::arg("scale"),
      py::arg("scale_stride"), py::arg("ignore_index"), py::arg("label_smoothing"), py::arg("z_loss"),
      py::arg("softcap"), py::arg("write_grad"), py::arg("stream") = 0,
      "Per-row loss, log-sum-exp and (optionally) in-place logits gradient of a cross-entropy chunk.");

  auto logprob = [](LogprobFn fn) {
    return [fn](uintptr_t logits, const std::string& dtype, int64_t rows, int64_t vocab,
                int64_t row_stride, uintptr_t target, int64_t ignore_index, double softcap,
                double temperature, uintptr_t logp, uintptr_t entropy, uintptr_t lse, uintptr_t mu,
                uintptr_t g_logp, uintptr_t g_entropy, uintptr_t stream) {
      LogprobRowsArgs a;
      a.logits = reinterpret_cast<void*>(logits);
      a.dtype = dtype;
      a.rows = rows;
      a.vocab = vocab;
      a.row_stride = row_stride;
      a.target = reinterpret_cast<const int64_t*>(target);
      a.ignore_index = ignore_index;
      a.softcap = softcap;
      a.temperature = temperature;
      a.logp = reinterpret_cast<void*>(logp);
      a.entropy = reinterpret_cast<void*>(entropy);
      a.lse = reinterpret_cast<void*>(lse);
      a.mu = reinterpret_cast<void*>(mu);
      a.g_logp = reinterpret_cast<const void*>(g_logp);
      a.g_entropy = reinterpret_cast<const void*>(g_entropy);
      a.stream = stream;
      py::gil_scoped_release no_gil;
      fn(a);
    };
  };
  const char* doc_stats = "Per-row log-prob, entropy, log-sum-exp and mean of the tempered logits.";
  const char* doc_grad = "Overwrites each logits row with d(g_logp*logp + g_entropy*H)/dlogits.";
  for (auto [name, fn, doc] : {std::tuple{"logprob_rows_stats", stats, doc_stats},
                               std::tuple{"logprob_rows_grad", grad, doc_grad}}) {
    m.def(name, logprob(fn), py::arg("logits"), py::arg("dtype"), py::arg("rows"), py::arg("vocab"),
          py::arg("row_stride"), py::arg("target"), py::arg("ignore_index"), py::arg("softcap"),
          py::arg("temperature"), py::arg("logp"), py::arg("entropy"), py::arg("lse"), py::arg("mu"),
          py::arg("g_logp"), py::arg("g_entropy"), py::arg("stream") = 0, doc);
  }
}

}  // namespace ptcore
