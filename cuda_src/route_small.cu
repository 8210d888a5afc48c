// The permutation of a small route (top-k indices, or a multihot map whose slots are its
// experts) in one launch, its rows moved as they are or dequantized from FP8. For a route of a
// few thousand (row, slot) entries (a multihot map of up to 64K), the multi-pass plan's launches
// (count, map, scatter: route.cu, rows.cu) cost the host and the device more than their work
// does. Here every block counts the whole route itself (at most 64 KB, read from L2), scans the
// padded expert totals, places the slots of its own kSmallRows rows and moves those rows; block
// 0 writes the layout. The result equals the multi-pass plan's bit for bit: a slot's output row
// is its expert's offset plus the number of earlier rows routed to that expert. The kernel also
// stores its error word to the caller's pinned host word (when given), which spares the op a
// launch to copy it there.
#include <algorithm>

#include "common.cuh"
#include "fp8.cuh"
#include "launch.h"
#include "plan.cuh"

namespace flexdispatch {
namespace cuda {
namespace {

constexpr int kSmallThreads = 1024;  // (the count reads the whole route: many loads in flight)
constexpr int kSmallRows = 8;             // rows a block places and moves (a bit each in `mine`)
constexpr int32_t kSmallExperts = 1024;   // shared memory: about 20 bytes an expert
constexpr int32_t kSmallSlots = 64;
constexpr int64_t kSmallEntries = 8192;   // (row, slot) entries of a top-k route
constexpr int64_t kSmallReads = 1 << 20;  // entries read by all blocks together (entries * blocks)
// A multihot map is counted a warp's 32 rows and an expert at a time (count_multihot), a few
// times faster an entry than a top-k route's slots, so its limits are 8 times larger.
constexpr int64_t kSmallMapEntries = 8 * kSmallEntries;
constexpr int64_t kSmallMapReads = 8 * kSmallReads;
constexpr int64_t kSmallBytes = 4 << 20;  // bytes of output rows: beyond, the multi-pass scatter's wide grid wins

int64_t small_blocks(int64_t rows) { return (rows + kSmallRows - 1) / kSmallRows; }

// scratch [32] and offsets [E + 1] int64, then total, before and mine [E] and dests
// [kSmallRows * slots] int32.
size_t small_shared_bytes(int32_t experts, int32_t slots) {
  return sizeof(int64_t) * (32 + size_t(experts) + 1) + sizeof(int32_t) * (3 * size_t(experts) + size_t(kSmallRows) * slots);
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

// A multihot map's counts (its slot s names expert s where set; it has no bad slot): a warp
// takes 32 rows at a time, a lane a row, whose bytes it loads first as 4-byte words (the loads
// issued together); the rows among the 32 that have expert e are one ballot, added once to
// total[e] and to before[e] (for the rows ahead of row0); the block's own rows set their bits of
// mine[e]. Every thread of the block calls it.
constexpr int kMapWords = kSmallSlots / 4;  // a map row of at most kSmallSlots bytes, in words

__device__ void count_multihot(const Route& route, int32_t row0, int32_t* total, int32_t* before, uint32_t* mine) {
  const int32_t rows = static_cast<int32_t>(route.rows), slots = route.slots;
  const uint8_t* map = static_cast<const uint8_t*>(route.data);
  const bool whole_words = slots % 4 == 0 && reinterpret_cast<uintptr_t>(map) % 4 == 0;
  const int lane = threadIdx.x % 32;
  for (int32_t first = threadIdx.x - lane; first < rows; first += blockDim.x) {  // (warp-uniform)
    const int32_t row = first + lane;
    const int32_t ahead = min(max(row0 - first, 0), 32);  // lanes whose rows come before row0
    const unsigned ahead_lanes = ahead == 32 ? kFullMask : (1u << ahead) - 1u;
    const bool moved = row >= row0 && row < row0 + kSmallRows;
    const uint8_t* bytes = map + int64_t(row < rows ? row : first) * slots;  // (a lane past the end counts 0)
    uint32_t words[kMapWords];
#pragma unroll
    for (int i = 0; i < kMapWords; ++i) {
      words[i] = 0;
      if (row >= rows || 4 * i >= slots) continue;
      if (whole_words) {
        words[i] = reinterpret_cast<const uint32_t*>(bytes)[i];
      } else {
        for (int j = 0; j < 4 && 4 * i + j < slots; ++j) words[i] |= uint32_t(bytes[4 * i + j]) << (8 * j);
      }
    }
#pragma unroll
    for (int i = 0; i < kMapWords; ++i) {
      if (4 * i >= slots) break;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int32_t e = 4 * i + j;
        if (e >= slots) break;
        const bool has = (words[i] >> (8 * j)) & 0xffu;
        const unsigned lanes = __ballot_sync(kFullMask, has);
        if (lane == 0 && lanes != 0) {
          atomicAdd(&total[e], __popc(lanes));
          if (lanes & ahead_lanes) atomicAdd(&before[e], __popc(lanes & ahead_lanes));
        }
        if (has && moved) atomicOr(&mine[e], 1u << (row - row0));
      }
    }
  }
}

template <int Kind, typename Rows, typename ProbBits>
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
  int32_t* dests = reinterpret_cast<int32_t*>(mine + experts);  // this block's slots' output rows
  for (int e = threadIdx.x; e < experts; e += blockDim.x) {
    total[e] = 0;
    before[e] = 0;
    mine[e] = 0;
  }
  if (threadIdx.x == 0) errors = 0;
  __syncthreads();

