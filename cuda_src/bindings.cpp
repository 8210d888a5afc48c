// Torch bindings: argument checks, allocation, device dispatch (CUDA launchers or their CPU
// twins) and streams. The only file of cuda_src/ that includes torch. Python callers live in
// flexdispatch/ops.py, which does the user-facing validation; the checks here guard
// the raw pointers.
#include <cstring>
#include <torch/extension.h>

#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/ops_cpu.h"
#include "flexdispatch.h"

#ifdef FLEXDISPATCH_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "launch.h"
#endif

// The one CUDA/CPU switch: for a CUDA `tensor`, CUDA_CALL (a launcher returning cudaError_t,
// which may name the current `stream`) under a guard of the tensor's device, its error
// raised (and cleared, as torch's checks do: an error that leaves the context usable, a
// refused launch say, is this op's, not the next CUDA call's); otherwise CPU_BLOCK. In CPU-only
// builds the CUDA call is not compiled at all.
#ifdef FLEXDISPATCH_WITH_CUDA
#define FD_ON_DEVICE(tensor, CUDA_CALL, CPU_BLOCK)                                                \
  do {                                                                                          \
    if ((tensor).is_cuda()) {                                                                   \
      const c10::cuda::CUDAGuard fd_guard((tensor).device());                                   \
      const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();                            \
      const cudaError_t fd_err = (CUDA_CALL);                                                   \
      if (fd_err != cudaSuccess) (void)cudaGetLastError();                                      \
      TORCH_CHECK(fd_err == cudaSuccess, "flexdispatch CUDA error: ", cudaGetErrorString(fd_err)); \
    } else {                                                                                    \
      CPU_BLOCK                                                                                 \
    }                                                                                           \
  } while (0)
#else
#define FD_ON_DEVICE(tensor, CUDA_CALL, CPU_BLOCK)                                         \
  do {                                                                                   \
    TORCH_CHECK(!(tensor).is_cuda(), "flexdispatch was built without CUDA");             \
    CPU_BLOCK                                                                            \
  } while (0)
#endif

namespace fd = flexdispatch;
using torch::Tensor;

namespace {

// A wait for peers' timeout in seconds (> 0, finite) as the kernels' nanoseconds.
uint64_t timeout_ns_of(double timeout_s) {
  TORCH_CHECK_VALUE(timeout_s > 0 && timeout_s <= 1e9, "timeout_s must be in (0, 1e9] seconds, got ", timeout_s);
  return static_cast<uint64_t>(timeout_s * 1e9);
}

void check_same_device(const Tensor& a, const Tensor& b, const char* name) {
  TORCH_CHECK_VALUE(a.device() == b.device(), name, " must be on ", a.device(), ", got ", b.device());
}

void check_contiguous(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

fd::DType dtype_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return fd::kFloat32;
    case at::kHalf: return fd::kFloat16;
    case at::kBFloat16: return fd::kBFloat16;
    case at::kDouble: return fd::kFloat64;
    default: TORCH_CHECK_TYPE(false, name, " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
  }
  return fd::kFloat32;
}

fd::DType prob_dtype_of(const Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
                   " must be float32 or float64, got ", t.scalar_type());
  return dtype_of(t, name);
}

fd::Route route_of(const Tensor& route, int64_t num_experts) {
  TORCH_CHECK_VALUE(route.dim() == 2, "route must be 2-D [rows, slots], got ", route.dim(), "-D");
  check_contiguous(route, "route");
  TORCH_CHECK_VALUE(num_experts > 0 && fd::chunk_rows_for(static_cast<int32_t>(num_experts)) > 0,
                    "num_experts must be in [1, ", fd::kMaxExperts, "], got ", num_experts);
  int32_t kind;
  switch (route.scalar_type()) {
    case at::kInt: kind = fd::kRouteIndex32; break;
    case at::kLong: kind = fd::kRouteIndex64; break;
    case at::kBool:
    case at::kByte:
      kind = fd::kRouteMultihot;
      TORCH_CHECK_VALUE(route.size(1) == num_experts, "a multihot route needs [rows, num_experts=",
                        num_experts, "], got ", route.sizes());
      break;
    default: TORCH_CHECK_TYPE(false, "route must be int32, int64 or bool, got ", route.scalar_type());
  }
  TORCH_CHECK_VALUE(route.size(0) < (int64_t(1) << 31), "at most 2^31 - 1 rows are supported");
  return fd::Route{route.data_ptr(), kind, route.size(0), static_cast<int32_t>(route.size(1)),
                   static_cast<int32_t>(num_experts)};
}

void check_row_id_map(const Tensor& map, const Tensor& like) {
  TORCH_CHECK_TYPE(map.scalar_type() == at::kInt, "row_id_map must be int32, got ", map.scalar_type());
  TORCH_CHECK_VALUE(map.dim() == 2, "row_id_map must be 2-D [rows, slots]");
  check_contiguous(map, "row_id_map");
  check_same_device(like, map, "row_id_map");
}

Tensor as_rows(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D [rows, hidden], got ", t.sizes());
  check_contiguous(t, name);
  return t;
}

// ---- ops ------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> indices_to_multihot(const Tensor& indices, const Tensor& probs,
                                                      int64_t num_experts) {
  TORCH_CHECK_VALUE(indices.dim() == 2 && probs.sizes() == indices.sizes(),
                    "indices and probs must both be [rows, topk]; got ", indices.sizes(), " and ", probs.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong,
                   "indices must be int32 or int64, got ", indices.scalar_type());
  prob_dtype_of(probs, "probs");
  check_contiguous(indices, "indices");
  check_contiguous(probs, "probs");
  check_same_device(indices, probs, "probs");
  const int64_t rows = indices.size(0);
  const int32_t slots = static_cast<int32_t>(indices.size(1));
  auto map = torch::empty({rows, num_experts}, indices.options().dtype(at::kBool));
  auto probs_out = torch::empty({rows, num_experts}, probs.options());
  auto error = torch::zeros({1}, indices.options().dtype(at::kLong));
  const bool is64 = indices.scalar_type() == at::kLong;
  FD_ON_DEVICE(indices, fd::cuda::indices_to_multihot(
        indices.data_ptr(), is64, probs.data_ptr(), static_cast<int>(probs.element_size()), rows, slots,
        static_cast<int32_t>(num_experts), reinterpret_cast<uint8_t*>(map.data_ptr()), probs_out.data_ptr(),
        error.data_ptr<int64_t>(), stream), {
    error.fill_(fd::cpu::indices_to_multihot(indices.data_ptr(), is64, probs.data_ptr(),
                                             static_cast<int>(probs.element_size()), rows, slots,
                                             static_cast<int32_t>(num_experts),
                                             reinterpret_cast<uint8_t*>(map.data_ptr()), probs_out.data_ptr()));
  });
  return {map, probs_out, error};
}

// (clean [rows, slots] int64 with out-of-range entries -1, status [2] int32: error bits, and
// `flag` if any bit is set), no sync.
// (in_rank [T, world] bool, counts [world, 1 + local] int64) of top-k indices [T, K] (int32 or
// int64; entries outside [0, world * local) ignored): whether token t has an expert on rank w,
// and per rank the tokens it receives, then the assignments per local expert. No host sync.
std::tuple<Tensor, Tensor> route_by_rank(const Tensor& indices, int64_t world, int64_t local) {
  TORCH_CHECK_VALUE(indices.dim() == 2, "indices must be 2-D [rows, topk], got ", indices.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong,
                   "indices must be int32 or int64, got ", indices.scalar_type());
  check_contiguous(indices, "indices");
  TORCH_CHECK_VALUE(world >= 1 && local >= 1 && world * local < (int64_t(1) << 31), "world ", world, " x local ",
                    local, " experts out of range");
  auto in_rank = torch::empty({indices.size(0), world}, indices.options().dtype(at::kBool));
  auto counts = torch::empty({world, local + 1}, indices.options().dtype(at::kLong));
  const bool is64 = indices.scalar_type() == at::kLong;
  const int32_t slots = static_cast<int32_t>(indices.size(1)), w = static_cast<int32_t>(world),
                l = static_cast<int32_t>(local);
  FD_ON_DEVICE(indices, fd::cuda::route_by_rank(indices.data_ptr(), is64, indices.size(0), slots, w, l,
                                                reinterpret_cast<uint8_t*>(in_rank.data_ptr<bool>()),
                                                counts.data_ptr<int64_t>(), stream), {
    fd::cpu::route_by_rank(indices.data_ptr(), is64, indices.size(0), slots, w, l,
                           reinterpret_cast<uint8_t*>(in_rank.data_ptr<bool>()), counts.data_ptr<int64_t>());
  });
  return {in_rank, counts};
}

