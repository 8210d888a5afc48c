// The permutation plan: which output row each (row, slot) goes to, in stable expert-major
// order (expert 0's rows, then expert 1's, ...; ascending source row inside an expert),
// computed from counts and prefix sums, with no sort and no atomics on the order.
//
// Rows are cut into chunks. Pass 1 (count) marks one bit per (expert, row of the chunk) in
// shared memory and writes each chunk's per-expert count. Pass 2 (scan, one block) turns
// those into per-chunk offsets and the layout (counts, padded counts, expert offsets).
// Pass 3 (map) rebuilds the chunk's bits and ranks each row among the earlier rows of its
// chunk with popcounts: dest = offsets[e] + chunk_offset[chunk, e] + rank. A multihot map's
// count and map keep the bits in registers instead, a lane per expert (see multihot_bits).
#include <algorithm>

#include "common.cuh"
#include "launch.h"
#include "plan.cuh"

namespace flexdispatch {
namespace cuda {
namespace {

constexpr int kScanThreads = 1024;

// The chunk's (row, slot) entries are spread over the block in memory order, a thread per
// entry (thread i takes entries i, i + blockDim, ...): a block of up to kPlanThreads threads
// keeps K times more loads in flight than a thread per row walking its K slots, and reads the
// route coalesced.
constexpr int kPlanThreads = 1024;

// Entries a map thread holds in registers between marking and placing (see route_map_kernel).
constexpr int kHeldEntries = 2;

// Threads for a chunk of chunk_rows rows of `slots` slots: one per entry, whole warps, at most
// kPlanThreads.
int plan_threads(int chunk_rows, int32_t slots) {
  const int64_t entries = std::max<int64_t>(int64_t(chunk_rows) * slots, 32);
  return static_cast<int>(std::min<int64_t>(round_up(entries, 32), kPlanThreads));
}

// The (row, slot) entries of the chunk that starts at row0 (the last chunk may be short).
__device__ __forceinline__ int64_t chunk_entries(const Route& route, int64_t row0, int chunk_rows) {
  const int64_t rows = route.rows - row0 < chunk_rows ? route.rows - row0 : chunk_rows;
  return rows * route.slots;
}

// Expert of entry i (row i / slots of the chunk at row0, slot i % slots) after validation, as
// checked_expert.
template <int Kind>
__device__ __forceinline__ int64_t entry_expert(const Route& route, int64_t row0, int64_t i, int64_t* bad) {
  return checked_expert<Kind>(route, row0 + i / route.slots, static_cast<int32_t>(i % route.slots), bad);
}

// Sets bit (e, c) of the chunk's masks for entry i (row c = i / slots of the chunk) if its slot
// is valid; returns its expert (-1: none).
template <int Kind>
__device__ __forceinline__ int64_t mark_entry(const Route& route, int64_t row0, int64_t i, uint32_t* masks,
                                              int words, int64_t* bad) {
  const int64_t e = entry_expert<Kind>(route, row0, i, bad);
  const int c = static_cast<int>(i / route.slots);
  if (e >= 0) atomicOr(&masks[e * words + c / 32], 1u << (c % 32));
  return e;
}

// Sets bit (e, c) of the chunk's masks for every valid slot of its rows.
template <int Kind>
__device__ void mark_chunk(const Route& route, int64_t row0, int chunk_rows, uint32_t* masks,
                           int words, int64_t* bad) {
  const int64_t entries = chunk_entries(route, row0, chunk_rows);
  for (int64_t i = threadIdx.x; i < entries; i += blockDim.x) mark_entry<Kind>(route, row0, i, masks, words, bad);
}

__device__ void clear_masks(uint32_t* masks, int n) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) masks[i] = 0;
  __syncthreads();
}

// Row c of chunk_counts [chunks, E + 1]: the chunk's count per expert, then its error bits,
// so that no buffer needs clearing before the launch. layout_error (when the map scans, see
// route_map_kernel) is zeroed here, before any map block ORs into it.
template <int Kind>
__global__ void route_count_kernel(Route route, int chunk_rows, int32_t* chunk_counts, int64_t* layout_error) {
  wait_for_previous_grid();
  allow_next_grid();  // (after the wait: the map reads the route before its own, see route_map_kernel)
  if (layout_error != nullptr && blockIdx.x == 0 && threadIdx.x == 0) *layout_error = 0;
  extern __shared__ uint32_t masks[];
  __shared__ int chunk_bad;
  const int words = chunk_rows / 32;
  const int experts = route.num_experts;
  if (threadIdx.x == 0) chunk_bad = 0;
  clear_masks(masks, experts * words);
  int64_t bad = 0;
  mark_chunk<Kind>(route, int64_t(blockIdx.x) * chunk_rows, chunk_rows, masks, words, &bad);
  if (bad) atomicOr(&chunk_bad, static_cast<int>(bad));
  __syncthreads();
  int32_t* row = chunk_counts + int64_t(blockIdx.x) * (experts + 1);
  for (int e = threadIdx.x; e < experts; e += blockDim.x) {
    int n = 0;
    for (int w = 0; w < words; ++w) n += __popc(masks[e * words + w]);
    row[e] = n;
  }
  if (threadIdx.x == 0) row[experts] = chunk_bad;
}

// One block: per expert, an exclusive scan over chunks (in place: counts in, offsets out);
// then the padded counts, an exclusive scan over experts, and the chunks' error bits OR-ed
// into the layout. Writes every entry of the layout.
__global__ void route_scan_kernel(int32_t* chunk_offsets, int64_t num_chunks, int experts,
                                  int64_t pad_multiple, int64_t* layout) {
  wait_for_previous_grid();
  allow_next_grid();
  __shared__ int64_t scratch[32];
  __shared__ int errors;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int stride = experts + 1;
  if (threadIdx.x == 0) errors = 0;
  __syncthreads();
  int bad = 0;
  for (int64_t c = threadIdx.x; c < num_chunks; c += blockDim.x) bad |= chunk_offsets[c * stride + experts];
  if (bad) atomicOr(&errors, bad);
  for (int e = warp; e < experts; e += warps) {
    int64_t running = 0;
    for (int64_t base = 0; base < num_chunks; base += 32) {
      const int64_t c = base + lane;
      const int64_t v = c < num_chunks ? chunk_offsets[c * stride + e] : 0;
      int64_t x = v;
#pragma unroll
      for (int o = 1; o < 32; o *= 2) {
        const int64_t y = __shfl_up_sync(kFullMask, x, o);
        if (lane >= o) x += y;
      }
      if (c < num_chunks) chunk_offsets[c * stride + e] = static_cast<int32_t>(running + x - v);
      running += __shfl_sync(kFullMask, x, 31);
    }
    if (lane == 0) {
      layout[layout_counts(experts) + e] = running;
      layout[layout_padded(experts) + e] = round_up(running, pad_multiple);
    }
  }
  __syncthreads();

  const int64_t* padded = layout + layout_padded(experts);
  scan_expert_offsets(experts, [padded](int e) { return padded[e]; }, scratch, layout + layout_offsets(experts));
  if (threadIdx.x == 0) layout[layout_error(experts)] = errors;
}

// Small tables (chunks * E <= kMapScanEntries, E <= kMapScanExperts) of a route whose output
// size is known: the map pass does the scan's work itself, and the scan's launch goes. Every
// block reads the whole count table ([chunks, E + 1], coalesced, a few words a thread) into
// shared sums: the expert totals, its own chunk's offsets within each expert (the sum over the
// chunks before it), the error bits; then the padded totals' exclusive scan gives the expert
// offsets. Block 0 writes the layout; the error word, zeroed by the count pass, is OR-ed by
// every block (another block's overflow may land before or after block 0's store). A multihot
// route's map (a grid of chunks by 32 experts) does the same, its blocks of chunk c taking
// chunk c's offsets.
constexpr int64_t kMapScanEntries = 8192;
constexpr int kMapScanExperts = 512;

// Bytes of shared memory the scanning map needs beside the masks.
size_t map_scan_bytes(int experts) { return 32 * 8 + (size_t(experts) + 1) * 8 + size_t(experts) * 8 + 8; }

// Where a map block places its chunk's rows: the expert offsets [E + 1] (with the total), this
// chunk's offset within each expert [E], and the count pass's error bits still to report
// (0 where the scan kernel has reported them).
struct ChunkPlace {
  const int64_t* offsets;
  const int32_t* chunk_base;
  int errors;
};

// The scan's results for this block, in `shared` (after the masks): offsets [E + 1] int64,
// before [E] int32 (this chunk's offset within each expert).
__device__ ChunkPlace scan_in_block(const int32_t* chunk_counts, int64_t num_chunks, int experts,
                                    int64_t pad_multiple, char* shared, int64_t* layout) {
  int64_t* scratch = reinterpret_cast<int64_t*>(shared);  // 32 int64 for block_exclusive_scan
  int64_t* offsets = scratch + 32;
  int32_t* before = reinterpret_cast<int32_t*>(offsets + experts + 1);
  int32_t* total = before + experts;
  int32_t* errors = total + experts;
  for (int e = threadIdx.x; e < experts; e += blockDim.x) before[e] = total[e] = 0;
  if (threadIdx.x == 0) *errors = 0;
  __syncthreads();
  const int stride = experts + 1;
  for (int64_t i = threadIdx.x; i < num_chunks * stride; i += blockDim.x) {
    const int32_t v = chunk_counts[i];
    const int64_t c = i / stride;
    const int e = static_cast<int>(i % stride);
    if (v == 0) continue;
    if (e == experts) {
      atomicOr(errors, v);
    } else {
      atomicAdd(&total[e], v);
      if (c < blockIdx.x) atomicAdd(&before[e], v);
    }
  }
  __syncthreads();
  offsets_from_totals(total, experts, pad_multiple, scratch, offsets,
                      blockIdx.x == 0 && blockIdx.y == 0 ? layout : nullptr);
  return {offsets, before, *errors};
}

// A map block's ChunkPlace: from the scan kernel's layout and chunk offsets, or (Scans) from the
// raw counts, summed by scan_in_block in `shared`.
template <bool Scans>
__device__ ChunkPlace chunk_place(const int32_t* chunk_offsets, int64_t num_chunks, int experts,
                                  int64_t pad_multiple, char* shared, int64_t* layout) {
  if constexpr (Scans) {
    return scan_in_block(chunk_offsets, num_chunks, experts, pad_multiple, shared, layout);
  } else {
    return {layout + layout_offsets(experts), chunk_offsets + int64_t(blockIdx.x) * (experts + 1), 0};
  }
}

// chunk_offsets: the scan's per-chunk offsets, or with Scans the count pass's raw counts
// (num_chunks and pad_multiple serve that case only).
template <int Kind, typename ProbBits, bool Scans>
__global__ void route_map_kernel(Route route, int chunk_rows, const int32_t* chunk_offsets,
                                 int64_t* layout, const ProbBits* probs, int64_t num_out,
                                 int32_t* row_id_map, ProbBits* probs_out, int64_t num_chunks,
                                 int64_t pad_multiple) {
  allow_next_grid();
  extern __shared__ uint32_t masks[];
  const int words = chunk_rows / 32;
  const int experts = route.num_experts;
  // The chunk's bits come from the route alone, which was complete before the count pass let
  // this grid start: marked while the count pass still runs.
  clear_masks(masks, experts * words);
  const int64_t row0 = int64_t(blockIdx.x) * chunk_rows;
  int64_t chunk_bad = 0;  // (the count pass reported these; the scan carries them)
  const int64_t entries = chunk_entries(route, row0, chunk_rows);
  // A thread's first kHeldEntries entries keep their expert and prob in registers from marking
  // to placing, so that after the wait nothing of the route or the probs is read again (a chunk
  // of 256 rows of up to 8 slots is held whole by 1024 threads); the rest are read again.
  int32_t held[kHeldEntries];
  ProbBits held_prob[kHeldEntries];
#pragma unroll
  for (int j = 0; j < kHeldEntries; ++j) {
    const int64_t i = threadIdx.x + int64_t(j) * blockDim.x;
    held[j] = i < entries ? static_cast<int32_t>(mark_entry<Kind>(route, row0, i, masks, words, &chunk_bad)) : -1;
    held_prob[j] = probs != nullptr && held[j] >= 0 ? probs[row0 * route.slots + i] : ProbBits{};
  }
  for (int64_t i = threadIdx.x + int64_t(kHeldEntries) * blockDim.x; i < entries; i += blockDim.x) {
    mark_entry<Kind>(route, row0, i, masks, words, &chunk_bad);
  }
  wait_for_previous_grid();
  const ChunkPlace place = chunk_place<Scans>(chunk_offsets, num_chunks, experts, pad_multiple,
                                              reinterpret_cast<char*>(masks + experts * words), layout);
  const int64_t* offsets = place.offsets;
  __syncthreads();

  // The padded rows must fit too: real rows that fit while the padding does not are an overflow.
  int64_t overflow = blockIdx.x == 0 && threadIdx.x == 0 && offsets[experts] > num_out ? kOutputOverflow : 0;
  // Output row of entry i of expert e (-1: none): the expert's offset, the chunk's within it, and
  // the rank of row c among the chunk's earlier rows of e.
  const auto dest_of = [&](int64_t i, int64_t e) -> int64_t {
    if (e < 0) return -1;
    const int c = static_cast<int>(i / route.slots);
    const uint32_t* m = masks + e * words;
    int rank = __popc(m[c / 32] & ((1u << (c % 32)) - 1u));
    for (int w = 0; w < c / 32; ++w) rank += __popc(m[w]);
    return offsets[e] + place.chunk_base[e] + rank;
  };
#pragma unroll
  for (int j = 0; j < kHeldEntries; ++j) {
    const int64_t i = threadIdx.x + int64_t(j) * blockDim.x;
    if (i < entries) {
      place_loaded_slot(dest_of(i, held[j]), row0 * route.slots + i, probs != nullptr, held_prob[j], num_out,
                        row_id_map, probs_out, &overflow);
    }
  }
  for (int64_t i = threadIdx.x + int64_t(kHeldEntries) * blockDim.x; i < entries; i += blockDim.x) {
    place_slot(dest_of(i, entry_expert<Kind>(route, row0, i, &chunk_bad)), row0 * route.slots + i, probs, num_out,
               row_id_map, probs_out, &overflow);
  }
  if (threadIdx.x == 0 && place.errors) overflow |= place.errors;  // (one OR per block: idempotent)
  if (overflow) or_error(layout + layout_error(experts), overflow);
}

// A multihot map's passes, over a grid of (chunk, 32 experts): lane l of warp w reads column
// e = 32 * blockIdx.y + l of the chunk's kMultihotWarpRows rows from kMultihotWarpRows * w, one
// coalesced 32-byte row segment per warp step, and keeps their bits for e in a register. The map
// is read across the whole GPU (a thread per row walking its E bytes would leave a few chunk
// blocks to read E-byte strides and write the map a row of E words per thread), and no
// shared-memory atomics are needed. Eight rows a lane make a chunk of 256 rows a block of 1024
// threads: the map pass's stores and the scan's table reads spread over four times the threads
// that 32 rows a lane gave, which left a GPU-wide map (32768 x 32) at one block of 8 warps an SM.
constexpr int kMultihotWarpRows = 8;  // (bits of a uint32_t)
constexpr int kMultihotMaxWarps = kChunkRowsMost / kMultihotWarpRows;

__device__ __forceinline__ uint32_t multihot_bits(const Route& route, int64_t row0, int e) {
  uint32_t bits = 0;
  if (e >= route.num_experts) return 0;
  const uint8_t* column = static_cast<const uint8_t*>(route.data) + e;
  // Unrolled and predicated rather than left at the last row: the loads are issued together
  // instead of one memory latency after another (a 4096-row count pass at E = 256 took 13 us
  // with the early exit, 5 us without, one H100).
#pragma unroll
  for (int r = 0; r < kMultihotWarpRows; ++r) {
    const int64_t row = row0 + r;
    if (row < route.rows && column[row * route.slots]) bits |= 1u << r;
  }
  return bits;
}

// A chunk has chunk_rows / kMultihotWarpRows warps (at most kMultihotMaxWarps).
inline int multihot_threads(int chunk_rows) { return chunk_rows / kMultihotWarpRows * 32; }

__device__ __forceinline__ int64_t multihot_warp_row0(int chunk_rows) {
  return int64_t(blockIdx.x) * chunk_rows + kMultihotWarpRows * (threadIdx.x / 32);
}

// Column `lane`'s set bits in the chunk's warps below `warp` (warp_counts: a warp's popcounts per
// lane): independent shared loads, issued together.
__device__ __forceinline__ int32_t warps_below(const int32_t (*warp_counts)[32], int lane, int warp) {
  int32_t n = 0;
#pragma unroll
  for (int w = 0; w < kMultihotMaxWarps; ++w) n += w < warp ? warp_counts[w][lane] : 0;
  return n;
}

__global__ void __launch_bounds__(kMultihotMaxWarps * 32)
    route_count_multihot_kernel(Route route, int chunk_rows, int32_t* chunk_counts, int64_t* layout_error) {
  wait_for_previous_grid();
  allow_next_grid();  // (after the wait, as route_count_kernel)
  // (zeroed before any map block ORs into it: as route_count_kernel)
  if (layout_error != nullptr && blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) *layout_error = 0;
  __shared__ int32_t warp_counts[kMultihotMaxWarps][32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, e = 32 * blockIdx.y + lane;
  warp_counts[warp][lane] = __popc(multihot_bits(route, multihot_warp_row0(chunk_rows), e));
  __syncthreads();
  int32_t* row = chunk_counts + int64_t(blockIdx.x) * (route.num_experts + 1);
  if (warp == 0 && e < route.num_experts) row[e] = warps_below(warp_counts, lane, blockDim.x / 32);
  if (blockIdx.y == 0 && threadIdx.x == 0) row[route.num_experts] = 0;  // (a multihot map has no bad slot)
}

// chunk_offsets: as route_map_kernel's (the raw counts with Scans).
template <typename ProbBits, bool Scans>
__global__ void __launch_bounds__(kMultihotMaxWarps * 32)
    route_map_multihot_kernel(Route route, int chunk_rows, const int32_t* chunk_offsets, int64_t* layout,
                              const ProbBits* probs, int64_t num_out, int32_t* row_id_map, ProbBits* probs_out,
                              int64_t num_chunks, int64_t pad_multiple) {
  allow_next_grid();
  __shared__ int32_t warp_counts[kMultihotMaxWarps][32];
  extern __shared__ __align__(16) char scan_space[];
  const int experts = route.num_experts;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, e = 32 * blockIdx.y + lane;
  // The column's bits and the probs of its set bits (a bit is set only on a row of the route)
  // come from the op's inputs alone, complete before the count pass let this grid start: read
  // while the count pass still runs, the probs together before any store (loaded inside the
  // store loop, each waited a memory latency behind the last store, which may alias it).
  const int64_t row0 = multihot_warp_row0(chunk_rows);
  const uint32_t bits = multihot_bits(route, row0, e);
  ProbBits prob[kMultihotWarpRows];
#pragma unroll
  for (int r = 0; r < kMultihotWarpRows; ++r) {
    prob[r] = probs != nullptr && (bits >> r) & 1u ? probs[(row0 + r) * route.slots + e] : ProbBits{};
  }
  warp_counts[warp][lane] = __popc(bits);
  wait_for_previous_grid();
  // (a multihot map has no bad slot: the count pass writes 0 errors)
  const ChunkPlace place = chunk_place<Scans>(chunk_offsets, num_chunks, experts, pad_multiple, scan_space, layout);
  const int64_t* offsets = place.offsets;
  __syncthreads();  // (also orders warp_counts, when the place came from the scan's layout)
  int64_t overflow = blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0 && offsets[experts] > num_out
                         ? kOutputOverflow : 0;
  if (e < experts) {
    const int64_t first = offsets[e] + place.chunk_base[e] + warps_below(warp_counts, lane, warp);
#pragma unroll
    for (int r = 0; r < kMultihotWarpRows; ++r) {
      const int64_t row = row0 + r;
      if (row >= route.rows) break;
      const int64_t dest = (bits >> r) & 1u ? first + __popc(bits & ((1u << r) - 1u)) : -1;
      place_loaded_slot(dest, row * route.slots + e, probs != nullptr, prob[r], num_out, row_id_map, probs_out,
                        &overflow);
    }
  }
  if (overflow) or_error(layout + layout_error(experts), overflow);
}

// The (chunk, 32-expert group) grid of the multihot passes.
dim3 multihot_grid(int64_t chunks, int experts) {
  return dim3(static_cast<unsigned>(chunks), static_cast<unsigned>((experts + 31) / 32));
}

size_t mask_bytes(int experts, int chunk_rows) { return size_t(experts) * (chunk_rows / 32) * 4; }

// The count pass: rows in chunks (a multihot map over (chunk, 32 experts)).
template <int Kind>
cudaError_t count_chunks(const Route& route, int chunk_rows, int64_t chunks, int32_t* chunk_offsets,
                         int64_t* layout_error, cudaStream_t stream) {
  if constexpr (Kind == kRouteMultihot) {
    return launch_after_previous(route_count_multihot_kernel, multihot_grid(chunks, route.num_experts),
                                 multihot_threads(chunk_rows), 0,
                                 stream, route, chunk_rows, chunk_offsets, layout_error);
  } else {
    const size_t bytes = mask_bytes(route.num_experts, chunk_rows);
    const cudaError_t err = allow_dynamic_shared(route_count_kernel<Kind>, bytes);
    if (err != cudaSuccess) return err;
    return launch_after_previous(route_count_kernel<Kind>, static_cast<unsigned>(chunks),
                                 plan_threads(chunk_rows, route.slots), bytes, stream, route, chunk_rows, chunk_offsets,
                                 layout_error);
  }
}

// Count, then scan unless the map will (scan false: see map_scans).
template <int Kind>
cudaError_t plan(const Route& route, int64_t pad_multiple, int32_t* chunk_offsets,
                 int64_t* layout, bool scan, cudaStream_t stream) {
  const int chunk_rows = chunk_rows_for(route.num_experts);
  const int64_t chunks = num_chunks_for(route.rows, route.num_experts);
  if (chunks > 0) {
    int64_t* error_word = scan ? nullptr : layout + layout_error(route.num_experts);
    const cudaError_t err = count_chunks<Kind>(route, chunk_rows, chunks, chunk_offsets, error_word, stream);
    if (err != cudaSuccess) return err;
  }
  if (!scan) return cudaSuccess;
  return launch_after_previous(route_scan_kernel, 1, kScanThreads, 0, stream, chunk_offsets, chunks,
                               route.num_experts, pad_multiple, layout);
}

template <int Kind, typename ProbBits>
cudaError_t map(const Route& route, const int32_t* chunk_offsets, int64_t* layout,
                const void* probs, int64_t num_out, int32_t* row_id_map, void* probs_out,
                bool scans, int64_t pad_multiple, cudaStream_t stream) {
  const int chunk_rows = chunk_rows_for(route.num_experts);
  const int64_t chunks = num_chunks_for(route.rows, route.num_experts);
  if (chunks == 0) return cudaSuccess;
  if constexpr (Kind == kRouteMultihot) {
    const auto kernel = scans ? route_map_multihot_kernel<ProbBits, true> : route_map_multihot_kernel<ProbBits, false>;
    return launch_after_previous(kernel, multihot_grid(chunks, route.num_experts), multihot_threads(chunk_rows),
                                 scans ? map_scan_bytes(route.num_experts) : 0, stream, route, chunk_rows,
                                 chunk_offsets, layout, static_cast<const ProbBits*>(probs), num_out, row_id_map,
                                 static_cast<ProbBits*>(probs_out), chunks, pad_multiple);
  } else {
    const auto kernel = scans ? route_map_kernel<Kind, ProbBits, true> : route_map_kernel<Kind, ProbBits, false>;
    const size_t bytes = mask_bytes(route.num_experts, chunk_rows) + (scans ? map_scan_bytes(route.num_experts) : 0);
    const cudaError_t err = allow_dynamic_shared(kernel, bytes);
    if (err != cudaSuccess) return err;
    return launch_after_previous(kernel, static_cast<unsigned>(chunks), plan_threads(chunk_rows, route.slots), bytes,
                                 stream, route, chunk_rows, chunk_offsets, layout, static_cast<const ProbBits*>(probs),
                                 num_out, row_id_map, static_cast<ProbBits*>(probs_out), chunks, pad_multiple);
  }
}

template <typename ProbBits>
cudaError_t map_by_kind(const Route& route, const int32_t* chunk_offsets, int64_t* layout,
                        const void* probs, int64_t num_out, int32_t* row_id_map, void* probs_out,
                        bool scans, int64_t pad_multiple, cudaStream_t stream) {
  switch (route.kind) {
    case kRouteIndex32:
      return map<kRouteIndex32, ProbBits>(route, chunk_offsets, layout, probs, num_out,
                                          row_id_map, probs_out, scans, pad_multiple, stream);
    case kRouteIndex64:
      return map<kRouteIndex64, ProbBits>(route, chunk_offsets, layout, probs, num_out,
                                          row_id_map, probs_out, scans, pad_multiple, stream);
    case kRouteMultihot:
      return map<kRouteMultihot, ProbBits>(route, chunk_offsets, layout, probs, num_out,
                                           row_id_map, probs_out, scans, pad_multiple, stream);
  }
  return cudaErrorInvalidValue;
}

constexpr int kRankThreads = 256;
constexpr int kRankMaxBlocks = 264;       // grid-strided: each block flushes its histogram once
constexpr int32_t kRankSharedExperts = 8192;  // experts counted in shared memory (32 KB), else in global

// A thread per token: its row of in_rank (written whole: no zeroing pass), and its ranks and
// experts counted in the block's histogram (counts' layout: [world, 1 + local], a rank's token
// count before its experts), flushed with one atomic per entry and block.
template <typename I>
__global__ void route_by_rank_kernel(const I* __restrict__ indices, int64_t rows, int32_t slots, int32_t world,
                                     int32_t local, uint8_t* __restrict__ in_rank, int64_t* __restrict__ counts) {
  extern __shared__ int32_t hist[];
  const int32_t experts = world * local, entries = world * (local + 1);
  const bool shared = experts <= kRankSharedExperts;
  auto count = [&](int32_t entry) {
    if (shared) {
      atomicAdd(&hist[entry], 1);
    } else {
      atomicAdd(reinterpret_cast<unsigned long long*>(counts + entry), 1ull);
    }
  };
  if (shared) {
    for (int32_t e = threadIdx.x; e < entries; e += blockDim.x) hist[e] = 0;
    __syncthreads();
  }
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < rows; t += int64_t(gridDim.x) * blockDim.x) {
    uint8_t* mine = in_rank + t * world;
    for (int32_t w = 0; w < world; ++w) mine[w] = 0;
    for (int32_t s = 0; s < slots; ++s) {
      const int64_t e = static_cast<int64_t>(indices[t * slots + s]);
      if (e < 0 || e >= experts) continue;
      const int32_t w = static_cast<int32_t>(e / local);
      if (!mine[w]) count(w * (local + 1));  // (the token's first expert on rank w)
      mine[w] = 1;
      count(w * (local + 1) + 1 + static_cast<int32_t>(e % local));
    }
  }
  if (shared) {
    __syncthreads();
    for (int32_t e = threadIdx.x; e < entries; e += blockDim.x) {
      if (hist[e]) atomicAdd(reinterpret_cast<unsigned long long*>(counts + e), static_cast<unsigned long long>(hist[e]));
    }
  }
}

// A thread per (row, slot) of the received routing rows (launch.h, received_routing).
template <typename P>
__global__ void received_routing_kernel(const double* __restrict__ meta, int64_t rows, int64_t stride, int32_t id_col,
                                        int32_t slots, int64_t first, int64_t local,
                                        const bool* __restrict__ has_source, int64_t* __restrict__ indices,
                                        P* __restrict__ probs) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < rows * slots;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / slots, s = i % slots;
    const double* row = meta + r * stride + id_col;
    const int64_t expert = static_cast<int64_t>(row[s]);  // (truncates, as torch's .long())
    const int64_t mine = expert - first;
    const bool kept = expert >= 0 && mine >= 0 && mine < local && (has_source == nullptr || has_source[r]);
    indices[i] = kept ? mine : -1;
    probs[i] = kept ? static_cast<P>(row[slots + s]) : P(0);
  }
}

}  // namespace

