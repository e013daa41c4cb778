// CUDA kernels of the fused backbone ops (same math and contract as csrc/cpu/backbone.cpp; the
// interface is csrc/cpu/backbone.h; docs/kernels.md, "Fused backbone ops"). fp32 math, each
// output rounded once. RMSNorm: one block per row (forward); the backward runs at most
// rms_norm_partial_rows_cuda(rows) blocks, each over a strided set of rows, and writes one row of
// fp32 weight-gradient partials (summed in Python). RoPE: one block per token, all heads of q
// and k. Gated activations: a grid-stride elementwise loop.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "../cpu/backbone.h"
#include "common.cuh"

namespace ptcore {
namespace {

constexpr int kRowThreads = 256;

template <typename T> __device__ inline const T* cin(uintptr_t p) { return reinterpret_cast<const T*>(p); }
template <typename T> __device__ inline T* cout(uintptr_t p) { return reinterpret_cast<T*>(p); }

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
rms_fwd_kernel(uintptr_t xp, uintptr_t rp, uintptr_t sp, uintptr_t wp, uintptr_t yp, float* rstd,
               int64_t H, float eps, float offset) {
  __shared__ float smem[32];
  const int64_t row = blockIdx.x;
  const T* x = cin<T>(xp) + row * H;
  const T* w = cin<T>(wp);
  T* s = rp ? cout<T>(sp) + row * H : nullptr;
  float ss = 0.0f;
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
    float v = to_f(x[j]);
    if (s) {  // the residual add, rounded to the storage dtype as the unfused add is
      const T r = from_f<T>(v + to_f(cin<T>(rp)[row * H + j]));
      s[j] = r;
      v = to_f(r);
    }
    ss += v * v;
  }
  ss = block_reduce<false>(ss, smem);
  const float rs = rsqrtf(ss / float(H) + eps);
  if (threadIdx.x == 0) rstd[row] = rs;
  const T* src = s ? s : x;  // each thread reads back only the elements it wrote
  T* y = cout<T>(yp) + row * H;
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) y[j] = from_f<T>(to_f(src[j]) * rs * (to_f(w[j]) + offset));
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
rms_bwd_kernel(uintptr_t dyp, uintptr_t dresp, uintptr_t sp, uintptr_t wp, const float* rstd, uintptr_t dsp,
               float* dw_partial, int64_t N, int64_t H, float offset) {
  __shared__ float smem[32];
  const T* w = cin<T>(wp);
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const T* s = cin<T>(sp) + row * H;
    const T* dy = cin<T>(dyp) + row * H;
    const float rs = rstd[row];
    float dot = 0.0f;
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x)
      dot += to_f(dy[j]) * (to_f(w[j]) + offset) * (to_f(s[j]) * rs);
    dot = block_reduce<false>(dot, smem) / float(H);
    T* ds = cout<T>(dsp) + row * H;
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
      const float shat = to_f(s[j]) * rs, d = to_f(dy[j]);
      float v = rs * (d * (to_f(w[j]) + offset) - shat * dot);
      if (dresp) v += to_f(cin<T>(dresp)[row * H + j]);
      ds[j] = from_f<T>(v);
      // Each thread owns columns j of this block's partial row: no atomics, a fixed order.
      if (dw_partial) dw_partial[int64_t(blockIdx.x) * H + j] += d * shat;
    }
  }
}

template <typename T>
__global__ void rope_kernel(uintptr_t qp, uintptr_t kp, uintptr_t cp, uintptr_t snp, uintptr_t qop,
                            uintptr_t kop, int64_t Hq, int64_t Hk, int64_t D, int64_t R, int64_t cos_rows,
                            bool inverse) {
  const int64_t row = blockIdx.x, half = R / 2;
  const T* c = cin<T>(cp) + (row % cos_rows) * R;
  const T* sn = cin<T>(snp) + (row % cos_rows) * R;
  for (int64_t i = threadIdx.x; i < (Hq + Hk) * D; i += blockDim.x) {
    const bool is_k = i >= Hq * D;
    const int64_t local = is_k ? i - Hq * D : i, heads = is_k ? Hk : Hq;
    const int64_t h = local / D, j = local % D;
    const T* x = cin<T>(is_k ? kp : qp) + (row * heads + h) * D;
    T* o = cout<T>(is_k ? kop : qop) + (row * heads + h) * D;
    if (j >= R) { o[j] = x[j]; continue; }
    const int64_t j1 = j < half ? j : j - half;
    const float x1 = to_f(x[j1]), x2 = to_f(x[j1 + half]);
    const float c1 = to_f(c[j1]), c2 = to_f(c[j1 + half]), s1 = to_f(sn[j1]), s2 = to_f(sn[j1 + half]);
    float v;
    if (j < half) v = inverse ? x1 * c1 + x2 * s2 : x1 * c1 - x2 * s1;
    else v = inverse ? x2 * c2 - x1 * s1 : x2 * c2 + x1 * s2;
    o[j] = from_f<T>(v);
  }
}

__device__ inline void act_fn(float g, int64_t act, float* f, float* df) {
  if (act == 0) {
    const float sg = 1.0f / (1.0f + __expf(-g));
    *f = g * sg;
    *df = sg * (1.0f + g * (1.0f - sg));
  } else {
    const float k = 0.7978845608028654f, c = 0.044715f;
    const float t = tanhf(k * (g + c * g * g * g));
    *f = 0.5f * g * (1.0f + t);
    *df = 0.5f * (1.0f + t) + 0.5f * g * (1.0f - t * t) * k * (1.0f + 3.0f * c * g * g);
  }
}

