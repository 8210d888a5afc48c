// FP8 quantization of rows, its inverse, and the dequantizing permutation on the CPU: the same
// arithmetic as fp8.cu, so both give the bits of flexdispatch/reference.py's quantize_fp8 / dequantize_fp8.
#include <cmath>

#include "half.h"
#include "ops_cpu.h"

namespace flexdispatch {
namespace cpu {
namespace {

template <typename T>
void quantize_groups(const T* x, int64_t groups, uint8_t* q, float* scales) {
#pragma omp parallel for schedule(static) if (worth_threads(groups * kFp8Group, kPsFp8Value))
  for (int64_t g = 0; g < groups; ++g) {
    const T* in = x + g * kFp8Group;
    float amax = 0.0f;
    for (int i = 0; i < kFp8Group; ++i) {
      const float a = std::fabs(to_float(in[i]));
      if (a > amax || a != a) amax = a;  // NaN wins, as torch's amax
    }
    if (amax < kFp8MinAmax) amax = kFp8MinAmax;  // (NaN stays NaN)
    const float scale = amax / kFp8Max;
    scales[g] = scale;
    for (int i = 0; i < kFp8Group; ++i) q[g * kFp8Group + i] = fp8_e4m3_from_float(to_float(in[i]) / scale);
  }
}

template <typename T>
void dequantize_groups(const uint8_t* q, const float* scales, int64_t groups, T* out) {
#pragma omp parallel for schedule(static) if (worth_threads(groups * kFp8Group, kPsFp8Value))
  for (int64_t g = 0; g < groups; ++g) {
    const float scale = scales[g];
    for (int i = 0; i < kFp8Group; ++i) {
      out[g * kFp8Group + i] = from_float<T>(fp8_e4m3_to_float(q[g * kFp8Group + i]) * scale);
    }
  }
}

template <typename T>
void scatter_fp8(const uint8_t* q, int64_t q_pitch, const float* scales, int64_t scale_pitch, const int64_t* addrs,
                 int64_t rows, int64_t hidden, const int32_t* row_id_map, int32_t slots, T* dst) {
#pragma omp parallel for schedule(static) if (worth_threads(rows * slots * hidden, kPsFp8Value))
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* in = q + r * q_pitch;
    const float* row_scales = scales + r * scale_pitch;
    if (addrs != nullptr) {  // the row at addrs[r]: its bytes, then its scales (0: no row)
      if (addrs[r] == 0) continue;
      in = reinterpret_cast<const uint8_t*>(addrs[r]);
      row_scales = reinterpret_cast<const float*>(in + hidden);
    }
    for (int32_t s = 0; s < slots; ++s) {
      const int32_t d = row_id_map[r * slots + s];
      if (d < 0) continue;
      T* out = dst + static_cast<int64_t>(d) * hidden;
      for (int64_t i = 0; i < hidden; ++i) out[i] = from_float<T>(fp8_e4m3_to_float(in[i]) * row_scales[i / kFp8Group]);
    }
  }
}

}  // namespace

void scatter_fp8_rows(DType dtype, const uint8_t* q, int64_t q_pitch, const float* scales, int64_t scale_pitch,
                      const int64_t* addrs, int64_t rows, int64_t hidden, const int32_t* row_id_map, int32_t slots,
                      void* dst) {
  switch (dtype) {
    case kFloat32:
      return scatter_fp8(q, q_pitch, scales, scale_pitch, addrs, rows, hidden, row_id_map, slots,
                         static_cast<float*>(dst));
    case kFloat16:
      return scatter_fp8(q, q_pitch, scales, scale_pitch, addrs, rows, hidden, row_id_map, slots,
                         static_cast<Float16*>(dst));
    case kBFloat16:
      return scatter_fp8(q, q_pitch, scales, scale_pitch, addrs, rows, hidden, row_id_map, slots,
                         static_cast<BFloat16*>(dst));
    default: return;
  }
}

void quantize_fp8(DType dtype, const void* x, int64_t groups, uint8_t* q, float* scales) {
  switch (dtype) {
    case kFloat32: return quantize_groups(static_cast<const float*>(x), groups, q, scales);
    case kFloat16: return quantize_groups(static_cast<const Float16*>(x), groups, q, scales);
    case kBFloat16: return quantize_groups(static_cast<const BFloat16*>(x), groups, q, scales);
    default: return;  // the bindings admit only the three above
  }
}

void dequantize_fp8(DType dtype, const uint8_t* q, const float* scales, int64_t groups, void* out) {
  switch (dtype) {
    case kFloat32: return dequantize_groups(q, scales, groups, static_cast<float*>(out));
    case kFloat16: return dequantize_groups(q, scales, groups, static_cast<Float16*>(out));
    case kBFloat16: return dequantize_groups(q, scales, groups, static_cast<BFloat16*>(out));
    default: return;
  }
}

}  // namespace cpu
}  // namespace flexdispatch
