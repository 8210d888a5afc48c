// FP8 rows' decoding, shared by the dequantizing kernels (fp8.cu) and the one-launch
// permutation (route_small.cu): a 16-byte store's worth of e4m3 values and their scale to the
// output dtype, with the hardware's conversion on sm_89 and later and the bit-exact software
// one of flexdispatch.h before.
#pragma once

#include <cuda_fp8.h>

#include "common.cuh"

namespace flexdispatch {
namespace cuda {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
#define FD_FP8_HARDWARE 1
#else
#define FD_FP8_HARDWARE 0
#endif

// Two e4m3 values (low byte first) as floats: exact (every e4m3 value is a half).
__device__ __forceinline__ float2 decode_pair(uint16_t pair) {
#if FD_FP8_HARDWARE
  return __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3)));
#else
  return make_float2(fp8_e4m3_to_float(pair & 0xffu), fp8_e4m3_to_float(pair >> 8));
#endif
}

// The values of one 16-byte output store, and their FP8 bytes as one load.
template <typename T>
struct Unit {
  static constexpr int kVals = 16 / sizeof(T);  // 8 (bf16, half) or 4 (float)
  using Bytes = typename std::conditional<kVals == 8, uint2, uint32_t>::type;
  using Out = Vec<T, kVals>;
};

template <typename T>
__device__ __forceinline__ typename Unit<T>::Out decode_unit(typename Unit<T>::Bytes raw, float scale) {
  constexpr int kVals = Unit<T>::kVals;
  const uint16_t* pairs = reinterpret_cast<const uint16_t*>(&raw);
  typename Unit<T>::Out out;
#pragma unroll
  for (int i = 0; i < kVals / 2; ++i) {
    const float2 f = decode_pair(pairs[i]);
    out.v[2 * i] = Num<T>::from(f.x * scale);
    out.v[2 * i + 1] = Num<T>::from(f.y * scale);
  }
  return out;
}

}  // namespace cuda
}  // namespace flexdispatch
