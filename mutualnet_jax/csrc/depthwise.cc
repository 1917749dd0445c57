// Depthwise KxK convolution (NHWC, float32, symmetric padding (K-1)/2, any stride, K in 1/3/5/7) for XLA:CPU through
// the XLA FFI: the forward pass and both gradients, each one pass over its operands, split over the batch on XLA's
// intra-op thread pool.
//
// XLA:CPU fuses the pure-JAX shift-add formulation (slim.py) into loops that recompute producers per tap, the
// kernel-gradient reduction worst of all (README.md, Benchmarks: the step with and without these kernels). These
// kernels read each operand once and work on blocks of 16 (then 8, then 1) channels, compiled per K: a pixel whose
// K x K taps all read real data (the interior) takes no test per tap, and keeps its block's sum (the kernel gradient:
// its K x K sums, over a whole image) and the block's kernel vectors in registers, where a sum in memory cost a load
// and a store per tap. Border pixels, and the input gradient at strides above 1, take a per-pixel loop over the valid
// taps. Every sum adds the same terms in the same order on either path (taps row-major; images, then pixels, in
// order), so the bits do not depend on the path.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "affine.h"
#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using mutualnet::ParallelFor;

namespace {

struct Geometry {
  int64_t n, h, w, c;     // input
  int64_t ho, wo;         // output
  int64_t k, stride, pad;
};

template <int B>
using Block = std::integral_constant<int, B>;

// f(Block<B>(), c0) over the channel blocks [c0, c0 + B) that tile [0, c): 16 wide while they fit, then 8, then 1.
template <typename F>
void ForEachBlock(int64_t c, F&& f) {
  int64_t c0 = 0;
  for (; c0 + 16 <= c; c0 += 16) f(Block<16>(), c0);
  if (c0 + 8 <= c) {
    f(Block<8>(), c0);
    c0 += 8;
  }
  for (; c0 < c; ++c0) f(Block<1>(), c0);
}

inline void Fma(float* __restrict acc, const float* __restrict x, const float* __restrict k, int64_t c) {
#pragma omp simd
  for (int64_t i = 0; i < c; ++i) acc[i] += x[i] * k[i];
}

// y[n, oh, ow, :] = sum_{i, j} k[i, j, :] * x[n, oh*s + i - p, ow*s + j - p, :], for one output pixel (any K; the
// path of pixels whose taps read padding).
void ForwardPixel(const Geometry& g, const float* x, const float* k, float* y, int64_t n, int64_t oh, int64_t ow) {
  const int64_t c = g.c;
  float* out = y + ((n * g.ho + oh) * g.wo + ow) * c;
  std::memset(out, 0, sizeof(float) * c);
  for (int64_t i = 0; i < g.k; ++i) {
    const int64_t ih = oh * g.stride + i - g.pad;
    if (ih < 0 || ih >= g.h) continue;
    for (int64_t j = 0; j < g.k; ++j) {
      const int64_t iw = ow * g.stride + j - g.pad;
      if (iw < 0 || iw >= g.w) continue;
      Fma(out, x + ((n * g.h + ih) * g.w + iw) * c, k + (i * g.k + j) * c, c);
    }
  }
}

// dx[n, h, w, :] = sum over taps (i, j) with (h + p - i) and (w + p - j) on the output grid of k[i, j, :] * dy[...],
// for one input pixel (any K and stride).
void BackwardInputPixel(const Geometry& g, const float* dy, const float* k, float* dx, int64_t n, int64_t h,
                        int64_t w) {
  const int64_t c = g.c;
  float* out = dx + ((n * g.h + h) * g.w + w) * c;
  std::memset(out, 0, sizeof(float) * c);
  for (int64_t i = 0; i < g.k; ++i) {
    const int64_t th = h + g.pad - i;
    if (th < 0 || th % g.stride) continue;
    const int64_t oh = th / g.stride;
    if (oh >= g.ho) continue;
    for (int64_t j = 0; j < g.k; ++j) {
      const int64_t tw = w + g.pad - j;
      if (tw < 0 || tw % g.stride) continue;
      const int64_t ow = tw / g.stride;
      if (ow >= g.wo) continue;
      Fma(out, dy + ((n * g.ho + oh) * g.wo + ow) * c, k + (i * g.k + j) * c, c);
    }
  }
}

// `count` pixels of one row whose K x K taps all read real data: dst[q, c0:c0+B] = sum over taps t = (i, j) in
// row-major order of src[q * step + i * row + j * col + b] * k[t, c0 + b] (`src` and `kernel` start at channel c0),
// with the block's K x K kernel vectors and its sum held in registers. The same terms in the same order as the
// per-pixel path: the same bits.
template <int K, int B>
void InteriorRow(const float* src, int64_t step, int64_t row, int64_t col, const float* kernel, int64_t c,
                 float* dst, int64_t count) {
  float kr[K * K][B];
  for (int t = 0; t < K * K; ++t) {
    for (int b = 0; b < B; ++b) kr[t][b] = kernel[t * c + b];
  }
  for (int64_t q = 0; q < count; ++q, src += step, dst += c) {
    float acc[B] = {};
#pragma GCC unroll 49
    for (int t = 0; t < K * K; ++t) {
      const float* __restrict tap = src + (t / K) * row + (t % K) * col;
#pragma omp simd
      for (int b = 0; b < B; ++b) acc[b] += tap[b] * kr[t][b];
    }
    for (int b = 0; b < B; ++b) dst[b] = acc[b];
  }
}

// [first, last) of the positions along one axis whose K taps at `origin(q) = q * stride + offset` all fall in
// [0, size); first == last when none does.
inline void Interior(int64_t count, int64_t stride, int64_t offset, int64_t k, int64_t size, int64_t* first,
                     int64_t* last) {
  *first = std::min(count, offset >= 0 ? 0 : (-offset + stride - 1) / stride);
  const int64_t top = size - k - offset;  // origin(q) <= size - k
  *last = std::max(*first, std::min(count, top < 0 ? 0 : top / stride + 1));
}

// The forward pass over images [n0, n1): interior pixels in registers (InteriorRow), the border per pixel.
template <int K>
void Forward(const Geometry& g, const float* x, const float* k, float* y, int64_t n0, int64_t n1) {
  const int64_t c = g.c;
  int64_t oh0, oh1, ow0, ow1;
  Interior(g.ho, g.stride, -g.pad, K, g.h, &oh0, &oh1);
  Interior(g.wo, g.stride, -g.pad, K, g.w, &ow0, &ow1);
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t oh = 0; oh < g.ho; ++oh) {
      const bool row_inside = oh >= oh0 && oh < oh1;
      for (int64_t ow = 0; ow < g.wo; ++ow) {
        if (!row_inside || ow < ow0 || ow >= ow1) ForwardPixel(g, x, k, y, n, oh, ow);
      }
      if (!row_inside || ow1 == ow0) continue;
      const float* src = x + ((n * g.h + oh * g.stride - g.pad) * g.w + ow0 * g.stride - g.pad) * c;
      float* dst = y + ((n * g.ho + oh) * g.wo + ow0) * c;
      ForEachBlock(c, [&](auto block, int64_t c0) {
        InteriorRow<K, decltype(block)::value>(src + c0, g.stride * c, g.w * c, c, k + c0, c, dst + c0, ow1 - ow0);
      });
    }
  }
}