cudaError_t route_by_rank(const void* indices, bool indices_are_64bit, int64_t rows, int32_t slots, int32_t world,
                          int32_t local, uint8_t* in_rank, int64_t* expert_counts, cudaStream_t stream) {
  const int32_t experts = world * local, entries = world * (local + 1);
  cudaError_t err = cudaMemsetAsync(expert_counts, 0, sizeof(int64_t) * entries, stream);
  if (err != cudaSuccess || rows == 0) return err;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(grid_for(rows, kRankThreads), kRankMaxBlocks));
  const size_t shared = experts <= kRankSharedExperts ? sizeof(int32_t) * entries : 0;
  if (indices_are_64bit) {
    route_by_rank_kernel<<<grid, kRankThreads, shared, stream>>>(static_cast<const int64_t*>(indices), rows, slots,
                                                                 world, local, in_rank, expert_counts);
  } else {
    route_by_rank_kernel<<<grid, kRankThreads, shared, stream>>>(static_cast<const int32_t*>(indices), rows, slots,
                                                                 world, local, in_rank, expert_counts);
  }
  return cudaGetLastError();
}

cudaError_t received_routing(const double* meta, int64_t rows, int64_t stride, int32_t id_col, int32_t slots,
                             int64_t first, int64_t local, const bool* has_source, int64_t* indices, void* probs,
                             bool probs_are_64bit, cudaStream_t stream) {
  if (rows == 0 || slots == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(grid_for(rows * slots, kThreads), 1024));
  if (probs_are_64bit) {
    received_routing_kernel<<<grid, kThreads, 0, stream>>>(meta, rows, stride, id_col, slots, first, local,
                                                           has_source, indices, static_cast<double*>(probs));
  } else {
    received_routing_kernel<<<grid, kThreads, 0, stream>>>(meta, rows, stride, id_col, slots, first, local,
                                                           has_source, indices, static_cast<float*>(probs));
  }
  return cudaGetLastError();
}

