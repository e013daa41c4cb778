// The pybind11 signatures of the fused backbone ops, shared by ptcore._C (and its ISA variants)
// and ptcore._cuda, so that every module takes the same arguments (pointers as ints; `stream`
// is ignored on the CPU). The GIL is released while a kernel runs.
#pragma once

#include <pybind11/pybind11.h>

#include "backbone.h"

namespace ptcore {

struct BackboneFns {
  decltype(&rms_norm_forward) rms_forward;
  decltype(&rms_norm_backward) rms_backward;
  decltype(&rope) rope_fn;
  decltype(&gated_act_forward) gated_forward;
  decltype(&gated_act_backward) gated_backward;
};

inline void bind_backbone(pybind11::module_& m, const BackboneFns& f) {
  namespace py = pybind11;
  auto rf = f.rms_forward;
  m.def("rms_norm_forward",
        [rf](uintptr_t x, uintptr_t r, uintptr_t s, uintptr_t w, uintptr_t y, uintptr_t rstd,
             const std::string& dt, int64_t rows, int64_t h, double eps, double off, uintptr_t st) {
          py::gil_scoped_release no_gil;
          rf(x, r, s, w, y, rstd, dt, rows, h, eps, off, st);
        },
        py::arg("x"), py::arg("residual"), py::arg("s_out"), py::arg("weight"), py::arg("y"),
        py::arg("rstd"), py::arg("dtype"), py::arg("rows"), py::arg("hidden"), py::arg("eps"),
        py::arg("offset"), py::arg("stream") = 0, "Fused residual add + RMSNorm forward.");
  auto rb = f.rms_backward;
  m.def("rms_norm_backward",
        [rb](uintptr_t dy, uintptr_t dres, uintptr_t s, uintptr_t w, uintptr_t rstd, uintptr_t ds,
             uintptr_t dw, const std::string& dt, int64_t rows, int64_t h, double off, uintptr_t st) {
          py::gil_scoped_release no_gil;
          rb(dy, dres, s, w, rstd, ds, dw, dt, rows, h, off, st);
        },
        py::arg("dy"), py::arg("dres"), py::arg("s"), py::arg("weight"), py::arg("rstd"), py::arg("ds"),
        py::arg("dweight"), py::arg("dtype"), py::arg("rows"), py::arg("hidden"), py::arg("offset"),
        py::arg("stream") = 0, "RMSNorm backward: the input gradient and the weight gradient.");
  auto ro = f.rope_fn;
  m.def("rope",
        [ro](uintptr_t q, uintptr_t k, uintptr_t c, uintptr_t s, uintptr_t qo, uintptr_t ko,
             const std::string& dt, int64_t rows, int64_t hq, int64_t hk, int64_t d, int64_t rd,
             int64_t cr, bool inv, uintptr_t st) {
          py::gil_scoped_release no_gil;
          ro(q, k, c, s, qo, ko, dt, rows, hq, hk, d, rd, cr, inv, st);
        },
        py::arg("q"), py::arg("k"), py::arg("cos"), py::arg("sin"), py::arg("q_out"), py::arg("k_out"),
        py::arg("dtype"), py::arg("rows"), py::arg("q_heads"), py::arg("k_heads"), py::arg("head_dim"),
        py::arg("rot_dim"), py::arg("cos_rows"), py::arg("inverse"), py::arg("stream") = 0,
        "Rotary embedding (HF rotate_half) of q and k; inverse is its transpose (the backward).");
  auto gf = f.gated_forward;
  m.def("gated_act_forward",
        [gf](uintptr_t g, uintptr_t u, uintptr_t y, const std::string& dt, int64_t n, int64_t act,
             uintptr_t st) {
          py::gil_scoped_release no_gil;
          gf(g, u, y, dt, n, act, st);
        },
        py::arg("gate"), py::arg("up"), py::arg("y"), py::arg("dtype"), py::arg("n"), py::arg("act"),
        py::arg("stream") = 0, "act(gate) * up; act 0 = silu, 1 = gelu (tanh approximation).");
  auto gb = f.gated_backward;
  m.def("gated_act_backward",
        [gb](uintptr_t dy, uintptr_t g, uintptr_t u, uintptr_t dg, uintptr_t du, const std::string& dt,
             int64_t n, int64_t act, uintptr_t st) {
          py::gil_scoped_release no_gil;
          gb(dy, g, u, dg, du, dt, n, act, st);
        },
        py::arg("dy"), py::arg("gate"), py::arg("up"), py::arg("dgate"), py::arg("dup"), py::arg("dtype"),
        py::arg("n"), py::arg("act"), py::arg("stream") = 0, "Gradients of act(gate) * up.");
}

inline BackboneFns cpu_backbone_fns() {
  return {&rms_norm_forward, &rms_norm_backward, &rope, &gated_act_forward, &gated_act_backward};
}

}  // namespace ptcore
