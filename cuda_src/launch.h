// CUDA launchers: raw pointers and a stream in, a cudaError_t out. Implemented in *.cu;
// called by bindings.cpp, which owns argument checks, allocation and streams.
#pragma once

#include <cuda_runtime_api.h>

#include "flexdispatch.h"

namespace flexdispatch {
namespace cuda {

// indices [rows, slots] (int32 or int64), probs [rows, slots] of prob_bytes (4 or 8) ->
// map [rows, E] (bool as uint8) and probs_out [rows, E] (zero where unset). Bad indices OR
// ErrorBits into *error.
cudaError_t indices_to_multihot(const void* indices, bool indices_are_64bit, const void* probs,
                                int prob_bytes, int64_t rows, int32_t slots, int32_t num_experts,
                                uint8_t* map, void* probs_out, int64_t* error, cudaStream_t stream);

// Validation of indices [rows, slots] (int32 or int64) in one pass: clean [rows, slots] int64
// gets them with out-of-range entries, and entries whose prob is not finite, set to -1;
// status[0] (written whole, no zeroing needed) gets the ErrorBits found (range, duplicates, non-finite
// probs) OR-ed in, and status[1] gets `flag` if any were found. probs [rows, slots] is
// optional (prob_kind 0: none, 1: float32, 2: float64). host_word (nullable): a pinned int32's
// device mapping that gets status[0] once the check is done (see store_word).
cudaError_t check_route(const void* indices, bool indices_are_64bit, const void* probs, int32_t prob_kind,
                        int64_t rows, int32_t slots, int32_t num_experts, int32_t flag, int64_t* clean,
                        int32_t* status, void* host_word, cudaStream_t stream);

// The router's top-k of dense probs [rows, experts] (dtype), checked in the same pass: per row
// the k largest values in descending order (NaN above every number, ties to the lower expert;
// 1 <= k <= kRouteTopkMax, k <= experts <= kRouteTopkMaxExperts), as values [rows, k] (dtype,
// the input's bits), indices [rows, k] int64 (their experts) and clean [rows, k] int64 (the
// same with -1 where the value is not finite); status and host_word as check_route's (the
// error bit: kNonFiniteProb).
cudaError_t route_topk(const void* probs, DType dtype, int64_t rows, int32_t experts, int32_t k, int32_t flag,
                       void* values, int64_t* indices, int64_t* clean, int32_t* status, void* host_word,
                       cudaStream_t stream);

// Where top-k indices [rows, slots] (int32 or int64; entries outside [0, world * local) are
// ignored) go by rank: in_rank [rows, world] (0/1: token r has an expert on rank w) and
// counts [world, 1 + local] (zeroed here): column 0 the tokens rank w receives (once per
// token), then the assignments per local expert of rank w.
cudaError_t route_by_rank(const void* indices, bool indices_are_64bit, int64_t rows, int32_t slots, int32_t world,
                          int32_t local, uint8_t* in_rank, int64_t* counts, cudaStream_t stream);

// The received rows' routing, from their routing rows meta [rows, stride] float64 (global
// experts in columns id_col .. id_col + slots, probs in the next `slots` columns): indices
// [rows, slots] int64, the local expert (global - first, when in [0, local)) or -1, and probs
// [rows, slots] (float32 or float64), 0 where the index is -1. has_source [rows] (optional):
// rows without a source get -1 everywhere.
cudaError_t received_routing(const double* meta, int64_t rows, int64_t stride, int32_t id_col, int32_t slots,
                             int64_t first, int64_t local, const bool* has_source, int64_t* indices, void* probs,
                             bool probs_are_64bit, cudaStream_t stream);

// The word (int32 or int64: `bytes` 4 or 8) at src, on the device, to a pinned host word
// addressed through its device mapping (cudaHostGetDevicePointer), by a one-thread kernel
// queued on the stream: a launch costs the host less than a device-to-host copy. The word is
// in host memory once the kernel has run.
cudaError_t store_word(const void* src, int bytes, void* host_word, cudaStream_t stream);

// Whether route_map can do the scan's work itself (scan = false in route_plan, scans = true in
// route_map): a route whose count table is small (see route.cu). Only for an output size
// known in advance: the host reads nothing between the passes then.
bool map_scans(const Route& route);

// Count and scan. chunk_offsets [num_chunks, E + 1] receives, for every chunk of rows and
// expert, the rows of that expert in earlier chunks (column E: scratch); layout (3E + 2), all
// of it, the counts, padded counts, offsets and error bits. Validates indices. With scan false
// (map_scans) chunk_offsets keeps each chunk's counts and only the layout's error word is
// written (zeroed); route_map with scans true writes the rest.
cudaError_t route_plan(const Route& route, int64_t pad_multiple, int32_t* chunk_offsets,
                       int64_t* layout, bool scan, cudaStream_t stream);

// row_id_map [rows, slots]: the output row of each (row, slot), -1 for an unused slot. Also
// moves probs [rows, slots] (nullable) to probs_out [num_out]. Slots past num_out set
// kOutputOverflow in the layout's error word and map to -1.
cudaError_t route_map(const Route& route, const int32_t* chunk_offsets, int64_t* layout,
                      const void* probs, int prob_bytes, int64_t num_out, int32_t* row_id_map,
                      void* probs_out, bool scans, int64_t pad_multiple, cudaStream_t stream);

// How the one-launch permutation (route_small.cu) runs a route: `block_rows` rows a block (0: it
// does not serve the route); `grid`: its blocks count only their own rows of the route and meet
// at a grid-wide barrier (a cooperative launch, every block resident at once), given scratch of
// small_grid_words int32 words; else every block counts the whole route (read from L2).
struct SmallLaunch {
  int32_t block_rows = 0;
  bool grid = false;
};

// How the one-launch permutation serves a route (top-k int32 or int64 indices, or a multihot map)
// whose output rows are row_bytes each, queued on `stream`: the grid launch wherever its blocks
// fit on the device at once (at most 1024 experts, 64 slots of a top-k route, a few MB of rows)
// and their count table (experts x blocks) is small (smaller where the stream is being captured
// into a CUDA graph); else, for a few thousand (row, slot) entries (a map of up to 256K, read by all blocks together
// within a larger limit where the stream is not being captured into a CUDA graph; captured,
// only routes whose blocks read at most half the limit of their kind), whole-route counts; else
// none. Asked once a call: the launch takes the answer.
SmallLaunch permute_small_fit(const Route& route, int64_t row_bytes, cudaStream_t stream);

// The int32 words of scratch a launch of `fit` needs (0 unless fit.grid).
int64_t small_grid_words(const Route& route, const SmallLaunch& fit);

// The whole permutation of such a route, `fit` from permute_small_fit (block_counts: its scratch,
// null unless fit.grid), its output size num_out known, in one launch: layout, row_id_map,
// probs_out (nullable) and dst [num_out] rows of row_bytes as route_plan, route_map, scatter_rows
// and zero_unused_rows leave them, bit for bit; the layout's error word also goes to host_word
// (nullable: an int64 of pinned host memory, its device mapping).
cudaError_t permute_small(const Route& route, const SmallLaunch& fit, int32_t* block_counts, int64_t pad_multiple,
                          const void* src, int64_t row_bytes, const void* probs, int prob_bytes, int64_t num_out,
                          void* dst, void* probs_out, int32_t* row_id_map, int64_t* layout, void* host_word,
                          cudaStream_t stream);

// How the one-launch permutation serves a route and FP8 rows of `hidden` values dequantized to
// dtype, queued on `stream`: a top-k route that permute_small_fit serves with the output's row
// bytes, float32, float16 or bfloat16 output, whole groups of kFp8Group values; else none.
SmallLaunch permute_fp8_small_fit(const Route& route, int64_t hidden, DType dtype, cudaStream_t stream);

// The dequantizing permutation of such a route in one launch, `fit` from permute_fp8_small_fit:
// FP8 rows q [rows, hidden] (e4m3 bytes, q_pitch apart, 16-byte aligned) and their float32
// scales (scale_pitch apart) written as dtype to dst [num_out, hidden], everything else as
// permute_small; the same bits as scatter_fp8_rows along the passes' plan.
cudaError_t permute_fp8_small(const Route& route, const SmallLaunch& fit, int32_t* block_counts,
                              int64_t pad_multiple, DType dtype, const uint8_t* q, int64_t q_pitch,
                              const float* scales, int64_t scale_pitch, int64_t hidden, const void* probs,
                              int prob_bytes, int64_t num_out, void* dst, void* probs_out, int32_t* row_id_map,
                              int64_t* layout, void* host_word, cudaStream_t stream);

// The unused tail of a permutation's output: rows from layout's offsets[E] (the rows used) up
// to num_out, zeroed with their probs_out entries (nullable, prob_bytes 4 or 8). The launch that
// zeroes it runs after the plan, so it also stores the layout's error word to host_word
// (nullable: an int64 of pinned host memory, its device mapping), sparing a launch for the copy.
struct TailRows {
  const int64_t* layout;
  int32_t experts;
  int64_t num_out;
  void* probs_out;
  int prob_bytes;
  int64_t* host_word;
};

// dst[row_id_map[r, s]] = src[r] for every valid slot: each source row is read once. With
// tail (nullable), the same launch zeroes the tail (and stores tail->host_word) where the kernel
// serving these rows can (*tail_done says whether it did; zero_unused_rows and store_word do it
// otherwise).
cudaError_t scatter_rows(const void* src, int64_t rows, int64_t row_bytes,
                         const int32_t* row_id_map, int32_t slots, void* dst, const TailRows* tail,
                         bool* tail_done, cudaStream_t stream);

// Zeroes the output rows no source row fills: pad rows of each expert (when padded) and the
// rows past offsets[E] (when tail); probs_out (nullable) gets 0 there too.
cudaError_t zero_unused_rows(const int64_t* layout, int32_t num_experts, bool padded, bool tail,
                             void* dst, int64_t num_out, int64_t row_bytes, void* probs_out,
                             int prob_bytes, cudaStream_t stream);

// dst[r] = sum over valid slots s, in slot order, of probs[r, s] * src[row_id_map[r, s]]
// (probs nullable: weight 1). Accumulates in float32 (float64 for float64 data or probs).
cudaError_t gather_rows(DType dtype, const void* src, int64_t hidden, const int32_t* row_id_map,
                        int32_t slots, const void* probs, int32_t prob_dtype, void* dst,
                        int64_t rows, cudaStream_t stream);

// out [n] = values[row_id_map[i]] for every slot i with row_id_map[i] >= 0, else 0 (values of
// value_bytes 4 or 8): the per-slot values of a permutation's output read back along its plan
// (the permuted probs' gradient to the route's probs).
cudaError_t gather_slots(const void* values, int value_bytes, const int32_t* row_id_map, int64_t n, void* out,
                         cudaStream_t stream);

// Backward of gather_rows with probs: grad_src[row_id_map[r, s]] = probs[r, s] * grad_out[r]
// and grad_probs[r, s] = <grad_out[r], src[row_id_map[r, s]]> (0 for unused slots).
cudaError_t gather_rows_backward(DType dtype, const void* grad_out, const void* src, int64_t hidden,
                                 const int32_t* row_id_map, int32_t slots, const void* probs,
                                 DType prob_dtype, int64_t rows, void* grad_src, void* grad_probs,
                                 cudaStream_t stream);

// FP8 rows in groups of kFp8Group values (dtype: float32, float16 or bfloat16), one warp
// per group: q [groups * 128] e4m3fn bits and scales [groups]; and back.
cudaError_t quantize_fp8(DType dtype, const void* x, int64_t groups, uint8_t* q, float* scales,
                         cudaStream_t stream);
cudaError_t dequantize_fp8(DType dtype, const uint8_t* q, const float* scales, int64_t groups, void* out,
                           cudaStream_t stream);
// The dequantizing permutation: dst [num_out, hidden] of dtype gets, at row_id_map[r, s] for
// every valid slot, FP8 row r dequantized (q: rows of e4m3 bytes, q_pitch bytes apart, 16-byte
// aligned; scales: rows of hidden / 128 floats, scale_pitch floats apart). Each q row is read
// once; the values equal dequantize_fp8's. With addrs [rows] (nullable), row r is instead read
// at addrs[r]: hidden bytes, then its hidden / 128 scales (0: no row; every address aligned to
// 8 bytes, 4 for a float32 dst). At most max_blocks blocks (0: no cap); rows taken from
// first_row on, as copy_rows_from. With tail (nullable), an uncapped launch also zeroes the
// tail (*tail_done says whether it did), as scatter_rows.
cudaError_t scatter_fp8_rows(DType dtype, const uint8_t* q, int64_t q_pitch, const float* scales, int64_t scale_pitch,
                             const int64_t* addrs, int64_t rows, int64_t hidden, const int32_t* row_id_map,
                             int32_t slots, void* dst, int64_t max_blocks, int64_t first_row, const TailRows* tail,
                             bool* tail_done, cudaStream_t stream);

// Rows read through addresses (the NVLink manager's transfers; peers' buffers mapped by
// symmetric memory): row r (row_bytes) at addrs[r] goes to dst rows map[r, 0..slots) (-1:
// none), or to dst row r when map is null; address 0: no row (zeros without a map, nothing
// with one). `align`: the alignment every addrs[r] shares
// (bytes, a power of two). At most max_blocks blocks (0: no cap). Rows are taken from
// first_row on, round to the start (in [0, rows)): readers that start at different peers
// spread their reads over every peer's links instead of queueing on one source at a time.
cudaError_t copy_rows_from(const int64_t* addrs, int64_t rows, int64_t row_bytes, int32_t align,
                           const int32_t* map, int32_t slots, void* dst, int64_t max_blocks,
                           int64_t first_row, cudaStream_t stream);
// dst [rows, hidden] (dtype): dst[r] = sum over s in slot order of the row at addrs[r, s]
// (0: none), accumulated in float32 (float64 for float64); a row without a slot is zero.
cudaError_t sum_rows_from(DType dtype, const int64_t* addrs, int64_t rows, int32_t slots, int64_t hidden,
                          int32_t align, void* dst, int64_t max_blocks, cudaStream_t stream);
// dst + parts.part[p].offset gets parts.part[p].bytes bytes from parts.part[p].src, every part in one launch.
cudaError_t pack_parts(const PackParts& parts, void* dst, cudaStream_t stream);
// Every rank of a group of `world` passes (a put to each peer, then a wait for each peer's) in
// the signal pads of symmetric memory: signal_pads is a device array of `world` pointers to
// uint32 pads, slots channel * world + rank. Stream-ordered; one block.
cudaError_t peer_barrier(const void* signal_pads, int32_t channel, int32_t rank, int32_t world, uint64_t timeout_ns,
                         cudaStream_t stream);
// out[i] = peer_address(kind, i, ...) for i < n (flexdispatch.h), the block starts made from
// counts [world, world] once per thread block.
cudaError_t peer_addresses(int32_t kind, const int64_t* counts, int32_t world, int32_t rank, const int64_t* table,
                           int64_t row_bytes, int64_t n, const int32_t* map, const double* tokens,
                           int64_t token_stride, int64_t* out, cudaStream_t stream);

// The agreement of a call on the device (no host sync): header [kHeaderWidth] = values, with
// status[0] (nullable: check_route's error bits) OR-ed into kHeaderError; and out [n] (int64 or
// int32) = indices [n] where every header of headers [ranks, kHeaderWidth] agrees (see
// flexdispatch.h), else -1 everywhere, so that a transfer then moves nothing.
cudaError_t make_header(Header values, const int32_t* status, int64_t* header, cudaStream_t stream);
cudaError_t mask_unless_agreed(const int64_t* headers, int32_t ranks, const int64_t* indices, int64_t n,
                               void* out, bool out_is_64bit, cudaStream_t stream);

// make_header and mask_unless_agreed in one kernel, with the headers exchanged through
// symmetric memory instead of a collective: bases [world] holds every rank's address of its
// slots, int64 [2][world][kHeaderSlotWords] (zeroed before the first exchange); seq (>= 1)
// numbers the exchanges of these slots, the same on every rank. Writes every rank's header to
// gathered [world, kHeaderWidth] (host memory mapped for the device may be passed). Traps
// after timeout_ns if a peer never writes.
cudaError_t exchange_headers(Header values, const int32_t* status, const int64_t* bases, int32_t rank, int32_t world,
                             int64_t seq, uint64_t timeout_ns, const int64_t* indices, int64_t n, void* out,
                             bool out_is_64bit, int64_t* gathered, cudaStream_t stream);

}  // namespace cuda
}  // namespace flexdispatch
