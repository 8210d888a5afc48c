// Row movers: scatter (permute), gather (unpermute, deterministic sum), the gather's
// backward with probs, and zeroing of rows that no source fills (padding, unused tail).
#include <algorithm>

#include "common.cuh"
#include "launch.h"
#include "plan.cuh"

namespace flexdispatch {
namespace cuda {
namespace {

constexpr int kRowThreads = 128;  // threads on one row of a large-row kernel
constexpr int kUnroll = 4;        // independent 16-byte loads in flight per thread
constexpr int kSmallRowVecs = 64; // rows of fewer vectors use one thread per vector

// Warp 0 packs the valid slots of `row` (slot order kept) into shared arrays; returns their
// number to the whole block. `weights` (nullable) receives probs[row, slot] as Acc.
template <typename Acc, typename P>
__device__ int compact_slots(const int32_t* row_id_map, int32_t slots, int64_t row,
                             const P* probs, int32_t* dest, int32_t* slot_of, Acc* weights) {
  __shared__ int count;
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int base = 0;
    for (int32_t s0 = 0; s0 < slots; s0 += 32) {
      const int32_t s = s0 + lane;
      const int32_t d = s < slots ? row_id_map[row * slots + s] : -1;
      const unsigned ballot = __ballot_sync(kFullMask, d >= 0);
      if (d >= 0) {
        const int at = base + __popc(ballot & ((1u << lane) - 1u));
        dest[at] = d;
        if (slot_of != nullptr) slot_of[at] = s;
        if (weights != nullptr) weights[at] = probs ? to_acc<Acc>(probs[row * slots + s]) : Acc(1);
      }
      base += __popc(ballot);
    }
    if (lane == 0) count = base;
  }
  __syncthreads();
  return count;
}

// One warp per source row: every lane reads the row's few destinations itself (a broadcast
// load), so there is no shared memory and no block barrier before the first row load, and
// each lane keeps kUnroll 16-byte loads in flight. (A block-per-row kernel with compacted
// destinations, and evict-first stores, measured the same on an H200: docs/PERFORMANCE.md.)
constexpr int kWarpRowsPerBlock = 4;

template <typename V>
__global__ void scatter_rows_warp_kernel(const char* __restrict__ src, int64_t rows, int64_t row_bytes,
                                         const int32_t* __restrict__ row_id_map, int32_t slots,
                                         char* __restrict__ dst) {
  wait_for_previous_grid();
  allow_next_grid();
  const int64_t row = int64_t(blockIdx.x) * kWarpRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int32_t* dests = row_id_map + row * slots;
  const int64_t vecs = row_bytes / int64_t(sizeof(V));
  const V* in = reinterpret_cast<const V*>(src + row * row_bytes);
  for (int64_t v0 = lane; v0 < vecs; v0 += 32 * kUnroll) {
    V buf[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = v0 + 32 * u;
      if (v < vecs) buf[u] = in[v];
    }
    for (int32_t s = 0; s < slots; ++s) {
      const int32_t d = __ldg(dests + s);
      if (d < 0) continue;
      V* out = reinterpret_cast<V*>(dst + int64_t(d) * row_bytes);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = v0 + 32 * u;
        if (v < vecs) out[v] = buf[u];
      }
    }
  }
}

// Rows of kSmallRowVecs vectors or more: a block per kRowSegment vectors of one row (block b
// holds segment b % segments of row b / segments), a thread per vector, which it loads once and
// stores to each of the row's destinations. Many small blocks keep more loads and stores in
// flight across the GPU than a warp walking a whole row (92-93% of a copy against 89-90% for
// the warp per row, the scatter alone on one H100 at 16384 x 7168 and 32768 x 2048 bf16, K = 8).
// Its stores are streaming (evict-first): the rows are read by the next kernel, not this one,
// and keeping them out of the way of the loads gained about 1% at those shapes (one H100; two
// vectors a thread, or 256 threads a block, gained nothing).
// A row with more than kCompactSlots slots (a multihot map's row: E slots, K of them used) has
// its destinations compacted into shared memory first by the whole block, so that a thread
// stores K times instead of testing E slots for every vector. Their order is free (each
// destination receives the same vector), so every thread takes a share of the slots; the
// gather's compact_slots keeps slot order with one warp, and the scatter took 214 us with it
// against 197 us this way (4096 x 7168, E = 512, one H100).
constexpr int kRowSegment = 128;
constexpr int32_t kCompactSlots = 16;

// Blocks past scatter_blocks (when the launch has any) zero the output's unused tail instead,
// after every row, and store the error word: launches of their own cost the host two launches
// and the device their latency after the rows.
template <typename V, bool Compact>
__global__ void scatter_row_segments_kernel(const char* __restrict__ src, int64_t row_bytes, int64_t segments,
                                            const int32_t* __restrict__ row_id_map, int32_t slots,
                                            char* __restrict__ dst, int64_t scatter_blocks, TailRows tail) {
  wait_for_previous_grid();
  allow_next_grid();
  if (blockIdx.x >= scatter_blocks) {
    finish_tail<V>(tail, blockIdx.x - scatter_blocks, gridDim.x - scatter_blocks, dst, row_bytes);
    return;
  }
  extern __shared__ int32_t compacted[];
  const int64_t row = blockIdx.x / segments;
  const int64_t v = (blockIdx.x % segments) * kRowSegment + threadIdx.x;
  const int32_t* dests = row_id_map + row * slots;
  int32_t n = slots;
  if constexpr (Compact) {  // (before the bounds test: every thread reaches the barriers)
    __shared__ int32_t count;
    if (threadIdx.x == 0) count = 0;
    __syncthreads();
    for (int32_t s = threadIdx.x; s < slots; s += blockDim.x) {
      const int32_t d = dests[s];
      if (d >= 0) compacted[atomicAdd(&count, 1)] = d;
    }
    __syncthreads();
    n = count;
    dests = compacted;
  }
  if (v >= row_bytes / int64_t(sizeof(V))) return;
  const V x = reinterpret_cast<const V*>(src + row * row_bytes)[v];
  for (int32_t s = 0; s < n; ++s) {
    const int32_t d = Compact ? dests[s] : __ldg(dests + s);
    if (d >= 0) __stcs(reinterpret_cast<V*>(dst + int64_t(d) * row_bytes) + v, x);
  }
}

// Small rows (routing metadata, tiny hidden sizes): one thread per vector of the input.
template <typename V>
__global__ void scatter_small_rows_kernel(const char* __restrict__ src, int64_t rows,
                                          int64_t row_bytes, const int32_t* __restrict__ row_id_map,
                                          int32_t slots, char* __restrict__ dst) {
  wait_for_previous_grid();
  allow_next_grid();
  const int64_t vecs = row_bytes / int64_t(sizeof(V));
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * vecs) return;
  const int64_t row = i / vecs, v = i % vecs;
  const V x = reinterpret_cast<const V*>(src + row * row_bytes)[v];
  for (int32_t s = 0; s < slots; ++s) {
    const int32_t d = row_id_map[row * slots + s];
    if (d >= 0) reinterpret_cast<V*>(dst + int64_t(d) * row_bytes)[v] = x;
  }
}