// (indices [R, K] int64, probs [R, K] of prob_dtype) from the received routing rows meta [R, C]
// float64 (global experts at columns id_col.., probs after them; launch.h, received_routing).
std::tuple<Tensor, Tensor> received_routing(const Tensor& meta, int64_t id_col, int64_t slots, int64_t first,
                                            int64_t local, const std::optional<Tensor>& has_source,
                                            at::ScalarType prob_dtype) {
  TORCH_CHECK_VALUE(meta.dim() == 2 && meta.scalar_type() == at::kDouble, "meta must be 2-D float64, got ",
                    meta.sizes(), " ", meta.scalar_type());
  TORCH_CHECK_VALUE(id_col >= 0 && slots >= 0 && id_col + 2 * slots <= meta.size(1), "columns ", id_col, " + 2 x ",
                    slots, " outside meta's ", meta.size(1));
  TORCH_CHECK_TYPE(prob_dtype == at::kFloat || prob_dtype == at::kDouble, "prob_dtype must be float32 or float64");
  check_contiguous(meta, "meta");
  const bool* source = nullptr;
  if (has_source.has_value()) {
    TORCH_CHECK_VALUE(has_source->scalar_type() == at::kBool && has_source->numel() == meta.size(0),
                      "has_source must be bool [", meta.size(0), "]");
    check_contiguous(*has_source, "has_source");
    check_same_device(meta, *has_source, "has_source");
    source = has_source->data_ptr<bool>();
  }
  auto indices = torch::empty({meta.size(0), slots}, meta.options().dtype(at::kLong));
  auto probs = torch::empty({meta.size(0), slots}, meta.options().dtype(prob_dtype));
  const bool p64 = prob_dtype == at::kDouble;
  const int32_t col = static_cast<int32_t>(id_col), k = static_cast<int32_t>(slots);
  FD_ON_DEVICE(meta, fd::cuda::received_routing(meta.data_ptr<double>(), meta.size(0), meta.size(1), col, k, first,
                                                local, source, indices.data_ptr<int64_t>(), probs.data_ptr(), p64,
                                                stream), {
    fd::cpu::received_routing(meta.data_ptr<double>(), meta.size(0), meta.size(1), col, k, first, local, source,
                              indices.data_ptr<int64_t>(), probs.data_ptr(), p64);
  });
  return {indices, probs};
}

// A route check's CPU status pair [2] int32: the error bits, and `flag` if there are any
// (written through its pointer, not by two tensor fills).
void set_status(Tensor& status, int32_t bits, int64_t flag) {
  int32_t* word = status.data_ptr<int32_t>();
  word[0] = bits;
  word[1] = bits ? static_cast<int32_t>(flag) : 0;
}

// error_address (CUDA; 0: none): the device mapping of a pinned int32 that gets status[0] once
// the check is done (queue_word_copy's destination), stored by the check itself where it is one
// block, so a reported check is one launch.
std::tuple<Tensor, Tensor> check_route(const Tensor& indices, int64_t num_experts, int64_t flag,
                                       const std::optional<Tensor>& probs, int64_t error_address) {
  TORCH_CHECK_VALUE(indices.dim() == 2, "indices must be 2-D [rows, topk], got ", indices.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong,
                   "indices must be int32 or int64, got ", indices.scalar_type());
  check_contiguous(indices, "indices");
  TORCH_CHECK_VALUE(num_experts > 0 && num_experts < (int64_t(1) << 31), "num_experts out of range: ", num_experts);
  TORCH_CHECK_VALUE(flag >= 0 && flag < (int64_t(1) << 31), "flag must fit in int32, got ", flag);
  TORCH_CHECK_VALUE(error_address % sizeof(int32_t) == 0, "error_address must be int32-aligned, got ", error_address);
  const int64_t rows = indices.size(0);
  const int32_t slots = static_cast<int32_t>(indices.size(1));
  const bool is64 = indices.scalar_type() == at::kLong;
  int32_t prob_kind = 0;
  const void* prob_ptr = nullptr;
  if (probs.has_value()) {
    TORCH_CHECK_VALUE(probs->sizes() == indices.sizes(), "probs must have the shape of indices ", indices.sizes(),
                      ", got ", probs->sizes());
    TORCH_CHECK_TYPE(probs->scalar_type() == at::kFloat || probs->scalar_type() == at::kDouble,
                     "probs must be float32 or float64, got ", probs->scalar_type());
    TORCH_CHECK_VALUE(probs->device() == indices.device(), "probs must be on the device of indices");
    check_contiguous(*probs, "probs");
    prob_kind = probs->scalar_type() == at::kFloat ? 1 : 2;
    prob_ptr = probs->data_ptr();
  }
  auto clean = torch::empty({rows, slots}, indices.options().dtype(at::kLong));
  auto status = torch::empty({2}, indices.options().dtype(at::kInt));  // (zeroed by the launcher)
  FD_ON_DEVICE(indices, fd::cuda::check_route(indices.data_ptr(), is64, prob_ptr, prob_kind, rows, slots,
                                        static_cast<int32_t>(num_experts), static_cast<int32_t>(flag),
                                        clean.data_ptr<int64_t>(), status.data_ptr<int32_t>(),
                                        reinterpret_cast<void*>(error_address), stream), {
    set_status(status, fd::cpu::check_route(indices.data_ptr(), is64, prob_ptr, prob_kind, rows, slots,
                                            static_cast<int32_t>(num_experts), clean.data_ptr<int64_t>()), flag);
  });
  return {clean, status};
}

// The router's top-k of dense probs [rows, experts] with the route check in the same pass:
// (values [rows, k] in the probs' dtype, indices [rows, k] int64, clean [rows, k] int64 (-1
// where the value is not finite), status [2] int32), as launch.h's route_topk says; flag and
// error_address as check_route's.
std::tuple<Tensor, Tensor, Tensor, Tensor> route_topk(const Tensor& probs, int64_t k, int64_t flag,
                                                      int64_t error_address) {
  TORCH_CHECK_VALUE(probs.dim() == 2, "probs must be 2-D [rows, experts], got ", probs.sizes());
  check_contiguous(probs, "probs");
  const fd::DType dtype = dtype_of(probs, "probs");
  const int64_t rows = probs.size(0), experts = probs.size(1);
  TORCH_CHECK_VALUE(experts >= 1 && experts <= fd::kRouteTopkMaxExperts, "route_topk takes 1 to ",
                    fd::kRouteTopkMaxExperts, " experts, got ", experts);
  TORCH_CHECK_VALUE(k >= 1 && k <= std::min<int64_t>(experts, fd::kRouteTopkMax), "k must be in [1, ",
                    std::min<int64_t>(experts, fd::kRouteTopkMax), "], got ", k);
  TORCH_CHECK_VALUE(flag >= 0 && flag < (int64_t(1) << 31), "flag must fit in int32, got ", flag);
  TORCH_CHECK_VALUE(error_address % sizeof(int32_t) == 0, "error_address must be int32-aligned, got ", error_address);
  auto values = torch::empty({rows, k}, probs.options());
  auto indices = torch::empty({rows, k}, probs.options().dtype(at::kLong));
  auto clean = torch::empty({rows, k}, probs.options().dtype(at::kLong));
  auto status = torch::empty({2}, probs.options().dtype(at::kInt));  // (written whole by the launcher)
  FD_ON_DEVICE(probs, fd::cuda::route_topk(probs.data_ptr(), dtype, rows, static_cast<int32_t>(experts),
                                          static_cast<int32_t>(k), static_cast<int32_t>(flag), values.data_ptr(),
                                          indices.data_ptr<int64_t>(), clean.data_ptr<int64_t>(),
                                          status.data_ptr<int32_t>(), reinterpret_cast<void*>(error_address),
                                          stream), {
    set_status(status, fd::cpu::route_topk(probs.data_ptr(), dtype, rows, static_cast<int32_t>(experts),
                                           static_cast<int32_t>(k), values.data_ptr(), indices.data_ptr<int64_t>(),
                                           clean.data_ptr<int64_t>()), flag);
  });
  return {values, indices, clean, status};
}

// ---- the permutation plan and the row movers --------------------------------------------

// Whether the map pass does the scan's work (CUDA, an output size known in advance, a small
// count table: launch.h, map_scans); the CPU twins always scan.
bool map_scans(const fd::Route& r, const Tensor& route, int64_t num_out) {
#ifdef FLEXDISPATCH_WITH_CUDA
  return num_out >= 0 && route.is_cuda() && fd::cuda::map_scans(r);
#else
  return false;
#endif
}

// The limits every permutation's plan shares: each expert's rows padded to a multiple >= 1, and
// an output row count the int32 map can name.
void check_pad_multiple(int64_t pad_multiple) {
  TORCH_CHECK_VALUE(pad_multiple >= 1, "pad_multiple must be >= 1, got ", pad_multiple);
}

void check_out_rows(int64_t num_out) {
  TORCH_CHECK_VALUE(num_out < (int64_t(1) << 31), "at most 2^31 - 1 output rows are supported");
}

// Count and scan (the scan left to route_map when map_scans): (chunk_offsets [chunks, E + 1]
// int32, layout [3E + 2] int64), no sync. (Two allocations: carving both from one costs more
// host time in view calls than the allocation it saves.)
std::tuple<Tensor, Tensor> route_plan(const fd::Route& r, const Tensor& route, int64_t pad_multiple, bool map_scans) {
  check_pad_multiple(pad_multiple);
  const int64_t chunks = fd::num_chunks_for(r.rows, r.num_experts);
  auto chunk_offsets = torch::empty({chunks, int64_t(r.num_experts) + 1}, route.options().dtype(at::kInt));
  auto layout = torch::empty({fd::layout_size(r.num_experts)}, route.options().dtype(at::kLong));
  FD_ON_DEVICE(route, fd::cuda::route_plan(r, pad_multiple, chunk_offsets.data_ptr<int32_t>(),
                                       layout.data_ptr<int64_t>(), !map_scans, stream), {
    fd::cpu::route_plan(r, pad_multiple, chunk_offsets.data_ptr<int32_t>(), layout.data_ptr<int64_t>());
  });
  return {chunk_offsets, layout};
}

