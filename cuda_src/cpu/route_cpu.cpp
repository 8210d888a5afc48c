// CPU twin of ../route.cu and ../multihot.cu: the same chunked counts and prefix sums; inside
// a chunk, rows are visited in order, so a running counter per expert gives the stable rank.
#include <algorithm>
#include <cmath>
#include <vector>

#include "half.h"
#include "ops_cpu.h"

namespace flexdispatch {
namespace cpu {
namespace {

int64_t raw_expert(const Route& route, int64_t row, int32_t slot) {
  const int64_t i = row * route.slots + slot;
  switch (route.kind) {
    case kRouteIndex32: return static_cast<const int32_t*>(route.data)[i];
    case kRouteIndex64: return static_cast<const int64_t*>(route.data)[i];
    default: return static_cast<const uint8_t*>(route.data)[i] ? slot : -1;
  }
}

// -1 for an unused, out-of-range or repeated slot (with the reason in *bad), as on the GPU.
int64_t checked_expert(const Route& route, int64_t row, int32_t slot, int64_t* bad) {
  const int64_t e = raw_expert(route, row, slot);
  if (e == -1) return -1;
  if (e < -1 || e >= route.num_experts) {
    *bad |= kIndexOutOfRange;
    return -1;
  }
  if (route.kind != kRouteMultihot) {
    for (int32_t j = 0; j < slot; ++j) {
      if (raw_expert(route, row, j) == e) {
        *bad |= kDuplicateIndex;
        return -1;
      }
    }
  }
  return e;
}

}  // namespace

void route_by_rank(const void* indices, bool indices_are_64bit, int64_t rows, int32_t slots, int32_t world,
                   int32_t local, uint8_t* in_rank, int64_t* counts) {
  const int64_t experts = int64_t(world) * local;
  std::fill(counts, counts + world * (int64_t(local) + 1), int64_t(0));
  std::fill(in_rank, in_rank + rows * world, uint8_t(0));
  for (int64_t i = 0; i < rows * slots; ++i) {
    const int64_t e = indices_are_64bit ? static_cast<const int64_t*>(indices)[i]
                                        : static_cast<const int32_t*>(indices)[i];
    if (e < 0 || e >= experts) continue;
    const int64_t w = e / local;
    uint8_t& seen = in_rank[(i / slots) * world + w];
    if (!seen) ++counts[w * (local + 1)];  // (the token's first expert on rank w)
    seen = 1;
    ++counts[w * (local + 1) + 1 + e % local];
  }
}

void received_routing(const double* meta, int64_t rows, int64_t stride, int32_t id_col, int32_t slots, int64_t first,
                      int64_t local, const bool* has_source, int64_t* indices, void* probs, bool probs_are_64bit) {
  for (int64_t i = 0; i < rows * slots; ++i) {
    const int64_t r = i / slots, s = i % slots;
    const double* row = meta + r * stride + id_col;
    const int64_t expert = static_cast<int64_t>(row[s]);
    const int64_t mine = expert - first;
    const bool kept = expert >= 0 && mine >= 0 && mine < local && (has_source == nullptr || has_source[r]);
    indices[i] = kept ? mine : -1;
    if (probs_are_64bit) {
      static_cast<double*>(probs)[i] = kept ? row[slots + s] : 0.0;
    } else {
      static_cast<float*>(probs)[i] = kept ? static_cast<float>(row[slots + s]) : 0.0f;
    }
  }
}

int64_t indices_to_multihot(const void* indices, bool indices_are_64bit, const void* probs,
                            int prob_bytes, int64_t rows, int32_t slots, int32_t num_experts,
                            uint8_t* map, void* probs_out) {
  const Route route{indices, indices_are_64bit ? kRouteIndex64 : kRouteIndex32, rows, slots,
                    num_experts};
  const char* p = static_cast<const char*>(probs);
  char* out = static_cast<char*>(probs_out);
  int64_t bad = 0;
#pragma omp parallel for schedule(static) reduction(| : bad) if (worth_threads(rows * num_experts * (1 + prob_bytes), kPsByte))
  for (int64_t r = 0; r < rows; ++r) {
    std::fill(map + r * num_experts, map + (r + 1) * num_experts, uint8_t(0));
    std::fill(out + r * num_experts * prob_bytes, out + (r + 1) * num_experts * prob_bytes, char(0));
    for (int32_t s = 0; s < slots; ++s) {
      const int64_t e = checked_expert(route, r, s, &bad);
      if (e < 0) continue;
      map[r * num_experts + e] = 1;
      std::copy_n(p + (r * slots + s) * prob_bytes, prob_bytes, out + (r * num_experts + e) * prob_bytes);
    }
  }
  return bad;
}

int32_t check_route(const void* indices, bool indices_are_64bit, const void* probs, int32_t prob_kind,
                    int64_t rows, int32_t slots, int32_t num_experts, int64_t* clean) {
  const Route route{indices, indices_are_64bit ? kRouteIndex64 : kRouteIndex32, rows, slots, num_experts};
  int64_t bad = 0;
#pragma omp parallel for schedule(static) reduction(| : bad) if (worth_threads(rows * slots, kPsRouteSlot))
  for (int64_t r = 0; r < rows; ++r) {
    for (int32_t s = 0; s < slots; ++s) {
      const int64_t i = r * slots + s;
      int64_t e = raw_expert(route, r, s);
      checked_expert(route, r, s, &bad);  // records range and duplicate errors
      if (e < -1 || e >= num_experts) e = -1;
      if (e >= 0 && prob_kind != 0) {
        const bool finite = prob_kind == 1 ? std::isfinite(static_cast<const float*>(probs)[i])
                                           : std::isfinite(static_cast<const double*>(probs)[i]);
        if (!finite) {
          bad |= kNonFiniteProb;
          e = -1;
        }
      }
      clean[i] = e;
    }
  }
  return static_cast<int32_t>(bad);
}

namespace {

// route_topk's rows for k <= KMax: every insertion walks KMax entries, so the smallest size
// that holds k is taken, as the CUDA kernel does.
template <int KMax, typename T>
int64_t select_rows(const T* probs, int64_t rows, int32_t experts, int32_t k, T* values, int64_t* indices,
                    int64_t* clean) {
  using Acc = decltype(to_float(T{}));
  int64_t bad = 0;
#pragma omp parallel for schedule(static) reduction(| : bad) if (worth_threads(rows * experts, kPsTopkValue))
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = probs + r * experts;
    Acc best[KMax];
    int32_t at[KMax];
    start_top<KMax>(k, best, at);
    for (int32_t e = 0; e < experts; ++e) keep_top<KMax>(to_float(row[e]), e, best, at);
    for (int32_t i = 0; i < k; ++i) {  // (the k best sit at the end of the arrays)
      const int32_t slot = KMax - k + i;
      bad |= write_choice(row, best[slot], at[slot], r * k + i, values, indices, clean);
    }
  }
  return bad;
}

}  // namespace

int32_t route_topk(const void* probs, DType dtype, int64_t rows, int32_t experts, int32_t k, void* values,
                   int64_t* indices, int64_t* clean) {
  int64_t bad = 0;
  with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    const T* p = static_cast<const T*>(probs);
    T* v = static_cast<T*>(values);
    if (k <= 8) {
      bad = select_rows<8>(p, rows, experts, k, v, indices, clean);
    } else if (k <= 16) {
      bad = select_rows<16>(p, rows, experts, k, v, indices, clean);
    } else {
      bad = select_rows<kRouteTopkMax>(p, rows, experts, k, v, indices, clean);
    }
  });
  return static_cast<int32_t>(bad);
}

