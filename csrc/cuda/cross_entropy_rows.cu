// CUDA version of the fused per-row cross-entropy pass (same math and contract as
// csrc/cpu/cross_entropy_rows.cpp; docs/kernels.md section 1). One thread block per
// row; three sweeps over the row (max and sum, sum of exp, gradient write), fp32 accumulation.
// An out-of-range target cannot raise from the device without a host sync, so such a row gets a
// NaN loss and a NaN gradient row: never a silent wrong answer.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "ptcore/cross_entropy_rows.h"

namespace ptcore {
namespace {

template <typename T, bool kCap>
__global__ void __launch_bounds__(kThreads)
cross_entropy_rows_kernel(T* __restrict__ logits, int64_t vocab, int64_t row_stride,
                          const int64_t* __restrict__ target, int64_t target_stride,
                          float* __restrict__ loss, float* __restrict__ lse_out,
                          const float* __restrict__ scale, int64_t scale_stride,
                          int64_t ignore_index, float eps, float zl, float cap, bool write_grad) {
  __shared__ float smem[32];
  const int64_t r = blockIdx.x;
  T* row = logits + r * row_stride;
  const int64_t y = target[r * target_stride];
  const float inv_cap = kCap ? 1.0f / cap : 0.0f;
  if (y == ignore_index) {
    if (threadIdx.x == 0) { loss[r] = 0.0f; lse_out[r] = 0.0f; }
    if (write_grad) for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) row[j] = from_f<T>(0.0f);
    return;
  }
  if (y < 0 || y >= vocab) {
    if (threadIdx.x == 0) { loss[r] = NAN; lse_out[r] = NAN; }
    if (write_grad) for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) row[j] = from_f<T>(NAN);
    return;
  }
  float m = -INFINITY, sum_z = 0.0f;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    const float z = capped<kCap>(to_f(row[j]), cap, inv_cap);
    m = fmaxf(m, z);
    sum_z += z;
  }
  m = block_reduce<true>(m, smem);
  sum_z = block_reduce<false>(sum_z, smem);
  if (isnan(sum_z) || sum_z == INFINITY) m = NAN;  // NaN / +inf logits poison the row, as on the CPU
  // Read the target's logit before any thread can overwrite the row with its gradient (the
  // reduction below is the last barrier before the write loop).
  const float zy = capped<kCap>(to_f(row[y]), cap, inv_cap);
  float d = 0.0f;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x)
    d += __expf(capped<kCap>(to_f(row[j]), cap, inv_cap) - m);
  d = block_reduce<false>(d, smem);
  const float lse = m + logf(d);
  if (threadIdx.x == 0) {
    loss[r] = (eps < 1.0f ? (1.0f - eps) * (lse - zy) : 0.0f) +
              (eps > 0.0f ? eps * (lse - sum_z / float(vocab)) : 0.0f) + zl * lse * lse;
    lse_out[r] = lse;
  }
  if (!write_grad) return;
  const float s = scale ? scale[r * scale_stride] : 1.0f;
  const float p_coef = s * (1.0f + 2.0f * zl * lse) / d, uniform = s * eps / float(vocab);
  const float onehot = s * (1.0f - eps);
  // Every thread has finished reading the row for the sums (the reductions above synchronize).
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    const float z = capped<kCap>(to_f(row[j]), cap, inv_cap);
    float g = p_coef * __expf(z - m) - uniform - (j == y ? onehot : 0.0f);
    if (kCap) g *= 1.0f - (z * inv_cap) * (z * inv_cap);
    row[j] = from_f<T>(g);
  }
}

template <typename T>
void launch(const CrossEntropyRowsArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.rows)), block(kThreads);
  const float eps = float(a.label_smoothing), zl = float(a.z_loss), cap = float(a.softcap);
  T* logits = static_cast<T*>(a.logits);
  if (a.softcap > 0)
    cross_entropy_rows_kernel<T, true><<<grid, block, 0, stream>>>(
        logits, a.vocab, a.row_stride, a.target, a.target_stride, static_cast<float*>(a.loss),
        static_cast<float*>(a.lse), static_cast<const float*>(a.scale), a.scale_stride,
        a.ignore_index, eps, zl, cap, a.write_grad);
  else
    cross_entropy_rows_kernel<T, false><<<grid, block, 0, stream>>>(
        logits, a.vocab, a.row_stride, a.target, a.target_stride, static_cast<float*>(a.loss),
        static_cast<float*>(a.lse), static_cast<const float*>(a.scale), a.scale_stride,
        a.ignore_index, eps, zl, cap, a.write_grad);
}

}  // namespace

void cross_entropy_rows_cuda(const CrossEntropyRowsArgs& a) {
  check_cross_entropy_rows_args(a);
  if (a.rows > 2147483647LL) throw std::invalid_argument("cross_entropy_rows: 'rows' exceeds the grid limit");
  if (a.rows == 0) return;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  const std::string& dt = a.dtype;
  if (dt == "float32") launch<float>(a, stream);
  else if (dt == "bfloat16") launch<__nv_bfloat16>(a, stream);
  else if (dt == "float16") launch<__half>(a, stream);
  else throw std::invalid_argument("cross_entropy_rows: 'logits' dtype '" + dt +
                                   "' is not one of float32, bfloat16, float16 on CUDA");
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("cross_entropy_rows: CUDA launch failed: ") + cudaGetErrorString(err));
}

int cuda_device_count(std::string* why) {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) { *why = cudaGetErrorString(err); return 0; }
  return n;
}

int cuda_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

}  // namespace ptcore
