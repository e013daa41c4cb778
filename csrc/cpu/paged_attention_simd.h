// The fp32 vector micro-kernels of the CPU paged attention: dot products, the 4-row score and
// P.V blocks over a transposed key tile, and the one-row P.V. Included by paged_attention.cpp
// only: everything here has internal linkage (anonymous namespace), compiled once per ISA level.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "paged_attention_internal.h"

#if defined(__GNUC__) && !defined(__clang__)
// The 64-byte vector helpers below are internal (anonymous namespace): no ABI boundary is crossed
// when the target lacks AVX-512 (e.g. PTCORE_CPU_ARCH=x86-64-v3).
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace ptcore {
namespace {

using paged_attention_detail::kKeyTile;

template <typename A>
inline A dot(const A* x, const A* y, int64_t n) {
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i] * y[i];
  return s;
}

// fp32 micro-kernels for blocks of 4 query rows (GCC/Clang vector extensions keep the
// accumulators in registers: 16 floats, one AVX-512 register or two AVX2 ones).
typedef float vf __attribute__((vector_size(64)));
constexpr int64_t kVec = 16;
static_assert(kKeyTile == 2 * kVec, "the micro-kernels take a key tile of two vectors");
inline vf vload(const float* p) { vf v; std::memcpy(&v, p, sizeof(vf)); return v; }
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof(vf)); }

// s[r][0:kKeyTile] = q[r] . k[:, kk] for rows r < 4 (stride D), kt transposed [D][kKeyTile].
inline void scores4(const float* q, int64_t D, const float* kt, float* s) {
  vf a00{}, a01{}, a10{}, a11{}, a20{}, a21{}, a30{}, a31{};
  const float *q0 = q, *q1 = q + D, *q2 = q + 2 * D, *q3 = q + 3 * D;
  for (int64_t d = 0; d < D; ++d) {
    const vf k0 = vload(kt + d * kKeyTile), k1 = vload(kt + d * kKeyTile + kVec);
    a00 += q0[d] * k0; a01 += q0[d] * k1;
    a10 += q1[d] * k0; a11 += q1[d] * k1;
    a20 += q2[d] * k0; a21 += q2[d] * k1;
    a30 += q3[d] * k0; a31 += q3[d] * k1;
  }
  vstore(s, a00); vstore(s + kVec, a01);
  vstore(s + kKeyTile, a10); vstore(s + kKeyTile + kVec, a11);
  vstore(s + 2 * kKeyTile, a20); vstore(s + 2 * kKeyTile + kVec, a21);
  vstore(s + 3 * kKeyTile, a30); vstore(s + 3 * kKeyTile + kVec, a31);
}

// acc[r][0:D] += sum_kk p[r][kk] v[kk][0:D] for rows r < 4 (acc stride D, p stride kKeyTile).
inline void pv4(float* acc, int64_t D, const float* p, const float* const* v, int64_t nk) {
  float *o0 = acc, *o1 = acc + D, *o2 = acc + 2 * D, *o3 = acc + 3 * D;
  const float *p0 = p, *p1 = p + kKeyTile, *p2 = p + 2 * kKeyTile, *p3 = p + 3 * kKeyTile;
  int64_t d = 0;
  for (; d + kVec <= D; d += kVec) {
    vf c0 = vload(o0 + d), c1 = vload(o1 + d), c2 = vload(o2 + d), c3 = vload(o3 + d);
    for (int64_t kk = 0; kk < nk; ++kk) {
      const vf x = vload(v[kk] + d);
      c0 += p0[kk] * x; c1 += p1[kk] * x; c2 += p2[kk] * x; c3 += p3[kk] * x;
    }
    vstore(o0 + d, c0); vstore(o1 + d, c1); vstore(o2 + d, c2); vstore(o3 + d, c3);
  }
  for (; d < D; ++d)
    for (int64_t kk = 0; kk < nk; ++kk) {
      const float x = v[kk][d];
      o0[d] += p0[kk] * x; o1[d] += p1[kk] * x; o2[d] += p2[kk] * x; o3[d] += p3[kk] * x;
    }
}

// q . k for D a multiple of kVec (one vector accumulator, summed once at the end).
inline float dot_vec(const float* q, const float* k, int64_t D) {
  vf acc{};
  for (int64_t d = 0; d < D; d += kVec) acc += vload(q + d) * vload(k + d);
#if defined(__AVX512F__)
  __m512 v;
  std::memcpy(&v, &acc, sizeof(v));
  return _mm512_reduce_add_ps(v);  // a shuffle tree, not 16 dependent scalar adds
#else
  float s = 0;
  for (int64_t i = 0; i < kVec; ++i) s += acc[i];
  return s;
#endif
}

// acc[0:D] += sum_kk p[kk] v[kk][0:D] for one row: two vectors of acc held in registers across keys.
inline void pv1(float* acc, int64_t D, const float* p, const float* const* v, int64_t nk) {
  int64_t d = 0;
  for (; d + 2 * kVec <= D; d += 2 * kVec) {
    vf c0 = vload(acc + d), c1 = vload(acc + d + kVec);
    for (int64_t kk = 0; kk < nk; ++kk) {
      c0 += p[kk] * vload(v[kk] + d);
      c1 += p[kk] * vload(v[kk] + d + kVec);
    }
    vstore(acc + d, c0);
    vstore(acc + d + kVec, c1);
  }
  for (; d + kVec <= D; d += kVec) {
    vf c0 = vload(acc + d);
    for (int64_t kk = 0; kk < nk; ++kk) c0 += p[kk] * vload(v[kk] + d);
    vstore(acc + d, c0);
  }
  for (; d < D; ++d)
    for (int64_t kk = 0; kk < nk; ++kk) acc[d] += p[kk] * v[kk][d];
}

}  // namespace
}  // namespace ptcore
