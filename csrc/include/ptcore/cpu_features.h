// Which x86-64 ISA levels this CPU (and its OS) runs, for ptcore/_ext.py to pick the CPU module
// variant at import (csrc/build.py: _C at the baseline, _C_v3 / _C_v4 built per level). Compiled
// into _C only, at the baseline, so the check itself runs on any CPU.
#pragma once

#include <pybind11/pybind11.h>

namespace ptcore {

// Adds cpu_features() -> {feature: bool}, cpu_isa_levels() -> {"v2": bool, "v3": bool, "v4": bool}
// and the attributes isa / build_arch (what this module was compiled for) to m.
void bind_cpu_features(pybind11::module_& m);

}  // namespace ptcore
