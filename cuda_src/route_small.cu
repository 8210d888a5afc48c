// The permutation of a small route (top-k indices, or a multihot map whose slots are its
// experts) in one launch, its rows moved as they are or dequantized from FP8. For a route of a
// few thousand (row, slot) entries (a multihot map of up to 256K), the multi-pass plan's launches
// (count, map, scatter: route.cu, rows.cu) cost the host and the device more than their work
// does. Here every block counts the whole route itself (read from L2), scans the padded expert
// totals, places the slots of its own 8 or 16 rows and moves those rows; block 0 writes the
// layout. The result equals the multi-pass plan's bit for bit: a slot's output row is its
// expert's offset plus the number of earlier rows routed to that expert. The kernel also stores
// its error word to the caller's pinned host word (when given), which spares the op a launch to
// copy it there.
#include <cooperative_groups.h>
#include <cuda.h>  // (the driver's context types; its functions are found at run time, not linked)

#include <algorithm>

#include "common.cuh"
#include "fp8.cuh"
#include "launch.h"
#include "plan.cuh"

namespace flexdispatch {
namespace cuda {
namespace {

constexpr int kSmallThreads = 1024;  // (the count reads the whole route: many loads in flight)
constexpr int32_t kSmallExperts = 1024;
constexpr int32_t kSmallSlots = 64;       // of a top-k route (a multihot map's are its experts)
constexpr int64_t kSmallEntries = 8192;   // (row, slot) entries of a top-k route
constexpr int64_t kSmallReads = 1 << 20;  // entries read by all blocks together (entries * blocks)
// A multihot map is counted a 4-byte word (4 experts) a load (count_multihot), many times faster
// an entry than a top-k route's slots, so its limits are larger.
constexpr int64_t kSmallMapEntries = 1 << 18;
constexpr int64_t kSmallMapReads = 8 * kSmallReads;
// Past kSmallMapReads the passes take less device time than one launch, yet queued one by one
// their three launches cost the host more than the launch's extra device time: at 1024 x 1024,
// E = 256, K = 8 (one H100) the passes took 19.4 us of kernels against 26.5 for one launch in
// blocks of 8 rows, but the permute + unpermute pair 42 us of host time a call against 32.5. So
// a stream that is not being captured into a CUDA graph takes the one launch up to
// kSmallMapReadsEager; a captured one, where no launch costs the host, the passes.
constexpr int64_t kSmallMapReadsEager = 4 * kSmallMapReads;
// Captured, a route takes one launch only while its blocks read at most 1/kCapturedShare of the
// limit of its kind; past that the passes take less device time there too (at 1024 x 1024, K = 8
// the one launch reads 2^20 entries of a top-k route, 2^23 of a 128-expert map).
constexpr int64_t kCapturedShare = 2;
constexpr int64_t kSmallBytes = 4 << 20;  // bytes of output rows: beyond, the multi-pass scatter's wide grid wins
// Shared memory a block may take: what every CUDA device gives without opting in.
constexpr size_t kSmallSharedBytes = 46 * 1024;
// Rows a block places and moves: 8, or 16 where fewer blocks keep the reads of the whole route
// within the limit. Not 32: a block's rows are moved by its SM alone; at 1024 x 1024, K = 8 (one
// H100) a map of 256 experts in blocks of 32 rows took 36 us, one of 128 in blocks of 16 21 us,
// the index route in blocks of 8 20.5 us.
constexpr int32_t kSmallRowsFirst = 8, kSmallRowsMost = 16;

int64_t small_blocks(int64_t rows, int32_t block_rows) { return (rows + block_rows - 1) / block_rows; }

// Words of a multihot map row that count_multihot reads (4 experts each).
FD_HOST_DEVICE inline int32_t map_word_count(int32_t slots) { return (slots + 3) / 4; }

// scratch [32] and offsets [E + 1] int64, then total, before and mine [E], the rows' placed
// counts [kSmallRowsMost] and dests [block_rows * slots] int32, where a multihot map's count keeps
// its partial counts first (count_multihot: kSmallThreads / words groups of 4 * words).
size_t small_shared_bytes(const Route& route, int32_t block_rows) {
  const size_t words = map_word_count(route.slots), dests = size_t(block_rows) * route.slots;
  const size_t partial = route.kind == kRouteMultihot ? kSmallThreads / words * 4 * words : 0;
  return sizeof(int64_t) * (32 + size_t(route.num_experts) + 1) +
         sizeof(int32_t) * (3 * size_t(route.num_experts) + kSmallRowsMost + std::max(dests, partial));
}

// Entries a launch in blocks of block_rows reads, all blocks together (each reads the whole route).
int64_t small_reads(const Route& route, int32_t block_rows) {
  return route.rows * route.slots * small_blocks(route.rows, block_rows);
}

// The fewest rows a block (8, then 16) for which too_many(block_rows) is false, where that
// block's shared memory stays within kSmallSharedBytes; else 0.
template <typename TooMany>
int32_t fewest_block_rows(const Route& route, TooMany too_many) {
  for (int32_t block_rows = kSmallRowsFirst; block_rows <= kSmallRowsMost; block_rows *= 2) {
    if (too_many(block_rows)) continue;
    return small_shared_bytes(route, block_rows) <= kSmallSharedBytes ? block_rows : 0;
  }
  return 0;
}

// The rows a block of permute_small takes for `route` with whole-route counts (the fewest that
// keep small_reads within `reads`), or 0 where no launch of it fits.
int32_t small_block_rows(const Route& route, int64_t reads) {
  return fewest_block_rows(route, [&](int32_t block_rows) { return small_reads(route, block_rows) > reads; });
}

// A one-launch permutation's arguments but its input rows, as its kernel takes them.
struct Small {
  Route route;
  int64_t pad_multiple;
  int32_t row_bytes;  // of an output row (rows * row_bytes <= kSmallBytes)
  const void* probs;  // nullable, ProbBits
  int64_t num_out;
  char* dst;
  void* probs_out;  // nullable, ProbBits
  int32_t* row_id_map;
  int64_t* layout;
  int64_t* host_word;  // nullable: the pinned word (its device mapping) that gets the error word
  int32_t block_rows;  // rows a block places and moves (small_block_rows)
  int32_t* block_counts;  // the grid launch's [blocks, E + 1] (count_by_blocks); null for the other
};

// The input rows of a one-launch permutation, read as the output's vectors (Vec): row r's
// vector u is load(r, u), units() vectors a row. PlainRows are moved as they are.
template <typename V>
struct PlainRows {
  using Vec = V;
  const char* src;
  int32_t row_bytes;
  __device__ int32_t units() const { return row_bytes / static_cast<int32_t>(sizeof(V)); }
  __device__ V load(int64_t row, int32_t u) const { return reinterpret_cast<const V*>(src + row * row_bytes)[u]; }
};

// FP8 rows (e4m3 bytes q_pitch apart, their float32 scales scale_pitch apart) dequantized to T
// as they are read, a 16-byte output vector at a time: dequantize_fp8's arithmetic (fp8.cuh).
template <typename T>
struct Fp8Rows {
  using Vec = uint4;
  const uint8_t* q;
  int64_t q_pitch;
  const float* scales;
  int64_t scale_pitch;
  int32_t hidden;
  __device__ int32_t units() const { return hidden / Unit<T>::kVals; }
  __device__ uint4 load(int64_t row, int32_t u) const {
    const auto bytes = reinterpret_cast<const typename Unit<T>::Bytes*>(q + row * q_pitch)[u];
    const auto values = decode_unit<T>(bytes, scales[row * scale_pitch + u / (kFp8Group / Unit<T>::kVals)]);
    return *reinterpret_cast<const uint4*>(&values);
  }
};

// Word w (bytes 4w .. 4w + 3, zero past the row's slots) of a multihot map's row.
__device__ __forceinline__ uint32_t map_word(const uint8_t* map, int32_t slots, bool whole_words, int32_t row,
                                             int32_t w) {
  const uint8_t* bytes = map + int64_t(row) * slots;
  if (whole_words) return reinterpret_cast<const uint32_t*>(bytes)[w];
  uint32_t word = 0;
  for (int j = 0; j < 4 && 4 * w + j < slots; ++j) word |= uint32_t(bytes[4 * w + j]) << (8 * j);
  return word;
}

// A multihot map's counts (its slot s names expert s where set; it has no bad slot). Thread t
// reads word w = t % words of rows g, g + groups, ... (g = t / words): a warp's loads cover
// consecutive stretches of whole rows, a word (4 experts) a load, as 4-byte words where the width
// and address allow. It counts, per byte of its word, the rows that have that expert, all and
// those ahead of row0, in registers, and sets the bits of mine[e] for the block's own rows. The
// groups' counts (two 16-bit halves of one word: a thread walks fewer than 2^16 rows) meet in
// `partial` and are summed an expert a thread into total[e] and before[e] (zeroed by the
// caller). Every thread of the block calls it.
__device__ void count_multihot(const Route& route, int32_t row0, int32_t block_rows, int32_t* total,
                               int32_t* before, uint32_t* mine, uint32_t* partial) {
  constexpr int kUnroll = 4;
  const int32_t rows = static_cast<int32_t>(route.rows), slots = route.slots;
  const uint8_t* map = static_cast<const uint8_t*>(route.data);
  const bool whole_words = slots % 4 == 0 && reinterpret_cast<uintptr_t>(map) % 4 == 0;
  const int words = map_word_count(slots), columns = 4 * words;
  const int groups = static_cast<int>(blockDim.x) / words;
  const int w = threadIdx.x % words, g = threadIdx.x / words;
  if (g < groups) {
    uint32_t counts[4] = {0, 0, 0, 0};  // (rows with the expert) | (those ahead of row0) << 16
    for (int32_t first = g; first < rows; first += kUnroll * groups) {
      uint32_t word[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int32_t row = first + u * groups;
        word[u] = row < rows ? map_word(map, slots, whole_words, row, w) : 0;
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int32_t row = first + u * groups;
        const uint32_t one = row < row0 ? 0x10001u : 1u;
        const bool moved = row >= row0 && row < row0 + block_rows;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if ((word[u] >> (8 * j)) & 0xffu) {
            counts[j] += one;
            if (moved) atomicOr(&mine[4 * w + j], 1u << (row - row0));
          }
        }
      }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) partial[g * columns + 4 * w + j] = counts[j];
  }
  __syncthreads();
  const int parts = static_cast<int>(blockDim.x) / columns;  // (>= 1: columns <= 4 * 256)
  const int c = threadIdx.x % columns, part = threadIdx.x / columns;
  if (part < parts && c < slots) {
    int32_t all = 0, ahead = 0;
    for (int h = part; h < groups; h += parts) {
      const uint32_t v = partial[h * columns + c];
      all += static_cast<int32_t>(v & 0xffffu);
      ahead += static_cast<int32_t>(v >> 16);
    }
    if (all) atomicAdd(&total[c], all);
    if (ahead) atomicAdd(&before[c], ahead);
  }
}

// The grid launch's count: each block reads only its own rows (the bits of mine[e]), publishes
// per expert their number, and its error bits, in its row of block_counts [blocks, E + 1], and
// after a grid-wide barrier sums the column of every expert: total[e] over all blocks, before[e]
// over the blocks ahead of it (zeroed by the caller), and the error bits of all into *errors. A
// thread per (expert, share of the blocks): consecutive threads read consecutive words of a row.
// Every thread of the block calls it; the launch is cooperative (all blocks resident at once).
template <int Kind>
__device__ void count_by_blocks(const Route& route, int32_t row0, int32_t rows, int32_t* block_counts,
                                int32_t* total, int32_t* before, uint32_t* mine, int* errors) {
  const int experts = route.num_experts, blocks = static_cast<int>(gridDim.x);
  const int64_t stride = int64_t(experts) + 1;
  const int32_t slots = route.slots;
  int64_t bad = 0;
  for (int32_t i = threadIdx.x; i < rows * slots; i += blockDim.x) {
    const int32_t c = i / slots;
    const int64_t e = checked_expert<Kind>(route, row0 + c, i % slots, &bad);
    if (e >= 0) atomicOr(&mine[e], 1u << c);
  }
  if (bad) atomicOr(errors, static_cast<int>(bad));
  __syncthreads();
  int32_t* own = block_counts + blockIdx.x * stride;
  for (int e = threadIdx.x; e < experts; e += blockDim.x) own[e] = __popc(mine[e]);
  if (threadIdx.x == 0) own[experts] = *errors;
  cooperative_groups::this_grid().sync();  // (also makes every block's row visible)
  const int shares = max(1, static_cast<int>(blockDim.x) / experts);
  const int e = threadIdx.x % experts, share = threadIdx.x / experts;
  if (share < shares) {
    int32_t all = 0, ahead = 0;
    for (int b = share; b < blocks; b += shares) {
      const int32_t n = block_counts[b * stride + e];
      all += n;
      if (b < static_cast<int>(blockIdx.x)) ahead += n;
    }
    if (all) atomicAdd(&total[e], all);
    if (ahead) atomicAdd(&before[e], ahead);
  }
  int found = 0;
  for (int b = threadIdx.x; b < blocks; b += blockDim.x) found |= block_counts[b * stride + experts];
  if (found) atomicOr(errors, found);
}

// Grid: the blocks count only their own rows and meet at a grid-wide barrier (count_by_blocks;
// a cooperative launch); else every block counts the whole route.
template <int Kind, bool Grid, typename Rows, typename ProbBits>
__global__ void __launch_bounds__(kSmallThreads, 1) permute_small_kernel(const Small a, const Rows in) {
  using V = typename Rows::Vec;
  allow_next_grid();
  const Route route = a.route;
  const int64_t pad_multiple = a.pad_multiple, num_out = a.num_out;
  const int32_t row_bytes = a.row_bytes;
  char* __restrict__ dst = a.dst;
  const ProbBits* probs = static_cast<const ProbBits*>(a.probs);
  ProbBits* probs_out = static_cast<ProbBits*>(a.probs_out);
  int64_t* layout = a.layout;
  extern __shared__ int64_t shared[];
  __shared__ int errors;
  const int experts = route.num_experts;
  const int32_t slots = route.slots;
  int64_t* scratch = shared;
  int64_t* offsets = scratch + 32;
  int32_t* total = reinterpret_cast<int32_t*>(offsets + experts + 1);  // slots of each expert
  int32_t* before = total + experts;  // ... in the rows before this block's
  uint32_t* mine = reinterpret_cast<uint32_t*>(before + experts);  // bit c: row row0 + c has the expert
  int32_t* placed = reinterpret_cast<int32_t*>(mine + experts);  // [kSmallRowsMost]: row c's destinations
  int32_t* dests = placed + kSmallRowsMost;  // row c's output rows, from dests[c * slots] (after the count)
  for (int e = threadIdx.x; e < experts; e += blockDim.x) {
    total[e] = 0;
    before[e] = 0;
    mine[e] = 0;
  }
  if (threadIdx.x < kSmallRowsMost) placed[threadIdx.x] = 0;
  if (threadIdx.x == 0) errors = 0;
  __syncthreads();

  const int32_t route_rows = static_cast<int32_t>(route.rows), block_rows = a.block_rows;
  const int32_t row0 = static_cast<int32_t>(blockIdx.x) * block_rows;
  int64_t bad = 0;
  if constexpr (Grid) {
    count_by_blocks<Kind>(route, row0, min(block_rows, route_rows - row0), a.block_counts, total, before, mine,
                          &errors);
  } else if constexpr (Kind == kRouteMultihot) {
    count_multihot(route, row0, block_rows, total, before, mine, reinterpret_cast<uint32_t*>(dests));
    __syncthreads();  // (the partial counts are read before dests overwrites them)
  } else {
    // A thread counts whole rows (entries < 2^13: 32-bit indices, no division). The lanes of a
    // warp that add to one counter add once (with few experts, many lanes share each counter),
    // so the warps run the loop together: rows past the route count nothing.
    const int lane = threadIdx.x % 32;
    for (int32_t row = threadIdx.x; row < round_up(route_rows, 32); row += blockDim.x) {
      const int where = row < row0 ? 0 : (row < row0 + block_rows ? 1 : 2);  // before, mine, after
      for (int32_t s = 0; s < slots; ++s) {
        const int64_t e = row < route_rows ? checked_expert<Kind>(route, row, s, &bad) : -1;
        const unsigned peers = __match_any_sync(0xffffffffu, e < 0 ? -1 : static_cast<int>(e) * 4 + where);
        if (e < 0) continue;
        if (where == 1) atomicOr(&mine[e], 1u << (row - row0));
        if (__ffs(peers) - 1 == lane) {
          atomicAdd(&total[e], __popc(peers));
          if (where == 0) atomicAdd(&before[e], __popc(peers));
        }
      }
    }
  }
  if (bad) atomicOr(&errors, static_cast<int>(bad));
  __syncthreads();
  offsets_from_totals(total, experts, pad_multiple, scratch, offsets, blockIdx.x == 0 ? layout : nullptr);
  // Every block finds the same error word (the whole route's bits; a slot can only overflow an
  // output too small for the padded total), so block 0 stores it: nothing needs zeroing first.
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    const int64_t word = errors | (offsets[experts] > num_out ? kOutputOverflow : 0);
    layout[layout_error(experts)] = word;
    if (a.host_word != nullptr) *reinterpret_cast<volatile int64_t*>(a.host_word) = word;
  }

