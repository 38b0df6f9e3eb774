// Gradient of the dropless combine for XLA:CPU through the XLA FFI (f32), threaded.
//
// The combine y[t] = sum_k w[t, k] * ys[inv[t, k]] has, for each sorted row r whose token is
// token[r] and whose weight is w[r]:
//   d ys[r] = w[r] * dy[token[r]]       d w[r] = <ys[r], dy[token[r]]>
// XLA:CPU ran the two as a gather-multiply and a separate gather-multiply-reduce along rows
// (2.0 ms for 8192 x 512 rows); here one pass reads each ys row and the token's dy row once
// and writes both results (0.9 ms).
//
// Built on first use by pallas_kernels/native.py (g++ -O3 -march=native).

#include <algorithm>
#include <cstdint>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRowsPerItem = 64;
constexpr int kLanes = 16;  // partial sums per row, reduced at the end of the row

void CombineGradRow(const float* y, const float* g, float scale, int64_t d, float* dys,
                    float* dw) {
  float acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      acc[l] += y[j + l] * g[j + l];
      dys[j + l] = scale * g[j + l];
    }
  for (; j < d; ++j) {
    acc[0] += y[j] * g[j];
    dys[j] = scale * g[j];
  }
  float sum = 0.0f;
  for (int l = 0; l < kLanes; ++l) sum += acc[l];
  *dw = sum;
}

ffi::Error CombineGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> ys,
                           ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::S32> token,
                           ffi::Buffer<ffi::F32> weight, ffi::ResultBuffer<ffi::F32> dys,
                           ffi::ResultBuffer<ffi::F32> dw) {
  const auto yd = ys.dimensions();
  const auto gd = dy.dimensions();
  if (yd.size() != 2 || gd.size() != 2 || gd[1] != yd[1])
    return ffi::Error::InvalidArgument("jmoe combine_grad: ys [N, D] and dy [T, D]");
  const int64_t n = yd[0], d = yd[1], t = gd[0];
  if (token.element_count() != static_cast<size_t>(n) ||
      weight.element_count() != static_cast<size_t>(n) ||
      dys->element_count() != static_cast<size_t>(n * d) ||
      dw->element_count() != static_cast<size_t>(n))
    return ffi::Error::InvalidArgument("jmoe combine_grad: token, weight, d w [N], d ys [N, D]");
  const int32_t* tok = token.typed_data();
  for (int64_t r = 0; r < n; ++r)
    if (tok[r] < 0 || tok[r] >= t)
      return ffi::Error::InvalidArgument("jmoe combine_grad: token index out of [0, T)");
  const float* y = ys.typed_data();
  const float* g = dy.typed_data();
  const float* w = weight.typed_data();
  float* out_ys = dys->typed_data();
  float* out_w = dw->typed_data();
  const int64_t items = (n + kRowsPerItem - 1) / kRowsPerItem;
  jmoe::ParallelFor(pool, items, [&](int64_t item, int64_t) {
    const int64_t r1 = std::min(n, (item + 1) * kRowsPerItem);
    for (int64_t r = item * kRowsPerItem; r < r1; ++r)
      CombineGradRow(y + r * d, g + tok[r] * d, w[r], d, out_ys + r * d, out_w + r);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JmoeCombineGradF32, CombineGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
