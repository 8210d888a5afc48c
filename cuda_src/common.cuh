// Device helpers shared by the kernels: element conversion, vector types, route reading.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <type_traits>
#include <utility>

#include "flexdispatch.h"

namespace flexdispatch {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// Accumulation type: float64 when either operand is float64, float32 otherwise.
template <typename T>
struct Num;
template <>
struct Num<float> {
  __device__ static float to_float(float x) { return x; }
  __device__ static double to_double(float x) { return x; }
  __device__ static float from(float x) { return x; }
  __device__ static float from(double x) { return static_cast<float>(x); }
};
template <>
struct Num<double> {
  __device__ static float to_float(double x) { return static_cast<float>(x); }
  __device__ static double to_double(double x) { return x; }
  __device__ static double from(float x) { return x; }
  __device__ static double from(double x) { return x; }
};
template <>
struct Num<__half> {
  __device__ static float to_float(__half x) { return __half2float(x); }
  __device__ static double to_double(__half x) { return __half2float(x); }
  __device__ static __half from(float x) { return __float2half_rn(x); }
  __device__ static __half from(double x) { return __double2half(x); }
};
template <>
struct Num<__nv_bfloat16> {
  __device__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static double to_double(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
  __device__ static __nv_bfloat16 from(double x) { return __double2bfloat16(x); }
};

template <typename Acc, typename T>
__device__ __forceinline__ Acc to_acc(T x) {
  if constexpr (sizeof(Acc) == 8) {
    return Num<T>::to_double(x);
  } else {
    return Num<T>::to_float(x);
  }
}

// Calls f(T{}) for the element type T named by dtype.
template <typename F>
cudaError_t with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case kFloat32: return f(float{});
    case kFloat16: return f(__half{});
    case kBFloat16: return f(__nv_bfloat16{});
    case kFloat64: return f(double{});
  }
  return cudaErrorInvalidValue;
}

// N elements of T moved as one aligned access (16 bytes when sizeof(T) * N == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Largest access width (16, 8, 4, 2 or 1 bytes) that divides the row and every base pointer.
inline int vector_bytes(int64_t row_bytes, const void* a, const void* b) {
  const uintptr_t bits = reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b);
  for (int w = 16; w > 1; w /= 2) {
    if (row_bytes % w == 0 && bits % w == 0) return w;
  }
  return 1;
}

// Calls f(V{}) with V the unsigned type of the widest access (16, 8, 4, 2 or 1 bytes) that
// divides the row and both base pointers.
template <typename F>
cudaError_t with_vector(int64_t row_bytes, const void* a, const void* b, F&& f) {
  switch (vector_bytes(row_bytes, a, b)) {
    case 16: return f(uint4{});
    case 8: return f(uint2{});
    case 4: return f(uint32_t{});
    case 2: return f(uint16_t{});
    default: return f(uint8_t{});
  }
}

// Expert of (row, slot), -1 for an unused slot: a top-k route's index, or for a multihot map
// the slot itself where its byte is set. No range check here: route_plan validates. (The
// multi-pass plan reads a multihot map by columns: route.cu's multihot_bits.)
template <int Kind>
__device__ __forceinline__ int64_t route_at(const Route& route, int64_t row, int32_t slot) {
  const int64_t i = row * route.slots + slot;
  if constexpr (Kind == kRouteIndex32) {
    return static_cast<const int32_t*>(route.data)[i];
  } else if constexpr (Kind == kRouteIndex64) {
    return static_cast<const int64_t*>(route.data)[i];
  } else {
    static_assert(Kind == kRouteMultihot, "a RouteKind");
    return static_cast<const uint8_t*>(route.data)[i] ? slot : -1;
  }
}

__device__ __forceinline__ void or_error(int64_t* error, int64_t bits) {
  atomicOr(reinterpret_cast<unsigned long long*>(error), static_cast<unsigned long long>(bits));
}