  const int rows = min(block_rows, route_rows - row0);
  int64_t overflow = 0;  // (already in the error word)
  for (int i = threadIdx.x; i < rows * slots; i += blockDim.x) {
    const int c = i / slots;
    int64_t counted = 0;  // (already in the error word)
    const int64_t e = checked_expert<Kind>(route, row0 + c, i % slots, &counted);
    const int64_t want = e < 0 ? -1 : offsets[e] + before[e] + __popc(mine[e] & ((1u << c) - 1u));
    const int32_t dest = place_slot(want, int64_t(row0) * slots + i, probs, num_out, a.row_id_map, probs_out,
                                    &overflow);
    // (a row's destinations kept in any order: each gets the same row; a map row's few among
    // its E slots)
    if (dest >= 0) dests[c * slots + atomicAdd(&placed[c], 1)] = dest;
  }
  __syncthreads();

  // The block's rows: each vector read once and stored at every destination of its row.
  const int32_t vecs = in.units();  // (rows * row_bytes < 2^22)
  for (int32_t i = threadIdx.x; i < rows * vecs; i += blockDim.x) {
    const int32_t c = i / vecs, v = i % vecs;
    const V x = in.load(row0 + c, v);
    for (int32_t k = 0; k < placed[c]; ++k) {
      reinterpret_cast<V*>(dst + int64_t(dests[c * slots + k]) * row_bytes)[v] = x;
    }
  }
  // The rows no source fills, spread over the blocks: each expert's pad rows, then the tail.
  char* zero_probs = reinterpret_cast<char*>(probs_out);
  if (pad_multiple > 1) {
    for (int e = blockIdx.x; e < experts; e += gridDim.x) {
      zero_rows<V>(offsets[e] + total[e], min(num_out, offsets[e] + round_up(total[e], pad_multiple)), 0, 1, dst,
                   row_bytes, zero_probs, sizeof(ProbBits));
    }
  }
  zero_rows<V>(offsets[experts], num_out, blockIdx.x, gridDim.x, dst, row_bytes, zero_probs, sizeof(ProbBits));
}

template <int Kind, bool Grid, typename Rows, typename ProbBits>
cudaError_t launch_small_kernel(const Small& a, const Rows& in, cudaStream_t stream) {
  const size_t bytes = small_shared_bytes(a.route, a.block_rows);
  const auto kernel = permute_small_kernel<Kind, Grid, Rows, ProbBits>;
  const cudaError_t err = allow_dynamic_shared(kernel, bytes);
  if (err != cudaSuccess) return err;
  const auto blocks = static_cast<unsigned>(small_blocks(a.route.rows, a.block_rows));
  // (a plain launch: the first kernel of the op waits for whatever came before it)
  if constexpr (!Grid) {
    kernel<<<blocks, kSmallThreads, bytes, stream>>>(a, in);
    return cudaGetLastError();
  }
  cudaLaunchAttribute cooperative = {};
  cooperative.id = cudaLaunchAttributeCooperative;
  cooperative.val.cooperative = 1;
  return launch_with(cooperative, kernel, dim3(blocks), dim3(kSmallThreads), bytes, stream, a, in);
}

// The grid launch where fit chose it, else (or where the driver refuses its grid) every block
// counting the whole route: the same result, more reads. The fit counts the context's
// multiprocessors where the driver tells them (grid_capacity); a context that holds fewer blocks
// at once than the fit counted (MPS's thread limit may be one) has its eager cooperative launch
// refused before anything runs, the error cleared.
template <int Kind, typename Rows, typename ProbBits>
cudaError_t launch_small(const Small& a, const Rows& in, cudaStream_t stream) {
  if (a.block_counts != nullptr) {
    const cudaError_t err = launch_small_kernel<Kind, true, Rows, ProbBits>(a, in, stream);
    if (err != cudaErrorCooperativeLaunchTooLarge) return err;
    (void)cudaGetLastError();
  }
  return launch_small_kernel<Kind, false, Rows, ProbBits>(a, in, stream);
}

// The kernel for the route's kind (Maps: whether a multihot map is served) and the probs' width.
template <bool Maps, typename Rows>
cudaError_t launch_small_for(const Small& a, int prob_bytes, const Rows& in, cudaStream_t stream) {
  const auto for_probs = [&](auto prob) {
    using ProbBits = decltype(prob);
    switch (a.route.kind) {
      case kRouteIndex32: return launch_small<kRouteIndex32, Rows, ProbBits>(a, in, stream);
      case kRouteIndex64: return launch_small<kRouteIndex64, Rows, ProbBits>(a, in, stream);
      default:
        if constexpr (Maps) return launch_small<kRouteMultihot, Rows, ProbBits>(a, in, stream);
        return cudaErrorInvalidValue;
    }
  };
  return a.probs != nullptr && prob_bytes == 8 ? for_probs(uint64_t{}) : for_probs(uint32_t{});
}

// Bytes of a dequantized row of `hidden` values (float32, float16 or bfloat16).
int64_t fp8_output_row_bytes(int64_t hidden, DType dtype) { return hidden * (dtype == kFloat32 ? 4 : 2); }

// Whether the one launch, either way of counting, may serve `route` with output rows of
// row_bytes: at most kSmallExperts experts (and kSmallSlots slots of a top-k route), kSmallBytes
// of output rows.
bool small_kind_served(const Route& route, int64_t row_bytes) {
  const bool map = route.kind == kRouteMultihot;
  return route.rows > 0 && route.num_experts <= kSmallExperts && (map || route.slots <= kSmallSlots) &&
         route.rows * row_bytes <= kSmallBytes;
}

// Whether whole-route counts may serve `route`, their reads aside: small_kind_served, and at most
// kSmallEntries entries (kSmallMapEntries of a map).
bool small_served(const Route& route, int64_t row_bytes) {
  const int64_t entries = route.rows * route.slots;
  return small_kind_served(route, row_bytes) &&
         entries <= (route.kind == kRouteMultihot ? kSmallMapEntries : kSmallEntries);
}

// Whether work queued on `stream` is being captured into a CUDA graph. A failed query counts as
// captured (the passes serve either way), its error cleared unless an earlier one was pending.
bool captured(cudaStream_t stream) {
  const cudaError_t pending = cudaPeekAtLastError();
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &status) != cudaSuccess) {
    if (pending == cudaSuccess) (void)cudaGetLastError();
    return true;
  }
  return status != cudaStreamCaptureStatusNone;
}

