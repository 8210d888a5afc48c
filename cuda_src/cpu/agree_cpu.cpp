// CPU twins of ../agree.cu: a rank's header, and indices emptied unless every header agrees.
#include "ops_cpu.h"

namespace flexdispatch {
namespace cpu {

void make_header(Header values, const int32_t* status, int64_t* header) {
  for (int f = 0; f < kHeaderWidth; ++f) header[f] = values.field[f];
  if (status != nullptr) header[kHeaderError] |= static_cast<int64_t>(status[0]);
}

void mask_unless_agreed(const int64_t* headers, int32_t ranks, const int64_t* indices, int64_t n, void* out,
                        bool out_is_64bit) {
  bool empty = false;
  for (int64_t i = 0; i < int64_t(ranks) * kHeaderWidth; ++i) empty = empty || header_breaks_agreement(headers, i);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = empty ? -1 : indices[i];
    if (out_is_64bit) {
      static_cast<int64_t*>(out)[i] = v;
    } else {
      static_cast<int32_t*>(out)[i] = static_cast<int32_t>(v);
    }
  }
}

}  // namespace cpu
}  // namespace flexdispatch
