// The per-channel map out = clamp(in * mul + shift, lo, hi) over one row of channels, shared by the BN kernel (the
// normalisation) and the depthwise kernel's inference epilogue (BN folded on the host).
#ifndef MUTUALNET_JAX_CSRC_AFFINE_H_
#define MUTUALNET_JAX_CSRC_AFFINE_H_

#include <cstdint>
#include <limits>

namespace mutualnet {

// [lo, hi] of the activation: ReLU6's, or the whole line.
struct Clamp {
  float lo, hi;
  static Clamp Of(bool relu6) {
    return relu6 ? Clamp{0.0f, 6.0f}
                 : Clamp{-std::numeric_limits<float>::infinity(), std::numeric_limits<float>::infinity()};
  }
};

// `in` may be `out` (each element is read, then written): they carry no __restrict.
inline void AffineRow(const float* in, float* out, int64_t c, const float* __restrict mul,
                      const float* __restrict shift, Clamp clamp) {
#pragma omp simd
  for (int64_t ch = 0; ch < c; ++ch) {
    // Comparisons written so that NaN propagates, as jnp.clip does (a NaN must reach the loss: the divergence guard
    // reads it there).
    const float z = in[ch] * mul[ch] + shift[ch];
    const float floored = z < clamp.lo ? clamp.lo : z;
    out[ch] = floored > clamp.hi ? clamp.hi : floored;
  }
}

}  // namespace mutualnet

#endif  // MUTUALNET_JAX_CSRC_AFFINE_H_
