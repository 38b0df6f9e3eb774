// Grouped matmul for XLA:CPU through the XLA FFI: f32, threaded over XLA's intra-op pool.
//
// Why this exists: XLA:CPU runs each small dot (one group of 32-64 rows) as a separate
// YNNPACK call that packs the group's weights and mostly uses one core, so an XLA loop over
// groups reaches 0.3-0.5x a dense GEMM at G=64-256 (BENCHMARKS.md, "gmm"). Here every
// (group, row block, column strip block) is one work item, items are claimed from an atomic
// counter by the calling thread and by helpers scheduled on XLA's pool, and the inner
// product is a register-blocked micro-kernel that reads the weights in place (no packing)
// whenever they are row-major.
//
// Products (row-major, the rows of group g are [start_g, end_g)):
//   gmm  NN: out[r, :] = lhs[r, :] @ rhs[g]         rhs [G, K, N]
//   gmm  NT: out[r, :] = lhs[r, :] @ rhs[g]^T       rhs [G, N, K] (run transposed, see kNT)
//   tgmm TN: out[g]    = lhs[rows g]^T @ dout[rows g]
// Rows past sum(group_sizes) come out zero; empty groups give zero tgmm blocks. The NN and TN
// products also come with `lhs_rows` (JmoeGmmRowsF32, JmoeTgmmRowsF32): row r of lhs is then
// lhs[lhs_rows[r]] of a [T, K] lhs, gathered per work item (a dispatch's sorted rows without
// the [T * K, D] copy).
//
// Built on first use by pallas_kernels/gmm/cpu.py (g++ -O3 -march=native).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using jmoe::ParallelFor;

namespace {

#if defined(__AVX512F__)
constexpr int kVL = 16;  // floats per vector register
constexpr int kNV = 4;   // vectors per micro-tile row: a 6 x 64 tile in 24 zmm accumulators
#elif defined(__AVX__)
constexpr int kVL = 8;
constexpr int kNV = 2;   // 6 x 16 in 12 ymm accumulators (16 registers in all)
#else
constexpr int kVL = 4;
constexpr int kNV = 2;
#endif
constexpr int kMR = 6;                  // rows per micro-tile
constexpr int kNR = kVL * kNV;          // columns per micro-tile (one "strip")
constexpr int64_t kRowBlock = 120;      // rows of one gmm work item (a multiple of kMR)
constexpr int64_t kStripsNN = 8;        // column strips of one gmm work item (row-major rhs)
constexpr int64_t kTgmmPanels = 16;     // kMR-row output panels of one tgmm work item
constexpr int64_t kReduceBlock = 512;   // tgmm reduction rows per pass over a C block

// Unaligned, and allowed to alias the float buffers it is loaded from and stored to.
typedef float vf __attribute__((vector_size(kVL * sizeof(float)), aligned(4), __may_alias__));

inline vf load(const float* p) { return *reinterpret_cast<const vf*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vf*>(p) = v; }

// How a micro-tile is written: plain stores, added to C, or non-temporal stores (C must be
// 64-byte aligned; skips the read-for-ownership of lines written once, e.g. tgmm's dW).
enum StoreMode { kStore, kAccumulate, kStream };

template <int MODE>
inline void StoreTile(float* p, vf v) {
#if defined(__AVX512F__)
  if (MODE == kStream) return _mm512_stream_ps(p, reinterpret_cast<__m512>(v));
#endif
  store(p, MODE == kAccumulate ? load(p) + v : v);
}

// Outputs are written with non-temporal stores where every vector store can be 64-byte
// aligned (an aligned buffer with rows of a multiple of 16 floats). A product's [M, N] result
// is written once and, at the grouped shapes, is larger than the caches, so skipping the
// read-for-ownership of its lines saves reading it from memory first (measured: DeepSeek-mini
// forward 2-10% faster, whole MoE layers 1-5%). gmm outputs under kStreamMinBytes keep plain
// stores, so that a small result (a few decode tokens) stays in cache for the op that reads it
// next (no loss was measured down to 256 KiB, either).
constexpr int64_t kStreamMinBytes = 1 << 20;

inline bool Streamable(const float* out, int64_t n) {
  return kVL == 16 && reinterpret_cast<uintptr_t>(out) % 64 == 0 && n % 16 == 0;
}

// Orders a work item's non-temporal stores before the item is reported done.
inline void FenceStreams() {
#if defined(__AVX512F__)
  _mm_sfence();
#endif
}

// dst[r * ldd + q] = src[r * width + q] with non-temporal stores; dst 64-byte aligned, width
// and ldd multiples of 16 floats (see Streamable). The copy branch serves builds without
// AVX-512, where Streamable is false and this is not called.
inline void StreamRows(const float* src, int64_t rows, int64_t width, float* dst, int64_t ldd) {
#if defined(__AVX512F__)
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t q = 0; q < width; q += 16)
      _mm512_stream_ps(dst + r * ldd + q, _mm512_loadu_ps(src + r * width + q));
#else
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(dst + r * ldd, src + r * width, width * sizeof(float));
#endif
}

