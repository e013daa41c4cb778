// CUDA speculative verification (rule and contract: ptcore/speculative.h). One block per sequence:
// the acceptance walk is a few scalar reads (every thread makes the same decisions), the stop
// token a block-wide (score, index) argmax over the vocabulary in double; the reduction keeps the
// lowest index among equal scores, so the result equals the sequential one bit for bit.
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "ptcore/speculative.h"

namespace ptcore {
namespace {

constexpr int kSpecThreads = 512;

__device__ inline double load_d(const float* p, int64_t i) { return double(p[i]); }
__device__ inline double load_d(const double* p, int64_t i) { return p[i]; }
__device__ inline double load_d(const __nv_bfloat16* p, int64_t i) { return double(__bfloat162float(p[i])); }
__device__ inline double load_d(const __half* p, int64_t i) { return double(__half2float(p[i])); }

// (score, index) pair: the larger score wins; equal scores: the lower index.
__device__ inline void better(double& s, long long& i, double s2, long long i2) {
  if (s2 > s || (s2 == s && i2 < i)) { s = s2; i = i2; }
}

// Block-wide argmax of per-thread (score, index); every thread gets the winner's index.
__device__ long long block_argmax(double s, long long i, double* sm_s, long long* sm_i) {
  for (int o = 16; o > 0; o >>= 1) better(s, i, __shfl_xor_sync(0xffffffffu, s, o), __shfl_xor_sync(0xffffffffu, i, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();  // the shared slots may still be read from the previous call
  if (lane == 0) { sm_s[warp] = s; sm_i[warp] = i; }
  __syncthreads();
  if (warp == 0) {
    s = lane < warps ? sm_s[lane] : -INFINITY;
    i = lane < warps ? sm_i[lane] : 0x7fffffffffffffffLL;
    for (int o = 16; o > 0; o >>= 1) better(s, i, __shfl_xor_sync(0xffffffffu, s, o), __shfl_xor_sync(0xffffffffu, i, o));
    if (lane == 0) sm_i[0] = i;
  }
  __syncthreads();
  return sm_i[0];
}

// Lowest index of the largest entry of a row (NaN entries never win).
template <typename T>
__device__ long long row_argmax(const T* p, int64_t V, double* sm_s, long long* sm_i) {
  double s = -INFINITY;
  long long idx = 0x7fffffffffffffffLL;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const double v = load_d(p, j);
    if (v > s || (idx == 0x7fffffffffffffffLL && v == v)) { s = v; idx = j; }
  }
  const long long r = block_argmax(s, idx, sm_s, sm_i);
  return r == 0x7fffffffffffffffLL ? 0 : r;
}

template <typename T>
__global__ void __launch_bounds__(kSpecThreads)
verify_kernel(const int64_t* __restrict__ tokens, const int64_t* __restrict__ lens, const T* draft,
              int64_t ds0, int64_t ds1, const T* target, int64_t ts0, int64_t ts1,
              const double* __restrict__ uniforms, const double* __restrict__ expo, bool greedy,
              int64_t K, int64_t V, int64_t* num_accepted, int64_t* emitted) {
  __shared__ double sm_s[32];
  __shared__ long long sm_i[32];
  __shared__ int sm_any;
  const int64_t b = blockIdx.x;
  const int64_t* x = tokens + b * K;
  int64_t L = lens[b];
  L = L < 0 ? 0 : (L > K ? K : L);
  const T* P = target + b * ts0;
  const T* Q = draft ? draft + b * ds0 : nullptr;
  int64_t n = 0;
  for (; n < L; ++n) {  // uniform control flow: every thread reads the same values
    const int64_t t = x[n];
    if (t < 0 || t >= V) break;
    const T* p = P + n * ts1;
    bool ok;
    if (greedy) {
      ok = row_argmax(p, V, sm_s, sm_i) == t;
    } else {
      const double q = Q ? load_d(Q + n * ds1, t) : 1.0;
      ok = uniforms[b * K + n] * q < load_d(p, t);
    }
    if (!ok) break;
  }
  const T* p = P + n * ts1;
  long long tok;
  if (greedy) {
    tok = row_argmax(p, V, sm_s, sm_i);
  } else {
    const bool rejected = n < L;
    const T* q = rejected && Q ? Q + n * ds1 : nullptr;
    const int64_t xq = rejected && !Q ? x[n] : -1;
    const double* e = expo + b * V;
    if (threadIdx.x == 0) sm_any = 0;
    __syncthreads();
    double s = -1.0;
    long long idx = 0x7fffffffffffffffLL;
    bool any = false;
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
      const double qi = q ? load_d(q, i) : (i == xq ? 1.0 : 0.0);
      double w = load_d(p, i) - qi;
      w = w > 0 ? w : 0.0;
      any = any || w > 0;
      better(s, idx, w > 0 ? w / e[i] : 0.0, i);
    }
    if (any) sm_any = 1;  // benign race: every writer writes 1
    __syncthreads();
    if (!sm_any) {  // rounding left no residual mass (p == q): race on p itself
      s = -1.0;
      idx = 0x7fffffffffffffffLL;
      for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
        double w = load_d(p, i);
        w = w > 0 ? w : 0.0;
        better(s, idx, w > 0 ? w / e[i] : 0.0, i);
      }
    }
    tok = block_argmax(s, idx, sm_s, sm_i);
  }
  int64_t* out = emitted + b * (K + 1);
  for (int64_t k = threadIdx.x; k <= K; k += blockDim.x) out[k] = k < n ? x[k] : (k == n ? int64_t(tok) : -1);
  if (threadIdx.x == 0) num_accepted[b] = n;
}

template <typename T>
void launch(const SpeculativeVerifyArgs& a) {
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  verify_kernel<T><<<unsigned(a.batch), kSpecThreads, 0, stream>>>(
      a.tokens, a.lens, static_cast<const T*>(a.draft_probs), a.draft_stride0, a.draft_stride1,
      static_cast<const T*>(a.target_probs), a.target_stride0, a.target_stride1, a.uniforms,
      a.exponentials, a.greedy, a.drafts, a.vocab, a.num_accepted, a.emitted);
}

}  // namespace

void speculative_verify_cuda(const SpeculativeVerifyArgs& a) {
  check_speculative_verify_args(a);
  if (a.batch > 2147483647LL) throw std::invalid_argument("speculative_verify: 'batch' exceeds the grid limit");
  if (a.batch == 0) return;
  const std::string& dt = a.dtype;
  if (dt == "float32") launch<float>(a);
  else if (dt == "bfloat16") launch<__nv_bfloat16>(a);
  else if (dt == "float16") launch<__half>(a);
  else launch<double>(a);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("speculative_verify: CUDA launch failed: ") + cudaGetErrorString(err));
}

}  // namespace ptcore