// The probs a permutation moves (when given): (their pointer or null, their bytes, probs_out
// [num_out] or none).
std::tuple<const void*, int, std::optional<Tensor>> moved_probs(const Tensor& route, const std::optional<Tensor>& probs,
                                                                 int64_t num_out) {
  if (!probs.has_value()) return {nullptr, 4, std::nullopt};
  prob_dtype_of(*probs, "probs");
  check_contiguous(*probs, "probs");
  check_same_device(route, *probs, "probs");
  TORCH_CHECK_VALUE(probs->sizes() == route.sizes(), "probs must have the route's shape ", route.sizes(),
                    ", got ", probs->sizes());
  return {probs->data_ptr(), static_cast<int>(probs->element_size()), torch::empty({num_out}, probs->options())};
}

// row_id_map [rows, slots] and the probs moved to [num_out] (when given).
std::tuple<Tensor, std::optional<Tensor>> route_map(const fd::Route& r, const Tensor& route, const Tensor& chunk_offsets,
                                                     Tensor& layout, const std::optional<Tensor>& probs, int64_t num_out,
                                                     bool map_scans, int64_t pad_multiple) {
  auto row_id_map = torch::empty({r.rows, r.slots}, route.options().dtype(at::kInt));
  auto [p, prob_bytes, probs_out] = moved_probs(route, probs, num_out);
  void* po = probs_out.has_value() ? probs_out->data_ptr() : nullptr;
  FD_ON_DEVICE(route, fd::cuda::route_map(r, chunk_offsets.data_ptr<int32_t>(), layout.data_ptr<int64_t>(), p,
                                      prob_bytes, num_out, row_id_map.data_ptr<int32_t>(), po, map_scans,
                                      pad_multiple, stream), {
    fd::cpu::route_map(r, chunk_offsets.data_ptr<int32_t>(), layout.data_ptr<int64_t>(), p, prob_bytes,
                       num_out, row_id_map.data_ptr<int32_t>(), po);
  });
  return {row_id_map, probs_out};
}

// Zeroes the rows of dst (and probs_out) that no source row fills: pad rows and the tail.
void zero_unused_rows(Tensor& dst, const std::optional<Tensor>& probs_out, const Tensor& layout,
                      int64_t num_experts, bool padded, bool tail) {
  if (!padded && !tail) return;
  void* po = probs_out.has_value() ? probs_out->data_ptr() : nullptr;
  const int prob_bytes = probs_out.has_value() ? static_cast<int>(probs_out->element_size()) : 4;
  const int64_t row_bytes = dst.numel() == 0 ? 0 : dst.size(1) * dst.element_size();
  FD_ON_DEVICE(dst, fd::cuda::zero_unused_rows(layout.data_ptr<int64_t>(), static_cast<int32_t>(num_experts), padded,
                                             tail, dst.data_ptr(), dst.size(0), row_bytes, po, prob_bytes,
                                             stream), {
    fd::cpu::zero_unused_rows(layout.data_ptr<int64_t>(), static_cast<int32_t>(num_experts), padded, tail,
                              dst.data_ptr(), dst.size(0), row_bytes, po, prob_bytes);
  });
}

// dst [num_out, hidden] with dst[row_id_map[r, s]] = src[r]; pad and tail rows zeroed.
#ifdef FLEXDISPATCH_WITH_CUDA
// The unused tail of a permutation's output [num_out, ...] that a scatter's own launch may zero,
// storing the layout's error word to error_address (0: none) as it does.
fd::cuda::TailRows tail_rows_of(const Tensor& layout, int64_t num_experts, int64_t num_out,
                                const std::optional<Tensor>& probs_out, int64_t error_address) {
  return {layout.data_ptr<int64_t>(), static_cast<int32_t>(num_experts), num_out,
          probs_out.has_value() ? probs_out->data_ptr() : nullptr,
          probs_out.has_value() ? static_cast<int>(probs_out->element_size()) : 4,
          reinterpret_cast<int64_t*>(error_address)};
}
#endif

// error_address: as permute_with's fill takes it.
Tensor scatter_into(const Tensor& src, const Tensor& row_id_map, int64_t num_out, const Tensor& layout,
                    int64_t num_experts, bool padded, bool tail, const std::optional<Tensor>& probs_out,
                    int64_t& error_address) {
  auto dst = torch::empty({num_out, src.size(1)}, src.options());
  const int64_t row_bytes = src.size(1) * src.element_size();
  const int32_t slots = static_cast<int32_t>(row_id_map.size(1));
  bool tail_done = false;  // (the CUDA scatter's launch zeroed the tail and stored the error word)
#ifdef FLEXDISPATCH_WITH_CUDA
  const fd::cuda::TailRows tail_rows = tail_rows_of(layout, num_experts, num_out, probs_out, error_address);
  const fd::cuda::TailRows* tail_arg = tail && num_out > 0 ? &tail_rows : nullptr;
#endif
  FD_ON_DEVICE(src, fd::cuda::scatter_rows(src.data_ptr(), src.size(0), row_bytes, row_id_map.data_ptr<int32_t>(),
                                         slots, dst.data_ptr(), tail_arg, &tail_done, stream), {
    fd::cpu::scatter_rows(src.data_ptr(), src.size(0), row_bytes, row_id_map.data_ptr<int32_t>(), slots,
                          dst.data_ptr());
  });
  zero_unused_rows(dst, probs_out, layout, num_experts, padded, tail && !tail_done);
  if (tail_done) error_address = 0;
  return dst;
}

// Sizes the output: num_out when given (>= 0); otherwise the one sync, which copies a device
// layout to the host (host; a CPU layout is read in place) and reads the rows used. Returns
// false when the layout's error bits are set (the caller returns early and Python raises from
// the host copy, or the CPU layout).
bool size_output(const fd::Route& r, const Tensor& layout, int64_t& num_out, std::optional<Tensor>& host) {
  if (num_out < 0) {
    const int64_t* h = (layout.is_cpu() ? layout : host.emplace(layout.to(at::kCPU))).data_ptr<int64_t>();
    if (h[fd::layout_error(r.num_experts)] != 0) return false;
    num_out = h[fd::layout_offsets(r.num_experts) + r.num_experts];
  }
  check_out_rows(num_out);
  return true;
}

// Queue a copy of src[index] (one word of a contiguous int32 or int64 device tensor) to the
// pinned host word of the same dtype at dst_address, its device mapping (mapped_address plus
// the word's offset), on the current stream: an error word read later without a sync
// (flexdispatch/_library.py). CUDA only.
void queue_word_copy(const Tensor& src, int64_t index, int64_t dst_address) {
  TORCH_CHECK_TYPE(src.scalar_type() == at::kInt || src.scalar_type() == at::kLong,
                   "src must be int32 or int64, got ", src.scalar_type());
  TORCH_CHECK_VALUE(index >= 0 && index < src.numel(), "word ", index, " of ", src.numel());
  TORCH_CHECK_VALUE(dst_address != 0 && dst_address % src.element_size() == 0,
                    "dst_address must be an aligned mapped address (mapped_address), got ", dst_address);
  check_contiguous(src, "src");
  const int bytes = static_cast<int>(src.element_size());
  FD_ON_DEVICE(src, fd::cuda::store_word(static_cast<const char*>(src.data_ptr()) + index * bytes, bytes,
                                         reinterpret_cast<void*>(dst_address), stream), {
    TORCH_CHECK_VALUE(false, "queue_word_copy copies from CUDA devices only");
  });
}

// (out [N, H], out_probs [N] or [0] float32, row_id_map [R, S], layout, host layout or [0]): the
// op outputs as flexdispatch/_library.py returns them. An op returns tensors only, and none that
// aliases another, so "none" is an empty tensor on the route's device: out_probs without
// probs, and the host layout unless a device layout was copied to the host to size the output.
using Permuted = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

Tensor host_or_empty(const std::optional<Tensor>& host, const Tensor& layout) {
  return host.has_value() ? *host : layout.new_empty({0});
}

Permuted permuted(Tensor out, const std::optional<Tensor>& probs_out, Tensor row_id_map, Tensor layout,
                  const std::optional<Tensor>& host) {
  Tensor p = probs_out.has_value() ? *probs_out : layout.new_empty({0}, at::kFloat);
  Tensor h = host_or_empty(host, layout);
  return {std::move(out), std::move(p), std::move(row_id_map), std::move(layout), std::move(h)};
}

// A device layout's copy on the host, queued on the current stream once the kernels queued so
// far have written it: pinned, so that the host waits for the copy alone (wait()), not for the
// kernels queued after it. None for a CPU layout (read in place).
#ifdef FLEXDISPATCH_WITH_CUDA
struct DestroyEvent {
  void operator()(cudaEvent_t event) const { (void)cudaEventDestroy(event); }
};
#endif

struct LayoutCopy {
  std::optional<Tensor> host;
#ifdef FLEXDISPATCH_WITH_CUDA
  std::unique_ptr<std::remove_pointer_t<cudaEvent_t>, DestroyEvent> landed;  // (recorded after the copy)
#endif
  void wait() {
#ifdef FLEXDISPATCH_WITH_CUDA
    if (!landed) return;
    // (a wait for the device as torch's own syncs report it to torch.cuda.set_sync_debug_mode)
    if (C10_UNLIKELY(c10::cuda::warning_state().get_sync_debug_mode() != c10::cuda::SyncDebugMode::L_DISABLED)) {
      c10::cuda::warn_or_error_on_sync();
    }
    C10_CUDA_CHECK(cudaEventSynchronize(landed.get()));
    landed.reset();
#endif
  }
};

