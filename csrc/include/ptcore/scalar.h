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

// exp for float, written without branches or calls so that the compiler vectorizes the loops that
// use it (std::exp blocks vectorization without -ffast-math). Cody-Waite reduction to
// [-ln2/2, ln2/2], degree-7 polynomial; relative error ~1 ulp (8e-8 measured). Inputs below -87 give 0, which is
// where float exp underflows anyway.
inline float fast_exp(float x) {
  const float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  // Round to nearest by the 1.5 * 2^23 trick: vectorizes everywhere, unlike nearbyint.
  const float n = (xc * kLog2e + 12582912.0f) - 12582912.0f;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float scale = bits_to_float(uint32_t(int32_t(n) + 127) << 23);
  return x < -87.0f ? 0.0f : p * scale;
}
inline double fast_exp(double x) { return std::exp(x); }

// Gemma-2 soft-capping cap * tanh(z / cap), from exp so that the loops using it vectorize.
template <typename A>
inline A softcap_fn(A z, A cap, A inv_cap) {
  const A x = z * inv_cap, ax = x < A(0) ? -x : x;
  const A t = A(1) - A(2) / (fast_exp(A(2) * ax) + A(1));
  return cap * (x < A(0) ? -t : t);
}

// Accumulation type: fp32 for every storage type except float64.
template <typename T> struct acc { using type = float; };
template <> struct acc<double> { using type = double; };

}  // namespace ptcore
