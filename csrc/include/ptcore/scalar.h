// Scalar types and math shared by the CPU kernels. No torch headers: tensors arrive as raw
// pointers with a dtype name, and 16-bit floats are plain uint16_t storage converted here.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

namespace ptcore {

struct bf16 { uint16_t bits; };
struct fp16 { uint16_t bits; };

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// Round-to-nearest-even, NaN kept quiet: the same rounding torch uses for .to(bfloat16).
inline float load(const bf16& v) { return bits_to_float(uint32_t(v.bits) << 16); }
inline void store(bf16& v, float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) { v.bits = 0x7fc0; return; }
  u += 0x7fffu + ((u >> 16) & 1u);
  v.bits = uint16_t(u >> 16);
}

inline float load(const fp16& v) {
  const uint32_t h = v.bits, sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));      // inf / nan
  if (exp != 0) return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));  // normal
  // zero or subnormal: man * 2^-24
  const float mag = float(man) * 5.9604644775390625e-08f;
  return sign ? -mag : mag;
}
inline void store(fp16& v, float f) {
  const uint32_t u = float_to_bits(f), sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) { v.bits = uint16_t(sign | 0x7e00u); return; }           // nan
  if (a >= 0x477ff000u) { v.bits = uint16_t(sign | 0x7c00u); return; }          // overflow -> inf
  if (a < 0x38800000u) {                                                        // subnormal / zero
    // Adding 0.5 (2^-1) shifts the value so the float's own rounding lands on the fp16 grid.
    const float r = bits_to_float(a) + 0.5f;
    v.bits = uint16_t(sign | (float_to_bits(r) - 0x3f000000u));
    return;
  }
  uint32_t m = a + 0xc8000fffu + ((a >> 13) & 1u);  // rebias exponent (-112 << 23) and round
  v.bits = uint16_t(sign | (m >> 13));
}

inline float load(const float& v) { return v; }
inline void store(float& v, float f) { v = f; }
inline double load(const double& v) { return v; }
inline void store(double& v, double f) { v = f; }

// c ? a : b through integer masks. Under the default -ftrapping-math GCC does not if-convert a
// float compare feeding a ?: (the compare may raise FE_INVALID), so a loop holding one stays
// scalar wherever there are no masked vector ops: every x86-64-v2/v3 (SSE4/AVX2) build of these
// kernels did, unlike the AVX-512 one (bench/cpu_dispatch.py times the ISA levels). Blending the
// compare's mask in the integer domain vectorizes at every level. NaN in a or b is kept as is.
inline float select(bool c, float a, float b) {
  const uint32_t m = 0u - uint32_t(c);
  return bits_to_float((float_to_bits(a) & m) | (float_to_bits(b) & ~m));
}
inline double select(bool c, double a, double b) { return c ? a : b; }

// exp for float, written without branches or calls so that the compiler vectorizes the loops that
// use it (std::exp blocks vectorization without -ffast-math). Cody-Waite reduction to
// [-ln2/2, ln2/2], degree-7 polynomial; relative error within 8.5e-8 (~1 ulp) and unbiased (mean
// -4e-10 over N(0, 9) logits), measured against double exp. Inputs below -87 give 0, which is
// where float exp underflows anyway.
struct ExpParts { float r, p, scale; };  // exp(x) = scale * (1 + r + p r^2)
inline ExpParts exp_parts(float x) {
  const float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  const float lo = select(x < -87.0f, -87.0f, x), xc = select(lo > 88.0f, 88.0f, lo);  // NaN stays
  // Round to nearest by the 1.5 * 2^23 trick: vectorizes everywhere, unlike nearbyint.
  const float n = (xc * kLog2e + 12582912.0f) - 12582912.0f;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return {r, p, bits_to_float(uint32_t(int32_t(n) + 127) << 23)};
}
inline float fast_exp(float x) {
  const ExpParts e = exp_parts(x);
  return select(x < -87.0f, 0.0f, (e.p * e.r * e.r + e.r + 1.0f) * e.scale);
}
inline double fast_exp(double x) { return std::exp(x); }

// exp(x) - 1 without the cancellation of fast_exp(x) - 1 near 0: for |x| < ln2/2 it is the
// polynomial r + p r^2 itself (relative error ~1 ulp down to the smallest x), else
// scale * (r + p r^2) + (scale - 1), where scale - 1 is exact.
inline float fast_expm1(float x) {
  const ExpParts e = exp_parts(x);
  return select(x < -87.0f, -1.0f, e.scale * (e.p * e.r * e.r + e.r) + (e.scale - 1.0f));
}
inline double fast_expm1(double x) { return std::expm1(x); }

// Gemma-2 soft-capping cap * tanh(z / cap), from expm1 so that the loops using it vectorize.
// tanh|x| = -u / (u + 2) with u = expm1(-2|x|) in (-1, 0]: no cancellation anywhere (the old
// 1 - 2 / (exp(2|x|) + 1) lost every digit for small |x|, i.e. for large caps). Where
// |x| < 1e-3, cap * tanh(x) = z * (1 - x^2/3 + 2x^4/15) to well below an ulp of either type; this
// form also stays exact when cap is too large for the accumulation type (inv_cap = 0 gives z).
// A -inf logit gives -cap, as tanh(-inf) = -1 does.
template <typename A>
inline A softcap_fn(A z, A cap, A inv_cap) {
  const A x = z * inv_cap, ax = std::fabs(x), x2 = x * x;
  const A u = fast_expm1(A(-2) * ax);
  const A t = -u / (u + A(2));
  const A small = z * (A(1) - x2 * (A(1) / A(3) - x2 * A(2.0 / 15.0)));
  return select(ax < A(1e-3), small, cap * std::copysign(t, x));
}

// d softcap(z) / dz = sech^2(z / cap) = 4 e / (1 + e)^2 with e = exp(-2|z / cap|): from the raw
// logit, with no cancellation anywhere. 1 - (softcap(z) / cap)^2 rounds softcap(z) and 1 / cap
// first, which near saturation (1 - tanh^2 small) cost 2-4x the error of torch's tanh backward.
template <typename A>
inline A softcap_grad(A z, A inv_cap) {
  const A e = fast_exp(A(-2) * std::fabs(z * inv_cap)), s = A(1) + e;
  return A(4) * e / (s * s);
}

// Sums over a row of logits: fp32 partial sums over blocks of kSumBlock terms (vectorized across
// the block), the blocks added in double. One plain vectorized fp32 reduction over V = 49152 terms
// runs ~3000 sequential additions per SIMD lane; once the lane holding the max term (exp(0) = 1)
// is large, every small term added to it is rounded away, so the sum of exp came out biased low
// by ~5e-6 relative on LM-head-like rows (eager PyTorch: ~1e-7). Blocks of 256 keep each lane's
// run at 16-64 additions (AVX-512 .. SSE) at a small cost in time. The order is fixed per row, so a
// row's result depends neither on the thread count nor on the other rows.
constexpr int64_t kSumBlock = 256;

// Accumulation type: fp32 for every storage type except float64.
template <typename T> struct acc { using type = float; };
template <> struct acc<double> { using type = double; };

}  // namespace ptcore
