// Training-mode batch norm fused with its activation and the capacity path's channel mask (NHWC, float32, statistics
// over batch x height x width) for XLA:CPU through the XLA FFI: the forward pass and its gradient, two passes over
// memory each.
//
// XLA:CPU runs the same layer as a handful of separate kernels (two statistics reductions, per-channel scale and
// shift, the normalise + ReLU6 + mask pass; backward two more reductions and a pass), each with its own dispatch and
// trip through memory; at 28 px the tensors are small and that per-kernel cost dominates. Here one kernel reduces
// the statistics (in double, per fixed chunk of rows, summed in a fixed order: deterministic for any thread count)
// and one writes the output.
//
// Channels at and beyond `active` (a run-time count) output zero and get zero gradient, as keep_active does;
// their statistics are still computed, as the unfused layer's are.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "affine.h"
#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using mutualnet::ParallelFor;

namespace {

constexpr int64_t kChunks = 16;  // row chunks of the reductions: fixed, so the summation order is too

struct Layout {
  int64_t rows, c, active;
  bool relu6;
};

Layout MakeLayout(ffi::Span<const int64_t> dims, const ffi::Buffer<ffi::S32>& active, int64_t relu6) {
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) rows *= dims[i];
  const int64_t c = dims.size() == 0 ? 1 : dims.back();
  const int64_t a = std::clamp<int64_t>(active.typed_data()[0], 0, c);
  return Layout{rows, c, a, relu6 != 0};
}

// Runs reduce(row0, row1, acc) on kChunks fixed row ranges, each into its own zeroed accumulator of `width` doubles,
// and returns their sum in chunk order.
template <typename Reduce>
std::vector<double> ChunkedSum(ffi::ThreadPool& pool, int64_t rows, int64_t width, Reduce reduce) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(rows, kChunks));
  std::vector<double> partial(static_cast<size_t>(chunks * width), 0.0);
  ParallelFor(pool, chunks, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) reduce(rows * i / chunks, rows * (i + 1) / chunks, partial.data() + i * width);
  });
  std::vector<double> total(static_cast<size_t>(width), 0.0);
  for (int64_t i = 0; i < chunks; ++i) {
    for (int64_t e = 0; e < width; ++e) total[e] += partial[i * width + e];
  }
  return total;
}

// The per-channel affine map of the normalisation, y = x * mul + shift with mul = scale * rstd, computed as the
// unfused layer does (float).
struct Affine {
  std::vector<float> rstd, mul, shift;

  Affine(int64_t c, const float* mean, const float* var, const float* scale, const float* bias, float eps)
      : rstd(c), mul(c), shift(c) {
    for (int64_t ch = 0; ch < c; ++ch) {
      rstd[ch] = 1.0f / std::sqrt(var[ch] + eps);
      mul[ch] = scale[ch] * rstd[ch];
      shift[ch] = bias[ch] - mean[ch] * mul[ch];
    }
  }
};

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                       ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::S32> active, ffi::ResultBuffer<ffi::F32> y,
                       ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> var, int64_t relu6,
                       float eps) {
  const Layout l = MakeLayout(x.dimensions(), active, relu6);
  const float* xp = x.typed_data();
  const int64_t c = l.c;
  const std::vector<double> sums = ChunkedSum(pool, l.rows, 2 * c, [&](int64_t r0, int64_t r1, double* acc) {
    double* __restrict sum = acc;
    double* __restrict squares = acc + c;
    for (int64_t r = r0; r < r1; ++r) {
      const float* __restrict row = xp + r * c;
#pragma omp simd
      for (int64_t ch = 0; ch < c; ++ch) {
        const double v = row[ch];
        sum[ch] += v;
        squares[ch] += v * v;
      }
    }
  });
  float* mp = mean->typed_data();
  float* vp = var->typed_data();
  const double n = static_cast<double>(std::max<int64_t>(l.rows, 1));
  for (int64_t ch = 0; ch < c; ++ch) {
    const double m = sums[ch] / n;
    mp[ch] = static_cast<float>(m);
    vp[ch] = static_cast<float>(std::max(sums[c + ch] / n - m * m, 0.0));
  }
  Affine affine(c, mp, vp, scale.typed_data(), bias.typed_data(), eps);
  std::fill(affine.mul.begin() + l.active, affine.mul.end(), 0.0f);  // inactive channels: 0 (ReLU6 keeps 0)
  std::fill(affine.shift.begin() + l.active, affine.shift.end(), 0.0f);
  float* yp = y->typed_data();
  const float* mulp = affine.mul.data();
  const float* shiftp = affine.shift.data();
  const mutualnet::Clamp clamp = mutualnet::Clamp::Of(l.relu6);
  ParallelFor(pool, l.rows, [=](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) mutualnet::AffineRow(xp + r * c, yp + r * c, c, mulp, shiftp, clamp);
  });
  return ffi::Error::Success();
}

