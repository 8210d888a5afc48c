// The agreement of a call on the device, with no host sync (flexdispatch/managers/agreement.py
// decides on the host later, from the same headers): one rank's header, and the indices a
// transfer may use, emptied when any rank's header says the call must not go on.
#include <algorithm>

#include "common.cuh"
#include "launch.h"

namespace flexdispatch {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__global__ void make_header_kernel(Header values, const int32_t* __restrict__ status, int64_t* __restrict__ header) {
  const int f = threadIdx.x;
  if (f >= kHeaderWidth) return;
  int64_t v = values.field[f];
  if (f == kHeaderError && status != nullptr) v |= static_cast<int64_t>(status[0]);
  header[f] = v;
}

template <typename Out>
__global__ void mask_unless_agreed_kernel(const int64_t* __restrict__ headers, int32_t ranks,
                                          const int64_t* __restrict__ indices, int64_t n, Out* __restrict__ out) {
  // Every block reads the few headers itself (ranks * 8 values) instead of a second launch.
  bool breaks = false;
  for (int64_t i = threadIdx.x; i < int64_t(ranks) * kHeaderWidth; i += blockDim.x) {
    breaks |= header_breaks_agreement(headers, i);
  }
  const bool empty = __syncthreads_or(breaks);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = static_cast<Out>(empty ? -1 : indices[i]);
  }
}

}  // namespace

cudaError_t make_header(Header values, const int32_t* status, int64_t* header, cudaStream_t stream) {
  make_header_kernel<<<1, 32, 0, stream>>>(values, status, header);
  return cudaGetLastError();
}

cudaError_t mask_unless_agreed(const int64_t* headers, int32_t ranks, const int64_t* indices, int64_t n,
                               void* out, bool out_is_64bit, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(grid_for(n, kThreads), 1024));
  if (out_is_64bit) {
    mask_unless_agreed_kernel<<<blocks, kThreads, 0, stream>>>(headers, ranks, indices, n, static_cast<int64_t*>(out));
  } else {
    mask_unless_agreed_kernel<<<blocks, kThreads, 0, stream>>>(headers, ranks, indices, n, static_cast<int32_t*>(out));
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace flexdispatch
