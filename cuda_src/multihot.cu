// indices [R, K] + probs [R, K] -> multihot map [R, E] + probs [R, E], one warp per row.
#include "common.cuh"
#include "launch.h"

namespace flexdispatch {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 8;

// ProbBits: an unsigned integer as wide as a prob; probs are moved, never computed with.
template <typename Index, typename ProbBits>
__global__ void indices_to_multihot_kernel(const Index* __restrict__ indices,
                                           const ProbBits* __restrict__ probs, int64_t rows,
                                           int32_t slots, int32_t num_experts,
                                           uint8_t* __restrict__ map,
                                           ProbBits* __restrict__ probs_out, int64_t* error) {
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const Index* idx = indices + row * slots;
  const ProbBits* p = probs + row * slots;

  int64_t bad = 0;
  for (int k = lane; k < slots; k += 32) {
    const int64_t e = idx[k];
    if (e < -1 || e >= num_experts) {
      bad |= kIndexOutOfRange;
    } else if (e >= 0) {
      for (int j = 0; j < k; ++j) {
        if (idx[j] == e) bad |= kDuplicateIndex;
      }
    }
  }
  if (bad) or_error(error, bad);

  // Each lane owns experts lane, lane+32, ...: coalesced writes of the output row.
  for (int e = lane; e < num_experts; e += 32) {
    uint8_t hit = 0;
    ProbBits value = 0;
    for (int k = 0; k < slots; ++k) {
      if (idx[k] == e) {
        hit = 1;
        value = p[k];
      }
    }
    map[row * num_experts + e] = hit;
    probs_out[row * num_experts + e] = value;
  }
}

template <typename Index, typename ProbBits>
cudaError_t launch(const void* indices, const void* probs, int64_t rows, int32_t slots,
                   int32_t num_experts, uint8_t* map, void* probs_out, int64_t* error,
                   cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  indices_to_multihot_kernel<Index, ProbBits>
      <<<grid_for(rows, kWarpsPerBlock), kWarpsPerBlock * 32, 0, stream>>>(
          static_cast<const Index*>(indices), static_cast<const ProbBits*>(probs), rows, slots,
          num_experts, map, static_cast<ProbBits*>(probs_out), error);
  return cudaGetLastError();
}

}  // namespace

cudaError_t indices_to_multihot(const void* indices, bool indices_are_64bit, const void* probs,
                                int prob_bytes, int64_t rows, int32_t slots, int32_t num_experts,
                                uint8_t* map, void* probs_out, int64_t* error, cudaStream_t stream) {
  if (prob_bytes != 4 && prob_bytes != 8) return cudaErrorInvalidValue;
  if (indices_are_64bit) {
    return prob_bytes == 4 ? launch<int64_t, uint32_t>(indices, probs, rows, slots, num_experts,
                                                       map, probs_out, error, stream)
                           : launch<int64_t, uint64_t>(indices, probs, rows, slots, num_experts,
                                                       map, probs_out, error, stream);
  }
  return prob_bytes == 4 ? launch<int32_t, uint32_t>(indices, probs, rows, slots, num_experts, map,
                                                     probs_out, error, stream)
                         : launch<int32_t, uint64_t>(indices, probs, rows, slots, num_experts, map,
                                                     probs_out, error, stream);
}

}  // namespace cuda
}  // namespace flexdispatch
