// Raw-pointer interface of the speculative verification kernels (rule: ptcore/ops/speculative.py
// and docs/ttc.md section 2), shared by the CPU and CUDA kernels and their bindings.
//
// Per sequence b with draft length L = clamp(lens[b], 0, K):
//   accept draft k < L iff x = tokens[b, k] is in [0, V) and
//     (greedy) x == argmax_i P[b, k, i]   (lowest index on ties), or
//     (sampled) u[b, k] * q < P[b, k, x]   in double, q = Q[b, k, x] (1 when Q is null);
//   n = the accepted prefix length; emitted[b, :n] = tokens, emitted[b, n] = the stop token,
//   emitted[b, n+1:] = -1, num_accepted[b] = n. The stop token is argmax P[b, n] when greedy, else
//   the exponential race argmax_i w_i / E[b, i] over w = max(0, P[b, n] - q_n) (q_n = Q[b, n], or
//   the one-hot of tokens[b, n] when Q is null; q_n = 0 for the bonus, n == L), falling back to
//   w = max(0, P[b, n]) when w is all zero. Scores are 0 where w is 0; lowest index wins ties.
// All arithmetic of the acceptance test and the race is in double, so every backend gives the same
// tokens bit for bit.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace ptcore {

struct SpeculativeVerifyArgs {
  std::string dtype;  // of both probability tensors: float32, bfloat16, float16, float64
  int64_t batch = 0, drafts = 0, vocab = 0;
  const int64_t* tokens = nullptr;  // [B, K] contiguous
  const int64_t* lens = nullptr;    // [B]
  const void* draft_probs = nullptr;  // [B, K, V] unit stride over V; null: deterministic drafts
  int64_t draft_stride0 = 0, draft_stride1 = 0;
  const void* target_probs = nullptr;  // [B, K+1, V] unit stride over V
  int64_t target_stride0 = 0, target_stride1 = 0;
  const double* uniforms = nullptr;      // [B, K] contiguous; unused when greedy
  const double* exponentials = nullptr;  // [B, V] contiguous; unused when greedy
  bool greedy = false;
  int64_t* num_accepted = nullptr;  // [B]
  int64_t* emitted = nullptr;       // [B, K+1] contiguous
  uintptr_t stream = 0;             // CUDA only
};

inline void check_speculative_verify_args(const SpeculativeVerifyArgs& a) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("speculative_verify: " + what); };
  if (a.batch < 0) fail("'batch' must be >= 0");
  if (a.drafts < 0) fail("'draft_tokens' must have K >= 0 columns");
  if (a.vocab <= 0) fail("'target_probs' must have a vocabulary V > 0");
  if (a.dtype != "float32" && a.dtype != "bfloat16" && a.dtype != "float16" && a.dtype != "float64")
    fail("'target_probs' dtype '" + a.dtype + "' is not one of float32, bfloat16, float16, float64");
  if (a.batch == 0) return;
  if (!a.tokens && a.drafts > 0) fail("'draft_tokens' must be non-null");
  if (!a.lens || !a.target_probs || !a.num_accepted || !a.emitted)
    fail("'draft_lens', 'target_probs', 'num_accepted' and 'emitted' must be non-null");
  // Strides may be 0 (one distribution broadcast with expand()); the kernels only read.
  if (a.target_stride0 < 0 || a.target_stride1 < 0 || a.draft_stride0 < 0 || a.draft_stride1 < 0)
    fail("probability strides must be >= 0");
  if (!a.greedy && (!a.exponentials || (a.drafts > 0 && !a.uniforms)))
    fail("'uniforms' and 'exponentials' must be non-null unless greedy");
}

void speculative_verify(const SpeculativeVerifyArgs& args);       // ptcore._C (csrc/cpu)

