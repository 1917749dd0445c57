"""MobileNet v2 (Sandler et al. 2018), the ImageNet definition used by US-Net and MutualNet.

Inverted-residual blocks slim (expanded width = make_divisible(in * w) * t, official rule); the final 1280-channel
conv, its BN and the classifier stay at full width (make_divisible(1280 * max_width) above 1.0x).
1.0x at 224 px: 300.84 M multiply-adds, 3.47 M parameters.
"""
from __future__ import annotations

import flax.linen as nn
import jax

from mutualnet_jax import slim
from mutualnet_jax.models.base import SlimmableModel

STEM = 32
LAST = 1280
# (expansion t, output channels c, repeats n, first stride s), as in the paper's Table 2.
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
          (6, 320, 1, 1))


def _blocks() -> list[tuple[int, int, int]]:
  """(expansion, output channels, stride) of every inverted-residual block."""
  return [(t, c, s if r == 0 else 1) for t, c, n, s in STAGES for r in range(n)]


class MobileNetV2(SlimmableModel):

  def channel_bases(self) -> tuple[int, ...]:
    return tuple(sorted({STEM, *(c for _, c, _, _ in STAGES)}))

  def layer_strides(self) -> list[int]:
    return [2] + [s for _, _, s in _blocks()]  # the stem, then each inverted-residual block

  @nn.compact
  def __call__(self, x: jax.Array, width: float | None = None, train: bool = False,
               active: jax.Array | None = None) -> jax.Array:
    x, width, impl = self.prepare(x, width, active)
    blocks = _blocks()
    stem_stride, *strides = self.stride_schedule(self.layer_strides())
    taps = self.feature_taps()  # the stride-32 level is the last block (320 channels, slimmed), not the 1280 conv
    used = self.active(STEM, active)
    x = self.conv_bn(STEM, None, impl, kernel_size=3, strides=stem_stride, name='stem')(
        x, self.channels(STEM, width), train, used)
    cin = STEM
    for i, ((t, c, _), s) in enumerate(zip(blocks, strides)):
      shortcut, expanded = x, None if used is None else used * t  # expansion: t x the input's channels (official)
      if t != 1:
        x = self.conv_bn(cin * t, cin, impl, name=f'block{i}_expand')(x, shortcut.shape[-1] * t, train, expanded)
      x = self.conv_bn(cin * t, cin * t, impl, kernel_size=3, strides=s, depthwise=True, name=f'block{i}_dw')(
          x, None, train, expanded)
      used = self.active(c, active)
      x = self.conv_bn(c, cin * t, impl, relu=False, name=f'block{i}_project')(
          x, self.channels(c, width), train, used)
      if s == 1 and cin == c:
        x = x + shortcut
      x = self.tap(taps, i + 1, x)
      cin = c
    last = slim.make_divisible(LAST * self.max_width) if self.max_width > 1.0 else LAST
    x = self.unit(last, self.max_channels(cin), impl, name='last')(x, last, train)
    return self.classify(x, last)