LayoutCopy copy_to_host(const Tensor& layout) {
  LayoutCopy copy;
#ifdef FLEXDISPATCH_WITH_CUDA
  if (layout.is_cuda()) {
    copy.host.emplace(torch::empty(layout.sizes(), layout.options().device(at::kCPU).pinned_memory(true)));
    copy.host->copy_(layout, /*non_blocking=*/true);
    cudaEvent_t event = nullptr;
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    copy.landed.reset(event);
    C10_CUDA_CHECK(cudaEventRecord(event, c10::cuda::getCurrentCUDAStream(layout.get_device())));
  }
#endif
  return copy;
}

// What every single-call permutation shares: plan, (sync when num_out < 0), map, then
// fill(row_id_map, num_out, layout, tail, out_probs, word) makes the rows, and with num_out
// given, the layout's error word goes to error_address (0: none): fill may store it with its
// own launch (then it sets `word`, error_address or 0, to 0), else it is queued after (see
// queue_word_copy). When the sync finds bad routing (or no row is used), returns a [0, hidden]
// tensor like `like` and an empty row_id_map; the caller reads the error bits from host_layout.
// copy_layout (num_out given): the host layout is a copy of the final layout (the map pass
// completes it, error bits included), queued before the rows move and waited for after their
// launch, so the host reads the counts while the rows move; its caller reads the error bits
// there and passes no error address.
template <typename Fill>
Permuted permute_with(const fd::Route& r, const Tensor& route, int64_t pad_multiple, int64_t num_out,
                      const std::optional<Tensor>& probs, const Tensor& like, int64_t hidden, int64_t error_address,
                      Fill fill, bool copy_layout = false) {
  const bool scans = map_scans(r, route, num_out);
  auto [chunk_offsets, layout] = route_plan(r, route, pad_multiple, scans);
  std::optional<Tensor> host;
  const bool tail = num_out >= 0;
  if (!size_output(r, layout, num_out, host)) {
    return permuted(like.new_empty({0, hidden}), std::nullopt, route.new_empty({0}, at::kInt), layout, host);
  }
  auto [row_id_map, probs_out] = route_map(r, route, chunk_offsets, layout, probs, num_out, scans, pad_multiple);
  LayoutCopy copied = tail && copy_layout ? copy_to_host(layout) : LayoutCopy{};
  int64_t word = tail ? error_address : 0;
  Tensor out = fill(row_id_map, num_out, layout, tail, probs_out, word);
  if (word != 0) queue_word_copy(layout, fd::layout_error(r.num_experts), word);
  copied.wait();
  return permuted(out, probs_out, row_id_map, layout, copied.host.has_value() ? copied.host : host);
}

#ifdef FLEXDISPATCH_WITH_CUDA
// The permutation of a small route on a CUDA device, its size known, in one launch
// (route_small.cu) instead of the plan's passes and the scatter, whose kernel also stores the
// error word at error_address (0: none). Output rows [num_out, hidden] of out_options;
// launch(block_counts, out, probs, prob_bytes, probs_out, row_id_map, layout, error_word, stream)
// queues the kernel (permute_small or permute_fp8_small) as `fit` says, block_counts the grid
// launch's scratch (null for the other). Returns as permute_with.
template <typename Launch>
Permuted permute_small_with(const fd::Route& r, const fd::cuda::SmallLaunch& fit, const Tensor& route,
                            int64_t pad_multiple, int64_t num_out, const std::optional<Tensor>& probs,
                            const at::TensorOptions& out_options, int64_t hidden, int64_t error_address, Launch launch,
                            bool copy_layout = false) {
  check_pad_multiple(pad_multiple);
  check_out_rows(num_out);
  auto layout = torch::empty({fd::layout_size(r.num_experts)}, route.options().dtype(at::kLong));
  // The grid launch's scratch takes whole rows past the map's in the map's allocation (one
  // allocation less a call): each block writes its words before any block reads them, and the
  // map returned is a view of the first r.rows rows.
  const int64_t scratch = fd::cuda::small_grid_words(r, fit), scratch_rows = (scratch + r.slots - 1) / r.slots;
  auto map_rows = torch::empty({r.rows + scratch_rows, r.slots}, route.options().dtype(at::kInt));
  auto row_id_map = scratch_rows ? map_rows.narrow(0, 0, r.rows) : map_rows;
  int32_t* counts = scratch_rows ? map_rows.data_ptr<int32_t>() + int64_t(r.rows) * r.slots : nullptr;
  auto [p, prob_bytes, probs_out] = moved_probs(route, probs, num_out);
  auto out = torch::empty({num_out, hidden}, out_options);
  void* po = probs_out.has_value() ? probs_out->data_ptr() : nullptr;
  FD_ON_DEVICE(route, launch(counts, out.data_ptr(), p, prob_bytes, po, row_id_map.data_ptr<int32_t>(),
                             layout.data_ptr<int64_t>(), reinterpret_cast<void*>(error_address), stream), {});
  LayoutCopy copied = copy_layout ? copy_to_host(layout) : LayoutCopy{};  // (the kernel writes the layout last)
  copied.wait();
  return permuted(out, probs_out, row_id_map, layout, copied.host);
}

// How the one-launch permutation serves a route of num_out rows (none where num_out < 0 or off
// CUDA): fit(stream) asked on the route's device, whose multiprocessors bound the grid launch.
template <typename Fit>
fd::cuda::SmallLaunch small_fit(const Tensor& route, int64_t num_out, Fit fit) {
  if (num_out < 0 || !route.is_cuda()) return {};
  const c10::cuda::CUDAGuard guard(route.device());
  return fit(c10::cuda::getCurrentCUDAStream());
}

// permute_small_with for rows as they are: tokens [R, H], as `fit` says (fd::cuda::permute_small_fit).
Permuted permute_small(const fd::Route& r, const fd::cuda::SmallLaunch& fit, const Tensor& route,
                       int64_t pad_multiple, int64_t num_out, const Tensor& tokens, const std::optional<Tensor>& probs,
                       int64_t error_address, bool copy_layout) {
  return permute_small_with(r, fit, route, pad_multiple, num_out, probs, tokens.options(), tokens.size(1),
                            error_address, [&](int32_t* counts, void* out, const void* p, int prob_bytes, void* po,
                                               int32_t* map, int64_t* layout, void* word, cudaStream_t stream) {
    return fd::cuda::permute_small(r, fit, counts, pad_multiple, tokens.data_ptr(),
                                   tokens.size(1) * tokens.element_size(), p, prob_bytes, num_out, out, po, map,
                                   layout, word, stream);
  }, copy_layout);
}
#endif

// The whole permutation in one call: plan, (sync when num_out < 0), map, rows, zero fill.
// error_address and copy_layout as permute_with's. Returns as permute_with.
Permuted permute(const Tensor& route, int64_t num_experts, int64_t pad_multiple, int64_t num_out,
                 const Tensor& tokens, const std::optional<Tensor>& probs, int64_t error_address, bool copy_layout) {
  const fd::Route r = route_of(route, num_experts);
  as_rows(tokens, "tokens");
  check_same_device(route, tokens, "tokens");
  TORCH_CHECK_VALUE(tokens.size(0) == r.rows, "tokens has ", tokens.size(0), " rows, the route ", r.rows);
#ifdef FLEXDISPATCH_WITH_CUDA
  const fd::cuda::SmallLaunch fit = small_fit(route, num_out, [&](cudaStream_t stream) {
    return fd::cuda::permute_small_fit(r, tokens.size(1) * tokens.element_size(), stream);
  });
  if (fit.block_rows != 0) {
    return permute_small(r, fit, route, pad_multiple, num_out, tokens, probs, error_address, copy_layout);
  }
#endif
  return permute_with(r, route, pad_multiple, num_out, probs, tokens, tokens.size(1), error_address,
                      [&](const Tensor& map, int64_t n, const Tensor& layout, bool tail, const auto& probs_out,
                          int64_t& word) {
                        return scatter_into(tokens, map, n, layout, num_experts, pad_multiple > 1, tail, probs_out,
                                            word);
                      }, copy_layout);
}

// The plan alone: (row_id_map, layout, host layout or [0], as Permuted's); sizes itself when
// num_out < 0.
std::tuple<Tensor, Tensor, Tensor> plan(const Tensor& route, int64_t num_experts, int64_t pad_multiple,
                                        int64_t num_out) {
  const fd::Route r = route_of(route, num_experts);
  const bool scans = map_scans(r, route, num_out);
  auto [chunk_offsets, layout] = route_plan(r, route, pad_multiple, scans);
  std::optional<Tensor> host;
  if (!size_output(r, layout, num_out, host)) {
    return {route.new_empty({0}, at::kInt), layout, host_or_empty(host, layout)};
  }
  auto [row_id_map, unused] = route_map(r, route, chunk_offsets, layout, std::nullopt, num_out, scans, pad_multiple);
  return {row_id_map, layout, host_or_empty(host, layout)};
}

