"""A 5-layer slimmable ConvNet (MobileNet v1's building blocks, 3 stages) that compiles in about a second.

For smoke tests, CI and trying the pipeline end to end: everything that works on a MobileNet works on it, since it
uses the same layers and slicing rules, at a fraction of XLA:CPU's compile time.
"""
from __future__ import annotations

import flax.linen as nn
import jax

from mutualnet_jax.models.base import SlimmableModel

STEM = 16
BLOCKS = ((32, 2), (64, 2))


class TinyConvNet(SlimmableModel):
  num_downsample: int = 3

  @nn.compact
  def __call__(self, x: jax.Array, width: float | None = None, train: bool = False) -> jax.Array:
    x, width, impl = self.prepare(x, width)
    stem_stride, *strides = self.stride_schedule([2] + [s for _, s in BLOCKS])
    x = self.conv_bn(STEM, None, impl, kernel_size=3, strides=stem_stride, name='stem')(
        x, self.channels(STEM, width), train)
    cin = STEM
    for i, ((c, _), s) in enumerate(zip(BLOCKS, strides)):
      x = self.conv_bn(cin, cin, impl, kernel_size=3, strides=s, depthwise=True, name=f'block{i}_dw')(
          x, None, train)
      x = self.conv_bn(c, cin, impl, name=f'block{i}_pw')(x, self.channels(c, width), train)
      cin = c
    return self.classify(x, self.max_channels(cin))
