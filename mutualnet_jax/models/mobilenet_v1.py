"""MobileNet v1 (Howard et al. 2017), the ImageNet definition used by US-Net and MutualNet.

Every layer slims, including the last 1024-channel block and the classifier's input (official rule).
1.0x at 224 px: 568.79 M multiply-adds, 4.21 M parameters.
"""
from __future__ import annotations

import flax.linen as nn
import jax

from mutualnet_jax.models.base import SlimmableModel

STEM = 32
# (output channels at width 1.0, stride) of the 13 depthwise-separable blocks.
BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
          (512, 1), (1024, 2), (1024, 1))


class MobileNetV1(SlimmableModel):

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
