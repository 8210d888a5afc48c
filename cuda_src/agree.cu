// The agreement of a call on the device, with no host sync (flexdispatch/managers/agreement.py
// decides on the host later, from the same headers): one rank's header, and the indices a
// transfer may use, emptied when any rank's header says the call must not go on; or all of it
// in one kernel that also exchanges the headers through symmetric memory (one node).
#include <algorithm>

#include "common.cuh"
#include "launch.h"

namespace flexdispatch {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// Field f of this rank's header: values, with status[0] (route check bits) in the error field.
__device__ __forceinline__ int64_t header_field(const Header& values, const int32_t* status, int f) {
  const int64_t v = values.field[f];
  return f == kHeaderError && status != nullptr ? v | static_cast<int64_t>(status[0]) : v;
}

// The block's share of the mask: indices, or -1 everywhere if any of the `ranks` headers breaks
// the agreement (every block reads the few headers itself instead of a second launch). Every
// thread of the block must call it.
template <typename Out>
__device__ __forceinline__ void mask_by_agreement(const int64_t* headers, int32_t ranks, const int64_t* indices,
                                                  int64_t n, Out* out) {
  bool breaks = false;
  for (int64_t i = threadIdx.x; i < int64_t(ranks) * kHeaderWidth; i += blockDim.x) {
    breaks |= header_breaks_agreement(headers, i);
  }
  const bool empty = __syncthreads_or(breaks);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = static_cast<Out>(empty ? -1 : indices[i]);
  }
}

__global__ void make_header_kernel(Header values, const int32_t* __restrict__ status, int64_t* __restrict__ header) {
  const int f = threadIdx.x;
  if (f < kHeaderWidth) header[f] = header_field(values, status, f);
}

template <typename Out>
__global__ void mask_unless_agreed_kernel(const int64_t* __restrict__ headers, int32_t ranks,
                                          const int64_t* __restrict__ indices, int64_t n, Out* __restrict__ out) {
  mask_by_agreement(headers, ranks, indices, n, out);
}

__device__ __forceinline__ int64_t load_acquire_sys(const int64_t* addr) {
  int64_t v;
  asm volatile("ld.acquire.sys.global.b64 %0, [%1];" : "=l"(v) : "l"(addr) : "memory");
  return v;
}

__device__ __forceinline__ void store_release_sys(int64_t* addr, int64_t v) {
  asm volatile("st.release.sys.global.b64 [%0], %1;" : : "l"(addr), "l"(v) : "memory");
}

// The headers of one call through symmetric memory, then the mask (see exchange_headers in
// launch.h). Thread w of block 0 writes this rank's header into rank w's slot for it, then the
// slot's sequence word (release, system scope); thread w of every block waits for sender w's
// sequence word in this rank's slots (acquire) and reads its header. Alternating halves by
// the sequence's parity: a peer can be at most one exchange ahead (it cannot finish the next
// one without this rank's header), so it never overwrites a slot still to be read.
template <typename Out>
__global__ void exchange_headers_kernel(Header values, const int32_t* __restrict__ status,
                                        const int64_t* __restrict__ bases, int32_t rank, int32_t world, int64_t seq,
                                        uint64_t timeout_ns, const int64_t* __restrict__ indices, int64_t n,
                                        Out* __restrict__ out, int64_t* __restrict__ gathered) {
  __shared__ int64_t headers[kMaxHeaderRanks * kHeaderWidth];
  const int32_t w = threadIdx.x;
  const int64_t half = (seq & 1) * world;
  if (blockIdx.x == 0 && w < world) {
    int64_t* slot = reinterpret_cast<int64_t*>(bases[w]) + (half + rank) * kHeaderSlotWords;
    for (int f = 0; f < kHeaderWidth; ++f) slot[1 + f] = header_field(values, status, f);
    __threadfence_system();
    store_release_sys(slot, seq);
  }
  if (w < world) {
    const int64_t* slot = reinterpret_cast<const int64_t*>(bases[rank]) + (half + w) * kHeaderSlotWords;
    const uint64_t start = global_ns();
    while (load_acquire_sys(slot) != seq) trap_after_timeout(start, timeout_ns, rank, w, "the header exchange");
    for (int f = 0; f < kHeaderWidth; ++f) {
      headers[w * kHeaderWidth + f] = *reinterpret_cast<const volatile int64_t*>(slot + 1 + f);
    }
  }
  __syncthreads();
  mask_by_agreement(headers, world, indices, n, out);
  if (blockIdx.x == 0) {
    for (int64_t i = threadIdx.x; i < int64_t(world) * kHeaderWidth; i += blockDim.x) gathered[i] = headers[i];
    __threadfence_system();  // (host memory: visible to the host once a later host wait returns)
  }
}

}  // namespace

cudaError_t exchange_headers(Header values, const int32_t* status, const int64_t* bases, int32_t rank, int32_t world,
                             int64_t seq, uint64_t timeout_ns, const int64_t* indices, int64_t n, void* out,
                             bool out_is_64bit, int64_t* gathered, cudaStream_t stream) {
  if (world < 1 || world > kMaxHeaderRanks || rank < 0 || rank >= world || seq < 1) return cudaErrorInvalidValue;
  // Every block waits for every peer: few enough blocks to be resident at once.
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(grid_for(n, kThreads), 1), 128));
  if (out_is_64bit) {
    exchange_headers_kernel<<<blocks, kThreads, 0, stream>>>(values, status, bases, rank, world, seq, timeout_ns,
                                                             indices, n, static_cast<int64_t*>(out), gathered);
  } else {
    exchange_headers_kernel<<<blocks, kThreads, 0, stream>>>(values, status, bases, rank, world, seq, timeout_ns,
                                                             indices, n, static_cast<int32_t*>(out), gathered);
  }
  return cudaGetLastError();
}

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