void route_plan(const Route& route, int64_t pad_multiple, int32_t* chunk_offsets, int64_t* layout) {
  const int32_t experts = route.num_experts;
  const int64_t chunk_rows = chunk_rows_for(experts);
  const int64_t chunks = num_chunks_for(route.rows, experts);
  const int64_t stride = experts + 1;  // column E is scratch, as on the GPU
  int64_t bad = 0;
#pragma omp parallel for schedule(static) reduction(| : bad) if (worth_threads(route.rows * route.slots, kPsRouteSlot))
  for (int64_t c = 0; c < chunks; ++c) {
    int32_t* counts = chunk_offsets + c * stride;
    std::fill(counts, counts + experts, 0);
    const int64_t end = std::min(route.rows, (c + 1) * chunk_rows);
    for (int64_t r = c * chunk_rows; r < end; ++r) {
      for (int32_t s = 0; s < route.slots; ++s) {
        const int64_t e = checked_expert(route, r, s, &bad);
        if (e >= 0) ++counts[e];
      }
    }
  }
  int64_t* counts = layout + layout_counts(experts);
  int64_t* padded = layout + layout_padded(experts);
  int64_t* offsets = layout + layout_offsets(experts);
#pragma omp parallel for schedule(static) if (worth_threads(experts * chunks, kPsRowValue))
  for (int32_t e = 0; e < experts; ++e) {
    int64_t running = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      const int32_t n = chunk_offsets[c * stride + e];
      chunk_offsets[c * stride + e] = static_cast<int32_t>(running);
      running += n;
    }
    counts[e] = running;
    padded[e] = round_up(running, pad_multiple);
  }
  int64_t total = 0;
  for (int32_t e = 0; e < experts; ++e) {
    offsets[e] = total;
    total += padded[e];
  }
  offsets[experts] = total;
  layout[layout_error(experts)] = bad;
}

void route_map(const Route& route, const int32_t* chunk_offsets, int64_t* layout, const void* probs,
               int prob_bytes, int64_t num_out, int32_t* row_id_map, void* probs_out) {
  const int32_t experts = route.num_experts;
  const int64_t chunk_rows = chunk_rows_for(experts);
  const int64_t chunks = num_chunks_for(route.rows, experts);
  const int64_t* offsets = layout + layout_offsets(experts);
  const char* p = static_cast<const char*>(probs);
  char* out = static_cast<char*>(probs_out);
  // The padded rows must fit too: real rows that fit while the padding does not are an overflow.
  int64_t bad = offsets[experts] > num_out ? kOutputOverflow : 0;
#pragma omp parallel reduction(| : bad) if (worth_threads(route.rows * route.slots, kPsRouteSlot))
  {
    std::vector<int64_t> next(experts);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      for (int32_t e = 0; e < experts; ++e) next[e] = offsets[e] + chunk_offsets[c * (experts + 1) + e];
      const int64_t end = std::min(route.rows, (c + 1) * chunk_rows);
      for (int64_t r = c * chunk_rows; r < end; ++r) {
        for (int32_t s = 0; s < route.slots; ++s) {
          int64_t unused = 0;
          const int64_t e = checked_expert(route, r, s, &unused);
          int64_t dest = e >= 0 ? next[e]++ : -1;
          if (dest >= num_out) {
            bad |= kOutputOverflow;
            dest = -1;
          } else if (dest >= 0 && p != nullptr) {
            std::copy_n(p + (r * route.slots + s) * prob_bytes, prob_bytes, out + dest * prob_bytes);
          }
          row_id_map[r * route.slots + s] = static_cast<int32_t>(dest);
        }
      }
    }
  }
  layout[layout_error(experts)] |= bad;
}

}  // namespace cpu
}  // namespace flexdispatch
