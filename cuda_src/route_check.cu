// Route validation in one pass, with no host sync: indices [R, K] (and, optionally, their probs
// [R, K]) -> a copy with out-of-range entries and entries with a non-finite prob replaced by -1,
// and a status word pair: OR of the ErrorBits found, and a caller's flag value written when
// anything was found (so a later kernel can add it somewhere without a branch on the host).
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

template <typename Index>
cudaError_t launch(const void* indices, const void* probs, int32_t prob_kind, int64_t rows, int32_t slots,
                   int32_t num_experts, int32_t flag, int64_t* clean, int32_t* status, void* host_word,
                   cudaStream_t stream) {
  const int64_t total = rows * slots;
  if (total <= kOneBlockEntries) {  // (an empty route too: its status is written zero)
    const int threads = static_cast<int>(std::clamp<int64_t>(round_up(total, 32), 32, kOneBlockThreads));
    check_route_kernel<Index, true><<<1, threads, 0, stream>>>(static_cast<const Index*>(indices), probs,
                                                               prob_kind, rows, slots, num_experts, flag,
                                                               clean, status, static_cast<int32_t*>(host_word));
    return cudaGetLastError();
  }
  const cudaError_t zeroed = cudaMemsetAsync(status, 0, 2 * sizeof(int32_t), stream);  // (no fill kernel)
  if (zeroed != cudaSuccess) return zeroed;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(grid_for(total, kThreads), 4096));
  check_route_kernel<Index, false><<<blocks, kThreads, 0, stream>>>(static_cast<const Index*>(indices), probs,
                                                                    prob_kind, rows, slots, num_experts, flag,
                                                                    clean, status, nullptr);
  const cudaError_t launched = cudaGetLastError();
  if (launched != cudaSuccess || host_word == nullptr) return launched;
  return store_word(status, sizeof(int32_t), host_word, stream);  // (after every block has ORed in)
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

}  // namespace cuda
}  // namespace flexdispatch