// The multiprocessors the calling thread's current context may use: a green context's share of
// the device, which the device's attribute does not tell, or -1 where the driver cannot say (the
// device's count then serves). Asked at every call, through the driver's entry points (CUDA
// 12.5 runtime or later): a context's address may be reused by another of another size.
int context_sms() {
#if CUDART_VERSION >= 12050
  using GetCurrent = CUresult (*)(CUcontext*);
  using GetResource = CUresult (*)(CUcontext, CUdevResource*, CUdevResourceType);
  static const auto entry = [](const char* name) -> void* {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion(name, &fn, 12040, cudaEnableDefault, &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return nullptr;
    }
    return fn;
  };
  static const auto get_current = reinterpret_cast<GetCurrent>(entry("cuCtxGetCurrent"));
  static const auto get_resource = reinterpret_cast<GetResource>(entry("cuCtxGetDevResource"));
  CUcontext context = nullptr;
  CUdevResource sms = {};
  if (get_current == nullptr || get_resource == nullptr || get_current(&context) != CUDA_SUCCESS ||
      context == nullptr || get_resource(context, &sms, CU_DEV_RESOURCE_TYPE_SM) != CUDA_SUCCESS) {
    return -1;
  }
  return static_cast<int>(sms.sm.smCount);
#else
  return -1;
#endif
}

