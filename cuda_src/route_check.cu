// Route validation in one pass, with no host sync: indices [R, K] (and, optionally, their probs
// [R, K]) -> a copy with out-of-range entries and entries with a non-finite prob replaced by -1,
// and a status word pair: OR of the ErrorBits found, and a caller's flag value written when
// anything was found (so a later kernel can add it somewhere without a branch on the host).
// The router's top-k of dense probs [R, E] is checked in the pass that selects it (route_topk).
#include <algorithm>

#include "common.cuh"
#include "launch.h"

namespace flexdispatch {
namespace cuda {
namespace {

constexpr int kThreads = 256;
// A route of at most this many entries is checked by one block, which stores the status words
// itself: no zeroing before the kernel (a launch of its own), no atomics across blocks.
constexpr int64_t kOneBlockEntries = 8192;
constexpr int kOneBlockThreads = 1024;

template <typename Prob>
__device__ __forceinline__ bool finite_at(const void* probs, int64_t i) {
  return isfinite(static_cast<const Prob*>(probs)[i]);
}

// Every thread's error bits `bad` into the status words (see check_route_kernel): written
// by the one block, or OR-ed in by the blocks of a larger launch (status zeroed before it).
template <bool OneBlock>
__device__ __forceinline__ void report_status(int32_t bad, int32_t flag, int32_t* status, int32_t* host_word) {
  for (int offset = 16; offset > 0; offset >>= 1) bad |= __shfl_xor_sync(kFullMask, bad, offset);
  if constexpr (OneBlock) {
    __shared__ int32_t block_bad;
    if (threadIdx.x == 0) block_bad = 0;
    __syncthreads();
    if (bad && threadIdx.x % 32 == 0) atomicOr(&block_bad, bad);
    __syncthreads();
    if (threadIdx.x == 0) {
      status[0] = block_bad;
      status[1] = block_bad ? flag : 0;
      if (host_word != nullptr) *reinterpret_cast<volatile int32_t*>(host_word) = block_bad;
    }
  } else if (bad && threadIdx.x % 32 == 0) {
    atomicOr(status, bad);
    status[1] = flag;  // every writer stores the same value
  }
}

// prob_kind: 0 no probs, 1 float32, 2 float64. OneBlock: the launch is one block, which writes
// both status words, and status[0] to host_word too (a pinned word's device mapping; null:
// none); else they are zeroed before the launch and ORed into.
template <typename Index, bool OneBlock>
__global__ void check_route_kernel(const Index* __restrict__ indices, const void* __restrict__ probs,
                                   int32_t prob_kind, int64_t rows, int32_t slots, int32_t num_experts,
                                   int32_t flag, int64_t* __restrict__ clean, int32_t* __restrict__ status,
                                   int32_t* host_word) {
  // One element per thread, grid-stride: coalesced reads and writes; the duplicate scan reads
  // the earlier slots of the same row, which sit in the same or a neighbouring cache line.
  int32_t bad = 0;
  const int64_t total = rows * slots;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    int64_t e = indices[i];
    if (e < -1 || e >= num_experts) {
      bad |= kIndexOutOfRange;
      e = -1;
    } else if (e >= 0) {
      const int64_t first = i - i % slots;
      for (int64_t j = first; j < i; ++j) {
        if (indices[j] == e) bad |= kDuplicateIndex;
      }
      const bool finite = prob_kind == 0 || (prob_kind == 1 ? finite_at<float>(probs, i) : finite_at<double>(probs, i));
      if (!finite) {
        bad |= kNonFiniteProb;
        e = -1;
      }
    }
    clean[i] = e;
  }
  report_status<OneBlock>(bad, flag, status, host_word);
}

// The router's top-k of probs [rows, experts], a group of `lanes` lanes a row (a power of two
// up to 32, lanes within one warp). Lane l of a group walks experts l, l + lanes, ... (kUnroll
// loads in flight; a warp's loads cover whole stretches of its rows), keeping its own k best
// sorted in registers (start_top, keep_top); then the group merges its lists in k rounds: every
// lane offers the best it has not given yet, the group takes the one ranking highest
// (shuffles; the order is total, so every lane agrees), and the lane that gave it writes it
// (write_choice) and moves on. One lane a row needs no shuffle; 32 spread a wide row's loads.
// Non-finite choices are reported as check_route_kernel reports given indices.
template <typename T, int KMax, bool OneBlock>
__global__ void route_topk_kernel(const T* __restrict__ probs, int64_t rows, int32_t experts, int32_t k, int lanes,
                                  int32_t flag, T* __restrict__ values, int64_t* __restrict__ indices,
                                  int64_t* __restrict__ clean, int32_t* __restrict__ status, int32_t* host_word) {
  using Acc = std::conditional_t<sizeof(T) == 8, double, float>;
  constexpr int kUnroll = 4;
  const int sub = threadIdx.x % lanes;
  const int group_in_warp = threadIdx.x % 32 / lanes;
  const int64_t groups = int64_t(gridDim.x) * (blockDim.x / lanes);
  int32_t bad = 0;
  // (the loop runs while the warp's first row is in range, so that a warp's lanes take the
  // same turns and every shuffle has the whole warp; a group past the last row offers nothing)
  for (int64_t r = int64_t(blockIdx.x) * (blockDim.x / lanes) + threadIdx.x / lanes; r - group_in_warp < rows;
       r += groups) {
    const bool active = r < rows;
    const T* row = probs + (active ? r : 0) * experts;
    Acc best[KMax];
    int32_t at[KMax];
    start_top<KMax>(k, best, at);
    for (int32_t e0 = active ? sub : experts; e0 < experts; e0 += lanes * kUnroll) {
      Acc v[kUnroll];
#pragma unroll
      for (int j = 0; j < kUnroll; ++j) v[j] = e0 + lanes * j < experts ? to_acc<Acc>(row[e0 + lanes * j]) : Acc(0);
#pragma unroll
      for (int j = 0; j < kUnroll; ++j) {
        if (e0 + lanes * j < experts) keep_top<KMax>(v[j], e0 + lanes * j, best, at);
      }
    }
    int next = KMax - k;  // (this lane's best not given yet; KMax: none left)
    for (int i = 0; i < k; ++i) {
      Acc mine = -INFINITY;
      int32_t mine_at = INT32_MAX;  // (nothing to offer: below any entry)
#pragma unroll
      for (int s = 0; s < KMax; ++s) {
        if (s == next) {
          mine = best[s];
          mine_at = at[s];
        }
      }
      Acc top = mine;
      int32_t top_at = mine_at;
      for (int offset = lanes / 2; offset > 0; offset >>= 1) {
        const Acc other = __shfl_xor_sync(kFullMask, top, offset);
        const int32_t other_at = __shfl_xor_sync(kFullMask, top_at, offset);
        if (ranks_above(other, other_at, top, top_at)) {
          top = other;
          top_at = other_at;
        }
      }
      if (mine_at == top_at) {  // (experts are distinct: only the giver's lane matches)
        ++next;
        if (active) bad |= write_choice(row, top, top_at, r * k + i, values, indices, clean);
      }
    }
  }
  report_status<OneBlock>(bad, flag, status, host_word);
}

// How a route check of `items` threads is launched: as one block when one_block (at most
// kOneBlockThreads), which writes the status itself (and host_word, if any): one launch; else
// blocks of per_block threads, the status zeroed first, the blocks OR into it, and a one-thread
// kernel stores it to host_word. launch(one_block, blocks, threads) launches the kernel.
template <typename Launch>
cudaError_t launch_check(int64_t items, bool one_block, int per_block, int32_t* status, void* host_word,
                         cudaStream_t stream, Launch&& launch) {
  if (one_block) {  // (an empty route too: its status is written zero)
    launch(true, 1u, static_cast<int>(std::clamp<int64_t>(round_up(items, 32), 32, kOneBlockThreads)));
    return cudaGetLastError();
  }
  const cudaError_t zeroed = cudaMemsetAsync(status, 0, 2 * sizeof(int32_t), stream);  // (no fill kernel)
  if (zeroed != cudaSuccess) return zeroed;
  // (at least one block: a grid of none is a launch error; a block with nothing to do reports 0)
  launch(false, static_cast<unsigned>(std::clamp<int64_t>(grid_for(items, per_block), 1, 4096)), per_block);
  const cudaError_t launched = cudaGetLastError();
  if (launched != cudaSuccess || host_word == nullptr) return launched;
  return store_word(status, sizeof(int32_t), host_word, stream);  // (after every block has ORed in)
}

template <typename Index>
cudaError_t launch(const void* indices, const void* probs, int32_t prob_kind, int64_t rows, int32_t slots,
                   int32_t num_experts, int32_t flag, int64_t* clean, int32_t* status, void* host_word,
                   cudaStream_t stream) {
  const auto* route = static_cast<const Index*>(indices);
  return launch_check(rows * slots, rows * slots <= kOneBlockEntries, kThreads, status, host_word, stream,
                      [&](bool one_block, unsigned blocks, int threads) {
                        if (one_block) {
                          check_route_kernel<Index, true><<<blocks, threads, 0, stream>>>(
                              route, probs, prob_kind, rows, slots, num_experts, flag, clean, status,
                              static_cast<int32_t*>(host_word));
                        } else {
                          check_route_kernel<Index, false><<<blocks, threads, 0, stream>>>(
                              route, probs, prob_kind, rows, slots, num_experts, flag, clean, status, nullptr);
                        }
                      });
}

// Lanes a row of route_topk (a power of two up to 32): the fewest that leave each lane at most
// 4 experts to walk, where the routing is small; a larger one, past kTopkBusyThreads threads,
// gets fewer lanes, down to 16 experts a lane: with the SMs busy, each merge round costs more
// than the loads it spreads. (The constants are an H100 sweep's best: 8 to 1024 experts, 128 to
// 16384 rows.)
constexpr int64_t kTopkBusyThreads = 3 << 15;
// The one-block launch serves up to this many threads: more on one SM run slower than a grid,
// even with the status zeroed before and stored after.
constexpr int64_t kTopkOneBlockThreads = 512;

inline int topk_lanes(int64_t rows, int32_t experts) {
  const auto lanes_for = [&](int32_t per_lane) {
    int lanes = 1;
    while (lanes < 32 && int64_t(lanes) * per_lane < experts) lanes *= 2;
    return lanes;
  };
  int lanes = lanes_for(4);
  const int fewest = lanes_for(16);
  while (lanes > fewest && rows * lanes > kTopkBusyThreads) lanes /= 2;
  return lanes;
}

template <typename T, int KMax>
cudaError_t launch_topk(const void* probs, int64_t rows, int32_t experts, int32_t k, int32_t flag, void* values,
                        int64_t* indices, int64_t* clean, int32_t* status, void* host_word, cudaStream_t stream) {
  const int lanes = topk_lanes(rows, experts);
  const int64_t threads = round_up(rows * lanes, 32);
  const auto* p = static_cast<const T*>(probs);
  auto* v = static_cast<T*>(values);
  // One block where the launch is small (a few microseconds of loads, where the status's zeroing
  // and store would cost two launches more); else blocks of kThreads spread over the SMs. A
  // thread holds 2 * KMax words of top-k in registers, so the one block is also bounded by the
  // largest the compiled kernel can run (no launch bounds: those made the compiler spill).
  static const int one_block_limit = [] {
    cudaFuncAttributes attributes{};
    return cudaFuncGetAttributes(&attributes, route_topk_kernel<T, KMax, true>) == cudaSuccess
               ? std::min<int>(kTopkOneBlockThreads, attributes.maxThreadsPerBlock / 32 * 32)
               : 0;
  }();
  return launch_check(threads, threads <= one_block_limit, kThreads, status, host_word, stream,
                      [&](bool one_block, unsigned blocks, int block_threads) {
                        if (one_block) {
                          route_topk_kernel<T, KMax, true><<<blocks, block_threads, 0, stream>>>(
                              p, rows, experts, k, lanes, flag, v, indices, clean, status,
                              static_cast<int32_t*>(host_word));
                        } else {
                          route_topk_kernel<T, KMax, false><<<blocks, block_threads, 0, stream>>>(
                              p, rows, experts, k, lanes, flag, v, indices, clean, status, nullptr);
                        }
                      });
}

// One word (4 or 8 bytes) from device memory to a pinned host word through its device mapping.
__global__ void store_word_kernel(const void* src, int bytes, void* host_word) {
  wait_for_previous_grid();
  allow_next_grid();  // (the next call's count pass may be scheduled while this waits)
  if (bytes == 8) {
    *static_cast<volatile int64_t*>(host_word) = *static_cast<const int64_t*>(src);
  } else {
    *static_cast<volatile int32_t*>(host_word) = *static_cast<const int32_t*>(src);
  }
}

}  // namespace

cudaError_t store_word(const void* src, int bytes, void* host_word, cudaStream_t stream) {
  if (bytes != 4 && bytes != 8) return cudaErrorInvalidValue;
  return launch_after_previous(store_word_kernel, 1, 1, 0, stream, src, bytes, host_word);
}

cudaError_t check_route(const void* indices, bool indices_are_64bit, const void* probs, int32_t prob_kind,
                        int64_t rows, int32_t slots, int32_t num_experts, int32_t flag, int64_t* clean,
                        int32_t* status, void* host_word, cudaStream_t stream) {
  return indices_are_64bit
             ? launch<int64_t>(indices, probs, prob_kind, rows, slots, num_experts, flag, clean, status, host_word,
                               stream)
             : launch<int32_t>(indices, probs, prob_kind, rows, slots, num_experts, flag, clean, status, host_word,
                               stream);
}

cudaError_t route_topk(const void* probs, DType dtype, int64_t rows, int32_t experts, int32_t k, int32_t flag,
                       void* values, int64_t* indices, int64_t* clean, int32_t* status, void* host_word,
                       cudaStream_t stream) {
  if (k < 1 || k > kRouteTopkMax || k > experts || experts > kRouteTopkMaxExperts) return cudaErrorInvalidValue;
  return with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return k <= 8 ? launch_topk<T, 8>(probs, rows, experts, k, flag, values, indices, clean, status, host_word, stream)
                  : launch_topk<T, kRouteTopkMax>(probs, rows, experts, k, flag, values, indices, clean, status,
                                                  host_word, stream);
  });
}

}  // namespace cuda
}  // namespace flexdispatch