// Block (e, y) zeroes pad rows y, y + gridDim.y, ... of expert e that lie below num_out (an
// output too small for the padding is flagged by the map; its pad rows past the end are not
// written).
template <typename V>
__global__ void zero_pad_rows_kernel(const int64_t* layout, int32_t experts, int64_t num_out, char* dst,
                                     int64_t row_bytes, char* probs_out, int prob_bytes) {
  wait_for_previous_grid();
  allow_next_grid();
  const int e = blockIdx.x;
  const int64_t start = layout[layout_offsets(experts) + e] + layout[layout_counts(experts) + e];
  const int64_t end = min(num_out, layout[layout_offsets(experts) + e] + layout[layout_padded(experts) + e]);
  zero_rows<V>(start, end, blockIdx.y, gridDim.y, dst, row_bytes, probs_out, prob_bytes);
}

template <typename V>
__global__ void zero_tail_rows_kernel(const int64_t* layout, int32_t experts, int64_t num_out,
                                      char* dst, int64_t row_bytes, char* probs_out, int prob_bytes) {
  wait_for_previous_grid();
  allow_next_grid();
  zero_rows<V>(layout[layout_offsets(experts) + experts], num_out, blockIdx.x, gridDim.x, dst, row_bytes, probs_out,
               prob_bytes);
}

