"""ResNet-50 (He et al. 2016; v1.5, stride on the 3x3 conv as in the official MutualNet code), slimmable.

Slimming follows the official MutualNet/US-Net ResNet: every stage's output (and the projection shortcut) slims as
make_divisible(c * w); the bottleneck's inner width is a quarter of its stage's slimmed output, and the stem a
quarter of the first stage's (the official `ratio=0.25` rule), so inner widths move in step with the outputs they
feed. The official code rounds to 1 channel; here the stage outputs round to 8 like every other backbone, so the
quarter counts are multiples of 2. Plain ReLU; the classifier's input slims, its outputs never.
1.0x at 224 px: 4.09 G multiply-adds, 25.50 M parameters (25.56 M with BN's scale/bias, which the count excludes).
"""
from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax

from mutualnet_jax.models.base import SlimmableModel

# (output channels at width 1.0, bottleneck blocks, stride of the first block) of the four stages.
STAGES = ((256, 3, 1), (512, 4, 2), (1024, 6, 2), (2048, 3, 2))
STEM_KERNEL = 7
EXPANSION = 4  # stage output / bottleneck inner width (and first stage output / stem width)


class ResNet50(SlimmableModel):
  """Stem (7x7 conv, 3x3 max pool), then bottleneck stages; `stages` is a class constant so depth variants (and
  small test networks) only restate it."""
  stages: ClassVar[tuple[tuple[int, int, int], ...]] = STAGES

  def channel_bases(self) -> tuple[int, ...]:
    return tuple(sorted({c for c, _, _ in self.stages}))

  def layer_strides(self) -> list[int]:
    return [2, 2] + [s if i == 0 else 1 for _, n, s in self.stages for i in range(n)]  # stem, pool, blocks

  def quarter(self, base: int, width: float) -> int:
    """Channels of a layer a quarter as wide as the stage with `base` outputs, at `width` (official ratio rule)."""
    return self.channels(base, width) // EXPANSION

  def quarter_active(self, base: int, active: jax.Array | None) -> jax.Array | None:
    used = self.active(base, active)
    return None if used is None else used // EXPANSION

  @nn.compact
  def __call__(self, x: jax.Array, width: float | None = None, train: bool = False,
               active: jax.Array | None = None) -> jax.Array:
    x, width, impl = self.prepare(x, width, active)
    stem_stride, pool_stride, *strides = self.stride_schedule(self.layer_strides())
    taps = self.feature_taps()
    first = self.stages[0][0]
    cin_max = self.max_channels(first) // EXPANSION
    # Plain ReLU after ConvBN(relu=False) (its own activation is the MobileNets' ReLU6); zeroed channels stay zero.
    x = self.unit(cin_max, None, impl, kernel_size=STEM_KERNEL, strides=stem_stride, relu=False, name='stem')(
        x, self.quarter(first, width), train, self.quarter_active(first, active))
    x = nn.relu(x)
    if pool_stride == 2:  # 3x3 max pool, padding 1 (PyTorch's MaxPool2d(3, 2, 1)); a dropped downsampling skips it
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    x = self.tap(taps, 1, x)
    index, cin = 0, None
    for stage, (c, n, s) in enumerate(self.stages):
      cout_max, used = self.max_channels(c), self.active(c, active)
      mid_max, mid_used = cout_max // EXPANSION, self.quarter_active(c, active)
      cout, mid = self.channels(c, width), self.quarter(c, width)
      for block in range(n):
        name = f'stage{stage}_block{block}'
        shortcut = x
        y = nn.relu(self.unit(mid_max, cin_max, impl, relu=False, name=f'{name}_conv1')(x, mid, train, mid_used))
        y = nn.relu(self.unit(mid_max, mid_max, impl, kernel_size=3, strides=strides[index], relu=False,
                              name=f'{name}_conv2')(y, mid, train, mid_used))
        y = self.unit(cout_max, mid_max, impl, relu=False, name=f'{name}_conv3')(y, cout, train, used)
        if block == 0 and (s != 1 or cin != c):  # the ImageNet definition decides, so num_downsample keeps the tree
          # A projection: its output carries the same run-time count as the branch it is added to.
          shortcut = self.unit(cout_max, cin_max, impl, strides=strides[index], relu=False,
                               name=f'{name}_shortcut')(shortcut, cout, train, used)
        x = self.tap(taps, index + 2, nn.relu(y + shortcut))
        index, cin, cin_max = index + 1, c, cout_max
    return self.classify(x, cin_max)
