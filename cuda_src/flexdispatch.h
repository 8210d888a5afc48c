// Declarations shared by the CUDA kernels, their CPU twins and the torch bindings.
// Nothing here includes torch or CUDA headers: every .cu file compiles on its own with nvcc,
// and every cpu/*.cpp file with a plain C++ compiler.
//
// Vocabulary (see DESIGN.md):
//   R  rows in (tokens), S routing slots per row (top-k K, or E for a multihot map),
//   E  experts, N rows out (sum of per-expert counts, padded), H hidden elements per row.
//
// A "route" is R rows of S slots naming experts: int32/int64 indices in [-1, E) (-1 = unused
// slot), or a bool multihot map [R, E] (slot s names expert s when set).
//
// The permutation plan lives in one int64 "layout" array of 3E + 2 entries:
//   [0, E)        counts[e]   rows routed to expert e
//   [E, 2E)       padded[e]   counts rounded up to the pad multiple (tokens_per_expert)
//   [2E, 3E+1)    offsets[e]  first output row of expert e; offsets[E] = rows used in total
//   [3E+1]        error bits  (ErrorBits below), OR-ed by the kernels
// so one small device-to-host copy returns both the size of the output and any error.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// Helpers below run on the host and, when nvcc compiles them, on the device.
#if defined(__CUDACC__)
#define FD_HOST_DEVICE __host__ __device__
#else
#define FD_HOST_DEVICE
#endif

