// Binds the CUDA speculative verification kernel into ptcore._cuda (the kernel itself is in
// speculative_verify.cu; nvcc does not see pybind11).
#include "ptcore/speculative.h"

namespace ptcore {

void bind_speculative(pybind11::module_& m) {
  bind_speculative_kernel(m, &speculative_verify_cuda);
}

}  // namespace ptcore
