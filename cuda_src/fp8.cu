// FP8 quantization of rows and its inverse: one warp per group of kFp8Group (128) values, four
// values a lane, the group's amax by warp shuffles. Same arithmetic as cpu/fp8_cpu.cpp.
#include "common.cuh"
#include "launch.h"

namespace flexdispatch {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kPerLane = kFp8Group / 32;  // 4

__device__ __forceinline__ float nan_max(float a, float b) { return (b > a || b != b) ? b : a; }

template <typename T>
__global__ void quantize_kernel(const T* __restrict__ x, int64_t groups, uint8_t* __restrict__ q,
                                float* __restrict__ scales) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (g >= groups) return;
  const int lane = threadIdx.x % 32;
  const Vec<T, kPerLane> in = reinterpret_cast<const Vec<T, kPerLane>*>(x + g * kFp8Group)[lane];
  float v[kPerLane];
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    v[i] = Num<T>::to_float(in.v[i]);
    amax = nan_max(amax, fabsf(v[i]));
  }
#pragma unroll
  for (int o = 16; o > 0; o /= 2) amax = nan_max(amax, __shfl_xor_sync(kFullMask, amax, o));
  if (amax < kFp8MinAmax) amax = kFp8MinAmax;
  const float scale = amax / kFp8Max;  // IEEE division (no fast-math): the CPU's bits
  uint32_t packed = 0;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) packed |= static_cast<uint32_t>(fp8_e4m3_from_float(v[i] / scale)) << (8 * i);
  reinterpret_cast<uint32_t*>(q + g * kFp8Group)[lane] = packed;
  if (lane == 0) scales[g] = scale;
}

template <typename T>
__global__ void dequantize_kernel(const uint8_t* __restrict__ q, const float* __restrict__ scales, int64_t groups,
                                  T* __restrict__ out) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (g >= groups) return;
  const int lane = threadIdx.x % 32;
  const float scale = scales[g];
  const uint32_t packed = reinterpret_cast<const uint32_t*>(q + g * kFp8Group)[lane];
  Vec<T, kPerLane> o;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    o.v[i] = Num<T>::from(fp8_e4m3_to_float(static_cast<uint8_t>(packed >> (8 * i))) * scale);
  }
  reinterpret_cast<Vec<T, kPerLane>*>(out + g * kFp8Group)[lane] = o;
}

// The dequantizing permutation: one warp per FP8 row, a lane per 16 values (one 16-byte load),
// the row's values written dequantized to each of its destination rows; each FP8 row is read
// once. The same arithmetic as dequantize_kernel, so it equals dequantize-then-permute.
template <typename T>
__global__ void scatter_fp8_rows_kernel(const uint8_t* __restrict__ q, int64_t q_pitch,
                                        const float* __restrict__ scales, int64_t scale_pitch, int64_t rows,
                                        int64_t hidden, const int32_t* __restrict__ row_id_map, int32_t slots,
                                        T* __restrict__ dst) {
  constexpr int kChunk = 16;  // values per lane access
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const int32_t* dests = row_id_map + row * slots;
  const uint4* in = reinterpret_cast<const uint4*>(q + row * q_pitch);
  const float* row_scales = scales + row * scale_pitch;
  const int64_t chunks = hidden / kChunk;
  for (int64_t c = lane; c < chunks; c += 32) {
    const uint4 raw = in[c];
    const float scale = row_scales[c / (kFp8Group / kChunk)];
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(&raw);
    Vec<T, kChunk> out;
#pragma unroll
    for (int i = 0; i < kChunk; ++i) out.v[i] = Num<T>::from(fp8_e4m3_to_float(bytes[i]) * scale);
    for (int32_t s = 0; s < slots; ++s) {
      const int32_t d = __ldg(dests + s);
      if (d >= 0) reinterpret_cast<Vec<T, kChunk>*>(dst + static_cast<int64_t>(d) * hidden)[c] = out;
    }
  }
}

}  // namespace

cudaError_t quantize_fp8(DType dtype, const void* x, int64_t groups, uint8_t* q, float* scales,
                         cudaStream_t stream) {
  if (groups == 0) return cudaSuccess;
  const unsigned grid = grid_for(groups, kWarpsPerBlock);
  const int block = 32 * kWarpsPerBlock;
  switch (dtype) {
    case kFloat32: quantize_kernel<<<grid, block, 0, stream>>>(static_cast<const float*>(x), groups, q, scales); break;
    case kFloat16: quantize_kernel<<<grid, block, 0, stream>>>(static_cast<const __half*>(x), groups, q, scales); break;
    case kBFloat16:
      quantize_kernel<<<grid, block, 0, stream>>>(static_cast<const __nv_bfloat16*>(x), groups, q, scales);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t dequantize_fp8(DType dtype, const uint8_t* q, const float* scales, int64_t groups, void* out,
                           cudaStream_t stream) {
  if (groups == 0) return cudaSuccess;
  const unsigned grid = grid_for(groups, kWarpsPerBlock);
  const int block = 32 * kWarpsPerBlock;
  switch (dtype) {
    case kFloat32: dequantize_kernel<<<grid, block, 0, stream>>>(q, scales, groups, static_cast<float*>(out)); break;
    case kFloat16: dequantize_kernel<<<grid, block, 0, stream>>>(q, scales, groups, static_cast<__half*>(out)); break;
    case kBFloat16:
      dequantize_kernel<<<grid, block, 0, stream>>>(q, scales, groups, static_cast<__nv_bfloat16*>(out));
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t scatter_fp8_rows(DType dtype, const uint8_t* q, int64_t q_pitch, const float* scales, int64_t scale_pitch,
                             int64_t rows, int64_t hidden, const int32_t* row_id_map, int32_t slots, void* dst,
                             cudaStream_t stream) {
  if (rows == 0 || hidden == 0) return cudaSuccess;
  const unsigned grid = grid_for(rows, kWarpsPerBlock);
  const int block = 32 * kWarpsPerBlock;
  switch (dtype) {
    case kFloat32:
      scatter_fp8_rows_kernel<<<grid, block, 0, stream>>>(q, q_pitch, scales, scale_pitch, rows, hidden, row_id_map,
                                                          slots, static_cast<float*>(dst));
      break;
    case kFloat16:
      scatter_fp8_rows_kernel<<<grid, block, 0, stream>>>(q, q_pitch, scales, scale_pitch, rows, hidden, row_id_map,
                                                          slots, static_cast<__half*>(dst));
      break;
    case kBFloat16:
      scatter_fp8_rows_kernel<<<grid, block, 0, stream>>>(q, q_pitch, scales, scale_pitch, rows, hidden, row_id_map,
                                                          slots, static_cast<__nv_bfloat16*>(dst));
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace flexdispatch