constexpr int64_t kPrefetchRows = 12;  // B rows ahead that the first panel of a strip prefetches

// Software prefetch in the micro-kernel: none; B rows kPrefetchRows ahead (the first panel
// of a strip streams B from memory, the later panels find it in L2); or one cache line per
// step of a caller-given region (the next work item's weights, fetched into L2 while this
// item computes from cache).
enum Prefetch { kNoPrefetch, kPrefetchB, kPrefetchNext };

// C[MROWS, kNR] = A[MROWS, k] @ B[k, kNR]. A(i, p) is a[i * lda + p] (A_T false) or
// a[p * lda + i] (A_T true); B(p, :) is the kNR floats at b + p * ldb.
template <int MROWS, bool A_T, int MODE, int PF>
inline void MicroKernel(int64_t k, const float* __restrict a, int64_t lda,
                        const float* __restrict b, int64_t ldb, float* __restrict c,
                        int64_t ldc, const char* pf) {
  vf acc[MROWS][kNV];
  for (int i = 0; i < MROWS; ++i)
    for (int j = 0; j < kNV; ++j) acc[i][j] = vf{};
  for (int64_t p = 0; p < k; ++p) {
    vf bv[kNV];
    for (int j = 0; j < kNV; ++j) bv[j] = load(b + p * ldb + j * kVL);
    if (PF == kPrefetchB)
      for (int j = 0; j < kNR; j += 16) __builtin_prefetch(b + (p + kPrefetchRows) * ldb + j, 0, 2);
    if (PF == kPrefetchNext) __builtin_prefetch(pf + p * 64, 0, 2);
    for (int i = 0; i < MROWS; ++i) {
      const float ai = A_T ? a[p * lda + i] : a[i * lda + p];
      for (int j = 0; j < kNV; ++j) acc[i][j] += ai * bv[j];
    }
  }
  for (int i = 0; i < MROWS; ++i)
    for (int j = 0; j < kNV; ++j) StoreTile<MODE>(c + i * ldc + j * kVL, acc[i][j]);
}

template <bool A_T, int MODE, int PF = kNoPrefetch>
void MicroKernelRows(int rows, int64_t k, const float* a, int64_t lda, const float* b,
                     int64_t ldb, float* c, int64_t ldc, const char* pf = nullptr) {
  switch (rows) {
#define JMOE_ROWS_CASE(R) \
  case R:                 \
    return MicroKernel<R, A_T, MODE, PF>(k, a, lda, b, ldb, c, ldc, pf);
    JMOE_ROWS_CASE(1)
    JMOE_ROWS_CASE(2)
    JMOE_ROWS_CASE(3)
    JMOE_ROWS_CASE(4)
    JMOE_ROWS_CASE(5)
    JMOE_ROWS_CASE(6)
#undef JMOE_ROWS_CASE
    default:
      return;
  }
}
static_assert(kMR == 6, "MicroKernelRows instantiates 1..6 rows");

#if defined(__AVX512F__)
// r[0..15] (16 rows of 16 floats) become their transpose in place: 64 shuffles.
inline void Transpose16x16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // u[4i + j], 128-bit lane l: element 4l + j of rows 4i .. 4i + 3.
  for (int i = 0; i < 4; ++i) {
    u[4 * i + 0] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  // A 4 x 4 transpose of 128-bit lanes for each j.
  for (int j = 0; j < 4; ++j) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x44);
    const __m512 v1 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xEE);
    const __m512 v2 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x44);
    const __m512 v3 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xEE);
    r[j] = _mm512_shuffle_f32x4(v0, v2, 0x88);
    r[4 + j] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
    r[8 + j] = _mm512_shuffle_f32x4(v1, v3, 0x88);
    r[12 + j] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
  }
}
#endif

// pack[p * ldp + n] = B(p, n0 + n) for p < k, n < width (zero up to ldp), where
// B(p, n) = b[p * b_rs + n * b_cs].
void PackStrip(int64_t k, const float* b, int64_t b_rs, int64_t b_cs, int64_t n0,
               int64_t width, float* pack, int64_t ldp) {
  int64_t n_done = 0, p_done = 0;
#if defined(__AVX512F__)
  if (b_rs == 1) {  // columns of B are contiguous rows in memory: 16 x 16 block transposes
    n_done = width / 16 * 16;
    p_done = k / 16 * 16;
    __m512 r[16];
    for (int64_t nb = 0; nb < n_done; nb += 16)
      for (int64_t pb = 0; pb < p_done; pb += 16) {
        for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(b + (n0 + nb + i) * b_cs + pb);
        Transpose16x16(r);
        for (int i = 0; i < 16; ++i) _mm512_storeu_ps(pack + (pb + i) * ldp + nb, r[i]);
      }
  }
#endif
  for (int64_t p = 0; p < k; ++p) {
    float* row = pack + p * ldp;
    for (int64_t n = (p < p_done ? n_done : 0); n < width; ++n)
      row[n] = b[p * b_rs + (n0 + n) * b_cs];
    for (int64_t n = width; n < ldp; ++n) row[n] = 0.0f;
  }
}

