// CPU kernels of the fused backbone ops (interface and math: backbone.h; docs/kernels.md,
// "Fused backbone ops"). Each is one pass over its rows, parallel over rows with OpenMP and
// vectorized along the row; every dtype is loaded to the accumulation type (fp32, fp64 for fp64)
// and rounded once on the store. exp / tanh come from scalar.h's branch-free versions, which the
// compiler vectorizes (std::exp would keep the loops scalar).
#include "backbone.h"

#include <omp.h>

#include <cmath>
#include <vector>

#include "ptcore/scalar.h"

namespace ptcore {
namespace {

constexpr int64_t kParallelMin = 1 << 14;  // below this many elements a thread team costs more

template <typename T> const T* in(uintptr_t p) { return reinterpret_cast<const T*>(p); }
template <typename T> T* out(uintptr_t p) { return reinterpret_cast<T*>(p); }

template <typename T>
void rms_forward_impl(uintptr_t xp, uintptr_t rp, uintptr_t sp, uintptr_t wp, uintptr_t yp,
                      uintptr_t rstdp, int64_t rows, int64_t H, double eps, double offset) {
  using A = typename acc<T>::type;
  const T* w = in<T>(wp);
  A* rstd = out<A>(rstdp);
  const A off = A(offset), inv_h = A(1.0 / double(H)), e = A(eps);
#pragma omp parallel for schedule(static) if (rows * H > kParallelMin)
  for (int64_t n = 0; n < rows; ++n) {
    const T* s = in<T>(xp) + n * H;
    if (rp) {  // the residual add, rounded to the storage dtype as the unfused add is
      const T* r = in<T>(rp) + n * H;
      T* so = out<T>(sp) + n * H;
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) store(so[j], A(load(s[j])) + A(load(r[j])));
      s = so;
    }
    A ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < H; ++j) {
      const A v = A(load(s[j]));
      ss += v * v;
    }
    const A rs = A(1) / std::sqrt(ss * inv_h + e);
    rstd[n] = rs;
    T* y = out<T>(yp) + n * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) store(y[j], (A(load(s[j])) * rs) * (A(load(w[j])) + off));
  }
}

template <typename T>
void rms_backward_impl(uintptr_t dyp, uintptr_t dresp, uintptr_t sp, uintptr_t wp, uintptr_t rstdp,
                       uintptr_t dsp, uintptr_t dwp, int64_t rows, int64_t H, double offset) {
  using A = typename acc<T>::type;
  const T* w = in<T>(wp);
  const A* rstd = in<A>(rstdp);
  const A off = A(offset), inv_h = A(1.0 / double(H));
  const bool par = rows * H > kParallelMin;
  const int team = par ? omp_get_max_threads() : 1;
  // Per-thread weight-gradient partials, in double (a sum over every token), added in thread
  // order afterwards: the result does not depend on which thread finishes first.
  std::vector<double> partial(dwp ? size_t(team) * size_t(H) : 0, 0.0);
#pragma omp parallel num_threads(team) if (par)
  {
    double* dw = dwp ? partial.data() + size_t(omp_get_thread_num()) * size_t(H) : nullptr;
#pragma omp for schedule(static)
    for (int64_t n = 0; n < rows; ++n) {
      const T* s = in<T>(sp) + n * H;
      const T* dy = in<T>(dyp) + n * H;
      const A rs = rstd[n];
      A dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < H; ++j)
        dot += (A(load(dy[j])) * (A(load(w[j])) + off)) * (A(load(s[j])) * rs);
      dot *= inv_h;
      T* ds = out<T>(dsp) + n * H;
      const T* dres = dresp ? in<T>(dresp) + n * H : nullptr;
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) {
        const A shat = A(load(s[j])) * rs, g = A(load(dy[j])) * (A(load(w[j])) + off);
        A v = rs * (g - shat * dot);
        if (dres) v += A(load(dres[j]));
        store(ds[j], v);
      }
      if (dw) {
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) dw[j] += double(A(load(dy[j])) * (A(load(s[j])) * rs));
      }
    }
  }
  if (!dwp) return;
  A* dw = out<A>(dwp);
  for (int64_t j = 0; j < H; ++j) {
    double sum = 0;
    for (int t = 0; t < team; ++t) sum += partial[size_t(t) * size_t(H) + size_t(j)];
    dw[j] = A(sum);
  }
}

