// FP8 rows: quantization (a warp per group of kFp8Group (128) values, four values a lane, the
// group's amax by warp shuffles), its inverse, and the dequantizing permutation. Each keeps
// several loads in flight per lane. Same arithmetic as cpu/fp8_cpu.cpp.
#include "common.cuh"
#include "launch.h"

namespace flexdispatch {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kPerLane = kFp8Group / 32;  // 4 values of a group per lane in the quantizer
constexpr int kGroupsPerWarp = 8;         // groups whose loads a quantizing warp issues before reducing
constexpr int kChunk = 16;                // FP8 values per 16-byte access (dequantizer, permutation)
constexpr int kUnroll = 4;                // 16-byte loads in flight per thread

__device__ __forceinline__ float nan_max(float a, float b) { return (b > a || b != b) ? b : a; }

// One warp per kGroupsPerWarp consecutive groups: every group's loads are issued first (so a
// lane keeps kGroupsPerWarp loads in flight), then each group's amax is reduced by shuffles.
template <typename T>
__global__ void quantize_kernel(const T* __restrict__ x, int64_t groups, uint8_t* __restrict__ q,
                                float* __restrict__ scales) {
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32) * kGroupsPerWarp;
  if (first >= groups) return;  // (the same for the whole warp)
  const int lane = threadIdx.x % 32;
  Vec<T, kPerLane> in[kGroupsPerWarp];
#pragma unroll
  for (int u = 0; u < kGroupsPerWarp; ++u) {
    if (first + u < groups) in[u] = reinterpret_cast<const Vec<T, kPerLane>*>(x + (first + u) * kFp8Group)[lane];
  }
#pragma unroll
  for (int u = 0; u < kGroupsPerWarp; ++u) {
    const int64_t g = first + u;
    if (g >= groups) break;  // (warp-uniform: every lane takes part in the shuffles)
    float v[kPerLane];
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      v[i] = Num<T>::to_float(in[u].v[i]);
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
}

// A thread per 16 values, kUnroll of them (a grid's width apart, so that neighbouring threads
// read neighbouring bytes) loaded before any is converted.
template <typename T>
__global__ void dequantize_kernel(const uint8_t* __restrict__ q, const float* __restrict__ scales, int64_t chunks,
                                  T* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  uint4 raw[kUnroll];
  float scale[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t c = c0 + u * stride;
    if (c < chunks) {
      raw[u] = reinterpret_cast<const uint4*>(q)[c];
      scale[u] = scales[c / (kFp8Group / kChunk)];
    }
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t c = c0 + u * stride;
    if (c >= chunks) break;
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(&raw[u]);
    Vec<T, kChunk> o;
#pragma unroll
    for (int i = 0; i < kChunk; ++i) o.v[i] = Num<T>::from(fp8_e4m3_to_float(bytes[i]) * scale[u]);
    reinterpret_cast<Vec<T, kChunk>*>(out)[c] = o;
  }
}

// The dequantizing permutation: one warp per FP8 row, a lane per 16 values (one 16-byte load),
// the row's values written dequantized to each of its destination rows; each FP8 row is read
// once. The same arithmetic as dequantize_kernel, so it equals dequantize-then-permute.
template <typename T>
__global__ void scatter_fp8_rows_kernel(const uint8_t* __restrict__ q, int64_t q_pitch,
                                        const float* __restrict__ scales, int64_t scale_pitch, int64_t rows,
                                        int64_t hidden, const int32_t* __restrict__ row_id_map, int32_t slots,
                                        T* __restrict__ dst) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const int32_t* dests = row_id_map + row * slots;
  const uint4* in = reinterpret_cast<const uint4*>(q + row * q_pitch);
  const float* row_scales = scales + row * scale_pitch;
  const int64_t chunks = hidden / kChunk;
  for (int64_t c0 = lane; c0 < chunks; c0 += 32 * kUnroll) {
    uint4 raw[kUnroll];  // kUnroll loads in flight before the first store
    float scale[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = c0 + 32 * u;
      if (c < chunks) {
        raw[u] = in[c];
        scale[u] = row_scales[c / (kFp8Group / kChunk)];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = c0 + 32 * u;
      if (c >= chunks) break;
      const uint8_t* bytes = reinterpret_cast<const uint8_t*>(&raw[u]);
      Vec<T, kChunk> out;
#pragma unroll
      for (int i = 0; i < kChunk; ++i) out.v[i] = Num<T>::from(fp8_e4m3_to_float(bytes[i]) * scale[u]);
      for (int32_t s = 0; s < slots; ++s) {
        const int32_t d = __ldg(dests + s);
        if (d >= 0) reinterpret_cast<Vec<T, kChunk>*>(dst + static_cast<int64_t>(d) * hidden)[c] = out;
      }
    }
  }
}

}  // namespace

cudaError_t quantize_fp8(DType dtype, const void* x, int64_t groups, uint8_t* q, float* scales,
                         cudaStream_t stream) {
  if (groups == 0) return cudaSuccess;
  const unsigned grid = grid_for(groups, kWarpsPerBlock * kGroupsPerWarp);
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
  const int64_t chunks = groups * (kFp8Group / kChunk);
  const int block = 256;
  const unsigned grid = grid_for(chunks, block * kUnroll);
  switch (dtype) {
    case kFloat32: dequantize_kernel<<<grid, block, 0, stream>>>(q, scales, chunks, static_cast<float*>(out)); break;
    case kFloat16: dequantize_kernel<<<grid, block, 0, stream>>>(q, scales, chunks, static_cast<__half*>(out)); break;
    case kBFloat16:
      dequantize_kernel<<<grid, block, 0, stream>>>(q, scales, chunks, static_cast<__nv_bfloat16*>(out));
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