// Blocks a cooperative launch of permute_small_kernel may have in the current context: one a
// multiprocessor (its launch bounds leave room for one block whatever its shared memory) of the
// device, or of the context's share where that is smaller (a green context), or 0 where the
// device takes no cooperative launch. The context's share must be known before the launch: a
// graph captured in such a context keeps a grid it cannot hold, and its replay waits forever at
// the grid's barrier (an eager launch is refused instead). The device's attributes are asked
// once per device.
int32_t grid_capacity() {
  static std::atomic<int> cooperative[64], sms[64];
  if (cached_device_attribute(cudaDevAttrCooperativeLaunch, cooperative) <= 0) return 0;
  const int device = std::max(0, cached_device_attribute(cudaDevAttrMultiProcessorCount, sms));
  const int context = context_sms();
  return context > 0 ? std::min(device, context) : device;
}

// The rows a block of the grid launch takes: the fewest for which every block fits on the
// device at once; 0 where none does. small_kind_served, but no limit on entries: its blocks read
// only their own rows of the route.
int32_t grid_block_rows(const Route& route, int64_t row_bytes) {
  if (!small_kind_served(route, row_bytes)) return 0;
  const int32_t capacity = grid_capacity();
  return fewest_block_rows(route, [&](int32_t block_rows) { return small_blocks(route.rows, block_rows) > capacity; });
}