// Rows moved along an existing plan (backward of unpermute, apply_permutation).
Tensor scatter_rows(const Tensor& src, const Tensor& row_id_map, int64_t num_out, const Tensor& layout,
                    int64_t num_experts, bool padded, bool tail) {
  as_rows(src, "src");
  check_row_id_map(row_id_map, src);
  TORCH_CHECK_VALUE(row_id_map.size(0) == src.size(0), "row_id_map has ", row_id_map.size(0),
                    " rows but src has ", src.size(0));
  int64_t no_word = 0;
  return scatter_into(src, row_id_map, num_out, layout, num_experts, padded, tail, std::nullopt, no_word);
}

// dst [rows, hidden]: dst[r] = sum over valid slots (in order) of probs[r, s] * src[map[r, s]].
Tensor gather_rows(const Tensor& src, const Tensor& row_id_map, const std::optional<Tensor>& probs) {
  as_rows(src, "src");
  const fd::DType dtype = dtype_of(src, "src");
  check_row_id_map(row_id_map, src);
  const void* p = nullptr;
  int32_t prob_dtype = -1;
  if (probs.has_value()) {
    prob_dtype = prob_dtype_of(*probs, "probs");
    check_contiguous(*probs, "probs");
    check_same_device(src, *probs, "probs");
    TORCH_CHECK_VALUE(probs->sizes() == row_id_map.sizes(), "probs must have row_id_map's shape ",
                      row_id_map.sizes(), ", got ", probs->sizes());
    p = probs->data_ptr();
  }
  const int64_t rows = row_id_map.size(0);
  const int32_t slots = static_cast<int32_t>(row_id_map.size(1));
  auto dst = torch::empty({rows, src.size(1)}, src.options());
  FD_ON_DEVICE(src, fd::cuda::gather_rows(dtype, src.data_ptr(), src.size(1), row_id_map.data_ptr<int32_t>(), slots,
                                        p, prob_dtype, dst.data_ptr(), rows, stream), {
    fd::cpu::gather_rows(dtype, src.data_ptr(), src.size(1), row_id_map.data_ptr<int32_t>(), slots, p, prob_dtype,
                         dst.data_ptr(), rows);
  });
  return dst;
}

// [R, S] of values' dtype: values [N] (float32 or float64) read at each slot's output row, 0 at an
// unused slot (the permuted probs' gradient back to the route's probs).
Tensor gather_slots(const Tensor& values, const Tensor& row_id_map) {
  prob_dtype_of(values, "values");
  TORCH_CHECK_VALUE(values.dim() == 1, "values must be 1-D [num_out], got ", values.sizes());
  check_contiguous(values, "values");
  check_row_id_map(row_id_map, values);
  auto out = torch::empty(row_id_map.sizes(), values.options());
  const int bytes = static_cast<int>(values.element_size());
  FD_ON_DEVICE(values, fd::cuda::gather_slots(values.data_ptr(), bytes, row_id_map.data_ptr<int32_t>(),
                                            row_id_map.numel(), out.data_ptr(), stream), {
    fd::cpu::gather_slots(values.data_ptr(), bytes, row_id_map.data_ptr<int32_t>(), row_id_map.numel(),
                          out.data_ptr());
  });
  return out;
}

// Backward of gather_rows with probs: (grad_src [src rows, hidden], grad_probs [rows, slots]);
// pad and tail rows of grad_src zeroed.
std::tuple<Tensor, Tensor> gather_rows_backward(const Tensor& grad_out, const Tensor& src,
                                                const Tensor& row_id_map, const Tensor& probs, const Tensor& layout,
                                                int64_t num_experts, bool padded, bool tail) {
  as_rows(grad_out, "grad_out");
  as_rows(src, "src");
  const fd::DType dtype = dtype_of(src, "src");
  TORCH_CHECK_TYPE(grad_out.scalar_type() == src.scalar_type(), "grad_out must have src's dtype");
  check_row_id_map(row_id_map, src);
  const fd::DType prob_dtype = prob_dtype_of(probs, "probs");
  check_contiguous(probs, "probs");
  TORCH_CHECK_VALUE(probs.sizes() == row_id_map.sizes(), "probs must have row_id_map's shape");
  TORCH_CHECK_VALUE(grad_out.size(0) == row_id_map.size(0) && grad_out.size(1) == src.size(1),
                    "grad_out must be [rows of row_id_map, hidden]");
  auto grad_src = torch::empty_like(src);
  auto grad_probs = torch::zeros_like(probs);
  const int64_t rows = row_id_map.size(0);
  const int32_t slots = static_cast<int32_t>(row_id_map.size(1));
  FD_ON_DEVICE(src, fd::cuda::gather_rows_backward(dtype, grad_out.data_ptr(), src.data_ptr(), src.size(1),
                                                 row_id_map.data_ptr<int32_t>(), slots, probs.data_ptr(),
                                                 prob_dtype, rows, grad_src.data_ptr(), grad_probs.data_ptr(),
                                                 stream), {
    fd::cpu::gather_rows_backward(dtype, grad_out.data_ptr(), src.data_ptr(), src.size(1),
                                  row_id_map.data_ptr<int32_t>(), slots, probs.data_ptr(), prob_dtype, rows,
                                  grad_src.data_ptr(), grad_probs.data_ptr());
  });
  zero_unused_rows(grad_src, std::nullopt, layout, num_experts, padded, tail);
  return {grad_src, grad_probs};
}

// ---- FP8 rows ---------------------------------------------------------------------------

// Kernels read rows as 16-byte vectors: a view that starts off that alignment is copied first.
Tensor aligned(const Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone();
}

// x [rows, hidden] (float32, float16 or bfloat16; hidden a multiple of 128) ->
// (q [rows, hidden] uint8 e4m3fn bits, scales [rows, hidden / 128] float32).
std::tuple<Tensor, Tensor> quantize_fp8(const Tensor& x_in) {
  as_rows(x_in, "x");
  const fd::DType dtype = dtype_of(x_in, "x");
  TORCH_CHECK_TYPE(dtype != fd::kFloat64, "x must be float32, float16 or bfloat16 for FP8, got float64");
  TORCH_CHECK_VALUE(x_in.size(1) % fd::kFp8Group == 0, "x's hidden size must be a multiple of ", fd::kFp8Group,
                    ", got ", x_in.size(1));
  const Tensor x = aligned(x_in);
  const int64_t groups = x.size(0) * (x.size(1) / fd::kFp8Group);
  auto q = torch::empty({x.size(0), x.size(1)}, x.options().dtype(at::kByte));
  auto scales = torch::empty({x.size(0), x.size(1) / fd::kFp8Group}, x.options().dtype(at::kFloat));
  FD_ON_DEVICE(x, fd::cuda::quantize_fp8(dtype, x.data_ptr(), groups, q.data_ptr<uint8_t>(), scales.data_ptr<float>(),
                                         stream), {
    fd::cpu::quantize_fp8(dtype, x.data_ptr(), groups, q.data_ptr<uint8_t>(), scales.data_ptr<float>());
  });
  return {q, scales};
}

// (q [rows, hidden] uint8, scales [rows, hidden / 128] float32) -> [rows, hidden] of `like`'s dtype.
Tensor dequantize_fp8(const Tensor& q_in, const Tensor& scales_in, const Tensor& like) {
  as_rows(q_in, "q");
  TORCH_CHECK_TYPE(q_in.scalar_type() == at::kByte, "q must hold e4m3fn bits as uint8, got ", q_in.scalar_type());
  TORCH_CHECK_VALUE(q_in.size(1) % fd::kFp8Group == 0, "q's hidden size must be a multiple of ", fd::kFp8Group);
  TORCH_CHECK_TYPE(scales_in.scalar_type() == at::kFloat, "scales must be float32, got ", scales_in.scalar_type());
  TORCH_CHECK_VALUE(scales_in.dim() == 2 && scales_in.size(0) == q_in.size(0) &&
                        scales_in.size(1) == q_in.size(1) / fd::kFp8Group,
                    "scales must be [rows, hidden / ", fd::kFp8Group, "], got ", scales_in.sizes());
  check_contiguous(scales_in, "scales");
  check_same_device(q_in, scales_in, "scales");
  const fd::DType dtype = dtype_of(like, "dtype");
  TORCH_CHECK_TYPE(dtype != fd::kFloat64, "FP8 rows dequantize to float32, float16 or bfloat16, not float64");
  const Tensor q = aligned(q_in);
  const int64_t groups = q.size(0) * (q.size(1) / fd::kFp8Group);
  auto out = torch::empty({q.size(0), q.size(1)}, q.options().dtype(like.scalar_type()));
  FD_ON_DEVICE(q, fd::cuda::dequantize_fp8(dtype, q.data_ptr<uint8_t>(), scales_in.data_ptr<float>(), groups,
                                           out.data_ptr(), stream), {
    fd::cpu::dequantize_fp8(dtype, q.data_ptr<uint8_t>(), scales_in.data_ptr<float>(), groups, out.data_ptr());
  });
  return out;
}

// ---- the agreement of a call -------------------------------------------------------------

// A header's kernel arguments: its values, and status[0] (int32 [2] from check_route,
// optional, on `like`'s device) to OR into its error field on the device.
std::pair<fd::Header, const int32_t*> header_args(const Tensor& like, const std::vector<int64_t>& values,
                                                  const std::optional<Tensor>& status) {
  TORCH_CHECK_VALUE(values.size() == fd::kHeaderWidth, "a header has ", int(fd::kHeaderWidth), " fields, got ",
                    values.size());
  fd::Header header_values;
  for (int f = 0; f < fd::kHeaderWidth; ++f) header_values.field[f] = values[f];
  const int32_t* status_ptr = nullptr;
  if (status.has_value()) {
    TORCH_CHECK_TYPE(status->scalar_type() == at::kInt && status->numel() >= 1, "status must be int32 [2]");
    check_same_device(like, *status, "status");
    status_ptr = status->data_ptr<int32_t>();
  }
  return {header_values, status_ptr};
}