// One column strip [n0, n0 + width) of C[rows, :] (+)= A[rows, k] @ B[k, :]. A(i, p) as in
// MicroKernel; B is row-major with row stride ldb. A full strip of B is read in place; a
// partial one is packed into `pack` (zero-padded to kNR columns) and its strip of C goes
// through a kNR-wide scratch tile. Panels that read B from cache prefetch the region
// [*next, next_end) one line per step, advancing *next.
template <bool A_T, int MODE>
void Strip(int64_t rows, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
           int64_t n0, int64_t width, float* c, int64_t ldc, std::vector<float>& pack,
           const char** next = nullptr, const char* next_end = nullptr) {
  const float* bp = b + n0;
  if (width < kNR) {
    pack.resize(static_cast<size_t>(k) * kNR);
    PackStrip(k, b, ldb, 1, n0, width, pack.data(), kNR);
    bp = pack.data();
    ldb = kNR;
  }
  float tile[kMR * kNR];
  for (int64_t i0 = 0; i0 < rows; i0 += kMR) {
    const int mr = static_cast<int>(std::min<int64_t>(kMR, rows - i0));
    const float* ai = A_T ? a + i0 : a + i0 * lda;
    float* ci = c + i0 * ldc + n0;
    if (width == kNR) {
      const bool first_from_memory = i0 == 0 && bp != pack.data();
      if (first_from_memory) {
        MicroKernelRows<A_T, MODE, kPrefetchB>(mr, k, ai, lda, bp, ldb, ci, ldc);
      } else if (next != nullptr && *next < next_end) {
        MicroKernelRows<A_T, MODE, kPrefetchNext>(mr, k, ai, lda, bp, ldb, ci, ldc, *next);
        *next += k * 64;
      } else {
        MicroKernelRows<A_T, MODE>(mr, k, ai, lda, bp, ldb, ci, ldc);
      }
      continue;
    }
    MicroKernelRows<A_T, kStore>(mr, k, ai, lda, bp, ldb, tile, kNR);
    for (int i = 0; i < mr; ++i)
      for (int64_t n = 0; n < width; ++n)
        ci[i * ldc + n] = (MODE == kAccumulate ? ci[i * ldc + n] : 0.0f) + tile[i * kNR + n];
  }
}

// The NT product runs transposed: out[rows, cols]^T = rhs[g][cols, :] @ lhs[rows, :]^T.
// rhs[g] [N, K] is row-major in the contraction, so it is the micro-kernel's A operand read in
// place, kMT output columns at a time; only the group's lhs rows are packed (as [K, kNT]
// tiles), where the plain product would pack every column strip of rhs[g] per row block
// (G * N * K floats per call against M * K). Tiles are transposed back as they are stored.
constexpr int kNVT = 2;
constexpr int kNT = kVL * kNVT;             // lhs rows per transposed tile (32 with AVX-512)
constexpr int kMT = kVL == 16 ? 12 : 6;     // output columns per transposed micro-tile
constexpr int64_t kPanelsNT = 16;           // kMT-column panels of one NT work item
constexpr int64_t kPackBytesNT = 256 << 10; // lhs rows packed per NT work item (L2-resident)

// out[r, i] (r < rows, i < MROWS) = acc[i] lane r: the [MROWS, NV * kVL] tile stored
// transposed.
template <int MROWS, int NV>
inline void StoreTransposed(const vf (&acc)[MROWS][NV], int rows, float* c, int64_t ldc) {
#if defined(__AVX512F__)
  static_assert(MROWS <= 16, "one 16 x 16 transpose per vector of rows");
  const __mmask16 mask = static_cast<__mmask16>((1u << MROWS) - 1);
  for (int j = 0; j < NV && j * 16 < rows; ++j) {
    __m512 r[16];
    for (int i = 0; i < 16; ++i)
      r[i] = i < MROWS ? reinterpret_cast<__m512>(acc[i][j]) : _mm512_setzero_ps();
    Transpose16x16(r);
    const int n = std::min(16, rows - j * 16);
    for (int q = 0; q < n; ++q) _mm512_mask_storeu_ps(c + (j * 16 + q) * ldc, mask, r[q]);
  }
#else
  for (int j = 0; j < NV; ++j)
    for (int l = 0; l < kVL && j * kVL + l < rows; ++l)
      for (int i = 0; i < MROWS; ++i) c[(j * kVL + l) * ldc + i] = acc[i][j][l];
#endif
}

