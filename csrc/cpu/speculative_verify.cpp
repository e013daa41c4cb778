// CPU speculative verification of chains and token trees (rule and contract: ptcore/speculative.h). One sequence per OpenMP
// iteration; each sequence reads at most its accepted drafts' entries and one full row (two when
// the race must fall back to p, or K+1 rows in greedy mode).
#include "ptcore/speculative.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "ptcore/scalar.h"

namespace ptcore {
namespace {

// Lowest index of the largest entry, as torch.argmax for rows without NaN.
template <typename T>
int64_t argmax_row(const T* p, int64_t V) {
  double best = double(load(p[0]));
  int64_t idx = 0;
  for (int64_t i = 1; i < V; ++i) {
    const double v = double(load(p[i]));
    if (v > best) { best = v; idx = i; }
  }
  return idx;
}

// Exponential race over w_i = max(0, p_i - q_i) (q = the row `q`, or one-hot at `xq`, or 0), with
// the fallback to w = max(0, p) when no w_i > 0.
template <typename T>
int64_t race(const T* p, const T* q, int64_t xq, const double* e, int64_t V) {
  double best = -1.0;
  int64_t idx = 0;
  bool any = false;
  for (int64_t i = 0; i < V; ++i) {
    const double qi = q ? double(load(q[i])) : (i == xq ? 1.0 : 0.0);
    double w = double(load(p[i])) - qi;
    w = w > 0 ? w : 0.0;
    const double s = w > 0 ? w / e[i] : 0.0;
    any = any || w > 0;
    if (s > best) { best = s; idx = i; }
  }
  if (any) return idx;
  best = -1.0;
  idx = 0;
  for (int64_t i = 0; i < V; ++i) {
    double w = double(load(p[i]));
    w = w > 0 ? w : 0.0;
    const double s = w > 0 ? w / e[i] : 0.0;
    if (s > best) { best = s; idx = i; }
  }
  return idx;
}

template <typename T>
void verify_impl(const SpeculativeVerifyArgs& a) {
  const int64_t K = a.drafts, V = a.vocab;
  const T* target = static_cast<const T*>(a.target_probs);
  const T* draft = static_cast<const T*>(a.draft_probs);
#pragma omp parallel for schedule(dynamic, 1) if (a.batch * V > (1 << 16))
  for (int64_t b = 0; b < a.batch; ++b) {
    const int64_t* x = a.tokens + b * K;
    const int64_t L = std::min(std::max(a.lens[b], int64_t(0)), K);
    const T* P = target + b * a.target_stride0;
    const T* Q = draft ? draft + b * a.draft_stride0 : nullptr;
    int64_t n = 0;
    for (; n < L; ++n) {
      const int64_t t = x[n];
      if (t < 0 || t >= V) break;
      const T* p = P + n * a.target_stride1;
      bool ok;
      if (a.greedy) {
        ok = argmax_row(p, V) == t;
      } else {
        const double q = Q ? double(load(Q[n * a.draft_stride1 + t])) : 1.0;
        ok = a.uniforms[b * K + n] * q < double(load(p[t]));
      }
      if (!ok) break;
    }
    const T* p = P + n * a.target_stride1;
    int64_t tok;
    if (a.greedy) {
      tok = argmax_row(p, V);
    } else {
      const bool rejected = n < L;
      const T* q = rejected && Q ? Q + n * a.draft_stride1 : nullptr;
      const int64_t xq = rejected && !Q ? x[n] : -1;
      tok = race(p, q, xq, a.exponentials + b * V, V);
    }
    int64_t* out = a.emitted + b * (K + 1);
    for (int64_t k = 0; k <= K; ++k) out[k] = k < n ? x[k] : (k == n ? tok : -1);
    a.num_accepted[b] = n;
  }
}

// Token trees: one sequence per iteration, one residual buffer w (double) per thread.
template <typename T>
void verify_tree_impl(const SpeculativeTreeArgs& a) {
  const int64_t N = a.nodes, V = a.vocab;
  const T* target = static_cast<const T*>(a.target_probs);
  const T* draft = static_cast<const T*>(a.draft_probs);
#pragma omp parallel if (a.batch * V > (1 << 16))
  {
    std::vector<double> w(static_cast<size_t>(V));
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < a.batch; ++b) {
      const int64_t* x = a.tokens + b * N;
      const int64_t* par = a.parents + b * N;
      const T* Pb = target + b * a.target_stride0;
      const T* Qb = draft ? draft + b * a.draft_stride0 : nullptr;
      int64_t* out = a.emitted + b * (N + 1);
      int64_t* path = a.path + b * N;
      for (int64_t k = 0; k <= N; ++k) out[k] = -1;
      for (int64_t k = 0; k < N; ++k) path[k] = -1;
      int64_t node = -1, depth = 0;
      const T* p = Pb;
      for (;;) {
        const int64_t row = node + 1;
        p = Pb + row * a.target_stride1;
        const T* q = Qb ? Qb + row * a.draft_stride1 : nullptr;
        for (int64_t i = 0; i < V; ++i) w[i] = double(load(p[i]));
        double s = 1.0;
        int64_t accepted = -1, am = -1;
        for (int64_t c = node + 1; c < N; ++c) {  // children in index order (parents[c] < c)
          if (par[c] != node) continue;
          const int64_t t = x[c];
          if (t < 0 || t >= V) continue;
          if (a.greedy) {
            if (am < 0) am = argmax_row(p, V);
            if (am == t) { accepted = c; break; }
            continue;
          }
          const double qx = q ? double(load(q[t])) : 1.0, wx = w[t];
          if (wx > 0 && a.uniforms[b * N + c] * qx * s < wx) { accepted = c; break; }
          if (q) {
            double sum = 0.0;
            for (int64_t i = 0; i < V; ++i) {
              const double v = w[i] - s * double(load(q[i]));
              w[i] = v > 0 ? v : 0.0;
              sum += w[i];
            }
            s = sum;
          } else {
            s = s - wx;
            w[t] = 0.0;
          }
        }
        if (accepted < 0) break;
        out[depth] = x[accepted];
        path[depth] = accepted;
        node = accepted;
        ++depth;
      }
      int64_t tok;
      if (a.greedy) {
        tok = argmax_row(p, V);
      } else {
        const double* e = a.exponentials + b * V;
        double best = -1.0;
        int64_t idx = 0;
        bool any = false;
        for (int64_t i = 0; i < V; ++i) {
          const double s = w[i] > 0 ? w[i] / e[i] : 0.0;
          any = any || w[i] > 0;
          if (s > best) { best = s; idx = i; }
        }
        tok = any ? idx : race<T>(p, nullptr, -1, e, V);  // no residual mass: race on p
      }
      out[depth] = tok;
      a.num_accepted[b] = depth;
    }
  }
}


// Value checks of probability rows in one pass (Python's validate=True on CPU tensors): row r of
// sequence b is checked when r < lens[b] + extra (all rows when lens is null). Returns the first
// bad row in (b, r) order as {b, r, kind} with kind 1: NaN, 2: negative (or -inf), 3: sum off 1 by
// more than tol (sum in double); {-1, -1, 0} and the sum 0 when all rows are fine.
struct ProbCheck { int64_t b = -1, r = -1, kind = 0; double sum = 0.0; };

template <typename T>
ProbCheck check_probs_impl(const T* probs, int64_t B, int64_t R, int64_t V, int64_t s0, int64_t s1,
                           const int64_t* lens, int64_t extra, double tol) {
  std::vector<ProbCheck> bad(static_cast<size_t>(B * R));
  // Threads only for large inputs: a parallel region costs more than scanning a few rows.
#pragma omp parallel for schedule(static) if (B * R * V > (1 << 20))
  for (int64_t i = 0; i < B * R; ++i) {
    const int64_t b = i / R, r = i % R;
    if (lens && r >= lens[b] + extra) continue;
    const T* row = probs + b * s0 + r * s1;
    double sum = 0.0;
    int nan = 0, neg = 0;  // ints, not short-circuit bools: the loop stays branch-free
#pragma omp simd reduction(+ : sum) reduction(| : nan, neg)
    for (int64_t j = 0; j < V; ++j) {
      const double v = double(load(row[j]));
      nan |= v != v;
      neg |= v < 0.0;
      sum += v;
    }
    ProbCheck& c = bad[static_cast<size_t>(i)];
    c.sum = sum;
    if (nan) c.kind = 1;
    else if (neg) c.kind = 2;
    else if (!(std::fabs(sum - 1.0) <= tol)) c.kind = 3;
    if (c.kind) { c.b = b; c.r = r; }
  }
  for (const ProbCheck& c : bad)
    if (c.kind) return c;
  return ProbCheck{};
}

}  // namespace