// One rank's header [kHeaderWidth] int64 on `like`'s device: `values`, with status[0] (int32
// [2] from check_route, optional) OR-ed into the error field. No host-to-device copy.
Tensor make_header(const Tensor& like, const std::vector<int64_t>& values, const std::optional<Tensor>& status) {
  const auto [header_values, status_ptr] = header_args(like, values, status);
  auto header = torch::empty({fd::kHeaderWidth}, like.options().dtype(at::kLong));
  FD_ON_DEVICE(like, fd::cuda::make_header(header_values, status_ptr, header.data_ptr<int64_t>(), stream), {
    fd::cpu::make_header(header_values, status_ptr, header.data_ptr<int64_t>());
  });
  return header;
}

// indices (int64, any shape) as `index_dtype` (int32 or int64), or -1 everywhere unless every
// header of headers [ranks, kHeaderWidth] agrees (flexdispatch.h: header_breaks_agreement).
Tensor mask_unless_agreed(const Tensor& headers, const Tensor& indices, at::ScalarType index_dtype) {
  TORCH_CHECK_VALUE(headers.dim() == 2 && headers.size(1) == fd::kHeaderWidth, "headers must be [ranks, ",
                    int(fd::kHeaderWidth), "], got ", headers.sizes());
  TORCH_CHECK_TYPE(headers.scalar_type() == at::kLong && indices.scalar_type() == at::kLong,
                   "headers and indices must be int64");
  TORCH_CHECK_TYPE(index_dtype == at::kLong || index_dtype == at::kInt, "index_dtype must be int32 or int64");
  check_contiguous(headers, "headers");
  check_contiguous(indices, "indices");
  check_same_device(headers, indices, "indices");
  const int32_t ranks = static_cast<int32_t>(headers.size(0));
  const bool out64 = index_dtype == at::kLong;
  auto out = torch::empty(indices.sizes(), indices.options().dtype(index_dtype));
  FD_ON_DEVICE(indices, fd::cuda::mask_unless_agreed(headers.data_ptr<int64_t>(), ranks, indices.data_ptr<int64_t>(),
                                                     indices.numel(), out.data_ptr(), out64, stream), {
    fd::cpu::mask_unless_agreed(headers.data_ptr<int64_t>(), ranks, indices.data_ptr<int64_t>(), indices.numel(),
                                out.data_ptr(), out64);
  });
  return out;
}

#ifdef FLEXDISPATCH_WITH_CUDA
// Pinned host memory as kernels address it (its device mapping): the one lookup of it.
cudaError_t device_view(const Tensor& pinned, void** view) {
  *view = nullptr;
  return cudaHostGetDevicePointer(view, pinned.data_ptr(), 0);
}
#endif

// The device address of pinned host memory (queue_word_copy's destination): asked once per
// buffer, since the runtime call costs about as much as the copy it replaces.
int64_t mapped_address(const Tensor& pinned) {
  TORCH_CHECK_VALUE(pinned.device().is_cpu() && pinned.is_pinned(), "pinned must be pinned host memory");
#ifdef FLEXDISPATCH_WITH_CUDA
  void* view = nullptr;
  const cudaError_t err = device_view(pinned, &view);
  TORCH_CHECK(err == cudaSuccess, "flexdispatch CUDA error: ", cudaGetErrorString(err));
  return reinterpret_cast<int64_t>(view);
#else
  TORCH_CHECK_VALUE(false, "mapped_address needs a CUDA build");
  return 0;
#endif
}

// make_header and mask_unless_agreed in one kernel, the headers exchanged through symmetric
// memory (launch.h, exchange_headers): bases [world] int64 on the device (every rank's address
// of its header slots), indices int64 (any shape) -> indices as `index_dtype`, or -1 everywhere
// unless every rank's header agrees. Every rank's header lands in `gathered` [world,
// kHeaderWidth] int64, pinned host memory (written by the kernel: read it after a later host
// wait). CUDA only.
Tensor exchange_headers(const Tensor& bases, int64_t rank, int64_t seq, const std::vector<int64_t>& values,
                        const std::optional<Tensor>& status, const Tensor& indices, at::ScalarType index_dtype,
                        const Tensor& gathered, double timeout_s) {
  TORCH_CHECK_TYPE(bases.scalar_type() == at::kLong && indices.scalar_type() == at::kLong &&
                       gathered.scalar_type() == at::kLong, "bases, indices and gathered must be int64");
  TORCH_CHECK_TYPE(index_dtype == at::kLong || index_dtype == at::kInt, "index_dtype must be int32 or int64");
  const int64_t world = bases.numel();
  TORCH_CHECK_VALUE(world >= 1 && world <= fd::kMaxHeaderRanks && rank >= 0 && rank < world, "rank ", rank,
                    " of a group of ", world, " (at most ", int(fd::kMaxHeaderRanks), ")");
  TORCH_CHECK_VALUE(seq >= 1, "seq must be >= 1, got ", seq);
  const uint64_t timeout_ns = timeout_ns_of(timeout_s);
  TORCH_CHECK_VALUE(gathered.device().is_cpu() && gathered.is_pinned() && gathered.is_contiguous() &&
                        gathered.numel() == world * fd::kHeaderWidth,
                    "gathered must be pinned host memory of ", world, " x ", int(fd::kHeaderWidth), " int64");
  check_contiguous(bases, "bases");
  check_contiguous(indices, "indices");
  check_same_device(bases, indices, "indices");
  const auto header = header_args(indices, values, status);  // (not a structured binding: the lambda captures it)
  auto out = torch::empty(indices.sizes(), indices.options().dtype(index_dtype));
  FD_ON_DEVICE(indices, [&] {
    void* gathered_view = nullptr;  // the pinned buffer as the kernel addresses it
    const cudaError_t mapped = device_view(gathered, &gathered_view);
    if (mapped != cudaSuccess) return mapped;
    return fd::cuda::exchange_headers(header.first, header.second, bases.data_ptr<int64_t>(),
                                      static_cast<int32_t>(rank), static_cast<int32_t>(world), seq, timeout_ns,
                                      indices.data_ptr<int64_t>(), indices.numel(), out.data_ptr(),
                                      index_dtype == at::kLong, static_cast<int64_t*>(gathered_view), stream);
  }(), {
    TORCH_CHECK_VALUE(false, "exchange_headers runs on CUDA devices only");
  });
  return out;
}

// FP8 rows read from q / scales (rows q_pitch bytes and scale_pitch floats apart) or at addrs
// (nullable; see permute_fp8_from), written dequantized to out [n, hidden] of `options` at their
// rows of `map`; pad rows and the tail zeroed, the tail by the scatter's own launch where it can
// (an uncapped CUDA launch). The one body of permute_fp8 and permute_fp8_from.
Tensor dequantized_into(fd::DType dtype, const uint8_t* q, int64_t q_pitch, const float* scales, int64_t scale_pitch,
                        const int64_t* addrs, int64_t rows, int64_t hidden, const Tensor& map, int64_t n,
                        const Tensor& layout, int64_t num_experts, bool padded, bool tail,
                        const std::optional<Tensor>& probs_out, const at::TensorOptions& options, int64_t max_blocks,
                        int64_t first_row, int64_t& error_address) {
  auto out = torch::empty({n, hidden}, options);
  const int32_t slots = static_cast<int32_t>(map.size(1));
  bool tail_done = false;  // (the CUDA scatter's launch zeroed the tail and stored the error word)
#ifdef FLEXDISPATCH_WITH_CUDA
  const fd::cuda::TailRows tail_rows = tail_rows_of(layout, num_experts, n, probs_out, error_address);
#endif
  FD_ON_DEVICE(map, fd::cuda::scatter_fp8_rows(dtype, q, q_pitch, scales, scale_pitch, addrs, rows, hidden,
                                               map.data_ptr<int32_t>(), slots, out.data_ptr(), max_blocks, first_row,
                                               tail && n > 0 ? &tail_rows : nullptr, &tail_done, stream), {
    fd::cpu::scatter_fp8_rows(dtype, q, q_pitch, scales, scale_pitch, addrs, rows, hidden, map.data_ptr<int32_t>(),
                              slots, out.data_ptr());
  });
  zero_unused_rows(out, probs_out, layout, num_experts, padded, tail && !tail_done);
  if (tail_done) error_address = 0;
  return out;
}