// Every block of the grid launch reads the whole count table (experts x blocks words), which
// past 2^15 words costs more device time than the passes' scan where their launches cost the
// host nothing (a CUDA graph): at 1024 x 1024, K = 8 in 128 blocks on one H100, the kernel took
// 12.8, 13.7 and 15.9 us at E = 128, 256 and 512 by indices, a map of 512 experts 17.5 us
// against 16.6 for the passes' three kernels (one launch eagerly, the passes captured). Past
// 2^16 words the whole-route counts or the passes serve either way.
constexpr int64_t kGridWords = 1 << 16;

// A launch's arguments the fit does not cover: the rows a block takes (as the fit gave them), the
// grid launch's scratch, a known output size, probs of 4 or 8 bytes.
bool small_call_valid(const SmallLaunch& fit, const int32_t* block_counts, int64_t num_out, const void* probs,
                      int prob_bytes) {
  return (fit.block_rows == kSmallRowsFirst || fit.block_rows == kSmallRowsMost) &&
         (fit.grid == (block_counts != nullptr)) && num_out >= 0 &&
         (probs == nullptr || prob_bytes == 4 || prob_bytes == 8);
}

}  // namespace

// (the grid launch wherever it fits with a count table of at most kGridWords / 2 words, or
// kGridWords where the stream is not captured; else small_block_rows: a multihot map within
// kSmallMapReadsEager where the stream is not captured, any route within 1/kCapturedShare of its
// reads where it is: the stream is asked past the smaller limits only)
SmallLaunch permute_small_fit(const Route& route, int64_t row_bytes, cudaStream_t stream) {
  const int32_t grid_rows = grid_block_rows(route, row_bytes);
  const int64_t words = grid_rows ? int64_t(route.num_experts) * small_blocks(route.rows, grid_rows) : 0;
  if (grid_rows != 0 && (words <= kGridWords / 2 || (words <= kGridWords && !captured(stream)))) {
    return SmallLaunch{grid_rows, true};
  }
  if (!small_served(route, row_bytes)) return SmallLaunch{};
  const bool map = route.kind == kRouteMultihot;
  const int64_t limit = map ? kSmallMapReads : kSmallReads;
  int32_t block_rows = small_block_rows(route, limit);
  if (block_rows == 0 && map) block_rows = small_block_rows(route, kSmallMapReadsEager);
  if (block_rows == 0) return SmallLaunch{};
  const bool fits = small_reads(route, block_rows) <= limit / kCapturedShare || !captured(stream);
  return fits ? SmallLaunch{block_rows, false} : SmallLaunch{};
}

