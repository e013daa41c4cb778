// pybind11 bindings of ptcore._cuda (compiled by the host compiler, linked with the statically
// linked CUDA runtime so that the module needs no CUDA library from whichever torch is installed).
#include "ptcore/bindings.h"
#include "ptcore/speculative.h"
#include "../cpu/backbone_bindings.h"

namespace py = pybind11;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "ptcore CUDA kernels; pointers and the caller's stream in, no torch headers";
  ptcore::bind_row_kernels(m, &ptcore::cross_entropy_rows_cuda, &ptcore::logprob_rows_stats_cuda,
                           &ptcore::logprob_rows_grad_cuda);
  ptcore::bind_speculative(m);
  ptcore::bind_backbone(m, {&ptcore::rms_norm_forward_cuda, &ptcore::rms_norm_backward_cuda, &ptcore::rope_cuda,
                            &ptcore::gated_act_forward_cuda, &ptcore::gated_act_backward_cuda});
  m.def("rms_norm_partial_rows_cuda", &ptcore::rms_norm_partial_rows_cuda);
  m.def("device_count", [] {
    std::string why;
    const int n = ptcore::cuda_device_count(&why);
    return py::make_tuple(n, why);
  }, "(number of CUDA devices, reason when 0)");
  m.def("runtime_version", &ptcore::cuda_runtime_version);
}
