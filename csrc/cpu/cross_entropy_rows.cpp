// The fused per-row pass of the chunked linear cross-entropy (math: docs/kernels.md
// section 1). For each row of a logits chunk it computes the log-sum-exp and the loss, and, when
// asked, overwrites the row with the gradient of the loss w.r.t. the (pre-softcap) logits:
//   G = s * [ (1 + 2 z_loss lse) softmax(z') - eps/V - (1-eps) onehot(y) ] * dz'/dz
// Three sweeps over a row that stays in L2: max and sum (for label smoothing), sum of exp, and the
// gradient write. exp is recomputed rather than stored, so the row is written once, at the end.
// The sums run in fp32 blocks added in double, and the row's scalars in double (scalar.h says why).
#include "ptcore/cross_entropy_rows.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

#include "ptcore/scalar.h"

namespace ptcore {
namespace {

template <typename T, bool kCap>
void rows_impl(const CrossEntropyRowsArgs& a, int64_t* first_bad_row) {
  using A = typename acc<T>::type;
  const A eps = A(a.label_smoothing), cap = A(a.softcap);
  // 1 / cap in double, then rounded: a cap beyond the fp32 range gives 0 (no capping), not NaN.
  const A inv_cap = kCap ? A(1.0 / a.softcap) : A(0);
  const int64_t V = a.vocab;
  int64_t bad = std::numeric_limits<int64_t>::max();

#pragma omp parallel for schedule(static) reduction(min : bad) if (a.rows * V > (1 << 16))
  for (int64_t r = 0; r < a.rows; ++r) {
    T* row = static_cast<T*>(a.logits) + r * a.row_stride;
    const int64_t y = a.target[r * a.target_stride];
    A& loss = static_cast<A*>(a.loss)[r];
    A& lse_out = static_cast<A*>(a.lse)[r];
    if (y == a.ignore_index) {
      loss = 0;
      lse_out = 0;
      if (a.write_grad) for (int64_t j = 0; j < V; ++j) store(row[j], A(0));
      continue;
    }
    if (y < 0 || y >= V) { bad = std::min(bad, r); continue; }

    auto z_at = [&](int64_t j) -> A {
      const A z = A(load(row[j]));
      return kCap ? softcap_fn(z, cap, inv_cap) : z;
    };
    A m = -std::numeric_limits<A>::infinity();
    double sum_z = 0;
    for (int64_t j0 = 0; j0 < V; j0 += kSumBlock) {
      const int64_t j1 = std::min(V, j0 + kSumBlock);
      A part = 0;
#pragma omp simd reduction(max : m) reduction(+ : part)
      for (int64_t j = j0; j < j1; ++j) {
        const A z = z_at(j);
        m = select(z > m, z, m);  // see select in scalar.h
        part += z;
      }
      sum_z += part;
    }
    // A NaN or +inf logit: say so in the result, never hide it. (-inf logits, e.g. a masked
    // vocabulary entry, are fine: they get probability 0.)
    if (std::isnan(sum_z) || sum_z == std::numeric_limits<double>::infinity()) {
      const A nan = std::numeric_limits<A>::quiet_NaN();
      loss = nan;
      lse_out = nan;
      if (a.write_grad) for (int64_t j = 0; j < V; ++j) store(row[j], nan);
      continue;
    }
    double d = 0;
    for (int64_t j0 = 0; j0 < V; j0 += kSumBlock) {
      const int64_t j1 = std::min(V, j0 + kSumBlock);
      A part = 0;
#pragma omp simd reduction(+ : part)
      for (int64_t j = j0; j < j1; ++j) part += fast_exp(z_at(j) - m);
      d += part;
    }
    // The row's scalars in double, rounded once at the end: lse - z_y cancels when the target is
    // likely, and lse = m + log d would round twice in fp32.
    const double lse = double(m) + std::log(d), zy = double(z_at(y)), dzl = double(a.z_loss);
    const double deps = double(a.label_smoothing);
    // Each term only when its weight is nonzero (0 * inf is NaN for a -inf logit).
    loss = A((deps < 1 ? (1 - deps) * (lse - zy) : 0.0) +
             (deps > 0 ? deps * (lse - sum_z / double(V)) : 0.0) + dzl * lse * lse);
    lse_out = A(lse);
    if (!a.write_grad) continue;

    const A s = a.scale ? static_cast<const A*>(a.scale)[r * a.scale_stride] : A(1);
    const A p_coef = A(double(s) * (1 + 2 * dzl * lse) / d), uniform = s * eps / A(V);
    const A onehot = s * (A(1) - eps);
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) {
      const A z = z_at(j);
      A g = p_coef * fast_exp(z - m) - uniform - select(j == y, onehot, A(0));
      if (kCap) g *= softcap_grad(A(load(row[j])), inv_cap);
      store(row[j], g);
    }
  }
  *first_bad_row = bad == std::numeric_limits<int64_t>::max() ? -1 : bad;
}

template <typename T>
void rows_dispatch_cap(const CrossEntropyRowsArgs& a, int64_t* bad) {
  if (a.softcap > 0) rows_impl<T, true>(a, bad);
  else rows_impl<T, false>(a, bad);
}

}  // namespace

void cross_entropy_rows(const CrossEntropyRowsArgs& a) {
  check_cross_entropy_rows_args(a);
  if (a.rows == 0) return;

  int64_t bad = -1;
  const std::string& dt = a.dtype;
  if (dt == "float32") rows_dispatch_cap<float>(a, &bad);
  else if (dt == "bfloat16") rows_dispatch_cap<bf16>(a, &bad);
  else if (dt == "float16") rows_dispatch_cap<fp16>(a, &bad);
  else if (dt == "float64") rows_dispatch_cap<double>(a, &bad);
  else throw std::invalid_argument("cross_entropy_rows: 'logits' dtype '" + dt +
                                   "' is not one of float32, bfloat16, float16, float64");
  if (bad >= 0) {
    const int64_t y = a.target[bad * a.target_stride];
    throw std::invalid_argument("cross_entropy_rows: 'target' holds " + std::to_string(y) + " at row " +
                            std::to_string(bad) + ", outside [0, " + std::to_string(a.vocab) +
                            ") and not ignore_index (" + std::to_string(a.ignore_index) + ")");
  }
}

}  // namespace ptcore
