// FP8 rows: quantization, its inverse, and the dequantizing permutation. A quantizing thread
// owns 16 values, so a group of kFp8Group (128) values is 8 neighbouring lanes and its amax
// takes three shuffles; a dequantizing thread owns the values of one 16-byte store. On sm_89
// and later the e4m3 conversions are the hardware's (two values an instruction); earlier
// architectures, and groups whose scale is not finite (NaN or inf inputs), take the bit-exact
// software conversion of flexdispatch.h. Both give the bits of cpu/fp8_cpu.cpp.
#include "common.cuh"
#include "fp8.cuh"
#include "launch.h"
#include "plan.cuh"

namespace flexdispatch {
namespace cuda {
namespace {

constexpr int kBlock = 256;
constexpr int kQuantVals = 16;                       // values a quantizing thread owns
constexpr int kQuantLanes = kFp8Group / kQuantVals;  // lanes sharing one group (8)
constexpr int kQuantUnroll = 2;                      // chunks whose loads a thread issues first
constexpr int kDequantUnroll = 8;                    // units whose loads a thread issues first

__device__ __forceinline__ float nan_max(float a, float b) { return (b > a || b != b) ? b : a; }

// e4m3 bits of two values of at most 448 (1 + 2^-23) in magnitude, round to nearest even,
// first value in the low byte.
__device__ __forceinline__ uint32_t encode_pair(float a, float b) {
#if FD_FP8_HARDWARE
  return __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
#else
  return fp8_e4m3_from_float(a) | (static_cast<uint32_t>(fp8_e4m3_from_float(b)) << 8);
#endif
}

// Thread t owns chunks t, t + stride, ... of kQuantVals values (the grid's stride is a
// multiple of 32, so a chunk's group-mates are lanes t ^ 1..7 of the same warp in every round).
// Lanes past the end still take part in the shuffles.
template <typename T>
__global__ void __launch_bounds__(kBlock) quantize_kernel(const T* __restrict__ x, int64_t chunks,
                                                          uint8_t* __restrict__ q, float* __restrict__ scales) {
  constexpr int kLoads = kQuantVals * sizeof(T) / 16;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  uint4 raw[kQuantUnroll][kLoads];
#pragma unroll
  for (int u = 0; u < kQuantUnroll; ++u) {
    const int64_t c = c0 + u * stride;
#pragma unroll
    for (int l = 0; l < kLoads; ++l) {
      raw[u][l] = c < chunks ? reinterpret_cast<const uint4*>(x)[c * kLoads + l] : make_uint4(0, 0, 0, 0);
    }
  }
#pragma unroll
  for (int u = 0; u < kQuantUnroll; ++u) {
    const int64_t c = c0 + u * stride;
    const T* vals = reinterpret_cast<const T*>(raw[u]);
    float v[kQuantVals];
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < kQuantVals; ++i) {
      v[i] = Num<T>::to_float(vals[i]);
      amax = nan_max(amax, fabsf(v[i]));
    }
#pragma unroll
    for (int o = kQuantLanes / 2; o > 0; o /= 2) amax = nan_max(amax, __shfl_xor_sync(kFullMask, amax, o));
    if (c >= chunks) continue;
    if (amax < kFp8MinAmax) amax = kFp8MinAmax;
    const float scale = amax / kFp8Max;  // IEEE division (no fast-math): the CPU's bits
    uint32_t words[kQuantVals / 4];
    if (isfinite(scale)) {  // every v / scale lies within +-448 (1 + 2^-23)
#pragma unroll
      for (int i = 0; i < kQuantVals / 4; ++i) {
        words[i] = encode_pair(v[4 * i] / scale, v[4 * i + 1] / scale) |
                   (encode_pair(v[4 * i + 2] / scale, v[4 * i + 3] / scale) << 16);
      }
    } else {  // NaN or inf in the group: the software conversion keeps NaN's sign
#pragma unroll
      for (int i = 0; i < kQuantVals / 4; ++i) {
        words[i] = 0;
#pragma unroll
        for (int b = 0; b < 4; ++b) words[i] |= static_cast<uint32_t>(fp8_e4m3_from_float(v[4 * i + b] / scale)) << (8 * b);
      }
    }
    reinterpret_cast<uint4*>(q)[c] = make_uint4(words[0], words[1], words[2], words[3]);
    if (threadIdx.x % kQuantLanes == 0) scales[c / kQuantLanes] = scale;
  }
}

// A thread per unit (the values of one 16-byte store), kDequantUnroll units a grid's width
// apart (neighbouring threads read neighbouring bytes), all loaded before any is converted.
template <typename T>
__global__ void __launch_bounds__(kBlock) dequantize_kernel(const uint8_t* __restrict__ q,
                                                            const float* __restrict__ scales, int64_t units,
                                                            T* __restrict__ out) {
  using U = Unit<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  typename U::Bytes raw[kDequantUnroll];
  float scale[kDequantUnroll];
#pragma unroll
  for (int u = 0; u < kDequantUnroll; ++u) {
    const int64_t c = c0 + u * stride;
    if (c < units) {
      raw[u] = reinterpret_cast<const typename U::Bytes*>(q)[c];
      scale[u] = scales[c / (kFp8Group / U::kVals)];
    }
  }
#pragma unroll
  for (int u = 0; u < kDequantUnroll; ++u) {
    const int64_t c = c0 + u * stride;
    if (c >= units) break;
    reinterpret_cast<typename U::Out*>(out)[c] = decode_unit<T>(raw[u], scale[u]);
  }
}

// The dequantizing permutation: a block of kSegmentThreads threads per segment of a row (one
// unit a thread, the segments of every row grid-strided), each unit converted once and written
// to each of the row's destinations. The same arithmetic as dequantize_kernel, so it equals
// dequantize-then-permute. Many small blocks keep more loads in flight than a warp walking a
// whole row, as in the bf16 scatter (rows.cu). With addrs, row r is read at addrs[r] (its
// `hidden` FP8 bytes, then its scales; 0: no row), in a peer's buffer for the NVLink manager;
// rows are taken from first_row on, round to the start (see copy_rows_from). Streaming stores,
// as in the bf16 scatter. Blocks past scatter_blocks (when the launch has any) zero the
// output's unused tail instead, as the bf16 scatter's do.
constexpr int kSegmentThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kSegmentThreads) scatter_fp8_rows_kernel(
    const uint8_t* __restrict__ q, int64_t q_pitch, const float* __restrict__ scales, int64_t scale_pitch,
    const int64_t* __restrict__ addrs, int64_t rows, int64_t hidden, const int32_t* __restrict__ row_id_map,
    int32_t slots, int64_t first_row, T* __restrict__ dst, int64_t scatter_blocks, TailRows tail) {
  wait_for_previous_grid();
  allow_next_grid();
  if (blockIdx.x >= scatter_blocks) {
    finish_tail<uint4>(tail, blockIdx.x - scatter_blocks, gridDim.x - scatter_blocks, reinterpret_cast<char*>(dst),
                       hidden * static_cast<int64_t>(sizeof(T)));
    return;
  }
  using U = Unit<T>;
  const int64_t units = hidden / U::kVals;
  const int64_t segments = (units + kSegmentThreads - 1) / kSegmentThreads;
  // Block b takes (row, segment) pairs b, b + blocks, ...; the pair advances without a division.
  const int64_t step_rows = scatter_blocks / segments, step_segments = scatter_blocks % segments;
  int64_t k = blockIdx.x / segments, segment = blockIdx.x % segments;
  for (; k < rows; k += step_rows + (segment + step_segments >= segments),
                   segment += step_segments - (segment + step_segments >= segments ? segments : 0)) {
    const int64_t c = segment * kSegmentThreads + threadIdx.x;
    const int64_t row = k < rows - first_row ? k + first_row : k + first_row - rows;
    const uint8_t* row_q = q + row * q_pitch;
    const float* row_scales = scales + row * scale_pitch;
    if (addrs != nullptr) {
      if (addrs[row] == 0) continue;  // (the whole block: one row)
      row_q = reinterpret_cast<const uint8_t*>(addrs[row]);
      row_scales = reinterpret_cast<const float*>(row_q + hidden);
    }
    if (c >= units) continue;
    const typename U::Out out = decode_unit<T>(reinterpret_cast<const typename U::Bytes*>(row_q)[c],
                                               row_scales[c / (kFp8Group / U::kVals)]);
    const int32_t* dests = row_id_map + row * slots;
    for (int32_t s = 0; s < slots; ++s) {
      const int32_t d = __ldg(dests + s);
      if (d >= 0) __stcs(reinterpret_cast<uint4*>(dst + static_cast<int64_t>(d) * hidden) + c,
                         *reinterpret_cast<const uint4*>(&out));
    }
  }
}

template <template <typename> class Launch, typename... Args>
cudaError_t by_dtype(DType dtype, Args&&... args) {
  switch (dtype) {
    case kFloat32: Launch<float>::run(args...); break;
    case kFloat16: Launch<__half>::run(args...); break;
    case kBFloat16: Launch<__nv_bfloat16>::run(args...); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename T>
struct Quantize {
  static void run(const void* x, int64_t groups, uint8_t* q, float* scales, cudaStream_t stream) {
    const int64_t chunks = groups * kQuantLanes;
    quantize_kernel<<<grid_for(chunks, kBlock * kQuantUnroll), kBlock, 0, stream>>>(static_cast<const T*>(x), chunks,
                                                                                    q, scales);
  }
};

template <typename T>
struct Dequantize {
  static void run(const uint8_t* q, const float* scales, int64_t groups, void* out, cudaStream_t stream) {
    const int64_t units = groups * (kFp8Group / Unit<T>::kVals);
    dequantize_kernel<<<grid_for(units, kBlock * kDequantUnroll), kBlock, 0, stream>>>(q, scales, units,
                                                                                      static_cast<T*>(out));
  }
};

template <typename T>
struct ScatterFp8 {
  static void run(const uint8_t* q, int64_t q_pitch, const float* scales, int64_t scale_pitch, const int64_t* addrs,
                  int64_t rows, int64_t hidden, const int32_t* row_id_map, int32_t slots, void* dst,
                  int64_t max_blocks, int64_t first_row, const TailRows* tail, bool* tail_done, cudaStream_t stream) {
    const int64_t units = hidden / Unit<T>::kVals;
    int64_t blocks = std::min<int64_t>(rows * ((units + kSegmentThreads - 1) / kSegmentThreads), INT32_MAX);
    // (max_blocks: the NVLink SM budget, one block an SM, as for the other transfer kernels;
    // a capped launch leaves the tail to a launch of its own)
    if (max_blocks > 0 && blocks > max_blocks) blocks = max_blocks;
    const int64_t tail_blocks = tail != nullptr && max_blocks <= 0 ? tail_blocks_for(tail->num_out) : 0;
    *tail_done = tail_blocks > 0 && blocks + tail_blocks <= INT32_MAX;
    launch_after_previous(scatter_fp8_rows_kernel<T>, dim3(static_cast<unsigned>(blocks + (*tail_done ? tail_blocks : 0))),
                          dim3(kSegmentThreads), 0, stream, q, q_pitch, scales, scale_pitch, addrs, rows, hidden,
                          row_id_map, slots, first_row, static_cast<T*>(dst), blocks,
                          *tail_done ? *tail : TailRows{nullptr, 0, 0, nullptr, 4, nullptr});
  }
};

}  // namespace

cudaError_t quantize_fp8(DType dtype, const void* x, int64_t groups, uint8_t* q, float* scales,
                         cudaStream_t stream) {
  if (groups == 0) return cudaSuccess;
  return by_dtype<Quantize>(dtype, x, groups, q, scales, stream);
}

cudaError_t dequantize_fp8(DType dtype, const uint8_t* q, const float* scales, int64_t groups, void* out,
                           cudaStream_t stream) {
  if (groups == 0) return cudaSuccess;
  return by_dtype<Dequantize>(dtype, q, scales, groups, out, stream);
}

cudaError_t scatter_fp8_rows(DType dtype, const uint8_t* q, int64_t q_pitch, const float* scales, int64_t scale_pitch,
                             const int64_t* addrs, int64_t rows, int64_t hidden, const int32_t* row_id_map,
                             int32_t slots, void* dst, int64_t max_blocks, int64_t first_row, const TailRows* tail,
                             bool* tail_done, cudaStream_t stream) {
  *tail_done = false;
  if (rows == 0 || hidden == 0) return cudaSuccess;
  if (first_row < 0 || first_row >= rows) first_row = 0;
  return by_dtype<ScatterFp8>(dtype, q, q_pitch, scales, scale_pitch, addrs, rows, hidden, row_id_map, slots, dst,
                              max_blocks, first_row, tail, tail_done, stream);
}

}  // namespace cuda
}  // namespace flexdispatch
