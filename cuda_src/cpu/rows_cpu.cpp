// CPU twin of ../rows.cu: scatter, deterministic gather (slot order, float32 accumulation
// or float64 for float64 operands), the gather's backward, and zeroing of unfilled rows.
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "half.h"
#include "ops_cpu.h"

namespace flexdispatch {
namespace cpu {
namespace {

template <typename T, typename P>
void gather_typed(const T* src, int64_t hidden, const int32_t* row_id_map, int32_t slots,
                  const P* probs, T* dst, int64_t rows) {
  using Acc = typename std::conditional<sizeof(T) == 8 || sizeof(P) == 8, double, float>::type;
#pragma omp parallel if (worth_threads(rows * slots * hidden, kPsRowValue))
  {
    std::vector<Acc> acc(hidden);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      std::fill(acc.begin(), acc.end(), Acc(0));
      for (int32_t s = 0; s < slots; ++s) {
        const int32_t d = row_id_map[r * slots + s];
        if (d < 0) continue;
        const Acc w = probs ? Acc(probs[r * slots + s]) : Acc(1);
        const T* x = src + int64_t(d) * hidden;
        for (int64_t h = 0; h < hidden; ++h) acc[h] += w * Acc(to_float(x[h]));
      }
      T* out = dst + r * hidden;
      for (int64_t h = 0; h < hidden; ++h) out[h] = from_float<T>(acc[h]);
    }
  }
}

template <typename T, typename P>
void gather_backward_typed(const T* grad_out, const T* src, int64_t hidden, const int32_t* row_id_map,
                           int32_t slots, const P* probs, int64_t rows, T* grad_src, P* grad_probs) {
  using Acc = typename std::conditional<sizeof(T) == 8 || sizeof(P) == 8, double, float>::type;
#pragma omp parallel for schedule(static) if (worth_threads(rows * slots * hidden, kPsRowValue))
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = grad_out + r * hidden;
    for (int32_t s = 0; s < slots; ++s) {
      const int32_t d = row_id_map[r * slots + s];
      if (d < 0) continue;
      const Acc w = Acc(probs[r * slots + s]);
      const T* x = src + int64_t(d) * hidden;
      T* gx = grad_src + int64_t(d) * hidden;
      Acc dot = 0;
      for (int64_t h = 0; h < hidden; ++h) {
        const Acc gh = Acc(to_float(g[h]));
        gx[h] = from_float<T>(w * gh);
        dot += gh * Acc(to_float(x[h]));
      }
      grad_probs[r * slots + s] = static_cast<P>(dot);
    }
  }
}

void zero_rows(char* dst, int64_t first, int64_t last, int64_t row_bytes, char* probs_out, int prob_bytes) {
  if (last <= first) return;
  std::memset(dst + first * row_bytes, 0, (last - first) * row_bytes);
  if (probs_out != nullptr) std::memset(probs_out + first * prob_bytes, 0, (last - first) * prob_bytes);
}

}  // namespace

void scatter_rows(const void* src, int64_t rows, int64_t row_bytes, const int32_t* row_id_map,
                  int32_t slots, void* dst) {
  const char* in = static_cast<const char*>(src);
  char* out = static_cast<char*>(dst);
#pragma omp parallel for schedule(static) if (worth_threads(rows * slots * row_bytes, kPsByte))
  for (int64_t r = 0; r < rows; ++r) {
    for (int32_t s = 0; s < slots; ++s) {
      const int32_t d = row_id_map[r * slots + s];
      if (d >= 0) std::memcpy(out + int64_t(d) * row_bytes, in + r * row_bytes, row_bytes);
    }
  }
}

void zero_unused_rows(const int64_t* layout, int32_t num_experts, bool padded, bool tail, void* dst,
                      int64_t num_out, int64_t row_bytes, void* probs_out, int prob_bytes) {
  char* out = static_cast<char*>(dst);
  char* p = static_cast<char*>(probs_out);
  const int64_t* counts = layout + layout_counts(num_experts);
  const int64_t* pad = layout + layout_padded(num_experts);
  const int64_t* offsets = layout + layout_offsets(num_experts);
  if (padded) {
#pragma omp parallel for schedule(static) if (worth_threads(num_out * row_bytes, kPsByte))
    for (int32_t e = 0; e < num_experts; ++e) {
      // (pad rows at or past num_out: an output too small, flagged by the map, not written)
      zero_rows(out, offsets[e] + counts[e], std::min(num_out, offsets[e] + pad[e]), row_bytes, p, prob_bytes);
    }
  }
  if (tail) zero_rows(out, offsets[num_experts], num_out, row_bytes, p, prob_bytes);
}

void gather_rows(DType dtype, const void* src, int64_t hidden, const int32_t* row_id_map,
                 int32_t slots, const void* probs, int32_t prob_dtype, void* dst, int64_t rows) {
  with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    if (probs != nullptr && prob_dtype == kFloat64) {
      gather_typed<T, double>(static_cast<const T*>(src), hidden, row_id_map, slots,
                              static_cast<const double*>(probs), static_cast<T*>(dst), rows);
    } else {
      gather_typed<T, float>(static_cast<const T*>(src), hidden, row_id_map, slots,
                             static_cast<const float*>(probs), static_cast<T*>(dst), rows);
    }
  });
}

namespace {
template <typename V>
void gather_slots_typed(const V* values, const int32_t* row_id_map, int64_t n, V* out) {
#pragma omp parallel for schedule(static) if (worth_threads(n, kPsRowValue))
  for (int64_t i = 0; i < n; ++i) out[i] = row_id_map[i] >= 0 ? values[row_id_map[i]] : V(0);
}
}  // namespace

void gather_slots(const void* values, int value_bytes, const int32_t* row_id_map, int64_t n, void* out) {
  if (value_bytes == 8) {
    gather_slots_typed(static_cast<const uint64_t*>(values), row_id_map, n, static_cast<uint64_t*>(out));
  } else {
    gather_slots_typed(static_cast<const uint32_t*>(values), row_id_map, n, static_cast<uint32_t*>(out));
  }
}

void gather_rows_backward(DType dtype, const void* grad_out, const void* src, int64_t hidden,
                          const int32_t* row_id_map, int32_t slots, const void* probs,
                          DType prob_dtype, int64_t rows, void* grad_src, void* grad_probs) {
  with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    if (prob_dtype == kFloat64) {
      gather_backward_typed<T, double>(static_cast<const T*>(grad_out), static_cast<const T*>(src),
                                       hidden, row_id_map, slots, static_cast<const double*>(probs),
                                       rows, static_cast<T*>(grad_src), static_cast<double*>(grad_probs));
    } else {
      gather_backward_typed<T, float>(static_cast<const T*>(grad_out), static_cast<const T*>(src),
                                      hidden, row_id_map, slots, static_cast<const float*>(probs),
                                      rows, static_cast<T*>(grad_src), static_cast<float*>(grad_probs));
    }
  });
}

}  // namespace cpu
}  // namespace flexdispatch
