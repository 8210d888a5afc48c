// Device helpers of the permutation plan, shared by the multi-pass plan (route.cu) and the
// one-launch permutation of small routes (route_small.cu): slot validation, the scan of the
// padded expert counts, a slot's placement, and zeroing a row no source fills.
#pragma once

#include "common.cuh"
#include "launch.h"

namespace flexdispatch {
namespace cuda {

// Expert of a slot after validation: -1 for an unused, out-of-range or repeated slot, so
// that count and map agree and nothing is ever written out of bounds; *bad gets the reason.
// (A multihot map's slot s can only name expert s, once.)
template <int Kind>
__device__ __forceinline__ int64_t checked_expert(const Route& route, int64_t row, int32_t slot,
                                                  int64_t* bad) {
  const int64_t e = route_at<Kind>(route, row, slot);
  if (Kind == kRouteMultihot || e == -1) return e;
  if (e < -1 || e >= route.num_experts) {
    *bad |= kIndexOutOfRange;
    return -1;
  }
  for (int32_t j = 0; j < slot; ++j) {
    if (route_at<Kind>(route, row, j) == e) {
      *bad |= kDuplicateIndex;
      return -1;
    }
  }
  return e;
}

// offsets[0, E): the exclusive scan over experts of padded(e), offsets[E] the total. Each thread
// sums a contiguous segment of experts, then one block scan (scratch: 32 int64 of shared
// memory); every thread of the block calls it.
template <typename Padded>
__device__ void scan_expert_offsets(int experts, Padded padded, int64_t* scratch, int64_t* offsets) {
  const int seg = (experts + blockDim.x - 1) / blockDim.x;
  const int begin = min(experts, int(threadIdx.x) * seg), end = min(experts, begin + seg);
  int64_t mine = 0;
  for (int e = begin; e < end; ++e) mine += padded(e);
  int64_t total = 0;
  int64_t running = block_exclusive_scan(mine, scratch, &total);
  for (int e = begin; e < end; ++e) {
    offsets[e] = running;
    running += padded(e);
  }
  if (threadIdx.x == 0) offsets[experts] = total;
}

// The expert offsets of per-expert slot counts `total` [E] padded to pad_multiple (offsets
// [E + 1], the last the rows used; scratch: 32 int64 of shared memory), every thread of the
// block calling; with `layout` (one block's call), also the layout's counts, padded counts and
// offsets (not its error word).
__device__ __forceinline__ void offsets_from_totals(const int32_t* total, int experts, int64_t pad_multiple,
                                                    int64_t* scratch, int64_t* offsets, int64_t* layout) {
  scan_expert_offsets(experts, [total, pad_multiple](int e) { return round_up(total[e], pad_multiple); }, scratch,
                      offsets);
  __syncthreads();
  if (layout == nullptr) return;
  for (int e = threadIdx.x; e < experts; e += blockDim.x) {
    layout[layout_counts(experts) + e] = total[e];
    layout[layout_padded(experts) + e] = round_up(total[e], pad_multiple);
    layout[layout_offsets(experts) + e] = offsets[e];
  }
  if (threadIdx.x == 0) layout[layout_offsets(experts) + experts] = offsets[experts];
}

// Writes slot `entry` (row * slots + slot) of the map, dest or -1, and `prob` (when has_prob)
// to probs_out[dest]; returns what it wrote. A dest at or past num_out is an overflow: the slot
// is left unplaced (-1) and *overflow is set. For a caller that loaded the prob already.
template <typename ProbBits>
__device__ __forceinline__ int32_t place_loaded_slot(int64_t dest, int64_t entry, bool has_prob, ProbBits prob,
                                                     int64_t num_out, int32_t* row_id_map, ProbBits* probs_out,
                                                     int64_t* overflow) {
  if (dest >= num_out) {
    *overflow = kOutputOverflow;
    dest = -1;
  } else if (dest >= 0 && has_prob) {
    probs_out[dest] = prob;
  }
  row_id_map[entry] = static_cast<int32_t>(dest);
  return static_cast<int32_t>(dest);
}

// place_loaded_slot with the prob read from probs[entry] (nullable), only where it is placed.
template <typename ProbBits>
__device__ __forceinline__ int32_t place_slot(int64_t dest, int64_t entry, const ProbBits* probs, int64_t num_out,
                                              int32_t* row_id_map, ProbBits* probs_out, int64_t* overflow) {
  const bool has_prob = probs != nullptr && dest >= 0 && dest < num_out;
  return place_loaded_slot(dest, entry, probs != nullptr, has_prob ? probs[entry] : ProbBits{}, num_out, row_id_map,
                           probs_out, overflow);
}

// Row `row` of dst (row_bytes, in V vectors) and its probs_out entry (nullable) set to zero by
// the whole block.
template <typename V>
__device__ void zero_row(char* dst, int64_t row, int64_t row_bytes, char* probs_out, int prob_bytes) {
  V* out = reinterpret_cast<V*>(dst + row * row_bytes);
  const int64_t vecs = row_bytes / int64_t(sizeof(V));
  for (int64_t v = threadIdx.x; v < vecs; v += blockDim.x) out[v] = V{};
  if (probs_out != nullptr && threadIdx.x == 0) {
    if (prob_bytes == 8) {
      reinterpret_cast<uint64_t*>(probs_out)[row] = 0;
    } else {
      reinterpret_cast<uint32_t*>(probs_out)[row] = 0;
    }
  }
}

// Blocks that zero a tail of num_out rows at most: one a row, up to 1024.
inline int64_t tail_blocks_for(int64_t num_out) { return num_out < 1024 ? num_out : 1024; }

// Rows first + part, first + part + parts, ... below end (and their probs_out entries) set to
// zero by the whole block: part `part` of `parts` blocks sharing the rows [first, end).
template <typename V>
__device__ void zero_rows(int64_t first, int64_t end, int64_t part, int64_t parts, char* dst, int64_t row_bytes,
                          char* probs_out, int prob_bytes) {
  for (int64_t row = first + part; row < end; row += parts) zero_row<V>(dst, row, row_bytes, probs_out, prob_bytes);
}

// Part `part` of the `parts` blocks that zero a permutation's unused tail (rows of row_bytes in
// dst); part 0 also stores the layout's error word, complete once the plan has run.
template <typename V>
__device__ void finish_tail(const TailRows& tail, int64_t part, int64_t parts, char* dst, int64_t row_bytes) {
  if (part == 0 && threadIdx.x == 0 && tail.host_word != nullptr) {
    *reinterpret_cast<volatile int64_t*>(tail.host_word) = tail.layout[layout_error(tail.experts)];
  }
  zero_rows<V>(tail.layout[layout_offsets(tail.experts) + tail.experts], tail.num_out, part, parts, dst, row_bytes,
               static_cast<char*>(tail.probs_out), tail.prob_bytes);
}

}  // namespace cuda
}  // namespace flexdispatch