template <typename T, typename P, typename Acc, int VecN>
__global__ void gather_rows_kernel(const T* __restrict__ src, int64_t hidden,
                                   const int32_t* __restrict__ row_id_map, int32_t slots,
                                   const P* __restrict__ probs, T* __restrict__ dst) {
  extern __shared__ int32_t dest[];
  Acc* weights = reinterpret_cast<Acc*>(dest + ((slots + 1) & ~1));  // 8-byte aligned
  const int64_t row = blockIdx.x;
  const int n = compact_slots<Acc, P>(row_id_map, slots, row, probs, dest, nullptr, weights);
  using VT = Vec<T, VecN>;
  const int64_t vecs = hidden / VecN;
  VT* out = reinterpret_cast<VT*>(dst + row * hidden);
  for (int64_t v = threadIdx.x; v < vecs; v += blockDim.x) {
    Acc acc[VecN];
#pragma unroll
    for (int j = 0; j < VecN; ++j) acc[j] = Acc(0);
    // Fixed slot order: the sum is the same on every run. Loads of kUnroll slots are issued
    // before their additions.
    for (int i0 = 0; i0 < n; i0 += kUnroll) {
      VT x[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (i0 + u < n) x[u] = reinterpret_cast<const VT*>(src + int64_t(dest[i0 + u]) * hidden)[v];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (i0 + u < n) {
          const Acc w = weights[i0 + u];
#pragma unroll
          for (int j = 0; j < VecN; ++j) acc[j] += w * to_acc<Acc>(x[u].v[j]);
        }
      }
    }
    VT y;
#pragma unroll
    for (int j = 0; j < VecN; ++j) y.v[j] = Num<T>::from(acc[j]);
    out[v] = y;
  }
}

template <typename Acc>
__device__ Acc block_sum(Acc x, Acc* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_down_sync(kFullMask, x, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  Acc total = Acc(0);
  if (threadIdx.x == 0) {
    for (int w = 0; w < int(blockDim.x / 32); ++w) total += scratch[w];  // fixed order
  }
  __syncthreads();
  return total;
}

template <typename T, typename P, typename Acc, int VecN>
__global__ void gather_rows_backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ src,
                                            int64_t hidden, const int32_t* __restrict__ row_id_map,
                                            int32_t slots, const P* __restrict__ probs,
                                            T* __restrict__ grad_src, P* __restrict__ grad_probs) {
  extern __shared__ int32_t dest[];
  int32_t* slot_of = dest + slots;
  Acc* weights = reinterpret_cast<Acc*>(dest + ((2 * slots + 1) & ~1));
  __shared__ Acc scratch[32];
  const int64_t row = blockIdx.x;
  const int n = compact_slots<Acc, P>(row_id_map, slots, row, probs, dest, slot_of, weights);
  using VT = Vec<T, VecN>;
  const int64_t vecs = hidden / VecN;
  const VT* g = reinterpret_cast<const VT*>(grad_out + row * hidden);
  for (int i = 0; i < n; ++i) {
    const VT* x = reinterpret_cast<const VT*>(src + int64_t(dest[i]) * hidden);
    VT* gx = reinterpret_cast<VT*>(grad_src + int64_t(dest[i]) * hidden);
    const Acc w = weights[i];
    Acc partial = Acc(0);
    for (int64_t v = threadIdx.x; v < vecs; v += blockDim.x) {
      const VT gv = g[v], xv = x[v];
      VT y;
#pragma unroll
      for (int j = 0; j < VecN; ++j) {
        const Acc gj = to_acc<Acc>(gv.v[j]);
        y.v[j] = Num<T>::from(w * gj);
        partial += gj * to_acc<Acc>(xv.v[j]);
      }
      gx[v] = y;
    }
    const Acc total = block_sum(partial, scratch);
    if (threadIdx.x == 0) grad_probs[row * slots + slot_of[i]] = static_cast<P>(total);
  }
}

// One thread per slot: out[i] = values[row_id_map[i]] for a placed slot, 0 for an unused one
// (V: the values' 4- or 8-byte bits).
template <typename V>
__global__ void gather_slots_kernel(const V* __restrict__ values, const int32_t* __restrict__ row_id_map,
                                    int64_t n, V* __restrict__ out) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int32_t d = row_id_map[i];
    out[i] = d >= 0 ? values[d] : V(0);
  }
}