int64_t small_grid_words(const Route& route, const SmallLaunch& fit) {
  return fit.grid ? small_blocks(route.rows, fit.block_rows) * (int64_t(route.num_experts) + 1) : 0;
}

cudaError_t permute_small(const Route& route, const SmallLaunch& fit, int32_t* block_counts, int64_t pad_multiple,
                          const void* src, int64_t row_bytes, const void* probs, int prob_bytes, int64_t num_out,
                          void* dst, void* probs_out, int32_t* row_id_map, int64_t* layout, void* host_word,
                          cudaStream_t stream) {
  if (!small_call_valid(fit, block_counts, num_out, probs, prob_bytes)) return cudaErrorInvalidValue;
  const Small a{route,     pad_multiple, static_cast<int32_t>(row_bytes), probs,
                num_out,   static_cast<char*>(dst), probs_out, row_id_map,
                layout,    static_cast<int64_t*>(host_word), fit.block_rows, block_counts};
  // (rows moved in the widest access that divides the row and both pointers)
  return with_vector(row_bytes, src, dst, [&](auto v) {
    return launch_small_for<true>(a, prob_bytes, PlainRows<decltype(v)>{static_cast<const char*>(src),
                                                                         static_cast<int32_t>(row_bytes)}, stream);
  });
}