// out[r, i] = sum_p A[i, p] * B[p, r] for i < MROWS, r < rows (<= NV * kVL), A[i, p] =
// a[i * lda + p] and B the packed [k, kNT] tile (its first NV vectors); prefetches the
// `pf_lines` cache lines from `pf`, one per step.
template <int MROWS, int NV>
inline void MicroKernelT(int64_t k, const float* __restrict a, int64_t lda,
                         const float* __restrict b, int rows, float* __restrict c, int64_t ldc,
                         const char* pf, int64_t pf_lines) {
  vf acc[MROWS][NV];
  for (int i = 0; i < MROWS; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = vf{};
  for (int64_t p = 0; p < k; ++p) {
    vf bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = load(b + p * kNT + j * kVL);
    if (p < pf_lines) __builtin_prefetch(pf + p * 64, 0, 2);
    for (int i = 0; i < MROWS; ++i) {
      const float ai = a[i * lda + p];
      for (int j = 0; j < NV; ++j) acc[i][j] += ai * bv[j];
    }
  }
  StoreTransposed<MROWS, NV>(acc, rows, c, ldc);
}

// A tile of at most kVL rows (a short group's last) runs on one vector of rows.
template <int MROWS>
inline void MicroKernelTRows(int64_t k, const float* a, int64_t lda, const float* b, int rows,
                             float* c, int64_t ldc, const char* pf, int64_t pf_lines) {
  if (rows <= kVL) return MicroKernelT<MROWS, 1>(k, a, lda, b, rows, c, ldc, pf, pf_lines);
  MicroKernelT<MROWS, kNVT>(k, a, lda, b, rows, c, ldc, pf, pf_lines);
}

void MicroKernelTCols(int cols, int64_t k, const float* a, int64_t lda, const float* b,
                      int rows, float* c, int64_t ldc, const char* pf, int64_t pf_lines) {
  switch (cols) {
#define JMOE_COLS_CASE(R) \
  case R:                 \
    return MicroKernelTRows<R>(k, a, lda, b, rows, c, ldc, pf, pf_lines);
    JMOE_COLS_CASE(1)
    JMOE_COLS_CASE(2)
    JMOE_COLS_CASE(3)
    JMOE_COLS_CASE(4)
    JMOE_COLS_CASE(5)
    JMOE_COLS_CASE(6)
#if defined(__AVX512F__)
    JMOE_COLS_CASE(7)
    JMOE_COLS_CASE(8)
    JMOE_COLS_CASE(9)
    JMOE_COLS_CASE(10)
    JMOE_COLS_CASE(11)
    JMOE_COLS_CASE(12)
#endif
#undef JMOE_COLS_CASE
    default:
      return;
  }
}
static_assert(kMT == 12 || kMT == 6, "MicroKernelTCols instantiates 1..kMT columns");

// The last rows of a group that do not fill a vector (rows % kVL of them) would cost a whole
// vector of lanes per output column in the transposed tiles (a group of 33 rows computes 48).
// Where they are few, they run as dot products along the contraction instead, where both
// operands are contiguous rows: out[r, c] = <lhs[r, :], rhs[g][c, :]>, in blocks of 4 rows x
// 4 columns whose 16 accumulators are summed across lanes together (SumEach16).
#if defined(__AVX512F__)
// Lane i of the result is the sum of the 16 lanes of v[i]: a tree of 45 shuffles and adds
// (one horizontal sum at a time takes about 8 dependent steps per vector).
__attribute__((always_inline)) inline __m512 SumEach16(const __m512 (&v)[16]) {
  __m512 s[8], t[4], u[2];
  // s[i], each 128-bit lane: partial sums of (v[2i], v[2i+1], v[2i], v[2i+1]).
  for (int i = 0; i < 8; ++i)
    s[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  // t[i], each 128-bit lane: that lane's sums of v[4i .. 4i + 3].
  for (int i = 0; i < 4; ++i)
    t[i] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * i], s[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(s[2 * i], s[2 * i + 1], 0xEE));
  // u[i]: 128-bit lanes (0 + 1, 2 + 3) of t[2i], then of t[2i + 1].
  for (int i = 0; i < 2; ++i)
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88),
                       _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
}

// out[r, c] = <x[r * ldx : + k], w[c][0 : k]> for r < R, c < cols (<= 4; w[c] valid for all 4).
template <int R>
inline void DotBlock(int64_t k, const float* __restrict x, int64_t ldx, const float* const (&w)[4],
                     int cols, float* __restrict out, int64_t ldo) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  // (One loop with a per-step mask: a lambda for the steps made GCC keep acc in memory.)
  for (int64_t p = 0; p < k; p += 16) {
    const __mmask16 mask =
        p + 16 <= k ? 0xFFFF : static_cast<__mmask16>((1u << (k - p)) - 1);
    __m512 wv[4];
    for (int c = 0; c < 4; ++c) wv[c] = _mm512_maskz_loadu_ps(mask, w[c] + p);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + r * ldx + p);
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  __m512 v[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) v[i] = i < 4 * R ? acc[i / 4][i % 4] : _mm512_setzero_ps();
  alignas(64) float sums[16];
  _mm512_store_ps(sums, SumEach16(v));
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < cols; ++c) out[r * ldo + c] = sums[4 * r + c];
}