// Token trees (recursive rejection over siblings; rule: verify_tree_torch in
// ptcore/ops/speculative.py). N nodes per sequence; parents [B, N] with -1 <= parents[i] < i;
// probability rows [B, N+1, V] (row 0: the root, row i+1: after node i); uniforms [B, N].
struct SpeculativeTreeArgs {
  std::string dtype;
  int64_t batch = 0, nodes = 0, vocab = 0;
  const int64_t* tokens = nullptr;   // [B, N]
  const int64_t* parents = nullptr;  // [B, N]
  const void* draft_probs = nullptr;  // [B, N+1, V] or null (deterministic candidates)
  int64_t draft_stride0 = 0, draft_stride1 = 0;
  const void* target_probs = nullptr;  // [B, N+1, V]
  int64_t target_stride0 = 0, target_stride1 = 0;
  const double* uniforms = nullptr;      // [B, N]
  const double* exponentials = nullptr;  // [B, V]
  bool greedy = false;
  int64_t* num_accepted = nullptr;  // [B]
  int64_t* emitted = nullptr;       // [B, N+1]
  int64_t* path = nullptr;          // [B, N]
};

void speculative_verify_tree(const SpeculativeTreeArgs& args);  // ptcore._C only
void speculative_verify_cuda(const SpeculativeVerifyArgs& args);  // ptcore._cuda (csrc/cuda)

}  // namespace ptcore

#ifndef __CUDACC__  // the bindings (host compiler only; nvcc does not see pybind11)
#include <pybind11/pybind11.h>

namespace ptcore {

// Defined in csrc/cpu/speculative_verify.cpp (for ptcore._C) and csrc/cuda/speculative_bindings.cpp
// (for ptcore._cuda); each binds its own module's kernel with bind_speculative_kernel.
void bind_speculative(pybind11::module_& m);

using SpeculativeVerifyFn = void (*)(const SpeculativeVerifyArgs&);

inline void bind_speculative_kernel(pybind11::module_& m, SpeculativeVerifyFn fn) {
  namespace py = pybind11;
  m.def(
      "speculative_verify",
      [fn](const std::string& dtype, int64_t batch, int64_t drafts, int64_t vocab, uintptr_t tokens,
           uintptr_t lens, uintptr_t draft_probs, int64_t draft_stride0, int64_t draft_stride1,
           uintptr_t target_probs, int64_t target_stride0, int64_t target_stride1, uintptr_t uniforms,
           uintptr_t exponentials, bool greedy, uintptr_t num_accepted, uintptr_t emitted,
           uintptr_t stream) {
        SpeculativeVerifyArgs a;
        a.dtype = dtype;
        a.batch = batch;
        a.drafts = drafts;
        a.vocab = vocab;
        a.tokens = reinterpret_cast<const int64_t*>(tokens);
        a.lens = reinterpret_cast<const int64_t*>(lens);
        a.draft_probs = reinterpret_cast<const void*>(draft_probs);
        a.draft_stride0 = draft_stride0;
        a.draft_stride1 = draft_stride1;
        a.target_probs = reinterpret_cast<const void*>(target_probs);
        a.target_stride0 = target_stride0;
        a.target_stride1 = target_stride1;
        a.uniforms = reinterpret_cast<const double*>(uniforms);
        a.exponentials = reinterpret_cast<const double*>(exponentials);
        a.greedy = greedy;
        a.num_accepted = reinterpret_cast<int64_t*>(num_accepted);
        a.emitted = reinterpret_cast<int64_t*>(emitted);
        a.stream = stream;
        py::gil_scoped_release no_gil;
        fn(a);
      },
      py::arg("dtype"), py::arg("batch"), py::arg("drafts"), py::arg("vocab"), py::arg("tokens"),
      py::arg("lens"), py::arg("draft_probs"), py::arg("draft_stride0"), py::arg("draft_stride1"),
      py::arg("target_probs"), py::arg("target_stride0"), py::arg("target_stride1"),
      py::arg("uniforms"), py::arg("exponentials"), py::arg("greedy"), py::arg("num_accepted"),
      py::arg("emitted"), py::arg("stream") = 0,
      "Speculative verification of a chain of drafts per sequence (rule: ptcore/speculative.h).");
}

}  // namespace ptcore
#endif