// kInverse a template parameter: a run-time flag inside the loop's ?: kept it scalar (scalar.h's
// select says why).
template <typename T, bool kInverse>
void rope_impl(uintptr_t qp, uintptr_t kp, uintptr_t cp, uintptr_t snp, uintptr_t qop, uintptr_t kop,
               int64_t rows, int64_t Hq, int64_t Hk, int64_t D, int64_t R, int64_t cos_rows) {
  using A = typename acc<T>::type;
  const int64_t half = R / 2;
#pragma omp parallel for schedule(static) if (rows * (Hq + Hk) * D > kParallelMin)
  for (int64_t n = 0; n < rows; ++n) {
    const T* c = in<T>(cp) + (n % cos_rows) * R;
    const T* sn = in<T>(snp) + (n % cos_rows) * R;
    for (int which = 0; which < 2; ++which) {
      const int64_t heads = which ? Hk : Hq;
      const T* src = in<T>(which ? kp : qp) + n * heads * D;
      T* dst = out<T>(which ? kop : qop) + n * heads * D;
      for (int64_t h = 0; h < heads; ++h) {
        const T* x = src + h * D;
        T* o = dst + h * D;
        // forward:  o1 = x1 c1 - x2 s1, o2 = x2 c2 + x1 s2 (o = x cos + rotate_half(x) sin);
        // inverse (its transpose, the backward): o1 = x1 c1 + x2 s2, o2 = x2 c2 - x1 s1.
#pragma omp simd
        for (int64_t j = 0; j < half; ++j) {
          const A x1 = A(load(x[j])), x2 = A(load(x[j + half]));
          const A c1 = A(load(c[j])), c2 = A(load(c[j + half]));
          const A s1 = A(load(sn[j])), s2 = A(load(sn[j + half]));
          if (kInverse) {
            store(o[j], x1 * c1 + x2 * s2);
            store(o[j + half], x2 * c2 - x1 * s1);
          } else {
            store(o[j], x1 * c1 - x2 * s1);
            store(o[j + half], x2 * c2 + x1 * s2);
          }
        }
        for (int64_t j = R; j < D; ++j) o[j] = x[j];
      }
    }
  }
}

// sigmoid(g) and tanh(u) from scalar.h's fast_exp / fast_expm1, so that the loops vectorize.
template <typename A> inline A sigmoid(A g) { return A(1) / (A(1) + fast_exp(-g)); }
template <typename A> inline A tanh_v(A u) {
  const A e = fast_expm1(A(-2) * std::fabs(u));
  return std::copysign(-e / (e + A(2)), u);
}
constexpr double kGeluK = 0.7978845608028654;  // sqrt(2 / pi)
constexpr double kGeluC = 0.044715;

template <typename T>
void gated_forward_impl(uintptr_t gp, uintptr_t up, uintptr_t yp, int64_t n, int64_t act) {
  using A = typename acc<T>::type;
  const T* g = in<T>(gp);
  const T* u = in<T>(up);
  T* y = out<T>(yp);
  const A k = A(kGeluK), c = A(kGeluC);
  if (act == 0) {
#pragma omp parallel for simd schedule(static) if (n > kParallelMin)
    for (int64_t i = 0; i < n; ++i) {
      const A x = A(load(g[i]));
      store(y[i], x * sigmoid(x) * A(load(u[i])));
    }
  } else {
#pragma omp parallel for simd schedule(static) if (n > kParallelMin)
    for (int64_t i = 0; i < n; ++i) {
      const A x = A(load(g[i]));
      const A t = tanh_v(k * (x + c * x * x * x));
      store(y[i], A(0.5) * x * (A(1) + t) * A(load(u[i])));
    }
  }
}

template <typename T>
void gated_backward_impl(uintptr_t dyp, uintptr_t gp, uintptr_t up, uintptr_t dgp, uintptr_t dup,
                         int64_t n, int64_t act) {
  using A = typename acc<T>::type;
  const T* dy = in<T>(dyp);
  const T* g = in<T>(gp);
  const T* u = in<T>(up);
  T* dg = out<T>(dgp);
  T* du = out<T>(dup);
  const A k = A(kGeluK), c = A(kGeluC);
  if (act == 0) {
#pragma omp parallel for simd schedule(static) if (n > kParallelMin)
    for (int64_t i = 0; i < n; ++i) {
      const A x = A(load(g[i])), d = A(load(dy[i])), sg = sigmoid(x);
      store(du[i], d * x * sg);
      store(dg[i], d * A(load(u[i])) * sg * (A(1) + x * (A(1) - sg)));
    }
  } else {
#pragma omp parallel for simd schedule(static) if (n > kParallelMin)
    for (int64_t i = 0; i < n; ++i) {
      const A x = A(load(g[i])), d = A(load(dy[i]));
      const A t = tanh_v(k * (x + c * x * x * x));
      const A dact = A(0.5) * (A(1) + t) + A(0.5) * x * (A(1) - t * t) * k * (A(1) + A(3) * c * x * x);
      store(du[i], d * A(0.5) * x * (A(1) + t));
      store(dg[i], d * A(load(u[i])) * dact);
    }
  }
}