// out[r, c] = <x[r, :], a[c, :]> for r < rows (< kVL), c < cols; row strides ldx and lda.
void DotRows(int rows, int cols, int64_t k, const float* x, int64_t ldx, const float* a,
             int64_t lda, float* out, int64_t ldo) {
  for (int c = 0; c < cols; c += 4) {
    const int nc = std::min(4, cols - c);
    const float* w[4];
    for (int j = 0; j < 4; ++j) w[j] = a + (c + std::min(j, nc - 1)) * lda;
    for (int r = 0; r < rows; r += 4) {
      const float* xr = x + r * ldx;
      float* o = out + r * ldo + c;
      switch (std::min(4, rows - r)) {
        case 1: DotBlock<1>(k, xr, ldx, w, nc, o, ldo); break;
        case 2: DotBlock<2>(k, xr, ldx, w, nc, o, ldo); break;
        case 3: DotBlock<3>(k, xr, ldx, w, nc, o, ldo); break;
        default: DotBlock<4>(k, xr, ldx, w, nc, o, ldo); break;
      }
    }
  }
}
#endif

// How many of a group's last `rest` (< kVL) rows run as dot products: all of them where that
// costs less than a vector of lanes per output column (k FMAs), counting an FMA per 16
// contraction steps of each row and kDotSumCost FMAs' worth of summing per 4-row block; else
// none. (Interleaved A/B at the DeepSeek-mini shapes: a sum cost of 0-30 within 5%.)
constexpr int64_t kDotSumCost = 12;
inline int DotTailRows(int rest, int64_t k) {
  if (kVL != 16 || rest == 0) return 0;
  const int64_t cost = rest * ((k + 15) / 16) + (rest + 3) / 4 * kDotSumCost;
  return cost < k ? rest : 0;
}

void GroupStarts(const int32_t* sizes, int64_t num_groups, int64_t num_rows,
                 std::vector<int64_t>& starts) {
  starts.assign(num_groups + 1, 0);
  for (int64_t g = 0; g < num_groups; ++g)
    starts[g + 1] = std::min<int64_t>(starts[g] + std::max<int32_t>(sizes[g], 0), num_rows);
}

// Rows of a product's lhs: lhs[ids[r]] where `ids` is given (the rows are gathered into a
// per-item buffer, so the caller need not materialise lhs[ids], e.g. the rows of a dispatch
// sorted by expert), else lhs[r]. Returns false if an id is outside [0, num_rows).
bool IdsInRange(const int32_t* ids, int64_t count, int64_t num_rows) {
  for (int64_t i = 0; i < count; ++i)
    if (ids[i] < 0 || ids[i] >= num_rows) return false;
  return true;
}

// dst[r, :] = src[ids[r0 + r], c0 : c0 + width] for r < rows (src has row stride lds).
void GatherRows(const float* src, int64_t lds, const int32_t* ids, int64_t r0, int64_t rows,
                int64_t c0, int64_t width, std::vector<float>& dst) {
  dst.resize(static_cast<size_t>(rows * width));
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(dst.data() + r * width, src + static_cast<int64_t>(ids[r0 + r]) * lds + c0,
                width * sizeof(float));
}