SmallLaunch permute_fp8_small_fit(const Route& route, int64_t hidden, DType dtype, cudaStream_t stream) {
  const bool served = route.kind != kRouteMultihot && dtype != kFloat64 && hidden % kFp8Group == 0;
  return served ? permute_small_fit(route, fp8_output_row_bytes(hidden, dtype), stream) : SmallLaunch{};
}

cudaError_t permute_fp8_small(const Route& route, const SmallLaunch& fit, int32_t* block_counts,
                              int64_t pad_multiple, DType dtype, const uint8_t* q, int64_t q_pitch,
                              const float* scales, int64_t scale_pitch, int64_t hidden, const void* probs,
                              int prob_bytes, int64_t num_out, void* dst, void* probs_out, int32_t* row_id_map,
                              int64_t* layout, void* host_word, cudaStream_t stream) {
  if (!small_call_valid(fit, block_counts, num_out, probs, prob_bytes)) return cudaErrorInvalidValue;
  const Small a{route,     pad_multiple, static_cast<int32_t>(fp8_output_row_bytes(hidden, dtype)),
                probs,     num_out,      static_cast<char*>(dst),
                probs_out, row_id_map,   layout,
                static_cast<int64_t*>(host_word), fit.block_rows, block_counts};
  const auto launch = [&](auto t) {
    using T = decltype(t);
    return launch_small_for<false>(a, prob_bytes, Fp8Rows<T>{q, q_pitch, scales, scale_pitch,
                                                              static_cast<int32_t>(hidden)}, stream);
  };
  switch (dtype) {
    case kFloat32: return launch(float{});
    case kFloat16: return launch(__half{});
    default: return launch(__nv_bfloat16{});
  }
}

}  // namespace cuda
}  // namespace flexdispatch