void speculative_verify(const SpeculativeVerifyArgs& a) {
  check_speculative_verify_args(a);
  if (a.batch == 0) return;
  const std::string& dt = a.dtype;
  if (dt == "float32") verify_impl<float>(a);
  else if (dt == "bfloat16") verify_impl<bf16>(a);
  else if (dt == "float16") verify_impl<fp16>(a);
  else verify_impl<double>(a);
}

void speculative_verify_tree(const SpeculativeTreeArgs& a) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("speculative_verify_tree: " + what); };
  if (a.batch < 0 || a.nodes < 0) fail("'batch' and 'nodes' must be >= 0");
  if (a.vocab <= 0) fail("'target_probs' must have a vocabulary V > 0");
  if (a.batch == 0) return;
  if ((a.nodes > 0 && (!a.tokens || !a.parents || !a.path)) || !a.target_probs || !a.num_accepted || !a.emitted)
    fail("'tree_tokens', 'parents', 'target_probs' and the outputs must be non-null");
  if (a.target_stride0 < 0 || a.target_stride1 < 0 || a.draft_stride0 < 0 || a.draft_stride1 < 0)
    fail("probability strides must be >= 0");
  if (!a.greedy && (!a.exponentials || (a.nodes > 0 && !a.uniforms)))
    fail("'uniforms' and 'exponentials' must be non-null unless greedy");
  for (int64_t i = 0; i < a.batch * a.nodes; ++i) {
    const int64_t par = a.parents[i], node = i % a.nodes;
    if (par < -1 || par >= node) fail("'parents' must satisfy -1 <= parents[i] < i");
  }
  const std::string& dt = a.dtype;
  if (dt == "float32") verify_tree_impl<float>(a);
  else if (dt == "bfloat16") verify_tree_impl<bf16>(a);
  else if (dt == "float16") verify_tree_impl<fp16>(a);
  else if (dt == "float64") verify_tree_impl<double>(a);
  else fail("'target_probs' dtype '" + dt + "' is not one of float32, bfloat16, float16, float64");
}