// Calls fn<T>() for the storage type named by dtype.
template <typename F>
void by_dtype(const char* op, const std::string& dtype, F&& fn) {
  if (dtype == "float32") fn(float{});
  else if (dtype == "bfloat16") fn(bf16{});
  else if (dtype == "float16") fn(fp16{});
  else if (dtype == "float64") fn(double{});
  else check_backbone(op, false, "dtype '" + dtype + "' is not one of float32, bfloat16, float16, float64");
}

}  // namespace

void rms_norm_forward(uintptr_t x, uintptr_t residual, uintptr_t s_out, uintptr_t weight, uintptr_t y,
                      uintptr_t rstd, const std::string& dtype, int64_t rows, int64_t hidden, double eps,
                      double offset, uintptr_t) {
  check_backbone("rms_norm", rows >= 0 && hidden > 0, "'x' needs rows >= 0 and a hidden size > 0");
  check_backbone("rms_norm", (residual == 0) == (s_out == 0), "'residual' and its output go together");
  check_backbone("rms_norm", eps >= 0, "'eps' must be >= 0");
  by_dtype("rms_norm", dtype, [&](auto t) {
    rms_forward_impl<decltype(t)>(x, residual, s_out, weight, y, rstd, rows, hidden, eps, offset);
  });
}

void rms_norm_backward(uintptr_t dy, uintptr_t dres, uintptr_t s, uintptr_t weight, uintptr_t rstd,
                       uintptr_t ds, uintptr_t dweight, const std::string& dtype, int64_t rows,
                       int64_t hidden, double offset, uintptr_t) {
  check_backbone("rms_norm", rows >= 0 && hidden > 0, "'x' needs rows >= 0 and a hidden size > 0");
  by_dtype("rms_norm", dtype, [&](auto t) {
    rms_backward_impl<decltype(t)>(dy, dres, s, weight, rstd, ds, dweight, rows, hidden, offset);
  });
}

void rope(uintptr_t q, uintptr_t k, uintptr_t cos, uintptr_t sin, uintptr_t q_out, uintptr_t k_out,
          const std::string& dtype, int64_t rows, int64_t q_heads, int64_t k_heads, int64_t head_dim,
          int64_t rot_dim, int64_t cos_rows, bool inverse, uintptr_t) {
  check_rope_shape(rows, q_heads, k_heads, head_dim, rot_dim, cos_rows);
  by_dtype("rope", dtype, [&](auto t) {
    using T = decltype(t);
    if (inverse) rope_impl<T, true>(q, k, cos, sin, q_out, k_out, rows, q_heads, k_heads, head_dim, rot_dim, cos_rows);
    else rope_impl<T, false>(q, k, cos, sin, q_out, k_out, rows, q_heads, k_heads, head_dim, rot_dim, cos_rows);
  });
}

void gated_act_forward(uintptr_t gate, uintptr_t up, uintptr_t y, const std::string& dtype, int64_t n,
                       int64_t act, uintptr_t) {
  check_backbone("gated_act", n >= 0 && (act == 0 || act == 1), "n >= 0 and act 0 (silu) or 1 (gelu_tanh)");
  by_dtype("gated_act", dtype, [&](auto t) { gated_forward_impl<decltype(t)>(gate, up, y, n, act); });
}

void gated_act_backward(uintptr_t dy, uintptr_t gate, uintptr_t up, uintptr_t dgate, uintptr_t dup,
                        const std::string& dtype, int64_t n, int64_t act, uintptr_t) {
  check_backbone("gated_act", n >= 0 && (act == 0 || act == 1), "n >= 0 and act 0 (silu) or 1 (gelu_tanh)");
  by_dtype("gated_act", dtype, [&](auto t) {
    gated_backward_impl<decltype(t)>(dy, gate, up, dgate, dup, n, act);
  });
}

}  // namespace ptcore
