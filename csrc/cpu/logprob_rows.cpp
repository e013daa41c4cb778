// CPU per-row log-prob / entropy passes (math in ptcore/logprob_rows.h). Rows are independent and
// each row's sums run in a fixed order, so a row's results do not depend on the other rows of the
// batch (the batch invariance the deterministic mode relies on).
#include "ptcore/logprob_rows.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "ptcore/scalar.h"

namespace ptcore {
namespace {

template <typename T, bool kCap>
struct Row {
  using A = typename acc<T>::type;
  const T* row;
  A cap, inv_cap, inv_t;
  // z' = softcap(z) / T, and u = softcap(z) for the chain rule
  A u(int64_t j) const {
    const A z = A(load(row[j]));
    return kCap ? softcap_fn(z, cap, inv_cap) : z;
  }
};

template <typename T, bool kCap>
void stats_impl(const LogprobRowsArgs& a) {
  using A = typename acc<T>::type;
  const int64_t V = a.vocab;
  const A cap = A(a.softcap), inv_cap = kCap ? A(1.0 / a.softcap) : A(0), inv_t = A(1.0 / a.temperature);
  A* logp = static_cast<A*>(a.logp);
  A* ent = static_cast<A*>(a.entropy);
  A* lse_out = static_cast<A*>(a.lse);
  A* mu_out = static_cast<A*>(a.mu);
#pragma omp parallel for schedule(static) if (a.rows * V > (1 << 16))
  for (int64_t r = 0; r < a.rows; ++r) {
    const int64_t y = a.target[r];
    if (y == a.ignore_index || y < 0 || y >= V) {
      // Ignored rows are 0; an out-of-range target (Python raises first on CPU) gives NaN.
      const A v = y == a.ignore_index ? A(0) : std::numeric_limits<A>::quiet_NaN();
      logp[r] = v; lse_out[r] = v; mu_out[r] = v;
      if (ent) ent[r] = v;
      continue;
    }
    const Row<T, kCap> row{static_cast<const T*>(a.logits) + r * a.row_stride, cap, inv_cap, inv_t};
    // Sums in fp32 blocks of kSumBlock added in double, the row's scalars in double (scalar.h).
    // The max is taken before the temperature and the row shifted before it is scaled:
    // z - m = (u - max u) / T. Computing u / T - m instead lets the compiler contract it into
    // fma(u, 1/T, -m), which differs from the rounded z_y used for logp (logp came out > 0 for
    // the argmax at T = 1e-3, and inf / NaN entropies at T = 1e-10).
    A u_max = -std::numeric_limits<A>::infinity();
    double sum_z = 0;
    for (int64_t j0 = 0; j0 < V; j0 += kSumBlock) {
      const int64_t j1 = std::min(V, j0 + kSumBlock);
      A part = 0;
#pragma omp simd reduction(max : u_max) reduction(+ : part)
      for (int64_t j = j0; j < j1; ++j) {
        const A u = row.u(j);
        u_max = select(u > u_max, u, u_max);  // see select in scalar.h
        part += u;
      }
      sum_z += part;
    }
    const double m = double(u_max) * double(inv_t);  // max z
    double d = 0, s1 = 0;
    if (!std::isnan(sum_z) && sum_z != std::numeric_limits<double>::infinity()) {  // -inf logits are fine
      for (int64_t j0 = 0; j0 < V; j0 += kSumBlock) {
        const int64_t j1 = std::min(V, j0 + kSumBlock);
        A pd = 0, ps = 0;
#pragma omp simd reduction(+ : pd, ps)
        for (int64_t j = j0; j < j1; ++j) {
          const A zm = (row.u(j) - u_max) * inv_t, e = fast_exp(zm);
          pd += e;
          // Shifted by m for accuracy (mu = m + s1 / d); the select keeps a -inf logit's
          // 0 * -inf at 0 without a branch, so the loop stays vectorized.
          ps += e * select(zm < A(-1e30), A(-1e30), zm);
        }
        d += pd;
        s1 += ps;
      }
    } else {
      d = s1 = std::numeric_limits<double>::quiet_NaN();  // NaN / inf logits: say so, never hide it
    }
    // Entropy as log d - s1 / d (both terms >= 0), never lse - mu: that difference cancels m,
    // which is large when the temperature is low (m = max z / T).
    const double log_d = std::log(d), s1_d = s1 / d;
    logp[r] = A(double((row.u(y) - u_max) * inv_t) - log_d);
    lse_out[r] = A(m + log_d);
    mu_out[r] = A(m + s1_d);
    if (ent) ent[r] = A(log_d - s1_d);
  }
}

template <typename T, bool kCap>
void grad_impl(const LogprobRowsArgs& a) {
  using A = typename acc<T>::type;
  const int64_t V = a.vocab;
  const A cap = A(a.softcap), inv_cap = kCap ? A(1.0 / a.softcap) : A(0), inv_t = A(1.0 / a.temperature);
  const A* lse_in = static_cast<const A*>(a.lse);
  const A* g_lp = static_cast<const A*>(a.g_logp);
  const A* g_h = static_cast<const A*>(a.g_entropy);
#pragma omp parallel for schedule(static) if (a.rows * V > (1 << 16))
  for (int64_t r = 0; r < a.rows; ++r) {
    T* out = static_cast<T*>(a.logits) + r * a.row_stride;
    const int64_t y = a.target[r];
    if (y == a.ignore_index) {
      for (int64_t j = 0; j < V; ++j) store(out[j], A(0));
      continue;
    }
    const Row<T, kCap> row{out, cap, inv_cap, inv_t};
    // p and z - mu from the row itself, not from the saved fp32 lse and mu: those are rounded at
    // the magnitude of max z (5e-7 relative for max z ~ 15, 6e-5 at T = 1e-2), and that error
    // entered every p unnormalized (2-200x the naive autograd error). One extra sweep renormalizes:
    // e_j = exp(z_j - l) for the saved l, p_j = e_j / sum e, z_j - mu = (z_j - l) - sum(e (z - l)) / sum e.
    // The shift is applied before the temperature ((u - l T) / T, no fma contraction), so both
    // sweeps see the same exponents and l's rounding cancels exactly.
    const A l_u = A(double(lse_in[r]) * a.temperature);
    double d = 0, s1 = 0;
    for (int64_t j0 = 0; j0 < V; j0 += kSumBlock) {
      const int64_t j1 = std::min(V, j0 + kSumBlock);
      A pd = 0, ps = 0;
#pragma omp simd reduction(+ : pd, ps)
      for (int64_t j = j0; j < j1; ++j) {
        const A zl = (row.u(j) - l_u) * inv_t, e = fast_exp(zl);
        pd += e;
        ps += e * select(zl < A(-1e30), A(-1e30), zl);
      }
      d += pd;
      s1 += ps;
    }
    const A inv_d = A(1.0 / d), mu_l = A(s1 / d);  // 1 / sum e, mu - l
    const A glp = g_lp ? g_lp[r] * inv_t : A(0), gh = g_h ? g_h[r] * inv_t : A(0);
    const bool in_range = y >= 0 && y < V;
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) {
      const A u = row.u(j), zl = (u - l_u) * inv_t, p = fast_exp(zl) * inv_d;
      A g = select(j == y, glp, A(0)) - glp * p - gh * p * select(zl < A(-1e30), A(-1e30), zl - mu_l);
      if (kCap) g *= softcap_grad(A(load(out[j])), inv_cap);
      store(out[j], select(in_range, g, std::numeric_limits<A>::quiet_NaN()));
    }
  }
}

template <template <typename, bool> class F>
void dispatch(const LogprobRowsArgs& a) {
  const bool cap = a.softcap > 0;
  const std::string& dt = a.dtype;
  if (dt == "float32") cap ? F<float, true>::run(a) : F<float, false>::run(a);
  else if (dt == "bfloat16") cap ? F<bf16, true>::run(a) : F<bf16, false>::run(a);
  else if (dt == "float16") cap ? F<fp16, true>::run(a) : F<fp16, false>::run(a);
  else if (dt == "float64") cap ? F<double, true>::run(a) : F<double, false>::run(a);
  else throw std::invalid_argument("logprob_rows: 'logits' dtype '" + dt +
                                   "' is not one of float32, bfloat16, float16, float64");
}

template <typename T, bool kCap> struct Stats { static void run(const LogprobRowsArgs& a) { stats_impl<T, kCap>(a); } };
template <typename T, bool kCap> struct Grad { static void run(const LogprobRowsArgs& a) { grad_impl<T, kCap>(a); } };

}  // namespace

void logprob_rows_stats(const LogprobRowsArgs& a) {
  check_logprob_rows_args(a, false);
  if (a.rows > 0) dispatch<Stats>(a);
}

void logprob_rows_grad(const LogprobRowsArgs& a) {
  check_logprob_rows_args(a, true);
  if (a.rows > 0) dispatch<Grad>(a);
}

}  // namespace ptcore
