// The CPUID check behind the CPU module's run-time dispatch (ptcore/cpu_features.h). It uses
// __builtin_cpu_supports, which reports AVX / AVX-512 only when the OS also saves their registers
// (XGETBV), so a variant it allows cannot die with SIGILL for want of OS support.
#include "ptcore/cpu_features.h"

#include <string>
#include <utility>
#include <vector>

#ifndef PTCORE_ISA
#define PTCORE_ISA "unknown"
#endif
#ifndef PTCORE_BUILD_ARCH
#define PTCORE_BUILD_ARCH "unknown"
#endif

namespace ptcore {
namespace {

namespace py = pybind11;

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PTCORE_X86_CPUID 1
// The features that define each level (x86-64 psABI) and that __builtin_cpu_supports names in
// both GCC and clang; CX16 (v2) and LZCNT / MOVBE / XSAVE (v3) have no portable name here and
// come with the others on every CPU that has them.
const std::vector<std::pair<const char*, std::vector<const char*>>>& level_features() {
  static const std::vector<std::pair<const char*, std::vector<const char*>>> levels = {
      {"v2", {"popcnt", "sse3", "ssse3", "sse4.1", "sse4.2"}},
      {"v3", {"avx", "avx2", "bmi", "bmi2", "fma", "f16c"}},
      {"v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}},
  };
  return levels;
}

bool supports(const char* f) {
  // __builtin_cpu_supports needs a literal argument: one branch per feature name.
#define PTCORE_F(name) if (std::string(f) == name) return __builtin_cpu_supports(name) != 0;
  PTCORE_F("popcnt") PTCORE_F("sse3") PTCORE_F("ssse3") PTCORE_F("sse4.1") PTCORE_F("sse4.2")
  PTCORE_F("avx") PTCORE_F("avx2") PTCORE_F("bmi") PTCORE_F("bmi2") PTCORE_F("fma") PTCORE_F("f16c")
  PTCORE_F("avx512f") PTCORE_F("avx512bw") PTCORE_F("avx512cd") PTCORE_F("avx512dq") PTCORE_F("avx512vl")
#undef PTCORE_F
  return false;
}
#endif

}  // namespace

void bind_cpu_features(py::module_& m) {
  m.attr("isa") = PTCORE_ISA;
  m.attr("build_arch") = PTCORE_BUILD_ARCH;
  m.def(
      "cpu_features",
      []() {
        py::dict out;
#ifdef PTCORE_X86_CPUID
        __builtin_cpu_init();
        for (const auto& [level, feats] : level_features())
          for (const char* f : feats) out[f] = supports(f);
#endif
        return out;
      },
      "{feature: usable} for the features of x86-64-v2, -v3 and -v4 (empty off x86-64).");
  m.def(
      "cpu_isa_levels",
      []() {
        py::dict out;
#ifdef PTCORE_X86_CPUID
        __builtin_cpu_init();
        bool all_below = true;  // a level needs every feature of the levels below it too
        for (const auto& [level, feats] : level_features()) {
          bool ok = all_below;
          for (const char* f : feats) ok = ok && supports(f);
          out[level] = ok;
          all_below = ok;
        }
#endif
        return out;
      },
      "{\"v2\": bool, \"v3\": bool, \"v4\": bool}: the x86-64 levels this CPU and OS run (empty off x86-64).");
}

}  // namespace ptcore