// The dequantizing permutation in one call, as permute: plan, (sync when num_out < 0), map, then
// FP8 rows q [R, H] (uint8 e4m3 bits; rows may be a strided view, e.g. a slice of a packed
// payload) and scales [R, H / 128] float32 written dequantized to `like`'s dtype at their
// planned rows, pad and tail rows zeroed. Returns as permute.
Permuted permute_fp8(
    const Tensor& route, int64_t num_experts, int64_t pad_multiple, int64_t num_out, const Tensor& q_in,
    const Tensor& scales_in, const std::optional<Tensor>& probs, const Tensor& like, int64_t error_address) {
  const fd::Route r = route_of(route, num_experts);
  TORCH_CHECK_VALUE(q_in.dim() == 2, "q must be 2-D [rows, hidden], got ", q_in.sizes());
  TORCH_CHECK_TYPE(q_in.scalar_type() == at::kByte, "q must hold e4m3fn bits as uint8, got ", q_in.scalar_type());
  TORCH_CHECK_VALUE(q_in.size(1) % fd::kFp8Group == 0, "q's hidden size must be a multiple of ", fd::kFp8Group);
  TORCH_CHECK_VALUE(q_in.size(0) == r.rows, "q has ", q_in.size(0), " rows, the route ", r.rows);
  TORCH_CHECK_TYPE(scales_in.scalar_type() == at::kFloat, "scales must be float32, got ", scales_in.scalar_type());
  TORCH_CHECK_VALUE(scales_in.dim() == 2 && scales_in.size(0) == q_in.size(0) &&
                        scales_in.size(1) == q_in.size(1) / fd::kFp8Group,
                    "scales must be [rows, hidden / ", fd::kFp8Group, "], got ", scales_in.sizes());
  check_same_device(route, q_in, "q");
  check_same_device(q_in, scales_in, "scales");
  const fd::DType dtype = dtype_of(like, "dtype");
  TORCH_CHECK_TYPE(dtype != fd::kFloat64, "FP8 rows dequantize to float32, float16 or bfloat16, not float64");
  // Rows are read as 16-byte vectors: a pitch or base off that alignment gets a packed copy.
  const bool q_ok = q_in.stride(1) == 1 && q_in.stride(0) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(q_in.data_ptr()) % 16 == 0;
  const Tensor q = q_ok || q_in.size(0) == 0 ? q_in : q_in.contiguous().clone();
  const Tensor scales = scales_in.stride(1) == 1 ? scales_in : scales_in.contiguous();
  const int64_t hidden = q.size(1);
  const int64_t q_pitch = q.size(0) > 1 ? q.stride(0) : hidden;
  const int64_t scale_pitch = scales.size(0) > 1 ? scales.stride(0) : hidden / fd::kFp8Group;
#ifdef FLEXDISPATCH_WITH_CUDA
  const fd::cuda::SmallLaunch fit = small_fit(route, num_out, [&](cudaStream_t stream) {
    return fd::cuda::permute_fp8_small_fit(r, hidden, dtype, stream);
  });
  if (fit.block_rows != 0) {
    return permute_small_with(r, fit, route, pad_multiple, num_out, probs, q.options().dtype(like.scalar_type()),
                              hidden, error_address, [&](int32_t* counts, void* out, const void* p, int prob_bytes,
                                                         void* po, int32_t* map, int64_t* layout, void* word,
                                                         cudaStream_t stream) {
      return fd::cuda::permute_fp8_small(r, fit, counts, pad_multiple, dtype, q.data_ptr<uint8_t>(), q_pitch,
                                         scales.data_ptr<float>(), scale_pitch, hidden, p, prob_bytes, num_out, out,
                                         po, map, layout, word, stream);
    });
  }
#endif
  return permute_with(r, route, pad_multiple, num_out, probs, like, hidden, error_address,
                      [&](const Tensor& map, int64_t n, const Tensor& layout, bool tail, const auto& probs_out,
                          int64_t& word) {
    return dequantized_into(dtype, q.data_ptr<uint8_t>(), q_pitch, scales.data_ptr<float>(), scale_pitch, nullptr,
                            q.size(0), hidden, map, n, layout, num_experts, pad_multiple > 1, tail, probs_out,
                            q.options().dtype(like.scalar_type()), 0, 0, word);
  });
}

// ---- rows read through addresses (the NVLink manager's transfers) ----------------------------

void check_addrs(const Tensor& addrs, const Tensor& out, int64_t rows, int64_t slots) {
  TORCH_CHECK_TYPE(addrs.scalar_type() == at::kLong, "addrs must be int64, got ", addrs.scalar_type());
  check_contiguous(addrs, "addrs");
  check_same_device(out, addrs, "addrs");
  TORCH_CHECK_VALUE(addrs.numel() == rows * slots, "addrs must have ", rows * slots, " entries, got ", addrs.numel());
}

// Where a pull starts (launch.h, copy_rows_from): a row of the `rows` read, or 0.
void check_first_row(int64_t first_row, int64_t rows) {
  TORCH_CHECK_VALUE(first_row >= 0 && (first_row < rows || first_row == 0), "first_row must be in [0, ", rows,
                    "), got ", first_row);
}

int32_t checked_align(int64_t align) {
  TORCH_CHECK_VALUE(align >= 1 && align <= 4096 && (align & (align - 1)) == 0,
                    "align must be a power of two in [1, 4096], got ", align);
  return static_cast<int32_t>(align);
}

// out [N, W] (contiguous, any dtype) gets the row of N * W * element bytes at addrs[r] for every r
// (addrs [N] int64, every address aligned to `align` bytes), or, with row_id_map [N, S], at its
// rows map[r, s] (-1: none; other rows of out untouched). Rows are read from first_row on, round
// to the start (launch.h).
void copy_rows_from(const Tensor& addrs, int64_t align, Tensor& out, const std::optional<Tensor>& row_id_map,
                    int64_t max_blocks, int64_t first_row) {
  TORCH_CHECK_VALUE(out.dim() == 2, "out must be 2-D, got ", out.sizes());
  check_contiguous(out, "out");
  const int64_t row_bytes = out.size(1) * out.element_size();
  const int64_t rows = row_id_map.has_value() ? row_id_map->size(0) : out.size(0);
  check_addrs(addrs, out, rows, 1);
  const int32_t* map = nullptr;
  int32_t slots = 0;
  if (row_id_map.has_value()) {
    check_row_id_map(*row_id_map, out);
    map = row_id_map->data_ptr<int32_t>();
    slots = static_cast<int32_t>(row_id_map->size(1));
  }
  const int32_t a = checked_align(align);
  check_first_row(first_row, rows);
  FD_ON_DEVICE(out, fd::cuda::copy_rows_from(addrs.data_ptr<int64_t>(), rows, row_bytes, a, map, slots,
                                             out.data_ptr(), max_blocks, first_row, stream), {
    fd::cpu::copy_rows_from(addrs.data_ptr<int64_t>(), rows, row_bytes, map, slots, out.data_ptr());
  });
}

// out [T, H] (float dtype, contiguous): out[t] = sum over s in order of the row at addrs[t, s]
// (addrs [T, S] int64, 0: none), float32 accumulation (float64 for float64).
void sum_rows_from(const Tensor& addrs, int64_t align, Tensor& out, int64_t max_blocks) {
  as_rows(out, "out");
  const fd::DType dtype = dtype_of(out, "out");
  TORCH_CHECK_VALUE(addrs.dim() == 2 && addrs.size(0) == out.size(0), "addrs must be [", out.size(0),
                    ", slots], got ", addrs.sizes());
  check_addrs(addrs, out, addrs.size(0), addrs.size(1));
  const int32_t a = checked_align(align);
  const int32_t slots = static_cast<int32_t>(addrs.size(1));
  FD_ON_DEVICE(out, fd::cuda::sum_rows_from(dtype, addrs.data_ptr<int64_t>(), out.size(0), slots, out.size(1), a,
                                            out.data_ptr(), max_blocks, stream), {
    fd::cpu::sum_rows_from(dtype, addrs.data_ptr<int64_t>(), out.size(0), slots, out.size(1), out.data_ptr());
  });
}

// The parts of an exchange (contiguous tensors on `buffer`'s device) copied into `buffer`
// (uint8, contiguous) at byte `offsets`, in one launch on CUDA.
void pack_parts(Tensor& buffer, const std::vector<Tensor>& parts, const std::vector<int64_t>& offsets) {
  TORCH_CHECK_VALUE(parts.size() == offsets.size() && parts.size() <= fd::kMaxPackParts, "pack_parts takes up to ",
                    int(fd::kMaxPackParts), " parts and one offset each, got ", parts.size(), " and ", offsets.size());
  TORCH_CHECK_TYPE(buffer.scalar_type() == at::kByte, "buffer must be uint8");
  check_contiguous(buffer, "buffer");
  fd::PackParts packed{};
  packed.count = static_cast<int32_t>(parts.size());
  for (size_t p = 0; p < parts.size(); ++p) {
    check_contiguous(parts[p], "parts");
    check_same_device(buffer, parts[p], "parts");
    const int64_t bytes = parts[p].numel() * parts[p].element_size();
    TORCH_CHECK_VALUE(offsets[p] >= 0 && offsets[p] + bytes <= buffer.numel(), "part ", p, " (", bytes,
                      " bytes at ", offsets[p], ") does not fit in the buffer of ", buffer.numel());
    packed.part[p] = fd::PackPart{bytes ? parts[p].data_ptr() : nullptr, bytes, offsets[p]};
  }
  FD_ON_DEVICE(buffer, fd::cuda::pack_parts(packed, buffer.data_ptr(), stream), {
    for (int32_t p = 0; p < packed.count; ++p) {
      if (packed.part[p].bytes) {
        std::memcpy(static_cast<char*>(buffer.data_ptr()) + packed.part[p].offset, packed.part[p].src,
                    packed.part[p].bytes);
      }
    }
  });
}

