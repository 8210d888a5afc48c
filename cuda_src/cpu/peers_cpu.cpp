// CPU twin of ../peers.cu: rows read through addresses (the emulated transport's gathered
// tensors), copied to mapped rows or summed in slot order (float32, float64 for float64).
#include <cstring>
#include <type_traits>
#include <vector>

#include "half.h"
#include "ops_cpu.h"

namespace flexdispatch {
namespace cpu {
namespace {

template <typename T>
void sum_typed(const int64_t* addrs, int64_t rows, int32_t slots, int64_t hidden, T* dst) {
  using Acc = typename std::conditional<sizeof(T) == 8, double, float>::type;
#pragma omp parallel if (worth_threads(rows * slots * hidden, kPsRowValue))
  {
    std::vector<Acc> acc(hidden);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      std::fill(acc.begin(), acc.end(), Acc(0));
      for (int32_t s = 0; s < slots; ++s) {
        const int64_t addr = addrs[r * slots + s];
        if (addr == 0) continue;
        const T* x = reinterpret_cast<const T*>(addr);
        for (int64_t h = 0; h < hidden; ++h) acc[h] += Acc(to_float(x[h]));
      }
      T* out = dst + r * hidden;
      for (int64_t h = 0; h < hidden; ++h) out[h] = from_float<T>(acc[h]);
    }
  }
}

}  // namespace

void copy_rows_from(const int64_t* addrs, int64_t rows, int64_t row_bytes, const int32_t* map, int32_t slots,
                    void* dst) {
  char* out = static_cast<char*>(dst);
#pragma omp parallel for schedule(static) if (worth_threads(rows * slots * row_bytes, kPsByte))
  for (int64_t r = 0; r < rows; ++r) {
    const char* in = reinterpret_cast<const char*>(addrs[r]);
    if (in == nullptr) {  // no source row: a zero row (identity), nothing (map)
      if (map == nullptr) std::memset(out + r * row_bytes, 0, row_bytes);
      continue;
    }
    if (map == nullptr) {
      std::memcpy(out + r * row_bytes, in, row_bytes);
      continue;
    }
    for (int32_t s = 0; s < slots; ++s) {
      const int32_t d = map[r * slots + s];
      if (d >= 0) std::memcpy(out + int64_t(d) * row_bytes, in, row_bytes);
    }
  }
}

void sum_rows_from(DType dtype, const int64_t* addrs, int64_t rows, int32_t slots, int64_t hidden, void* dst) {
  switch (dtype) {
    case kFloat32: sum_typed(addrs, rows, slots, hidden, static_cast<float*>(dst)); break;
    case kFloat16: sum_typed(addrs, rows, slots, hidden, static_cast<Float16*>(dst)); break;
    case kBFloat16: sum_typed(addrs, rows, slots, hidden, static_cast<BFloat16*>(dst)); break;
    case kFloat64: sum_typed(addrs, rows, slots, hidden, static_cast<double*>(dst)); break;
  }
}

void peer_addresses(int32_t kind, const int64_t* counts, int32_t world, int32_t rank, const int64_t* table,
                    int64_t row_bytes, int64_t n, const int32_t* map, const double* tokens, int64_t token_stride,
                    int64_t* out) {
  std::vector<int64_t> words(peer_block_words(world));
  peer_blocks(counts, world, rank, words.data());
  for (int64_t i = 0; i < n; ++i) {
    out[i] = peer_address(kind, i, world, words.data(), table, row_bytes, map, tokens, token_stride);
  }
}

}  // namespace cpu
}  // namespace flexdispatch
