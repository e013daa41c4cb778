// One ISA variant of ptcore's compute-bound CPU kernels: ptcore._C_v3 / ptcore._C_v4 (the name
// comes from -DPTCORE_MODULE_NAME), built by csrc/build.py from csrc/cpu's HOT_SOURCES at one
// -march for the whole module. ptcore/_ext.py loads it only on a CPU that runs that level, and
// serves its functions in place of _C's baseline ones (same names, same arguments).
#include "ptcore/bindings.h"
#include "../cpu/backbone_bindings.h"
#include "ptcore/paged_attention.h"
#include "ptcore/speculative.h"

#ifndef PTCORE_MODULE_NAME
#error "PTCORE_MODULE_NAME (the module's name, e.g. _C_v3) must be defined"
#endif
#ifndef PTCORE_ISA
#define PTCORE_ISA "unknown"
#endif
#ifndef PTCORE_BUILD_ARCH
#define PTCORE_BUILD_ARCH "unknown"
#endif

PYBIND11_MODULE(PTCORE_MODULE_NAME, m) {
  m.doc() = "ptcore CPU kernels compiled for one x86-64 ISA level (-march=" PTCORE_BUILD_ARCH ")";
  ptcore::bind_row_kernels(m, &ptcore::cross_entropy_rows, &ptcore::logprob_rows_stats,
                           &ptcore::logprob_rows_grad);
  ptcore::bind_paged_attention(m);
  ptcore::bind_backbone(m, ptcore::cpu_backbone_fns());
  ptcore::bind_speculative(m);
  m.attr("isa") = PTCORE_ISA;
  m.attr("build_arch") = PTCORE_BUILD_ARCH;
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