// Exclusive scan of one value per thread over the block (blockDim.x a multiple of 32, at most
// 1024). `scratch` holds 32 ints of shared memory. Returns the block total through *total.
__device__ __forceinline__ int64_t block_exclusive_scan(int64_t value, int64_t* scratch, int64_t* total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  int64_t x = value;
#pragma unroll
  for (int o = 1; o < 32; o *= 2) {
    const int64_t y = __shfl_up_sync(kFullMask, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) scratch[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int64_t w = lane < warps ? scratch[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o *= 2) {
      const int64_t y = __shfl_up_sync(kFullMask, w, o);
      if (lane >= o) w += y;
    }
    if (lane < warps) scratch[lane] = w;  // inclusive warp totals
  }
  __syncthreads();
  const int64_t before = (warp > 0 ? scratch[warp - 1] : 0) + x - value;
  *total = scratch[warps - 1];
  __syncthreads();  // scratch may be reused by the caller
  return before;
}

// Waits for a peer (over NVLink, through symmetric memory) spin for at most timeout_ns (the
// caller's, flexdispatch/managers/peer_buffers.py: peer_timeout_s), then trap: a peer that
// never arrives is then a CUDA error, not a hang.

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ void trap_after_timeout(uint64_t start, uint64_t timeout_ns, int32_t rank, int32_t peer,
                                                   const char* where) {
  if (global_ns() - start > timeout_ns) {
    printf("flexdispatch: rank %d waited %llu s for rank %d at %s (FLEXDISPATCH_PEER_TIMEOUT_S)\n", rank,
           static_cast<unsigned long long>(timeout_ns / 1000000000ull), peer, where);
    __trap();
  }
}

inline unsigned grid_for(int64_t n, int per_block) {
  return static_cast<unsigned>((n + per_block - 1) / per_block);
}

// A launch may use at most 48 KiB of shared memory, static and dynamic together, unless the
// kernel opts in to more. The plan's masks reach exactly 48 KiB (chunk_rows_for) beside a few
// static bytes, so a kernel asks for its dynamic bytes when they come near the default.
template <typename Kernel>
inline cudaError_t allow_dynamic_shared(Kernel* kernel, size_t bytes) {
  if (bytes + 1024 <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

// Programmatic dependent launch (sm_90 and later): the permutation's kernels follow each
// other on one stream, each reading what the previous one wrote. Launched with
// launch_after_previous, a kernel may be scheduled while its predecessor's last blocks still
// run; it calls wait_for_previous_grid before it reads anything its predecessor may write, and
// the wait returns once the predecessor has finished and its writes are visible.
// allow_next_grid lets the next such kernel be scheduled as soon as every block of this one
// has called it. A kernel that calls it only after its own wait guarantees its successor that
// everything before itself on the stream is complete: the plan's count pass does, so the map
// pass reads the op's inputs (the route, the probs) before its wait, while the count runs.
// Every other kernel waits before its first memory access. Both are no-ops without the launch
// attribute and before sm_90.
__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_next_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// The current device's `attribute`, asked once per device and kept in `known` (per device: 0
// until asked, then the value + 1); -1 where it cannot be asked (the error cleared, not left
// sticky: the caller takes its plain path).
inline int cached_device_attribute(cudaDeviceAttr attribute, std::atomic<int> (&known)[64]) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) {
    cudaGetLastError();
    return -1;
  }
  if (known[device].load() == 0) {
    int value = 0;
    if (cudaDeviceGetAttribute(&value, attribute, device) != cudaSuccess || value < 0) {
      cudaGetLastError();
      return -1;
    }
    known[device].store(value + 1);
  }
  return known[device].load() - 1;
}

// Whether the current device takes programmatic dependent launches (sm_90 and later; asked
// once per device).
inline bool device_overlaps_launches() {
  static std::atomic<int> major[64];
  return cached_device_attribute(cudaDevAttrComputeCapabilityMajor, major) >= 9;
}

// kernel<<<grid, block, smem, stream>>>(args...) with one launch attribute. Returns the launch's
// error.
template <typename... Params, typename... Args>
inline cudaError_t launch_with(cudaLaunchAttribute attribute, void (*kernel)(Params...), dim3 grid, dim3 block,
                               size_t smem, cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

// kernel<<<grid, block, smem, stream>>>(args...), allowed to be scheduled before the previous
// kernel on the stream has finished (see wait_for_previous_grid, which the kernel must call
// first). Returns the launch's error.
template <typename... Params, typename... Args>
inline cudaError_t launch_after_previous(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                         cudaStream_t stream, Args&&... args) {
  if (!device_overlaps_launches()) {
    kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
    return cudaGetLastError();
  }
  cudaLaunchAttribute overlap = {};
  overlap.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  overlap.val.programmaticStreamSerializationAllowed = 1;
  return launch_with(overlap, kernel, grid, block, smem, stream, std::forward<Args>(args)...);
}

}  // namespace cuda
}  // namespace flexdispatch
