// Rows read through addresses: the transfers of the NVLink manager. Row r of a transfer lives
// at addrs[r], in a peer's buffer that symmetric memory mapped into this process (read over
// NVLink), or, with the emulated transport, in a local tensor: the kernels do not know which.
// Each kernel takes max_blocks (0: no cap) so that a transfer can leave SMs to compute.
#include <algorithm>
#include <cstdio>

#include "common.cuh"
#include "launch.h"

namespace flexdispatch {
namespace cuda {
namespace {

constexpr int kUnroll = 4;         // independent 16-byte loads in flight per thread
constexpr int kWarpsPerBlock = 4;  // rows of the copy kernel per block (one warp each)
constexpr int kSumThreads = 128;   // threads on one row of the sum kernel

unsigned capped_grid(int64_t blocks, int64_t max_blocks) {
  if (blocks < 1) blocks = 1;
  if (max_blocks > 0 && blocks > max_blocks) blocks = max_blocks;
  return static_cast<unsigned>(blocks < (int64_t(1) << 30) ? blocks : (int64_t(1) << 30));
}

// One warp per source row, rows grid-strided from first_row round to the start: the row
// (row_bytes at addrs[row]) is read once, with kUnroll loads in flight per lane (remote reads
// are latency-bound), and written to dst rows map[row, 0..slots) (-1: none), or to dst row
// `row` when map is null. Address 0: no source row (a zero row without a map; nothing with one).
template <typename V>
__global__ void copy_rows_from_kernel(const int64_t* __restrict__ addrs, int64_t rows, int64_t row_bytes,
                                      const int32_t* __restrict__ map, int32_t slots, int64_t first_row,
                                      char* __restrict__ dst) {
  const int lane = threadIdx.x % 32;
  const int64_t vecs = row_bytes / int64_t(sizeof(V));
  for (int64_t j = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; j < rows;
       j += int64_t(gridDim.x) * kWarpsPerBlock) {
    const int64_t row = j < rows - first_row ? j + first_row : j + first_row - rows;
    const V* in = reinterpret_cast<const V*>(addrs[row]);
    if (in == nullptr) {  // no source row: a zero row (identity), nothing (map)
      if (map == nullptr) {
        V* out = reinterpret_cast<V*>(dst + row * row_bytes);
        for (int64_t v = lane; v < vecs; v += 32) out[v] = V{};
      }
      continue;
    }
    for (int64_t v0 = lane; v0 < vecs; v0 += 32 * kUnroll) {
      V buf[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = v0 + 32 * u;
        if (v < vecs) buf[u] = in[v];
      }
      if (map == nullptr) {
        V* out = reinterpret_cast<V*>(dst + row * row_bytes);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t v = v0 + 32 * u;
          if (v < vecs) out[v] = buf[u];
        }
        continue;
      }
      for (int32_t s = 0; s < slots; ++s) {
        const int32_t d = map[row * slots + s];
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
}

// One block per output row, rows grid-strided: dst[row] = sum over slots s, in slot order, of
// the row at addrs[row, s] (0: none), accumulated in Acc; a row with no slot is zero.
template <typename T, typename Acc, int VecN>
__global__ void sum_rows_from_kernel(const int64_t* __restrict__ addrs, int64_t rows, int32_t slots,
                                     int64_t hidden, T* __restrict__ dst) {
  using VT = Vec<T, VecN>;
  const int64_t vecs = hidden / VecN;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t* a = addrs + row * slots;
    VT* out = reinterpret_cast<VT*>(dst + row * hidden);
    for (int64_t v = threadIdx.x; v < vecs; v += blockDim.x) {
      Acc acc[VecN];
#pragma unroll
      for (int j = 0; j < VecN; ++j) acc[j] = Acc(0);
      for (int32_t s0 = 0; s0 < slots; s0 += kUnroll) {
        VT x[kUnroll];
        bool has[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {  // the loads of kUnroll slots first, then their sums
          const int64_t addr = s0 + u < slots ? a[s0 + u] : 0;
          has[u] = addr != 0;
          if (has[u]) x[u] = reinterpret_cast<const VT*>(addr)[v];
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (has[u]) {
#pragma unroll
            for (int j = 0; j < VecN; ++j) acc[j] += to_acc<Acc>(x[u].v[j]);
          }
        }
      }
      VT y;
#pragma unroll
      for (int j = 0; j < VecN; ++j) y.v[j] = Num<T>::from(acc[j]);
      out[v] = y;
    }
  }
}

__global__ void peer_addresses_kernel(int32_t kind, const int64_t* __restrict__ counts, int32_t world, int32_t rank,
                                      const int64_t* __restrict__ table, int64_t row_bytes, int64_t n,
                                      const int32_t* __restrict__ map, const double* __restrict__ tokens,
                                      int64_t token_stride, int64_t* __restrict__ out) {
  extern __shared__ int64_t words[];
  if (threadIdx.x == 0) peer_blocks(counts, world, rank, words);
  __syncthreads();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = peer_address(kind, i, world, words, table, row_bytes, map, tokens, token_stride);
  }
}

// Signals between the ranks of a group in their symmetric signal pads (uint32 words): a put is
// a compare-and-swap 0 -> 1 with release semantics at system scope (the writes this rank's
// stream made before are visible to a peer that acquires it), a wait a compare-and-swap 1 -> 0
// with acquire semantics. Spins for at most timeout_ns, then traps (common.cuh).
__device__ __forceinline__ uint32_t cas_release_sys(uint32_t* addr, uint32_t expected, uint32_t desired) {
  uint32_t old;
  asm volatile("atom.release.sys.global.cas.b32 %0, [%1], %2, %3;" : "=r"(old) : "l"(addr), "r"(expected),
               "r"(desired) : "memory");
  return old;
}

__device__ __forceinline__ uint32_t cas_acquire_sys(uint32_t* addr, uint32_t expected, uint32_t desired) {
  uint32_t old;
  asm volatile("atom.acquire.sys.global.cas.b32 %0, [%1], %2, %3;" : "=r"(old) : "l"(addr), "r"(expected),
               "r"(desired) : "memory");
  return old;
}

__device__ void spin_cas(uint32_t* addr, uint32_t expected, uint32_t desired, bool release, uint64_t timeout_ns,
                         int32_t rank, int32_t peer) {
  const uint64_t start = global_ns();
  while ((release ? cas_release_sys(addr, expected, desired) : cas_acquire_sys(addr, expected, desired)) !=
         expected) {
    trap_after_timeout(start, timeout_ns, rank, peer, "a peer barrier");
  }
}

// A thread per peer: signal it, then wait for its signal (slots channel * world + sender).
__global__ void peer_barrier_kernel(uint32_t* const* __restrict__ pads, int32_t channel, int32_t rank,
                                    int32_t world, uint64_t timeout_ns) {
  const int32_t peer = threadIdx.x;
  if (peer >= world || peer == rank) return;
  spin_cas(pads[peer] + channel * world + rank, 0, 1, true, timeout_ns, rank, peer);
  spin_cas(pads[rank] + channel * world + peer, 1, 0, false, timeout_ns, rank, peer);
}

// Parts of an exchange copied into this rank's buffer: blockIdx.y picks the part, blocks
// stride over its 16-byte vectors (or bytes, when the part's source or size is not aligned).
__global__ void pack_parts_kernel(PackParts parts, char* __restrict__ dst) {
  const PackPart part = parts.part[blockIdx.y];
  char* out = dst + part.offset;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (reinterpret_cast<uintptr_t>(part.src) % 16 == 0 && part.bytes % 16 == 0) {
    const uint4* in = static_cast<const uint4*>(part.src);
    for (int64_t i = first; i < part.bytes / 16; i += stride) reinterpret_cast<uint4*>(out)[i] = in[i];
  } else {
    const char* in = static_cast<const char*>(part.src);
    for (int64_t i = first; i < part.bytes; i += stride) out[i] = in[i];
  }
}

template <typename V>
cudaError_t copy_as(const int64_t* addrs, int64_t rows, int64_t row_bytes, const int32_t* map, int32_t slots,
                    void* dst, int64_t max_blocks, int64_t first_row, cudaStream_t stream) {
  copy_rows_from_kernel<V><<<capped_grid(grid_for(rows, kWarpsPerBlock), max_blocks), kWarpsPerBlock * 32, 0,
                             stream>>>(addrs, rows, row_bytes, map, slots, first_row, static_cast<char*>(dst));
  return cudaGetLastError();
}

template <typename T>
cudaError_t sum_typed(const int64_t* addrs, int64_t rows, int32_t slots, int64_t hidden, int32_t align,
                      void* dst, int64_t max_blocks, cudaStream_t stream) {
  using Acc = typename std::conditional<sizeof(T) == 8, double, float>::type;
  constexpr int kVec = 16 / sizeof(T);
  const unsigned grid = capped_grid(rows, max_blocks);
  if (hidden % kVec == 0 && align >= 16 && vector_bytes(16, dst, dst) == 16) {
    sum_rows_from_kernel<T, Acc, kVec><<<grid, kSumThreads, 0, stream>>>(addrs, rows, slots, hidden,
                                                                         static_cast<T*>(dst));
  } else {
    sum_rows_from_kernel<T, Acc, 1><<<grid, kSumThreads, 0, stream>>>(addrs, rows, slots, hidden,
                                                                      static_cast<T*>(dst));
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t copy_rows_from(const int64_t* addrs, int64_t rows, int64_t row_bytes, int32_t align,
                           const int32_t* map, int32_t slots, void* dst, int64_t max_blocks,
                           int64_t first_row, cudaStream_t stream) {
  if (rows == 0 || row_bytes == 0) return cudaSuccess;
  if (first_row < 0 || first_row >= rows) first_row = 0;
  // The widest access that divides the row, the destination and the sources' alignment.
  int width = vector_bytes(row_bytes, dst, dst);
  while (width > align) width /= 2;
  switch (width) {
    case 16: return copy_as<uint4>(addrs, rows, row_bytes, map, slots, dst, max_blocks, first_row, stream);
    case 8: return copy_as<uint2>(addrs, rows, row_bytes, map, slots, dst, max_blocks, first_row, stream);
    case 4: return copy_as<uint32_t>(addrs, rows, row_bytes, map, slots, dst, max_blocks, first_row, stream);
    case 2: return copy_as<uint16_t>(addrs, rows, row_bytes, map, slots, dst, max_blocks, first_row, stream);
    default: return copy_as<uint8_t>(addrs, rows, row_bytes, map, slots, dst, max_blocks, first_row, stream);
  }
}

cudaError_t sum_rows_from(DType dtype, const int64_t* addrs, int64_t rows, int32_t slots, int64_t hidden,
                          int32_t align, void* dst, int64_t max_blocks, cudaStream_t stream) {
  if (rows == 0 || hidden == 0) return cudaSuccess;
  switch (dtype) {
    case kFloat32: return sum_typed<float>(addrs, rows, slots, hidden, align, dst, max_blocks, stream);
    case kFloat16: return sum_typed<__half>(addrs, rows, slots, hidden, align, dst, max_blocks, stream);
    case kBFloat16: return sum_typed<__nv_bfloat16>(addrs, rows, slots, hidden, align, dst, max_blocks, stream);
    case kFloat64: return sum_typed<double>(addrs, rows, slots, hidden, align, dst, max_blocks, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t pack_parts(const PackParts& parts, void* dst, cudaStream_t stream) {
  int64_t most = 0;
  for (int32_t p = 0; p < parts.count; ++p) most = std::max(most, parts.part[p].bytes);
  if (parts.count == 0 || most == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const dim3 grid(capped_grid(grid_for((most + 15) / 16, kThreads), 264), parts.count);
  pack_parts_kernel<<<grid, kThreads, 0, stream>>>(parts, static_cast<char*>(dst));
  return cudaGetLastError();
}

cudaError_t peer_barrier(const void* signal_pads, int32_t channel, int32_t rank, int32_t world, uint64_t timeout_ns,
                         cudaStream_t stream) {
  if (world > 1024) return cudaErrorInvalidValue;
  peer_barrier_kernel<<<1, (world + 31) / 32 * 32, 0, stream>>>(static_cast<uint32_t* const*>(signal_pads), channel,
                                                               rank, world, timeout_ns);
  return cudaGetLastError();
}

cudaError_t peer_addresses(int32_t kind, const int64_t* counts, int32_t world, int32_t rank, const int64_t* table,
                           int64_t row_bytes, int64_t n, const int32_t* map, const double* tokens,
                           int64_t token_stride, int64_t* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const unsigned grid = capped_grid(grid_for(n, kThreads), 1024);
  const size_t shared = sizeof(int64_t) * peer_block_words(world);
  peer_addresses_kernel<<<grid, kThreads, shared, stream>>>(kind, counts, world, rank, table, row_bytes, n, map,
                                                            tokens, token_stride, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace flexdispatch