// out[rows of g] = lhs[rows of g] @ rhs[g]^T for rhs [G, N, K], computed transposed (see
// kNT). Items: (group, up to 4 row tiles, up to kPanelsNT column panels); each packs its row
// tiles once and runs the column panels outermost, so a panel of rhs[g] is read from memory
// once per item and the next panel (or the next item's first one) is prefetched meanwhile.
// With `ids`, row r of lhs is x[ids[r]] (gathered per item).
void GmmNT(ffi::ThreadPool& pool, const float* x, const int32_t* ids, const float* w,
           const std::vector<int64_t>& starts, int64_t k, int64_t n, float* y, bool stream) {
  struct Item { int64_t g, r0, r1, c0, c1; };
  const int64_t tile_bytes = k * kNT * static_cast<int64_t>(sizeof(float));
  const int64_t row_block =
      std::clamp<int64_t>(kPackBytesNT / std::max<int64_t>(tile_bytes, 1), 1, 4) * kNT;
  const int64_t col_block = kPanelsNT * kMT;
  std::vector<Item> items;
  for (size_t g = 0; g + 1 < starts.size(); ++g)
    for (int64_t r0 = starts[g]; r0 < starts[g + 1]; r0 += row_block)
      for (int64_t c0 = 0; c0 < n; c0 += col_block)
        items.push_back({static_cast<int64_t>(g), r0, std::min(r0 + row_block, starts[g + 1]),
                         c0, std::min(c0 + col_block, n)});
  // With `stream`, the item's [rows, c0:c1] block goes to a scratch buffer and then out with
  // non-temporal stores (the transposed micro-tiles store 12-column pieces: partial lines).
  ParallelFor(pool, static_cast<int64_t>(items.size()), [&](int64_t idx, int64_t nxt) {
    thread_local std::vector<float> pack, block, gathered;
    const Item& it = items[idx];
    const int64_t rows = it.r1 - it.r0;
    const float* xr;  // the item's lhs rows
    if (ids != nullptr) {
      GatherRows(x, k, ids, it.r0, rows, 0, k, gathered);
      xr = gathered.data();
    } else {
      xr = x + it.r0 * k;
    }
    // Only a group's last item has rows % kVL != 0 (row_block is a multiple of kNT).
    const int tail = DotTailRows(static_cast<int>(rows % kVL), k);
    const int64_t vec_rows = rows - tail, tiles = (vec_rows + kNT - 1) / kNT;
    float* out = y + it.r0 * n + it.c0;
    int64_t ldo = n;
    if (stream) {
      ldo = it.c1 - it.c0;
      block.resize(static_cast<size_t>(rows * ldo));
      out = block.data();
    }
    pack.resize(static_cast<size_t>(tiles * k * kNT));
    for (int64_t t = 0; t < tiles; ++t)
      PackStrip(k, xr + t * kNT * k, 1, k, 0, std::min<int64_t>(kNT, vec_rows - t * kNT),
                pack.data() + t * k * kNT, kNT);
    const float* wg = w + it.g * n * k;
    // Prefetched meanwhile: the next panel, or the next item's first one if not this item's.
    const Item* next = nxt >= 0 && (items[nxt].g != it.g || items[nxt].c0 != it.c0)
                           ? &items[nxt] : nullptr;
    for (int64_t c = it.c0; c < it.c1; c += kMT) {
      const float* a = wg + c * k;
      const float* pf = nullptr;
      int64_t pf_cols = 0;
      if (c + kMT < it.c1) {
        pf = a + kMT * k;
        pf_cols = std::min<int64_t>(kMT, it.c1 - c - kMT);
      } else if (next != nullptr) {
        pf = w + next->g * n * k + next->c0 * k;
        pf_cols = std::min<int64_t>(kMT, next->c1 - next->c0);
      }
      const int64_t pf_lines = (pf_cols * k * static_cast<int64_t>(sizeof(float)) + 63) / 64;
      for (int64_t t = 0; t < tiles; ++t)
        MicroKernelTCols(static_cast<int>(std::min<int64_t>(kMT, it.c1 - c)), k, a, k,
                         pack.data() + t * k * kNT,
                         static_cast<int>(std::min<int64_t>(kNT, vec_rows - t * kNT)),
                         out + t * kNT * ldo + (c - it.c0), ldo,
                         reinterpret_cast<const char*>(pf), t == 0 ? pf_lines : 0);
#if defined(__AVX512F__)
      if (tail > 0)
        DotRows(tail, static_cast<int>(std::min<int64_t>(kMT, it.c1 - c)), k,
                xr + vec_rows * k, k, a, k, out + vec_rows * ldo + (c - it.c0), ldo);
#endif
    }
    if (stream) {
      StreamRows(out, rows, ldo, y + it.r0 * n + it.c0, n);
      FenceStreams();
    }
  });
}

