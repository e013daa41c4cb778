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
  const A cap = A(a.softcap), inv_cap = kCap ? A(1) / cap : A(0), inv_t = A(1) / A(a.temperature);
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
    A m = -std::numeric_limits<A>::infinity(), sum_z = 0;
#pragma omp simd reduction(max : m) reduction(+ : sum_z)
    for (int64_t j = 0; j < V; ++j) {
      const A z = row.u(j) * inv_t;
      m = z > m ? z : m;
      sum_z += z;
    }
    A d = 0, s1 = 0;
    if (!std::isnan(sum_z) && sum_z != std::numeric_limits<A>::infinity()) {  // -inf logits are fine
#pragma omp simd reduction(+ : d, s1)
      for (int64_t j = 0; j < V; ++j) {
        const A z = row.u(j) * inv_t, e = fast_exp(z - m);
        d += e;
        // Shifted by m for accuracy (mu = m + s1 / d); the max keeps a -inf logit's 0 * -inf at 0
        // without a branch, so the loop stays vectorized.
        s1 += e * std::max(z - m, A(-1e30));
      }
    } else {
      d = s1 = std::numeric_limits<A>::quiet_NaN();  // NaN / inf logits: say so, never hide it
    }
    const A lse = m + std::log(d), mu = m + s1 / d;
    logp[r] = row.u(y) * inv_t - lse;
    lse_out[r] = lse;
    mu_out[r] = mu;
    if (ent) ent[r] = lse - mu;
  }
}

template <typename T, bool kCap>
void grad_impl(const LogprobRowsArgs& a) {
  using A = typename acc<T>::type;
  const int64_t V = a.vocab;
  const A cap = A(a.softcap), inv_cap = kCap ? A(1) / cap : A(0), inv_t = A(1) / A(a.temperature);
  const A* lse_in = static_cast<const A*>(a.lse);
  const A* mu_in = static_cast<const A*>(a.mu);
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
    const A lse = lse_in[r], mu = mu_in[r];
    const A glp = g_lp ? g_lp[r] * inv_t : A(0), gh = g_h ? g_h[r] * inv_t : A(0);
    const bool in_range = y >= 0 && y < V;
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) {
      const A u = row.u(j), z = u * inv_t, p = fast_exp(z - lse);
      A g = (j == y ? glp : A(0)) - glp * p - gh * p * std::max(z - mu, A(-1e30));
      if (kCap) g *= A(1) - (u * inv_cap) * (u * inv_cap);
      store(out[j], in_range ? g : std::numeric_limits<A>::quiet_NaN());
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
