// CUDA per-row log-prob / entropy passes (math and contract: ptcore/logprob_rows.h). One block
// per row; fixed reduction order per row, so results do not depend on the other rows.
#include <cmath>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "ptcore/logprob_rows.h"

namespace ptcore {
namespace {

template <typename T, bool kCap>
__global__ void __launch_bounds__(kThreads)
logprob_stats_kernel(const T* __restrict__ logits, int64_t vocab, int64_t row_stride,
                     const int64_t* __restrict__ target, int64_t ignore_index, float cap,
                     float inv_t, float* logp, float* entropy, float* lse_out, float* mu_out) {
  __shared__ float smem[32];
  const int64_t r = blockIdx.x;
  const T* row = logits + r * row_stride;
  const int64_t y = target[r];
  const float inv_cap = kCap ? 1.0f / cap : 0.0f;
  if (y == ignore_index || y < 0 || y >= vocab) {  // ignored: 0; out of range: NaN (cannot raise)
    if (threadIdx.x == 0) {
      const float v = y == ignore_index ? 0.0f : NAN;
      logp[r] = v; lse_out[r] = v; mu_out[r] = v;
      if (entropy) entropy[r] = v;
    }
    return;
  }
  float m = -INFINITY, sum_z = 0.0f;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    const float z = capped<kCap>(to_f(row[j]), cap, inv_cap) * inv_t;
    m = fmaxf(m, z);
    sum_z += z;
  }
  m = block_reduce<true>(m, smem);
  sum_z = block_reduce<false>(sum_z, smem);
  if (isnan(sum_z) || sum_z == INFINITY) m = NAN;  // -inf logits are fine
  float d = 0.0f, s1 = 0.0f;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    const float z = capped<kCap>(to_f(row[j]), cap, inv_cap) * inv_t - m, e = __expf(z);
    d += e;
    s1 += e > 0.0f ? e * z : 0.0f;
  }
  d = block_reduce<false>(d, smem);
  s1 = block_reduce<false>(s1, smem);
  if (threadIdx.x == 0) {
    const float lse = m + logf(d), mu = m + s1 / d;
    logp[r] = capped<kCap>(to_f(row[y]), cap, inv_cap) * inv_t - lse;
    lse_out[r] = lse;
    mu_out[r] = mu;
    if (entropy) entropy[r] = lse - mu;
  }
}

template <typename T, bool kCap>
__global__ void __launch_bounds__(kThreads)
logprob_grad_kernel(T* __restrict__ logits, int64_t vocab, int64_t row_stride,
                    const int64_t* __restrict__ target, int64_t ignore_index, float cap, float inv_t,
                    const float* lse_in, const float* mu_in, const float* g_logp, const float* g_entropy) {
  const int64_t r = blockIdx.x;
  T* row = logits + r * row_stride;
  const int64_t y = target[r];
  const float inv_cap = kCap ? 1.0f / cap : 0.0f;
  const bool ignored = y == ignore_index, in_range = y >= 0 && y < vocab;
  const float lse = lse_in[r], mu = mu_in[r];
  const float glp = g_logp ? g_logp[r] * inv_t : 0.0f, gh = g_entropy ? g_entropy[r] * inv_t : 0.0f;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    const float u = capped<kCap>(to_f(row[j]), cap, inv_cap), z = u * inv_t, p = __expf(z - lse);
    float g = (j == y ? glp : 0.0f) - glp * p - (p > 0.0f ? gh * p * (z - mu) : 0.0f);
    if (kCap) g *= 1.0f - (u * inv_cap) * (u * inv_cap);
    row[j] = from_f<T>(ignored ? 0.0f : (in_range ? g : NAN));
  }
}

template <typename T, bool kCap>
void launch(const LogprobRowsArgs& a, bool grad) {
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  const float cap = float(a.softcap), inv_t = float(1.0 / a.temperature);
  auto f = [](const void* p) { return static_cast<float*>(const_cast<void*>(p)); };
  if (grad)
    logprob_grad_kernel<T, kCap><<<unsigned(a.rows), kThreads, 0, stream>>>(
        static_cast<T*>(a.logits), a.vocab, a.row_stride, a.target, a.ignore_index, cap, inv_t,
        f(a.lse), f(a.mu), f(a.g_logp), f(a.g_entropy));
  else
    logprob_stats_kernel<T, kCap><<<unsigned(a.rows), kThreads, 0, stream>>>(
        static_cast<const T*>(a.logits), a.vocab, a.row_stride, a.target, a.ignore_index, cap,
        inv_t, f(a.logp), f(a.entropy), f(a.lse), f(a.mu));
}

void run(const LogprobRowsArgs& a, bool grad) {
  check_logprob_rows_args(a, grad);
  if (a.rows > 2147483647LL) throw std::invalid_argument("logprob_rows: 'rows' exceeds the grid limit");
  if (a.rows == 0) return;
  const bool cap = a.softcap > 0;
  const std::string& dt = a.dtype;
  if (dt == "float32") cap ? launch<float, true>(a, grad) : launch<float, false>(a, grad);
  else if (dt == "bfloat16") cap ? launch<__nv_bfloat16, true>(a, grad) : launch<__nv_bfloat16, false>(a, grad);
  else if (dt == "float16") cap ? launch<__half, true>(a, grad) : launch<__half, false>(a, grad);
  else throw std::invalid_argument("logprob_rows: 'logits' dtype '" + dt + "' is not one of float32, bfloat16, float16 on CUDA");
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("logprob_rows: CUDA launch failed: ") + cudaGetErrorString(err));
}

}  // namespace

void logprob_rows_stats_cuda(const LogprobRowsArgs& a) { run(a, false); }
void logprob_rows_grad_cuda(const LogprobRowsArgs& a) { run(a, true); }

}  // namespace ptcore