// ---- launch helpers ---------------------------------------------------------------------

template <typename V>
cudaError_t scatter_as(const void* src, int64_t rows, int64_t row_bytes, const int32_t* row_id_map,
                       int32_t slots, void* dst, const TailRows* tail, bool* tail_done, cudaStream_t stream) {
  const int64_t vecs = row_bytes / int64_t(sizeof(V));
  if (vecs < kSmallRowVecs) {
    return launch_after_previous(scatter_small_rows_kernel<V>, grid_for(rows * vecs, 256), 256, 0, stream,
                                 static_cast<const char*>(src), rows, row_bytes, row_id_map, slots,
                                 static_cast<char*>(dst));
  } else if (const int64_t segments = (vecs + kRowSegment - 1) / kRowSegment,
             tail_blocks = tail != nullptr ? tail_blocks_for(tail->num_out) : 0;
             rows * segments + tail_blocks <= INT32_MAX) {
    const bool compact = slots > kCompactSlots;
    const auto kernel = compact ? scatter_row_segments_kernel<V, true> : scatter_row_segments_kernel<V, false>;
    const size_t smem = compact ? sizeof(int32_t) * slots : 0;
    const cudaError_t err = allow_dynamic_shared(kernel, smem);
    if (err != cudaSuccess) return err;
    *tail_done = tail_blocks > 0;
    return launch_after_previous(kernel, static_cast<unsigned>(rows * segments + tail_blocks), kRowSegment, smem,
                                 stream, static_cast<const char*>(src), row_bytes, segments, row_id_map, slots,
                                 static_cast<char*>(dst), rows * segments,
                                 tail != nullptr ? *tail : TailRows{nullptr, 0, 0, nullptr, 4, nullptr});
  } else {  // (more blocks than a grid holds)
    return launch_after_previous(scatter_rows_warp_kernel<V>, grid_for(rows, kWarpRowsPerBlock),
                                 kWarpRowsPerBlock * 32, 0, stream, static_cast<const char*>(src), rows, row_bytes,
                                 row_id_map, slots, static_cast<char*>(dst));
  }
}

template <typename V>
cudaError_t zero_as(const int64_t* layout, int32_t experts, bool padded, bool tail, void* dst,
                    int64_t num_out, int64_t row_bytes, void* probs_out, int prob_bytes,
                    cudaStream_t stream) {
  char* d = static_cast<char*>(dst);
  char* p = static_cast<char*>(probs_out);
  if (padded && experts > 0) {
    const cudaError_t err = launch_after_previous(zero_pad_rows_kernel<V>, dim3(experts, 8), kRowThreads, 0, stream,
                                                  layout, experts, num_out, d, row_bytes, p, prob_bytes);
    if (err != cudaSuccess) return err;
  }
  if (tail && num_out > 0) {
    return launch_after_previous(zero_tail_rows_kernel<V>, static_cast<unsigned>(tail_blocks_for(num_out)),
                                 kRowThreads, 0, stream, layout, experts, num_out, d, row_bytes, p, prob_bytes);
  }
  return cudaSuccess;
}

template <typename T, typename P>
cudaError_t gather_typed(const void* src, int64_t hidden, const int32_t* row_id_map, int32_t slots,
                         const void* probs, void* dst, int64_t rows, cudaStream_t stream) {
  using Acc = typename std::conditional<sizeof(T) == 8 || sizeof(P) == 8, double, float>::type;
  constexpr int kVec = 16 / sizeof(T);
  const size_t smem = ((slots + 1) & ~1) * sizeof(int32_t) + slots * sizeof(Acc);
  const bool vec = hidden % kVec == 0 && vector_bytes(16, src, dst) == 16;
  const auto kernel = vec ? gather_rows_kernel<T, P, Acc, kVec> : gather_rows_kernel<T, P, Acc, 1>;
  const cudaError_t err = allow_dynamic_shared(kernel, smem);  // (a multihot map's slots: up to E)
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(rows), kRowThreads, smem, stream>>>(
      static_cast<const T*>(src), hidden, row_id_map, slots, static_cast<const P*>(probs), static_cast<T*>(dst));
  return cudaGetLastError();
}

