// float16 and bfloat16 <-> float conversions (round to nearest even), for the CPU kernels,
// which include no torch header.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../flexdispatch.h"

namespace flexdispatch {
namespace cpu {

struct BFloat16 { uint16_t bits; };
struct Float16 { uint16_t bits; };

inline float to_float(float x) { return x; }
inline double to_float(double x) { return x; }

inline float to_float(BFloat16 x) {
  const uint32_t u = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float to_float(Float16 x) {
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  const uint32_t exp = (x.bits >> 10) & 0x1fu, mant = x.bits & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    const float v = std::ldexp(float(mant), -24);  // zero or subnormal
    return sign ? -v : v;
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (mant << 13);  // inf or nan
  } else {
    u = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T>
inline T from_float(double x);

template <>
inline float from_float<float>(double x) { return float(x); }
template <>
inline double from_float<double>(double x) { return x; }

template <>
inline BFloat16 from_float<BFloat16>(double xd) {
  const float x = float(xd);
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BFloat16{uint16_t((u >> 16) | 0x40u)};  // quiet nan
  u += 0x7fffu + ((u >> 16) & 1u);
  return BFloat16{uint16_t(u >> 16)};
}

template <>
inline Float16 from_float<Float16>(double xd) {
  const float x = float(xd);
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return Float16{uint16_t(sign | 0x7e00u)};  // nan
  if (u >= 0x477ff000u) return Float16{uint16_t(sign | 0x7c00u)};  // rounds to inf
  if (u < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    float a;
    std::memcpy(&a, &u, 4);
    return Float16{uint16_t(sign | uint16_t(std::nearbyint(a * 16777216.0f)))};
  }
  const uint32_t r = u - 0x38000000u + 0xfffu + ((u >> 13) & 1u);
  return Float16{uint16_t(sign | (r >> 13))};
}

// Calls f(T{}) for the element type T named by dtype (the CPU twin of common.cuh's).
template <typename F>
void with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case kFloat32: f(float{}); break;
    case kFloat16: f(Float16{}); break;
    case kBFloat16: f(BFloat16{}); break;
    case kFloat64: f(double{}); break;
  }
}

}  // namespace cpu
}  // namespace flexdispatch