// The input gradient over images [n0, n1). At stride 1 it is a correlation of dy with the flipped kernel: interior
// pixels in registers, tap (i, j) at dy[h + p - i, w + p - j]; other strides (and the border) per pixel.
template <int K>
void BackwardInput(const Geometry& g, const float* dy, const float* k, float* dx, int64_t n0, int64_t n1) {
  const int64_t c = g.c;
  int64_t h0 = 0, h1 = 0, w0 = 0, w1 = 0;
  if (g.stride == 1) {  // origin = q + p - (K - 1): the lowest output row/column a pixel's taps read
    Interior(g.h, 1, g.pad - (K - 1), K, g.ho, &h0, &h1);
    Interior(g.w, 1, g.pad - (K - 1), K, g.wo, &w0, &w1);
  }
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t h = 0; h < g.h; ++h) {
      const bool row_inside = h >= h0 && h < h1;
      for (int64_t w = 0; w < g.w; ++w) {
        if (!row_inside || w < w0 || w >= w1) BackwardInputPixel(g, dy, k, dx, n, h, w);
      }
      if (!row_inside || w1 == w0) continue;
      const float* src = dy + ((n * g.ho + h + g.pad) * g.wo + w0 + g.pad) * c;
      float* dst = dx + ((n * g.h + h) * g.w + w0) * c;
      ForEachBlock(c, [&](auto block, int64_t c0) {
        InteriorRow<K, decltype(block)::value>(src + c0, c, -g.wo * c, -c, k + c0, c, dst + c0, w1 - w0);
      });
    }
  }
}