bool map_scans(const Route& route) {
  const int64_t chunks = num_chunks_for(route.rows, route.num_experts);
  return chunks > 0 && route.num_experts <= kMapScanExperts &&
         chunks * (int64_t(route.num_experts) + 1) <= kMapScanEntries;
}

cudaError_t route_plan(const Route& route, int64_t pad_multiple, int32_t* chunk_offsets,
                       int64_t* layout, bool scan, cudaStream_t stream) {
  if (chunk_rows_for(route.num_experts) == 0) return cudaErrorInvalidValue;
  switch (route.kind) {
    case kRouteIndex32:
      return plan<kRouteIndex32>(route, pad_multiple, chunk_offsets, layout, scan, stream);
    case kRouteIndex64:
      return plan<kRouteIndex64>(route, pad_multiple, chunk_offsets, layout, scan, stream);
    case kRouteMultihot:
      return plan<kRouteMultihot>(route, pad_multiple, chunk_offsets, layout, scan, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t route_map(const Route& route, const int32_t* chunk_offsets, int64_t* layout,
                      const void* probs, int prob_bytes, int64_t num_out, int32_t* row_id_map,
                      void* probs_out, bool scans, int64_t pad_multiple, cudaStream_t stream) {
  if (probs != nullptr && prob_bytes == 8) {
    return map_by_kind<uint64_t>(route, chunk_offsets, layout, probs, num_out, row_id_map,
                                 probs_out, scans, pad_multiple, stream);
  }
  if (probs != nullptr && prob_bytes != 4) return cudaErrorInvalidValue;
  return map_by_kind<uint32_t>(route, chunk_offsets, layout, probs, num_out, row_id_map,
                               probs_out, scans, pad_multiple, stream);
}

}  // namespace cuda
}  // namespace flexdispatch