void bind_speculative(pybind11::module_& m) {
  namespace py = pybind11;
  bind_speculative_kernel(m, &speculative_verify);
  m.def(
      "speculative_verify_tree",
      [](const std::string& dtype, int64_t batch, int64_t nodes, int64_t vocab, uintptr_t tokens,
         uintptr_t parents, uintptr_t draft_probs, int64_t draft_stride0, int64_t draft_stride1,
         uintptr_t target_probs, int64_t target_stride0, int64_t target_stride1, uintptr_t uniforms,
         uintptr_t exponentials, bool greedy, uintptr_t num_accepted, uintptr_t emitted, uintptr_t path) {
        SpeculativeTreeArgs a;
        a.dtype = dtype;
        a.batch = batch;
        a.nodes = nodes;
        a.vocab = vocab;
        a.tokens = reinterpret_cast<const int64_t*>(tokens);
        a.parents = reinterpret_cast<const int64_t*>(parents);
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
        a.path = reinterpret_cast<int64_t*>(path);
        py::gil_scoped_release no_gil;
        speculative_verify_tree(a);
      },
      py::arg("dtype"), py::arg("batch"), py::arg("nodes"), py::arg("vocab"), py::arg("tokens"),
      py::arg("parents"), py::arg("draft_probs"), py::arg("draft_stride0"), py::arg("draft_stride1"),
      py::arg("target_probs"), py::arg("target_stride0"), py::arg("target_stride1"),
      py::arg("uniforms"), py::arg("exponentials"), py::arg("greedy"), py::arg("num_accepted"),
      py::arg("emitted"), py::arg("path"),
      "Speculative verification of a token tree per sequence (recursive rejection over siblings).");
  m.def(
      "speculative_check_probs",
      [](const std::string& dtype, int64_t B, int64_t R, int64_t V, uintptr_t probs, int64_t s0, int64_t s1,
         uintptr_t lens, int64_t extra, double tol) {
        if (B < 0 || R < 0 || V <= 0 || s0 < 0 || s1 < 0)
          throw std::invalid_argument("speculative_check_probs: bad sizes or strides");
        const auto* l = reinterpret_cast<const int64_t*>(lens);
        ProbCheck c;
        {
          py::gil_scoped_release no_gil;
          if (B * R > 0) {
            if (!probs) throw std::invalid_argument("speculative_check_probs: 'probs' must be non-null");
            if (dtype == "float32") c = check_probs_impl(reinterpret_cast<const float*>(probs), B, R, V, s0, s1, l, extra, tol);
            else if (dtype == "bfloat16") c = check_probs_impl(reinterpret_cast<const bf16*>(probs), B, R, V, s0, s1, l, extra, tol);
            else if (dtype == "float16") c = check_probs_impl(reinterpret_cast<const fp16*>(probs), B, R, V, s0, s1, l, extra, tol);
            else if (dtype == "float64") c = check_probs_impl(reinterpret_cast<const double*>(probs), B, R, V, s0, s1, l, extra, tol);
            else throw std::invalid_argument("speculative_check_probs: dtype '" + dtype + "' is not a float dtype");
          }
        }
        return py::make_tuple(c.b, c.r, c.kind, c.sum);
      },
      py::arg("dtype"), py::arg("batch"), py::arg("rows"), py::arg("vocab"), py::arg("probs"), py::arg("stride0"),
      py::arg("stride1"), py::arg("lens"), py::arg("extra"), py::arg("tol"),
      "(b, r, kind, sum) of the first probability row that is NaN (1), negative (2) or not summing to 1 (3).");
}

}  // namespace ptcore