// out [M, N]; lhs [M, K] or, with ids (M of them), [T, K].
ffi::Error GmmCommon(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& lhs, ffi::Buffer<ffi::F32>& rhs,
                     ffi::Buffer<ffi::S32>& group_sizes, const int32_t* ids, int64_t num_ids,
                     ffi::ResultBuffer<ffi::F32>& out, bool transpose_rhs) {
  const auto ld = lhs.dimensions();
  const auto rd = rhs.dimensions();
  if (ld.size() != 2 || rd.size() != 3)
    return ffi::Error::InvalidArgument("jmoe gmm: lhs must be [M, K], rhs [G, K, N]");
  const int64_t m = ids != nullptr ? num_ids : ld[0], k = ld[1], g_count = rd[0];
  const int64_t n = transpose_rhs ? rd[1] : rd[2];
  if ((transpose_rhs ? rd[2] : rd[1]) != k)
    return ffi::Error::InvalidArgument("jmoe gmm: contraction dims differ");
  if (group_sizes.element_count() != static_cast<size_t>(g_count))
    return ffi::Error::InvalidArgument("jmoe gmm: group_sizes must have G entries");
  const auto od = out->dimensions();
  if (od.size() != 2 || od[0] != m || od[1] != n)
    return ffi::Error::InvalidArgument("jmoe gmm: out must be [M, N]");
  if (ids != nullptr && !IdsInRange(ids, num_ids, ld[0]))
    return ffi::Error::InvalidArgument("jmoe gmm: lhs_rows must lie in [0, T) for lhs [T, K]");
  std::vector<int64_t> starts;
  GroupStarts(group_sizes.typed_data(), g_count, m, starts);
  const float* x = lhs.typed_data();
  const float* w = rhs.typed_data();
  float* y = out->typed_data();
  if (starts[g_count] < m)
    std::memset(y + starts[g_count] * n, 0, (m - starts[g_count]) * n * sizeof(float));
  const bool stream =
      Streamable(y, n) && m * n * static_cast<int64_t>(sizeof(float)) >= kStreamMinBytes;
  if (transpose_rhs) {
    GmmNT(pool, x, ids, w, starts, k, n, y, stream);
    return ffi::Error::Success();
  }
  // Items: (group, row block, strip block).
  struct Item { int64_t g, r0, r1, s0, s1; };
  const int64_t strips = (n + kNR - 1) / kNR;
  const int64_t per_item = kStripsNN;
  std::vector<Item> items;
  for (int64_t g = 0; g < g_count; ++g)
    for (int64_t r0 = starts[g]; r0 < starts[g + 1]; r0 += kRowBlock)
      for (int64_t s0 = 0; s0 < strips; s0 += per_item)
        items.push_back({g, r0, std::min(r0 + kRowBlock, starts[g + 1]), s0,
                         std::min(s0 + per_item, strips)});
  ParallelFor(pool, static_cast<int64_t>(items.size()), [&](int64_t idx, int64_t nxt) {
    thread_local std::vector<float> pack;
    const Item& it = items[idx];
    const float* wg = w + it.g * k * n;
    // Small groups are bound by streaming their weights: while this item computes from
    // cache, fetch the next item's weights where they are one contiguous region (the whole
    // rhs[g] when one item covers all its columns).
    const char *pf = nullptr, *pf_end = nullptr;
    if (nxt >= 0 && items[nxt].g != it.g && strips <= per_item) {
      pf = reinterpret_cast<const char*>(w + items[nxt].g * k * n);
      pf_end = pf + k * n * sizeof(float);
    }
    const int64_t rows = it.r1 - it.r0;
    thread_local std::vector<float> gathered;
    if (ids != nullptr) GatherRows(x, k, ids, it.r0, rows, 0, k, gathered);
    const float* a = ids != nullptr ? gathered.data() : x + it.r0 * k;
    float* out = y + it.r0 * n;
    for (int64_t s = it.s0; s < it.s1; ++s) {
      const int64_t n0 = s * kNR, width = std::min<int64_t>(kNR, n - n0);
      if (stream)
        Strip<false, kStream>(rows, k, a, k, wg, n, n0, width, out, n, pack, &pf, pf_end);
      else
        Strip<false, kStore>(rows, k, a, k, wg, n, n0, width, out, n, pack, &pf, pf_end);
    }
    if (stream) FenceStreams();
  });
  return ffi::Error::Success();
}

ffi::Error GmmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> lhs, ffi::Buffer<ffi::F32> rhs,
                   ffi::Buffer<ffi::S32> group_sizes, ffi::ResultBuffer<ffi::F32> out,
                   bool transpose_rhs) {
  return GmmCommon(pool, lhs, rhs, group_sizes, nullptr, 0, out, transpose_rhs);
}

ffi::Error GmmRowsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> lhs, ffi::Buffer<ffi::F32> rhs,
                       ffi::Buffer<ffi::S32> group_sizes, ffi::Buffer<ffi::S32> lhs_rows,
                       ffi::ResultBuffer<ffi::F32> out, bool transpose_rhs) {
  return GmmCommon(pool, lhs, rhs, group_sizes, lhs_rows.typed_data(),
                   static_cast<int64_t>(lhs_rows.element_count()), out, transpose_rhs);
}