// The taps [lo, hi) of one axis that read the input (not padding) for the output position `o`.
inline void TapRange(int64_t o, const Geometry& g, int64_t size, int64_t* lo, int64_t* hi) {
  const int64_t first = o * g.stride - g.pad;
  *lo = std::max<int64_t>(0, -first);
  *hi = std::min<int64_t>(g.k, size - first);
}

// dk[i, j, :] += sum_{n, oh, ow} x[n, oh*s + i - p, ow*s + j - p, :] * dy[n, oh, ow, :] (into a private accumulator);
// a block's K x K sums stay in registers over one image.
template <int K>
void BackwardKernel(const Geometry& g, const float* x, const float* dy, float* dk, int64_t n0, int64_t n1) {
  const int64_t c = g.c;
  for (int64_t n = n0; n < n1; ++n) {
    ForEachBlock(c, [&](auto block, int64_t c0) {
      constexpr int B = decltype(block)::value;
      float acc[K * K][B];
      for (int t = 0; t < K * K; ++t) {
        for (int b = 0; b < B; ++b) acc[t][b] = dk[t * c + c0 + b];
      }
      for (int64_t oh = 0; oh < g.ho; ++oh) {
        int64_t i0, i1;
        TapRange(oh, g, g.h, &i0, &i1);
        const int64_t ih = oh * g.stride - g.pad;
        for (int64_t ow = 0; ow < g.wo; ++ow) {
          int64_t j0, j1;
          TapRange(ow, g, g.w, &j0, &j1);
          const int64_t iw = ow * g.stride - g.pad;
          const float* __restrict grad = dy + ((n * g.ho + oh) * g.wo + ow) * c + c0;
          if (i0 == 0 && i1 == K && j0 == 0 && j1 == K) {  // every tap reads real data: no tests per tap
            const float* origin = x + ((n * g.h + ih) * g.w + iw) * c + c0;
#pragma GCC unroll 49
            for (int t = 0; t < K * K; ++t) {
              const float* __restrict xp = origin + ((t / K) * g.w + t % K) * c;
#pragma omp simd
              for (int b = 0; b < B; ++b) acc[t][b] += xp[b] * grad[b];
            }
            continue;
          }
#pragma GCC unroll 8
          for (int i = 0; i < K; ++i) {
            if (i < i0 || i >= i1) continue;
#pragma GCC unroll 8
            for (int j = 0; j < K; ++j) {
              if (j < j0 || j >= j1) continue;
              const float* __restrict xp = x + ((n * g.h + ih + i) * g.w + iw + j) * c + c0;
#pragma omp simd
              for (int b = 0; b < B; ++b) acc[i * K + j][b] += xp[b] * grad[b];
            }
          }
        }
      }
      for (int t = 0; t < K * K; ++t) {
        for (int b = 0; b < B; ++b) dk[t * c + c0 + b] = acc[t][b];
      }
    });
  }
}

// f(std::integral_constant<int, K>()) for the kernel sizes compiled here; false for any other.
template <typename F>
bool WithKernelSize(int64_t k, F&& f) {
  switch (k) {
    case 1: f(std::integral_constant<int, 1>()); return true;
    case 3: f(std::integral_constant<int, 3>()); return true;
    case 5: f(std::integral_constant<int, 5>()); return true;
    case 7: f(std::integral_constant<int, 7>()); return true;
    default: return false;
  }
}

ffi::Error UnsupportedKernel(int64_t k) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                    "native depthwise kernels take kernel sizes 1, 3, 5 or 7, not " + std::to_string(k));
}

Geometry MakeGeometry(ffi::Span<const int64_t> in, ffi::Span<const int64_t> out, int64_t k, int64_t stride) {
  return Geometry{in[0], in[1], in[2], in[3], out[1], out[2], k, stride, (k - 1) / 2};
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                       ffi::ResultBuffer<ffi::F32> y, int64_t stride) {
  const Geometry g = MakeGeometry(x.dimensions(), y->dimensions(), kernel.dimensions()[0], stride);
  const float* xp = x.typed_data();
  const float* kp = kernel.typed_data();
  float* yp = y->typed_data();
  const bool known = WithKernelSize(g.k, [&](auto size) {
    ParallelFor(pool, g.n, [&](int64_t a, int64_t b) { Forward<decltype(size)::value>(g, xp, kp, yp, a, b); });
  });
  return known ? ffi::Error::Success() : UnsupportedKernel(g.k);
}