template <typename T>
__global__ void gated_kernel(uintptr_t dyp, uintptr_t gp, uintptr_t up, uintptr_t yp, uintptr_t dgp,
                             uintptr_t dup, int64_t n, int64_t act) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float f, df;
    act_fn(to_f(cin<T>(gp)[i]), act, &f, &df);
    const float u = to_f(cin<T>(up)[i]);
    if (!dyp) { cout<T>(yp)[i] = from_f<T>(f * u); continue; }
    const float d = to_f(cin<T>(dyp)[i]);
    cout<T>(dgp)[i] = from_f<T>(d * u * df);
    cout<T>(dup)[i] = from_f<T>(d * f);
  }
}

template <typename F>
void by_dtype(const char* op, const std::string& dtype, F&& fn) {
  if (dtype == "float32") fn(float{});
  else if (dtype == "bfloat16") fn(__nv_bfloat16{});
  else if (dtype == "float16") fn(__half{});
  else check_backbone(op, false, "dtype '" + dtype + "' is not one of float32, bfloat16, float16 on CUDA");
}

void check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(op) + ": CUDA launch failed: " + cudaGetErrorString(err));
}

cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

unsigned grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return unsigned(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

}  // namespace

void rms_norm_forward_cuda(uintptr_t x, uintptr_t residual, uintptr_t s_out, uintptr_t weight, uintptr_t y,
                           uintptr_t rstd, const std::string& dtype, int64_t rows, int64_t hidden, double eps,
                           double offset, uintptr_t stream) {
  check_backbone("rms_norm", rows >= 0 && rows <= 2147483647LL && hidden > 0, "'x' rows in [0, 2^31) and hidden > 0");
  check_backbone("rms_norm", (residual == 0) == (s_out == 0), "'residual' and its output go together");
  if (rows == 0) return;
  by_dtype("rms_norm", dtype, [&](auto t) {
    rms_fwd_kernel<decltype(t)><<<unsigned(rows), kRowThreads, 0, as_stream(stream)>>>(
        x, residual, s_out, weight, y, reinterpret_cast<float*>(rstd), hidden, float(eps), float(offset));
  });
  check_launch("rms_norm");
}

void rms_norm_backward_cuda(uintptr_t dy, uintptr_t dres, uintptr_t s, uintptr_t weight, uintptr_t rstd,
                            uintptr_t ds, uintptr_t dweight, const std::string& dtype, int64_t rows,
                            int64_t hidden, double offset, uintptr_t stream) {
  check_backbone("rms_norm", rows >= 0 && hidden > 0, "'x' rows >= 0 and hidden > 0");
  if (rows == 0) return;
  const int64_t parts = rms_norm_partial_rows_cuda(rows);
  float* dw = reinterpret_cast<float*>(dweight);
  if (dw) cudaMemsetAsync(dw, 0, sizeof(float) * size_t(parts) * size_t(hidden), as_stream(stream));
  by_dtype("rms_norm", dtype, [&](auto t) {
    rms_bwd_kernel<decltype(t)><<<unsigned(parts), kRowThreads, 0, as_stream(stream)>>>(
        dy, dres, s, weight, reinterpret_cast<const float*>(rstd), ds, dw, rows, hidden, float(offset));
  });
  check_launch("rms_norm");
}

void rope_cuda(uintptr_t q, uintptr_t k, uintptr_t cos, uintptr_t sin, uintptr_t q_out, uintptr_t k_out,
               const std::string& dtype, int64_t rows, int64_t q_heads, int64_t k_heads, int64_t head_dim,
               int64_t rot_dim, int64_t cos_rows, bool inverse, uintptr_t stream) {
  check_rope_shape(rows, q_heads, k_heads, head_dim, rot_dim, cos_rows);
  check_backbone("rope", rows <= 2147483647LL, "'q' rows must be < 2^31");
  if (rows == 0) return;
  by_dtype("rope", dtype, [&](auto t) {
    rope_kernel<decltype(t)><<<unsigned(rows), kRowThreads, 0, as_stream(stream)>>>(
        q, k, cos, sin, q_out, k_out, q_heads, k_heads, head_dim, rot_dim, cos_rows, inverse);
  });
  check_launch("rope");
}

void gated_act_forward_cuda(uintptr_t gate, uintptr_t up, uintptr_t y, const std::string& dtype, int64_t n,
                            int64_t act, uintptr_t stream) {
  check_backbone("gated_act", n >= 0 && (act == 0 || act == 1), "n >= 0 and act 0 (silu) or 1 (gelu_tanh)");
  if (n == 0) return;
  by_dtype("gated_act", dtype, [&](auto t) {
    gated_kernel<decltype(t)><<<grid_for(n, kThreads), kThreads, 0, as_stream(stream)>>>(0, gate, up, y, 0, 0, n, act);
  });
  check_launch("gated_act");
}

void gated_act_backward_cuda(uintptr_t dy, uintptr_t gate, uintptr_t up, uintptr_t dgate, uintptr_t dup,
                             const std::string& dtype, int64_t n, int64_t act, uintptr_t stream) {
  check_backbone("gated_act", n >= 0 && (act == 0 || act == 1), "n >= 0 and act 0 (silu) or 1 (gelu_tanh)");
  check_backbone("gated_act", n == 0 || dy != 0, "'dy' must be non-null");
  if (n == 0) return;
  by_dtype("gated_act", dtype, [&](auto t) {
    gated_kernel<decltype(t)><<<grid_for(n, kThreads), kThreads, 0, as_stream(stream)>>>(dy, gate, up, 0, dgate, dup, n, act);
  });
  check_launch("gated_act");
}

}  // namespace ptcore