template <typename T, typename P>
cudaError_t gather_backward_typed(const void* grad_out, const void* src, int64_t hidden,
                                  const int32_t* row_id_map, int32_t slots, const void* probs,
                                  int64_t rows, void* grad_src, void* grad_probs, cudaStream_t stream) {
  using Acc = typename std::conditional<sizeof(T) == 8 || sizeof(P) == 8, double, float>::type;
  constexpr int kVec = 16 / sizeof(T);
  const size_t smem = ((2 * slots + 1) & ~1) * sizeof(int32_t) + slots * sizeof(Acc);
  const bool vec = hidden % kVec == 0 && vector_bytes(16, grad_out, src) == 16 &&
                   vector_bytes(16, grad_src, grad_src) == 16;
  const auto kernel = vec ? gather_rows_backward_kernel<T, P, Acc, kVec> : gather_rows_backward_kernel<T, P, Acc, 1>;
  const cudaError_t err = allow_dynamic_shared(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(rows), kRowThreads, smem, stream>>>(
      static_cast<const T*>(grad_out), static_cast<const T*>(src), hidden, row_id_map, slots,
      static_cast<const P*>(probs), static_cast<T*>(grad_src), static_cast<P*>(grad_probs));
  return cudaGetLastError();
}

}  // namespace

cudaError_t scatter_rows(const void* src, int64_t rows, int64_t row_bytes, const int32_t* row_id_map,
                         int32_t slots, void* dst, const TailRows* tail, bool* tail_done, cudaStream_t stream) {
  *tail_done = false;
  if (rows == 0 || row_bytes == 0) return cudaSuccess;
  return with_vector(row_bytes, src, dst, [&](auto v) {
    return scatter_as<decltype(v)>(src, rows, row_bytes, row_id_map, slots, dst, tail, tail_done, stream);
  });
}

cudaError_t zero_unused_rows(const int64_t* layout, int32_t num_experts, bool padded, bool tail,
                             void* dst, int64_t num_out, int64_t row_bytes, void* probs_out,
                             int prob_bytes, cudaStream_t stream) {
  if (num_out == 0 || (!padded && !tail)) return cudaSuccess;
  return with_vector(row_bytes, dst, dst, [&](auto v) {
    return zero_as<decltype(v)>(layout, num_experts, padded, tail, dst, num_out, row_bytes, probs_out, prob_bytes,
                                stream);
  });
}

cudaError_t gather_slots(const void* values, int value_bytes, const int32_t* row_id_map, int64_t n, void* out,
                         cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(grid_for(n, kThreads), 1024));
  if (value_bytes == 8) {
    gather_slots_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const uint64_t*>(values), row_id_map, n,
                                                       static_cast<uint64_t*>(out));
  } else if (value_bytes == 4) {
    gather_slots_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const uint32_t*>(values), row_id_map, n,
                                                       static_cast<uint32_t*>(out));
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t gather_rows(DType dtype, const void* src, int64_t hidden, const int32_t* row_id_map,
                        int32_t slots, const void* probs, int32_t prob_dtype, void* dst,
                        int64_t rows, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (probs != nullptr && prob_dtype != kFloat32 && prob_dtype != kFloat64) return cudaErrorInvalidValue;
  const bool probs64 = probs != nullptr && prob_dtype == kFloat64;
  return with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return probs64 ? gather_typed<T, double>(src, hidden, row_id_map, slots, probs, dst, rows, stream)
                   : gather_typed<T, float>(src, hidden, row_id_map, slots, probs, dst, rows, stream);
  });
}

cudaError_t gather_rows_backward(DType dtype, const void* grad_out, const void* src, int64_t hidden,
                                 const int32_t* row_id_map, int32_t slots, const void* probs,
                                 DType prob_dtype, int64_t rows, void* grad_src, void* grad_probs,
                                 cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (prob_dtype != kFloat32 && prob_dtype != kFloat64) return cudaErrorInvalidValue;
  return with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return prob_dtype == kFloat64
               ? gather_backward_typed<T, double>(grad_out, src, hidden, row_id_map, slots, probs,
                                                  rows, grad_src, grad_probs, stream)
               : gather_backward_typed<T, float>(grad_out, src, hidden, row_id_map, slots, probs,
                                                 rows, grad_src, grad_probs, stream);
  });
}

}  // namespace cuda
}  // namespace flexdispatch