namespace flexdispatch {

// Error bits (flexdispatch/rowmap.py reads these lines: the Python names are generated from them).
enum ErrorBits : int64_t {
  kIndexOutOfRange = 1,   // an index < -1 or >= E
  kDuplicateIndex = 2,    // the same expert twice in one row
  kOutputOverflow = 4,    // more rows than the num_out_tokens the caller allowed
  kNonFiniteProb = 8,     // a NaN or infinite probability of a selected expert (route check)
};

// The header every rank of a group sends in the first exchange of a call, kHeaderWidth int64
// fields in this order (flexdispatch/managers/agreement.py reads these lines). Ranks agree
// when no header has error bits and every field from kHeaderPhase on equals rank 0's.
enum HeaderField : int32_t {
  kHeaderRows = 0,    // rows this rank sends to the reader (all-to-all)
  kHeaderPhase = 1,   // dispatch or combine
  kHeaderStep = 2,    // calls of this layer finished before this one
  kHeaderError = 3,   // routing error bits and the failed-argument bit
  kHeaderArg = 4,     // which argument failed
  kHeaderHidden = 5,  // the call's signature: hidden size, dtype, top-k
  kHeaderDtype = 6,
  kHeaderTopk = 7,
  kHeaderLayer = 8,   // which layer of the group the call is for (its dispatcher's creation order)
  kHeaderConfig = 9,  // a hash of the layer's settings (backend, experts, FP8, sync-free, bound, ...)
  kHeaderWidth = 10,
};

struct Header {
  int64_t field[kHeaderWidth];
};

// A rank's slot for one sender's header in symmetric memory: a sequence word, then the fields.
constexpr int kHeaderSlotWords = kHeaderWidth + 1;
// The largest group whose headers one block holds (exchange_headers).
constexpr int kMaxHeaderRanks = 64;

// Whether element i of headers [ranks, kHeaderWidth] breaks the agreement: error bits, or a
// field from kHeaderPhase on that differs from rank 0's.
FD_HOST_DEVICE inline bool header_breaks_agreement(const int64_t* headers, int64_t i) {
  const int64_t field = i % kHeaderWidth;
  if (field == kHeaderError) return headers[i] != 0;
  return field >= kHeaderPhase && headers[i] != headers[field];
}

enum RouteKind : int32_t {
  kRouteIndex32 = 0,
  kRouteIndex64 = 1,
  kRouteMultihot = 2,  // uint8/bool map, S == E
};

// Element types of token rows and probabilities.
enum DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

struct Route {
  const void* data;  // [rows, slots], row-major, contiguous
  int32_t kind;      // RouteKind
  int64_t rows;
  int32_t slots;
  int32_t num_experts;
};

FD_HOST_DEVICE inline int64_t layout_size(int32_t num_experts) { return 3 * int64_t(num_experts) + 2; }
FD_HOST_DEVICE inline int64_t layout_counts(int32_t) { return 0; }
FD_HOST_DEVICE inline int64_t layout_padded(int32_t e) { return e; }
FD_HOST_DEVICE inline int64_t layout_offsets(int32_t e) { return 2 * int64_t(e); }
FD_HOST_DEVICE inline int64_t layout_error(int32_t e) { return 3 * int64_t(e) + 1; }

// The most experts one permutation serves (flexdispatch/rowmap.py reads this line).
constexpr int32_t kMaxExperts = 12288;

// The router top-k that route_topk selects with its check in one pass: k up to kRouteTopkMax of
// up to kRouteTopkMaxExperts experts (flexdispatch/ops.py reads these lines; larger routings
// are selected by a stable sort and checked by check_route).
constexpr int32_t kRouteTopkMax = 32;
constexpr int32_t kRouteTopkMaxExperts = 1024;

// "v at expert e ranks above w at expert f" in route_topk: the larger value, NaN above every
// number (as torch.topk), and between equal values (or two NaNs) the lower expert, so that the
// selection and its order are the same on every run and device. (x != x: NaN, on either side.)
template <typename Acc>
FD_HOST_DEVICE inline bool ranks_above(Acc v, int32_t e, Acc w, int32_t f) {
  const bool v_nan = v != v, w_nan = w != w;
  if (v_nan != w_nan) return v_nan;
  if (!v_nan && v != w) return v > w;
  return e < f;
}

#ifdef __CUDA_ARCH__
#define FD_UNROLL _Pragma("unroll")
#else
#define FD_UNROLL
#endif

// A row's k best entries so far (k <= KMax), in order, in best[KMax - k, KMax) with their
// experts in at[]: the KMax - k slots above them hold entries that rank above any (NaN at
// expert -1), so that the k-th best is always best[KMax - 1] and every index is a constant
// (the arrays stay in registers). start_top fills them; keep_top takes one more entry (v, e),
// inserted from the bottom, each entry ranking below it moving down one.
template <int KMax, typename Acc>
FD_HOST_DEVICE inline void start_top(int32_t k, Acc* best, int32_t* at) {
  FD_UNROLL
  for (int i = 0; i < KMax; ++i) {
    const bool held = i < KMax - k;
    best[i] = held ? Acc(NAN) : Acc(-INFINITY);
    at[i] = held ? -1 : INT32_MAX;  // (-inf at INT32_MAX: below any entry, -inf ones by their lower expert)
  }
}

template <int KMax, typename Acc>
FD_HOST_DEVICE inline void keep_top(Acc v, int32_t e, Acc* best, int32_t* at) {
  if (!ranks_above(v, e, best[KMax - 1], at[KMax - 1])) return;
  bool placed = false;
  FD_UNROLL
  for (int i = KMax - 1; i >= 0; --i) {
    if (placed) continue;
    if (i > 0 && ranks_above(v, e, best[i - 1], at[i - 1])) {
      best[i] = best[i - 1];
      at[i] = at[i - 1];
    } else {
      best[i] = v;
      at[i] = e;
      placed = true;
    }
  }
}

// Writes choice `out` of a row's top-k: the value (read again from the row, so its bits are the
// input's), its expert, and the same or -1 where the value is not finite (clean). Returns the
// error bit it found (kNonFiniteProb or 0).
template <typename T, typename Acc>
FD_HOST_DEVICE inline int32_t write_choice(const T* row, Acc value, int32_t expert, int64_t out, T* values,
                                           int64_t* indices, int64_t* clean) {
#ifdef __CUDA_ARCH__
  const bool finite = isfinite(value);
#else
  const bool finite = std::isfinite(value);
#endif
  values[out] = row[expert];
  indices[out] = expert;
  clean[out] = finite ? expert : -1;
  return finite ? 0 : kNonFiniteProb;
}

// Rows per chunk of the counting passes: a chunk keeps one bit per (expert, row) in shared
// memory (E * rows / 8 bytes), so many experts get smaller chunks. Returns 0 when E is too
// large for the kernels (the bindings turn that into a ValueError).
constexpr int32_t kChunkRowsMost = 256;  // (the multihot passes size their blocks by it)
inline int32_t chunk_rows_for(int32_t num_experts) {
  if (num_experts <= 1536) return kChunkRowsMost;  // <= 48 KiB of masks
  if (num_experts <= kMaxExperts) return 32;       // <= 48 KiB of masks
  return 0;
}

inline int64_t num_chunks_for(int64_t rows, int32_t num_experts) {
  const int32_t c = chunk_rows_for(num_experts);
  return c == 0 ? 0 : (rows + c - 1) / c;
}

FD_HOST_DEVICE inline int64_t round_up(int64_t x, int64_t m) { return m > 1 ? (x + m - 1) / m * m : x; }

// ---- FP8 dispatch: float8 e4m3fn values, one float32 scale per kFp8Group values of a row ----
// (DeepEP's and DeepSeek-V3's format.) A group's scale is max(amax, kFp8MinAmax) / kFp8Max, so
// its largest value lands on 448 and an all-zero group stays zero.
constexpr int32_t kFp8Group = 128;
constexpr float kFp8Max = 448.0f;      // the largest finite e4m3fn value
constexpr float kFp8MinAmax = 1e-4f;   // the smallest amax a scale is made from

FD_HOST_DEVICE inline uint32_t float_bits(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  return u;
}

FD_HOST_DEVICE inline float bits_float(uint32_t u) {
  float x;
  memcpy(&x, &u, 4);
  return x;
}

// float -> e4m3fn bits: round to nearest even (as torch's conversion), saturating at +-448
// (torch gives NaN from 464 up; quantized values never get there); NaN -> 0x7f with its sign.
FD_HOST_DEVICE inline uint8_t fp8_e4m3_from_float(float x) {
  const uint32_t u = float_bits(x);
  const uint32_t sign = (u >> 24) & 0x80u;
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint8_t>(sign | 0x7fu);  // NaN
  if (a >= 0x43e80000u) return static_cast<uint8_t>(sign | 0x7eu);  // >= 464: saturate
  if (a < 0x3c800000u) {  // below 2^-6: subnormal steps of 2^-9 (8 steps round up to 2^-6)
    return static_cast<uint8_t>(sign | static_cast<uint32_t>(rintf(bits_float(a) * 512.0f)));
  }
  const uint32_t rounded = (a + 0x7ffffu + ((a >> 20) & 1u)) >> 20;  // 3 mantissa bits, to even
  const uint32_t code = rounded - ((127u - 7u) << 3);                // exponent bias 127 -> 7
  return static_cast<uint8_t>(sign | (code > 0x7eu ? 0x7eu : code));
}

FD_HOST_DEVICE inline float fp8_e4m3_to_float(uint8_t v) {
  const uint32_t sign = static_cast<uint32_t>(v & 0x80u) << 24;
  const uint32_t e = (v >> 3) & 0xfu, m = v & 7u;
  if ((v & 0x7fu) == 0x7fu) return bits_float(sign | 0x7fc00000u);  // NaN
  if (e == 0) return bits_float(sign | float_bits(static_cast<float>(m) * 0.001953125f));  // m * 2^-9
  return bits_float(sign | ((e + 120u) << 23) | (m << 20));
}

// ---- the NVLink manager's transfers: where each row lies -----------------------------------
// One call's rows, for this rank, from counts[s * world + d] (rows rank s sends rank d): rows
// received are ordered by source rank (each source's block in its send-list order); a send
// list is ordered by destination rank. table[w]: where rank w's part of an exchange starts.
// Parts of one exchange, copied by one launch into this rank's buffer at their offsets.
constexpr int32_t kMaxPackParts = 8;
struct PackPart {
  const void* src;
  int64_t bytes;
  int64_t offset;  // in the destination buffer
};
struct PackParts {
  PackPart part[kMaxPackParts];
  int32_t count;
};

enum PeerRows : int32_t {
  kPeerReceived = 0,       // entry r: received row r, in its source's send-list part
  kPeerReceivedToken = 1,  // entry r: received row r, in its source's token part (row: tokens[r * stride])
  kPeerHome = 2,           // entry t * world + w: token t's row in rank w's received part (map [T, world])
  kPeerSent = 3,           // entry i: row i of this rank's send list, in its destination's received part
};

FD_HOST_DEVICE inline constexpr int32_t peer_block_words(int32_t world) { return 4 * world + 2; }

// words[peer_block_words(world)]: received rows' starts by source [world + 1], this rank's
// block in each source's send list [world], the send list's starts by destination
// [world + 1], this rank's block among each destination's received rows [world].
FD_HOST_DEVICE inline void peer_blocks(const int64_t* counts, int32_t world, int32_t rank, int64_t* words) {
  int64_t* recv_start = words;
  int64_t* their_off = recv_start + world + 1;
  int64_t* send_start = their_off + world;
  int64_t* dest_off = send_start + world + 1;
  recv_start[0] = send_start[0] = 0;
  for (int32_t w = 0; w < world; ++w) {
    recv_start[w + 1] = recv_start[w] + counts[w * world + rank];
    send_start[w + 1] = send_start[w] + counts[rank * world + w];
    int64_t off = 0, before = 0;
    for (int32_t v = 0; v < rank; ++v) {
      off += counts[w * world + v];
      before += counts[v * world + w];
    }
    their_off[w] = off;
    dest_off[w] = before;
  }
}

// The block of starts[0..world] holding entry i (world: past the last).
FD_HOST_DEVICE inline int32_t peer_block_of(const int64_t* starts, int32_t world, int64_t i) {
  int32_t b = 0;
  while (b < world && i >= starts[b + 1]) ++b;
  return b;
}

// Address of entry i of a transfer of `kind`; 0: no row.
FD_HOST_DEVICE inline int64_t peer_address(int32_t kind, int64_t i, int32_t world, const int64_t* words,
                                           const int64_t* table, int64_t row_bytes, const int32_t* map,
                                           const double* tokens, int64_t token_stride) {
  const int64_t* recv_start = words;
  const int64_t* their_off = recv_start + world + 1;
  const int64_t* send_start = their_off + world;
  const int64_t* dest_off = send_start + world + 1;
  if (kind == kPeerHome) {
    const int32_t w = static_cast<int32_t>(i % world);
    const int32_t m = map[i];
    return m < 0 ? 0 : table[w] + (m - send_start[w] + dest_off[w]) * row_bytes;
  }
  if (kind == kPeerSent) {
    const int32_t d = peer_block_of(send_start, world, i);
    return d == world ? 0 : table[d] + (i - send_start[d] + dest_off[d]) * row_bytes;
  }
  const int32_t s = peer_block_of(recv_start, world, i);
  if (s == world) return 0;
  const int64_t row = kind == kPeerReceived ? i - recv_start[s] + their_off[s]
                                            : static_cast<int64_t>(tokens[i * token_stride]);
  return table[s] + row * row_bytes;
}

}  // namespace flexdispatch