// out [G, K, N]; lhs [M, K] or, with ids (M of them), [T, K]; dout [M, N] or, with
// dout_ids (M of them), [T', N].
ffi::Error TgmmCommon(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& lhs,
                      ffi::Buffer<ffi::F32>& dout, ffi::Buffer<ffi::S32>& group_sizes,
                      const int32_t* ids, const int32_t* dout_ids, int64_t m,
                      ffi::ResultBuffer<ffi::F32>& out) {
  const auto ld = lhs.dimensions();
  const auto dd = dout.dimensions();
  const auto od = out->dimensions();
  if (ld.size() != 2 || dd.size() != 2 || od.size() != 3 || (ids == nullptr && ld[0] != m) ||
      (dout_ids == nullptr && dd[0] != m) || od[1] != ld[1] || od[2] != dd[1])
    return ffi::Error::InvalidArgument("jmoe tgmm: lhs [M, K], dout [M, N], out [G, K, N]");
  const int64_t k = ld[1], n = dd[1], g_count = od[0];
  if (group_sizes.element_count() < static_cast<size_t>(g_count))
    return ffi::Error::InvalidArgument("jmoe tgmm: fewer group sizes than output groups");
  if (ids != nullptr && !IdsInRange(ids, m, ld[0]))
    return ffi::Error::InvalidArgument("jmoe tgmm: lhs_rows must lie in [0, T) for lhs [T, K]");
  if (dout_ids != nullptr && !IdsInRange(dout_ids, m, dd[0]))
    return ffi::Error::InvalidArgument(
        "jmoe tgmm: dout_rows must lie in [0, T) for dout [T, N]");
  std::vector<int64_t> starts;
  GroupStarts(group_sizes.typed_data(), g_count, m, starts);
  const float* x = lhs.typed_data();
  const float* dy = dout.typed_data();
  float* dw = out->typed_data();
  const int64_t panel_rows = kMR * kTgmmPanels;
  const bool stream = Streamable(dw, n);
  const int64_t blocks = (k + panel_rows - 1) / panel_rows;
  ParallelFor(pool, g_count * blocks, [&](int64_t idx, int64_t) {
    thread_local std::vector<float> pack, gathered, gathered_dout;
    const int64_t g = idx / blocks;
    const int64_t k0 = (idx % blocks) * panel_rows, k1 = std::min(k0 + panel_rows, k);
    const int64_t rows = starts[g + 1] - starts[g];
    float* c = dw + g * k * n + k0 * n;
    if (rows == 0) {
      std::memset(c, 0, (k1 - k0) * n * sizeof(float));
      return;
    }
    // out[g][k0:k1, :] = A @ B with A(i, p) = x[(start + p) * k + k0 + i] (transposed
    // access) and B = dy[start:end, :] read in place.
    // The reduction runs in passes of kReduceBlock rows so the lhs and dout rows of a pass
    // stay in cache across the strips; later passes accumulate into C.
    for (int64_t r0 = 0; r0 < rows; r0 += kReduceBlock) {
      const int64_t len = std::min(kReduceBlock, rows - r0);
      const float* a;
      int64_t lda = k;
      if (ids != nullptr) {  // this pass's rows, columns [k0, k1)
        GatherRows(x, k, ids, starts[g] + r0, len, k0, k1 - k0, gathered);
        a = gathered.data();
        lda = k1 - k0;
      } else {
        a = x + (starts[g] + r0) * k + k0;
      }
      const float* b;
      if (dout_ids != nullptr) {  // this pass's dout rows
        GatherRows(dy, n, dout_ids, starts[g] + r0, len, 0, n, gathered_dout);
        b = gathered_dout.data();
      } else {
        b = dy + (starts[g] + r0) * n;
      }
      for (int64_t n0 = 0; n0 < n; n0 += kNR) {
        const int64_t width = std::min<int64_t>(kNR, n - n0);
        if (r0 > 0)
          Strip<true, kAccumulate>(k1 - k0, len, a, lda, b, n, n0, width, c, n, pack);
        else if (stream && len == rows)
          Strip<true, kStream>(k1 - k0, len, a, lda, b, n, n0, width, c, n, pack);
        else
          Strip<true, kStore>(k1 - k0, len, a, lda, b, n, n0, width, c, n, pack);
      }
    }
    FenceStreams();
  });
  return ffi::Error::Success();
}

ffi::Error TgmmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> lhs, ffi::Buffer<ffi::F32> dout,
                    ffi::Buffer<ffi::S32> group_sizes, ffi::ResultBuffer<ffi::F32> out) {
  return TgmmCommon(pool, lhs, dout, group_sizes, nullptr, nullptr, dout.dimensions()[0], out);
}

// lhs_rows and dout_rows: [M] ids, or empty where that operand is not gathered (M is the
// length of the one given).
ffi::Error TgmmRowsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> lhs,
                        ffi::Buffer<ffi::F32> dout, ffi::Buffer<ffi::S32> group_sizes,
                        ffi::Buffer<ffi::S32> lhs_rows, ffi::Buffer<ffi::S32> dout_rows,
                        ffi::ResultBuffer<ffi::F32> out) {
  const size_t n_lhs = lhs_rows.element_count(), n_dout = dout_rows.element_count();
  if ((n_lhs == 0 && n_dout == 0) || (n_lhs > 0 && n_dout > 0 && n_lhs != n_dout))
    return ffi::Error::InvalidArgument("jmoe tgmm: lhs_rows and dout_rows must both have M ids");
  const int64_t m = static_cast<int64_t>(n_lhs > 0 ? n_lhs : n_dout);
  return TgmmCommon(pool, lhs, dout, group_sizes, n_lhs > 0 ? lhs_rows.typed_data() : nullptr,
                    n_dout > 0 ? dout_rows.typed_data() : nullptr, m, out);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JmoeGmmF32, GmmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_rhs"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JmoeTgmmF32, TgmmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JmoeGmmRowsF32, GmmRowsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_rhs"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JmoeTgmmRowsF32, TgmmRowsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
