// pybind11 bindings of ptcore._C. Python validates tensors and passes data pointers, sizes and
// strides; the kernels check again and throw, which pybind11 turns into a Python exception.
#include "ptcore/bindings.h"
#include "backbone_bindings.h"
#include "ptcore/cpu_features.h"
#include "ptcore/paged_attention.h"
#include "ptcore/speculative.h"
#include "ptcore/radix_cache.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "ptcore CPU kernels (C++17, OpenMP); pointers in, no torch headers";
  ptcore::bind_row_kernels(m, &ptcore::cross_entropy_rows, &ptcore::logprob_rows_stats,
                           &ptcore::logprob_rows_grad);
  ptcore::bind_paged_attention(m);
  ptcore::bind_backbone(m, ptcore::cpu_backbone_fns());
  ptcore::bind_speculative(m);
  ptcore::bind_radix_cache(m);
  ptcore::bind_cpu_features(m);  // isa, build_arch and the CPUID check of the dispatch (ptcore/_ext.py)
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
