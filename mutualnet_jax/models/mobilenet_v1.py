"""MobileNet v1 (Howard et al. 2017), the ImageNet definition used by US-Net and MutualNet.

Every layer slims, including the last 1024-channel block and the classifier's input (official rule).
1.0x at 224 px: 568.79 M multiply-adds, 4.21 M parameters.
"""
from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax

from mutualnet_jax.models.base import SlimmableModel

STEM = 32
# (output channels at width 1.0, stride) of the 13 depthwise-separable blocks.
BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
          (512, 1), (1024, 2), (1024, 1))


class MobileNetV1(SlimmableModel):
  """A 3x3 stem, then depthwise-separable blocks; `stem`/`blocks` are class constants so variants only restate them."""
  stem: ClassVar[int] = STEM
  blocks: ClassVar[tuple[tuple[int, int], ...]] = BLOCKS

  def channel_bases(self) -> tuple[int, ...]:
    return tuple(sorted({self.stem, *(c for c, _ in self.blocks)}))

  def layer_strides(self) -> list[int]:
    return [2] + [s for _, s in self.blocks]  # the stem, then each block (its depthwise conv holds the stride)

  @nn.compact
  def __call__(self, x: jax.Array, width: float | None = None, train: bool = False,
               active: jax.Array | None = None) -> jax.Array:
    x, width, impl = self.prepare(x, width, active)
    stem_stride, *strides = self.stride_schedule(self.layer_strides())
    taps = self.feature_taps()
    used = self.active(self.stem, active)
    x = self.conv_bn(self.stem, None, impl, kernel_size=3, strides=stem_stride, name='stem')(
        x, self.channels(self.stem, width), train, used)
    cin = self.stem
    for i, ((c, _), s) in enumerate(zip(self.blocks, strides)):
      x = self.conv_bn(cin, cin, impl, kernel_size=3, strides=s, depthwise=True, name=f'block{i}_dw')(
          x, None, train, used)
      used = self.active(c, active)
      x = self.conv_bn(c, cin, impl, name=f'block{i}_pw')(x, self.channels(c, width), train, used)
      x = self.tap(taps, i + 1, x)
      cin = c
    return self.classify(x, self.max_channels(cin))