// dy where the activation passes, 0 where ReLU6 clips (z = the normalised value). A multiply by a 0/1 mask, not a
// branch: the clip pattern of real activations is random, and a branch mispredicts on it.
template <bool kRelu6>
inline float Passed(float z, float g) {
  return kRelu6 ? g * static_cast<float>((z > 0.0f) & (z < 6.0f)) : g;
}

// Gradient of (y, mean, var) = forward(x, scale, bias) for cotangents (dy, dmean, dvar). With g = dy where the
// activation passes (and the channel is active), xhat = (x - mean) * rstd and R rows:
//   dbias = sum g, dscale = sum g * xhat,
//   dx = scale * rstd * (g - dbias / R - xhat * dscale / R) + dmean / R + dvar * 2 (x - mean) / R.
template <bool kRelu6>
void Backward(ffi::ThreadPool& pool, const Layout& l, const float* dyp, const float* xp, const float* mp,
              const float* vp, const float* scale, const float* bias, const float* dmean, const float* dvar,
              float eps, float* dxp, float* dsp, float* dbp) {
  const int64_t c = l.c, a = l.active;
  const Affine affine(c, mp, vp, scale, bias, eps);
  const float* mulp = affine.mul.data();
  const float* shiftp = affine.shift.data();
  const float* rstdp = affine.rstd.data();
  const std::vector<double> sums = ChunkedSum(pool, l.rows, 2 * a, [&](int64_t r0, int64_t r1, double* acc) {
    double* __restrict sg = acc;
    double* __restrict sgx = acc + a;
    for (int64_t r = r0; r < r1; ++r) {
      const float* __restrict xr = xp + r * c;
      const float* __restrict gr = dyp + r * c;
#pragma omp simd
      for (int64_t ch = 0; ch < a; ++ch) {
        const double g = Passed<kRelu6>(xr[ch] * mulp[ch] + shiftp[ch], gr[ch]);
        sg[ch] += g;
        sgx[ch] += g * static_cast<double>((xr[ch] - mp[ch]) * rstdp[ch]);
      }
    }
  });
  const float inv_n = 1.0f / static_cast<float>(std::max<int64_t>(l.rows, 1));
  std::vector<float> g_mean(c, 0.0f), gx_mean(c, 0.0f), m_term(c), v_term(c);
  for (int64_t ch = 0; ch < c; ++ch) {
    dbp[ch] = ch < a ? static_cast<float>(sums[ch]) : 0.0f;
    dsp[ch] = ch < a ? static_cast<float>(sums[a + ch]) : 0.0f;
    g_mean[ch] = dbp[ch] * inv_n;
    gx_mean[ch] = dsp[ch] * inv_n * rstdp[ch];
    m_term[ch] = dmean[ch] * inv_n;
    v_term[ch] = 2.0f * dvar[ch] * inv_n;
  }
  const float* gm = g_mean.data();
  const float* gxm = gx_mean.data();
  const float* mt = m_term.data();
  const float* vt = v_term.data();
  ParallelFor(pool, l.rows, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* __restrict xr = xp + r * c;
      const float* __restrict gr = dyp + r * c;
      float* __restrict out = dxp + r * c;
#pragma omp simd
      for (int64_t ch = 0; ch < a; ++ch) {
        const float centred = xr[ch] - mp[ch];
        const float g = Passed<kRelu6>(xr[ch] * mulp[ch] + shiftp[ch], gr[ch]);
        out[ch] = mulp[ch] * (g - gm[ch] - centred * gxm[ch]) + mt[ch] + vt[ch] * centred;
      }
#pragma omp simd
      for (int64_t ch = a; ch < c; ++ch) out[ch] = mt[ch] + vt[ch] * (xr[ch] - mp[ch]);
    }
  });
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> var, ffi::Buffer<ffi::F32> scale,
                        ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> dmean, ffi::Buffer<ffi::F32> dvar,
                        ffi::Buffer<ffi::S32> active, ffi::ResultBuffer<ffi::F32> dx,
                        ffi::ResultBuffer<ffi::F32> dscale, ffi::ResultBuffer<ffi::F32> dbias, int64_t relu6,
                        float eps) {
  const Layout l = MakeLayout(x.dimensions(), active, relu6);
  auto run = l.relu6 ? Backward<true> : Backward<false>;
  run(pool, l, dy.typed_data(), x.typed_data(), mean.typed_data(), var.typed_data(), scale.typed_data(),
      bias.typed_data(), dmean.typed_data(), dvar.typed_data(), eps, dx->typed_data(), dscale->typed_data(),
      dbias->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MutualnetBatchNormForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::S32>>()  // active channels (scalar)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // mean
                                  .Ret<ffi::Buffer<ffi::F32>>()  // biased variance
                                  .Attr<int64_t>("relu6")
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MutualnetBatchNormBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // var
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dmean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dvar
                                  .Arg<ffi::Buffer<ffi::S32>>()  // active channels (scalar)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dscale
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dbias
                                  .Attr<int64_t>("relu6")
                                  .Attr<float>("eps"));