  const int32_t route_rows = static_cast<int32_t>(route.rows);
  const int32_t row0 = static_cast<int32_t>(blockIdx.x) * kSmallRows;
  int64_t bad = 0;
  if constexpr (Kind == kRouteMultihot) {
    count_multihot(route, row0, total, before, mine);
  } else {
    // A thread counts whole rows (entries < 2^13: 32-bit indices, no division). The lanes of a
    // warp that add to one counter add once (with few experts, many lanes share each counter),
    // so the warps run the loop together: rows past the route count nothing.
    const int lane = threadIdx.x % 32;
    for (int32_t row = threadIdx.x; row < round_up(route_rows, 32); row += blockDim.x) {
      const int where = row < row0 ? 0 : (row < row0 + kSmallRows ? 1 : 2);  // before, mine, after
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

  const int rows = min(kSmallRows, route_rows - row0);
  int64_t overflow = 0;  // (already in the error word)
  for (int i = threadIdx.x; i < rows * slots; i += blockDim.x) {
    const int c = i / slots;
    int64_t counted = 0;  // (already in the error word)
    const int64_t e = checked_expert<Kind>(route, row0 + c, i % slots, &counted);
    const int64_t dest = e < 0 ? -1 : offsets[e] + before[e] + __popc(mine[e] & ((1u << c) - 1u));
    dests[i] = place_slot(dest, int64_t(row0) * slots + i, probs, num_out, a.row_id_map, probs_out, &overflow);
  }
  __syncthreads();

  // The block's rows: each vector read once and stored at every destination of its row.
  const int32_t vecs = in.units();  // (rows * row_bytes < 2^22)
  for (int32_t i = threadIdx.x; i < rows * vecs; i += blockDim.x) {
    const int32_t c = i / vecs, v = i % vecs;
    const V x = in.load(row0 + c, v);
    for (int32_t s = 0; s < slots; ++s) {
      const int32_t d = dests[c * slots + s];
      if (d >= 0) reinterpret_cast<V*>(dst + int64_t(d) * row_bytes)[v] = x;
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

template <int Kind, typename Rows, typename ProbBits>
cudaError_t launch_small(const Small& a, const Rows& in, cudaStream_t stream) {
  const size_t bytes = small_shared_bytes(a.route.num_experts, a.route.slots);
  const auto kernel = permute_small_kernel<Kind, Rows, ProbBits>;
  const cudaError_t err = allow_dynamic_shared(kernel, bytes);
  if (err != cudaSuccess) return err;
  // (a plain launch: the first kernel of the op waits for whatever came before it)
  kernel<<<static_cast<unsigned>(small_blocks(a.route.rows)), kSmallThreads, bytes, stream>>>(a, in);
  return cudaGetLastError();
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

}  // namespace

bool permute_small_fits(const Route& route, int64_t row_bytes) {
  if (route.rows == 0) return false;
  const bool map = route.kind == kRouteMultihot;
  const int64_t entries = route.rows * route.slots;
  return route.num_experts <= kSmallExperts && route.slots <= kSmallSlots &&
         entries <= (map ? kSmallMapEntries : kSmallEntries) &&
         entries * small_blocks(route.rows) <= (map ? kSmallMapReads : kSmallReads) &&
         route.rows * row_bytes <= kSmallBytes;
}

cudaError_t permute_small(const Route& route, int64_t pad_multiple, const void* src, int64_t row_bytes,
                          const void* probs, int prob_bytes, int64_t num_out, void* dst, void* probs_out,
                          int32_t* row_id_map, int64_t* layout, void* host_word, cudaStream_t stream) {
  if (!permute_small_fits(route, row_bytes) || num_out < 0) return cudaErrorInvalidValue;
  if (probs != nullptr && prob_bytes != 4 && prob_bytes != 8) return cudaErrorInvalidValue;
  const Small a{route,    pad_multiple, static_cast<int32_t>(row_bytes), probs,  num_out, static_cast<char*>(dst),
                probs_out, row_id_map,   layout,                          static_cast<int64_t*>(host_word)};
  // (rows moved in the widest access that divides the row and both pointers)
  return with_vector(row_bytes, src, dst, [&](auto v) {
    return launch_small_for<true>(a, prob_bytes, PlainRows<decltype(v)>{static_cast<const char*>(src),
                                                                         static_cast<int32_t>(row_bytes)}, stream);
  });
}

bool permute_fp8_small_fits(const Route& route, int64_t hidden, DType dtype) {
  return route.kind != kRouteMultihot && dtype != kFloat64 && hidden % kFp8Group == 0 &&
         permute_small_fits(route, fp8_output_row_bytes(hidden, dtype));
}

cudaError_t permute_fp8_small(const Route& route, int64_t pad_multiple, DType dtype, const uint8_t* q,
                              int64_t q_pitch, const float* scales, int64_t scale_pitch, int64_t hidden,
                              const void* probs, int prob_bytes, int64_t num_out, void* dst, void* probs_out,
                              int32_t* row_id_map, int64_t* layout, void* host_word, cudaStream_t stream) {
  if (!permute_fp8_small_fits(route, hidden, dtype) || num_out < 0) return cudaErrorInvalidValue;
  if (probs != nullptr && prob_bytes != 4 && prob_bytes != 8) return cudaErrorInvalidValue;
  const Small a{route,     pad_multiple, static_cast<int32_t>(fp8_output_row_bytes(hidden, dtype)),
                probs,     num_out,      static_cast<char*>(dst),
                probs_out, row_id_map,   layout,
                static_cast<int64_t*>(host_word)};
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