// y = act(depthwise(x) * mul + shift) per output channel: inference with BN folded on the host, ReLU6 when `relu6`,
// zero from channel `active` on.
// The map runs on each image's output right after it is computed, while it is still in cache: one call, no second
// pass through memory (and, in a compiled network, no separate kernel per layer to compile).
ffi::Error ForwardAffineImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                             ffi::Buffer<ffi::F32> mul, ffi::Buffer<ffi::F32> shift, ffi::Buffer<ffi::S32> active,
                             ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t relu6) {
  const Geometry g = MakeGeometry(x.dimensions(), y->dimensions(), kernel.dimensions()[0], stride);
  const float* xp = x.typed_data();
  const float* kp = kernel.typed_data();
  // Channels at and beyond `active` (a capacity program's run-time width) output zero, as keep_active does.
  const int64_t used = std::clamp<int64_t>(active.typed_data()[0], 0, g.c);
  std::vector<float> mul_used(mul.typed_data(), mul.typed_data() + used), shift_used(shift.typed_data(),
                                                                                     shift.typed_data() + used);
  mul_used.resize(g.c, 0.0f);
  shift_used.resize(g.c, 0.0f);
  const float* mulp = mul_used.data();
  const float* shiftp = shift_used.data();
  float* yp = y->typed_data();
  const mutualnet::Clamp clamp = mutualnet::Clamp::Of(relu6 != 0);
  const int64_t pixels = g.ho * g.wo;
  const bool known = WithKernelSize(g.k, [&](auto size) {
    ParallelFor(pool, g.n, [&](int64_t a, int64_t b) {
      for (int64_t n = a; n < b; ++n) {
        Forward<decltype(size)::value>(g, xp, kp, yp, n, n + 1);
        for (float* row = yp + n * pixels * g.c; row < yp + (n + 1) * pixels * g.c; row += g.c) {
          mutualnet::AffineRow(row, row, g.c, mulp, shiftp, clamp);
        }
      }
    });
  });
  return known ? ffi::Error::Success() : UnsupportedKernel(g.k);
}

ffi::Error BackwardInputImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> kernel,
                             ffi::ResultBuffer<ffi::F32> dx, int64_t stride) {
  const Geometry g = MakeGeometry(dx->dimensions(), dy.dimensions(), kernel.dimensions()[0], stride);
  const float* dyp = dy.typed_data();
  const float* kp = kernel.typed_data();
  float* dxp = dx->typed_data();
  const bool known = WithKernelSize(g.k, [&](auto size) {
    ParallelFor(pool, g.n, [&](int64_t a, int64_t b) { BackwardInput<decltype(size)::value>(g, dyp, kp, dxp, a, b); });
  });
  return known ? ffi::Error::Success() : UnsupportedKernel(g.k);
}

ffi::Error BackwardKernelImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                              ffi::ResultBuffer<ffi::F32> dk, int64_t stride) {
  const Geometry g = MakeGeometry(x.dimensions(), dy.dimensions(), dk->dimensions()[0], stride);
  const int64_t size = g.k * g.k * g.c;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunks = std::min<int64_t>(g.n, threads * 4);
  std::vector<float> partial(static_cast<size_t>(std::max<int64_t>(chunks, 1) * size), 0.0f);
  const float* xp = x.typed_data();
  const float* dyp = dy.typed_data();
  // One accumulator per chunk (chunks are contiguous batch ranges), summed in a fixed order: deterministic.
  const bool known = WithKernelSize(g.k, [&](auto kernel_size) {
    ParallelFor(pool, std::max<int64_t>(chunks, 1), [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i) {
        BackwardKernel<decltype(kernel_size)::value>(g, xp, dyp, partial.data() + i * size, g.n * i / chunks,
                                                     g.n * (i + 1) / chunks);
      }
    });
  });
  if (!known) return UnsupportedKernel(g.k);
  float* out = dk->typed_data();
  std::memset(out, 0, sizeof(float) * size);
  for (int64_t i = 0; i < std::max<int64_t>(chunks, 1); ++i) {
    for (int64_t e = 0; e < size; ++e) out[e] += partial[i * size + e];
  }
  return ffi::Error::Success();
}

}  // namespace

// The three kernels take the same operands: two float32 buffers in, one out, the stride as an attribute.
static auto TwoInOneOut() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("stride");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MutualnetDepthwiseForward, ForwardImpl, TwoInOneOut());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MutualnetDepthwiseBackwardInput, BackwardInputImpl, TwoInOneOut());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MutualnetDepthwiseBackwardKernel, BackwardKernelImpl, TwoInOneOut());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MutualnetDepthwiseForwardAffine, ForwardAffineImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("relu6"));
