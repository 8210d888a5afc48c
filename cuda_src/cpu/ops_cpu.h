// CPU implementations of the kernels in ../launch.h: the same algorithms (chunked counts,
// prefix sums, stable expert-major order, fixed-order float32 sums), parallel with OpenMP.
// Error bits are returned (indices_to_multihot) or OR-ed into the layout, as on the GPU.
#pragma once

#include <cstdint>

#include "../flexdispatch.h"

namespace flexdispatch {
namespace cpu {

// Whether a loop of `count` items, each about `ps_each` picoseconds of one core's time, is worth
// an OpenMP team: at least kParallelWorkPs of work. Smaller loops run on the calling thread: a
// team's workers spin after each region (libgomp's active wait), and where the ranks of a CPU
// group share the cores those spins take the time the other ranks need, while a small batch
// gains little from threads. The costs per item, measured on one x86-64 core (2026-12-07):
constexpr int64_t kParallelWorkPs = 20000000;  // 20 us
constexpr int64_t kPsTopkValue = 11000;        // a prob the router's top-k reads
constexpr int64_t kPsRouteSlot = 4000;         // a routing slot checked, counted or mapped
constexpr int64_t kPsFp8Value = 3500;          // a value quantized or dequantized
constexpr int64_t kPsRowValue = 300;           // a value summed or scaled, or a count added
constexpr int64_t kPsByte = 50;                // a byte copied or zeroed
inline bool worth_threads(int64_t count, int64_t ps_each) { return count * ps_each >= kParallelWorkPs; }

int64_t indices_to_multihot(const void* indices, bool indices_are_64bit, const void* probs,
                            int prob_bytes, int64_t rows, int32_t slots, int32_t num_experts,
                            uint8_t* map, void* probs_out);

// Returns the error bits; writes clean (out-of-range entries and non-finite probs -1), as
// check_route on the GPU (prob_kind 0: no probs, 1: float32, 2: float64).
int32_t check_route(const void* indices, bool indices_are_64bit, const void* probs, int32_t prob_kind,
                    int64_t rows, int32_t slots, int32_t num_experts, int64_t* clean);

// Returns the error bits (kNonFiniteProb); writes values, indices and clean as route_topk on the GPU.
int32_t route_topk(const void* probs, DType dtype, int64_t rows, int32_t experts, int32_t k, void* values,
                   int64_t* indices, int64_t* clean);

void route_plan(const Route& route, int64_t pad_multiple, int32_t* chunk_offsets, int64_t* layout);

void route_map(const Route& route, const int32_t* chunk_offsets, int64_t* layout, const void* probs,
               int prob_bytes, int64_t num_out, int32_t* row_id_map, void* probs_out);

void scatter_rows(const void* src, int64_t rows, int64_t row_bytes, const int32_t* row_id_map,
                  int32_t slots, void* dst);

void zero_unused_rows(const int64_t* layout, int32_t num_experts, bool padded, bool tail, void* dst,
                      int64_t num_out, int64_t row_bytes, void* probs_out, int prob_bytes);

void gather_rows(DType dtype, const void* src, int64_t hidden, const int32_t* row_id_map,
                 int32_t slots, const void* probs, int32_t prob_dtype, void* dst, int64_t rows);

// (see ../launch.h: gather_slots)
void gather_slots(const void* values, int value_bytes, const int32_t* row_id_map, int64_t n, void* out);

void gather_rows_backward(DType dtype, const void* grad_out, const void* src, int64_t hidden,
                          const int32_t* row_id_map, int32_t slots, const void* probs,
                          DType prob_dtype, int64_t rows, void* grad_src, void* grad_probs);

// FP8 rows in groups of kFp8Group values (dtype: float32, float16 or bfloat16): q and one
// scale per group, and back (see flexdispatch.h).
void quantize_fp8(DType dtype, const void* x, int64_t groups, uint8_t* q, float* scales);
void dequantize_fp8(DType dtype, const uint8_t* q, const float* scales, int64_t groups, void* out);
// The dequantizing permutation (see ../launch.h: scatter_fp8_rows).
void scatter_fp8_rows(DType dtype, const uint8_t* q, int64_t q_pitch, const float* scales, int64_t scale_pitch,
                      const int64_t* addrs, int64_t rows, int64_t hidden, const int32_t* row_id_map, int32_t slots,
                      void* dst);

// Rows read through addresses (see ../launch.h: copy_rows_from, sum_rows_from).
void copy_rows_from(const int64_t* addrs, int64_t rows, int64_t row_bytes, const int32_t* map, int32_t slots,
                    void* dst);
void sum_rows_from(DType dtype, const int64_t* addrs, int64_t rows, int32_t slots, int64_t hidden, void* dst);
void route_by_rank(const void* indices, bool indices_are_64bit, int64_t rows, int32_t slots, int32_t world,
                   int32_t local, uint8_t* in_rank, int64_t* counts);
void received_routing(const double* meta, int64_t rows, int64_t stride, int32_t id_col, int32_t slots, int64_t first,
                      int64_t local, const bool* has_source, int64_t* indices, void* probs, bool probs_are_64bit);
void peer_addresses(int32_t kind, const int64_t* counts, int32_t world, int32_t rank, const int64_t* table,
                    int64_t row_bytes, int64_t n, const int32_t* map, const double* tokens, int64_t token_stride,
                    int64_t* out);

// The agreement of a call (see ../launch.h): a header with status's error bits, and indices
// masked to -1 unless every header agrees.
void make_header(Header values, const int32_t* status, int64_t* header);
void mask_unless_agreed(const int64_t* headers, int32_t ranks, const int64_t* indices, int64_t n, void* out,
                        bool out_is_64bit);

}  // namespace cpu
}  // namespace flexdispatch