// The signal-pad barrier of a symmetric-memory group on `like`'s device and current stream
// (signal_pads: the device address of the group's array of pad pointers). CUDA only.
void peer_barrier(int64_t signal_pads, int64_t channel, int64_t rank, int64_t world, const Tensor& like,
                  double timeout_s) {
  const uint64_t timeout_ns = timeout_ns_of(timeout_s);
  TORCH_CHECK_VALUE(world >= 1 && world <= 1024 && rank >= 0 && rank < world, "rank ", rank, " of ", world);
  TORCH_CHECK_VALUE(channel >= 0 && signal_pads != 0, "channel must be >= 0 and signal_pads non-null");
  FD_ON_DEVICE(like, fd::cuda::peer_barrier(reinterpret_cast<const void*>(signal_pads), static_cast<int32_t>(channel),
                                            static_cast<int32_t>(rank), static_cast<int32_t>(world), timeout_ns,
                                            stream), {
    TORCH_CHECK_VALUE(false, "peer_barrier runs on CUDA devices only");
  });
}

// int64 [n]: the address of entry i of a transfer of `kind` (flexdispatch.h, PeerRows; 0: no
// row) for `rank`, from counts [W, W] int64 (rows rank s sends rank d) and table [W] int64
// (where each rank's part starts); map int32 [n / W, W] for kPeerHome, tokens float64 [>= n, C]
// (column 0: the row's token on its source) for kPeerReceivedToken. No host sync.
Tensor peer_addresses(int64_t kind, const Tensor& counts, int64_t rank, const Tensor& table, int64_t row_bytes,
                      int64_t n, const std::optional<Tensor>& map, const std::optional<Tensor>& tokens) {
  TORCH_CHECK_VALUE(kind >= fd::kPeerReceived && kind <= fd::kPeerSent, "kind must be a PeerRows value, got ", kind);
  TORCH_CHECK_VALUE(counts.dim() == 2 && counts.size(0) == counts.size(1), "counts must be [W, W], got ",
                    counts.sizes());
  TORCH_CHECK_TYPE(counts.scalar_type() == at::kLong && table.scalar_type() == at::kLong,
                   "counts and table must be int64");
  const int64_t world = counts.size(0);
  TORCH_CHECK_VALUE(world >= 1 && rank >= 0 && rank < world, "rank ", rank, " is not in a group of ", world);
  TORCH_CHECK_VALUE(table.numel() == world, "table must have ", world, " entries, got ", table.numel());
  TORCH_CHECK_VALUE(n >= 0 && row_bytes >= 0, "n and row_bytes must be >= 0");
  check_contiguous(counts, "counts");
  check_contiguous(table, "table");
  check_same_device(counts, table, "table");
  const int32_t* map_ptr = nullptr;
  const double* token_ptr = nullptr;
  int64_t token_stride = 0;
  if (kind == fd::kPeerHome) {
    TORCH_CHECK_VALUE(map.has_value() && map->scalar_type() == at::kInt && map->dim() == 2 && map->size(1) == world &&
                          map->numel() == n, "kPeerHome needs map int32 [n / W, W]");
    check_contiguous(*map, "map");
    check_same_device(counts, *map, "map");
    map_ptr = map->data_ptr<int32_t>();
  }
  if (kind == fd::kPeerReceivedToken) {
    TORCH_CHECK_VALUE(tokens.has_value() && tokens->scalar_type() == at::kDouble && tokens->dim() == 2 &&
                          tokens->size(0) >= n && tokens->stride(1) == 1, "kPeerReceivedToken needs tokens float64 "
                      "[>= n, C] with unit column stride");
    check_same_device(counts, *tokens, "tokens");
    token_ptr = tokens->data_ptr<double>();
    token_stride = tokens->stride(0);
  }
  auto out = torch::empty({n}, counts.options());
  const int32_t w = static_cast<int32_t>(world), r = static_cast<int32_t>(rank), k = static_cast<int32_t>(kind);
  FD_ON_DEVICE(counts, fd::cuda::peer_addresses(k, counts.data_ptr<int64_t>(), w, r, table.data_ptr<int64_t>(),
                                                row_bytes, n, map_ptr, token_ptr, token_stride,
                                                out.data_ptr<int64_t>(), stream), {
    fd::cpu::peer_addresses(k, counts.data_ptr<int64_t>(), w, r, table.data_ptr<int64_t>(), row_bytes, n, map_ptr,
                            token_ptr, token_stride, out.data_ptr<int64_t>());
  });
  return out;
}

// The route of a permutation that reads its rows through addrs [R], checked with `like` ([R, H]:
// the rows' stand-in, whose shape, dtype and device alone are read).
fd::Route pulled_route(const Tensor& route, int64_t num_experts, const Tensor& addrs, const Tensor& like) {
  const fd::Route r = route_of(route, num_experts);
  TORCH_CHECK_VALUE(like.dim() == 2 && like.size(0) == r.rows, "like must be [", r.rows, ", hidden], got ",
                    like.sizes());
  check_same_device(route, like, "like");
  check_addrs(addrs, like, r.rows, 1);
  return r;
}

// The permutation of rows read through addresses, as permute: plan, (sync when num_out < 0),
// map, then row r of `like` ([R, H], only its shape, dtype and device are read) read at addrs[r]
// once and written to its planned rows; pad and tail rows zeroed. Returns as permute.
Permuted permute_from(
    const Tensor& route, int64_t num_experts, int64_t pad_multiple, int64_t num_out, const Tensor& addrs,
    int64_t align, const Tensor& like, const std::optional<Tensor>& probs, int64_t max_blocks, int64_t first_row,
    int64_t error_address) {
  const fd::Route r = pulled_route(route, num_experts, addrs, like);
  return permute_with(r, route, pad_multiple, num_out, probs, like, like.size(1), error_address,
                      [&](const Tensor& map, int64_t n, const Tensor& layout, bool tail, const auto& probs_out,
                          int64_t& /*word: queued after*/) {
    auto out = torch::empty({n, like.size(1)}, like.options());
    copy_rows_from(addrs, align, out, map, max_blocks, first_row);
    zero_unused_rows(out, probs_out, layout, num_experts, pad_multiple > 1, tail);
    return out;
  });
}

// The dequantizing permutation of FP8 rows read through addresses, as permute_fp8: row r of
// `like` ([R, H] of the output dtype; only its shape, dtype and device are read) lies at
// addrs[r] as H e4m3 bytes followed by its H / 128 float32 scales (0: no row; every address
// aligned to `align` bytes, at least 8, or 4 for float32 output). Returns as permute.
Permuted permute_fp8_from(
    const Tensor& route, int64_t num_experts, int64_t pad_multiple, int64_t num_out, const Tensor& addrs,
    int64_t align, const Tensor& like, const std::optional<Tensor>& probs, int64_t max_blocks, int64_t first_row,
    int64_t error_address) {
  const fd::Route r = pulled_route(route, num_experts, addrs, like);
  check_first_row(first_row, r.rows);
  TORCH_CHECK_VALUE(like.size(1) % fd::kFp8Group == 0, "the hidden size must be a multiple of ", fd::kFp8Group);
  const fd::DType dtype = dtype_of(like, "like");
  TORCH_CHECK_TYPE(dtype != fd::kFloat64, "FP8 rows dequantize to float32, float16 or bfloat16, not float64");
  const int64_t unit = dtype == fd::kFloat32 ? 4 : 8;
  TORCH_CHECK_VALUE(checked_align(align) >= unit, "addresses must be aligned to ", unit, " bytes, got ", align);
  const int64_t hidden = like.size(1);
  return permute_with(r, route, pad_multiple, num_out, probs, like, hidden, error_address,
                      [&](const Tensor& map, int64_t n, const Tensor& layout, bool tail, const auto& probs_out,
                          int64_t& word) {
    return dequantized_into(dtype, nullptr, 0, nullptr, 0, addrs.data_ptr<int64_t>(), r.rows, hidden, map, n, layout,
                            num_experts, pad_multiple > 1, tail, probs_out, like.options(), max_blocks, first_row,
                            word);
  });
}

bool with_cuda() {
#ifdef FLEXDISPATCH_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "flexdispatch kernels (see flexdispatch/ops.py for the Python-facing wrappers)";
  m.def("indices_to_multihot", &indices_to_multihot);
  m.def("check_route", &check_route);
  m.def("route_topk", &route_topk);
  m.def("route_by_rank", &route_by_rank);
  m.def("received_routing", &received_routing);
  m.def("permute", &permute, py::arg("route"), py::arg("num_experts"), py::arg("pad_multiple"), py::arg("num_out"),
        py::arg("tokens"), py::arg("probs"), py::arg("error_address"), py::arg("copy_layout") = false);
  m.def("plan", &plan);
  m.def("scatter_rows", &scatter_rows);
  m.def("gather_rows", &gather_rows);
  m.def("gather_rows_backward", &gather_rows_backward);
  m.def("gather_slots", &gather_slots);
  m.def("quantize_fp8", &quantize_fp8);
  m.def("dequantize_fp8", &dequantize_fp8);
  m.def("permute_fp8", &permute_fp8);
  m.def("make_header", &make_header);
  m.def("mask_unless_agreed", &mask_unless_agreed);
  m.def("exchange_headers", &exchange_headers);
  m.def("queue_word_copy", &queue_word_copy);
  m.def("mapped_address", &mapped_address);
  m.def("copy_rows_from", &copy_rows_from);
  m.def("sum_rows_from", &sum_rows_from);
  m.def("permute_from", &permute_from);
  m.def("permute_fp8_from", &permute_fp8_from);
  m.def("peer_addresses", &peer_addresses);
  m.def("peer_barrier", &peer_barrier);
  m.def("pack_parts", &pack_parts);
  m.def("with_cuda", &with_cuda);
}
