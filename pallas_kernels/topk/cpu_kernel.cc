// Top-k indices along the last axis for XLA:CPU through the XLA FFI (f32).
//
// Why this exists: XLA:CPU's TopK runs a partial sort per row at about 1 us a row, so a
// router's top-8 of 256 experts for 1024 tokens took 1.2 ms, as long as the router matmul
// and its gradient together. Here each row is cut into 16-lane chunks whose maxima are kept;
// each of the k steps takes the best chunk, its first lane holding that maximum, removes the
// lane and recomputes that chunk's maximum: O(n + k * n / 16) per row, vectorised.
//
// Order (the same as jax.lax.top_k): descending in the IEEE total order, so +NaN > +inf >
// ... > +0 > -0 > ... > -inf > -NaN; equal values in increasing index order. Values map to
// int32 keys with that order: bits ^ ((bits >> 31) & 0x7fffffff).
//
// Built on first use by pallas_kernels/native.py (g++ -O3 -march=native).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;  // values per chunk
constexpr int32_t kLowest = std::numeric_limits<int32_t>::min();

#if defined(__AVX512F__)
using ChunkKeys = __m512i;  // one vector per chunk
constexpr int kKeysPerChunk = 1;
#else
using ChunkKeys = int32_t;
constexpr int kKeysPerChunk = kLanes;
#endif

// Chunks of one row: keys, the lanes not yet taken, and the maximum key over those lanes.
struct Row {
  std::vector<ChunkKeys> keys;
  std::vector<uint32_t> alive;
  std::vector<int32_t> best;

  void Resize(int64_t chunks) {
    keys.resize(chunks * kKeysPerChunk);
    alive.resize(chunks);
    best.resize(chunks);
  }
};

#if defined(__AVX512F__)
void LoadChunk(Row& row, int64_t c, const float* x, int lanes) {
  const __mmask16 m = static_cast<__mmask16>(lanes == kLanes ? 0xFFFF : (1u << lanes) - 1);
  const __m512i lowest = _mm512_set1_epi32(kLowest);
  const __m512i v = _mm512_mask_loadu_epi32(lowest, m, x);
  const __m512i flip = _mm512_and_si512(_mm512_srai_epi32(v, 31), _mm512_set1_epi32(0x7FFFFFFF));
  row.keys[c] = _mm512_xor_si512(v, flip);
  row.alive[c] = m;
  row.best[c] = _mm512_mask_reduce_max_epi32(m, row.keys[c]);
}

// Takes the first alive lane of chunk c holding its maximum; returns the lane.
int TakeBest(Row& row, int64_t c) {
  const __mmask16 alive = static_cast<__mmask16>(row.alive[c]);
  const __mmask16 eq =
      _mm512_mask_cmpeq_epi32_mask(alive, row.keys[c], _mm512_set1_epi32(row.best[c]));
  const int lane = __builtin_ctz(eq);
  row.alive[c] &= ~(1u << lane);
  row.best[c] = _mm512_mask_reduce_max_epi32(static_cast<__mmask16>(row.alive[c]), row.keys[c]);
  return lane;
}
#else
void LoadChunk(Row& row, int64_t c, const float* x, int lanes) {
  int32_t* keys = row.keys.data() + c * kLanes;
  for (int l = 0; l < kLanes; ++l) {
    int32_t bits = kLowest;
    if (l < lanes) std::memcpy(&bits, x + l, sizeof(bits));
    keys[l] = l < lanes ? bits ^ ((bits >> 31) & 0x7FFFFFFF) : kLowest;
  }
  row.alive[c] = lanes == kLanes ? 0xFFFFu : (1u << lanes) - 1;
  row.best[c] = *std::max_element(keys, keys + lanes);
}

int TakeBest(Row& row, int64_t c) {
  const int32_t* keys = row.keys.data() + c * kLanes;
  int lane = 0;
  while (!((row.alive[c] >> lane) & 1) || keys[lane] != row.best[c]) ++lane;
  row.alive[c] &= ~(1u << lane);
  int32_t best = kLowest;
  for (int l = 0; l < kLanes; ++l)
    if ((row.alive[c] >> l) & 1) best = std::max(best, keys[l]);
  row.best[c] = best;
  return lane;
}
#endif

void TopKRow(const float* x, int64_t n, int64_t k, int32_t* ids, Row& row) {
  const int64_t chunks = (n + kLanes - 1) / kLanes;
  row.Resize(chunks);
  for (int64_t c = 0; c < chunks; ++c)
    LoadChunk(row, c, x + c * kLanes, static_cast<int>(std::min<int64_t>(kLanes, n - c * kLanes)));
  for (int64_t t = 0; t < k; ++t) {
    int64_t c_best = -1;  // the first chunk with the largest maximum among chunks with lanes
    for (int64_t c = 0; c < chunks; ++c)
      if (row.alive[c] != 0 && (c_best < 0 || row.best[c] > row.best[c_best])) c_best = c;
    ids[t] = static_cast<int32_t>(c_best * kLanes + TakeBest(row, c_best));
  }
}

ffi::Error TopKImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::S32> ids) {
  const auto xd = x.dimensions();
  const auto od = ids->dimensions();
  if (xd.size() == 0 || od.size() != xd.size() ||
      !std::equal(xd.begin(), xd.end() - 1, od.begin()))
    return ffi::Error::InvalidArgument("jmoe top_k: x [..., N] and indices [..., K]");
  const int64_t n = xd.back(), k = od.back();
  if (k < 0 || k > n) return ffi::Error::InvalidArgument("jmoe top_k: needs 0 <= K <= N");
  const int64_t rows = n == 0 ? 0 : static_cast<int64_t>(x.element_count()) / n;
  Row row;
  for (int64_t r = 0; r < rows; ++r)
    TopKRow(x.typed_data() + r * n, n, k, ids->typed_data() + r * k, row);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JmoeTopKF32, TopKImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
