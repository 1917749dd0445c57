"""VGG-16 (Simonyan & Zisserman 2015, configuration D) with batch norm, slimmable: the detection backbone (SSD).

Every conv slims (make_divisible(c * w)); batch norm follows each conv because slimmable widths need their own
statistics (the library's BN is calibrated per configuration). Two heads:
- 'fc': adaptive average pooling to `head_pool` x `head_pool` (7 at 224 px, as torchvision), then fc6/fc7 of
  `fc_features` units (both slim) and the classifier. The pooled map is flattened channel-major (PyTorch's NCHW
  order), so a narrower width's input to fc6 is a leading block of fc6's rows, which is what a slice can take.
  No dropout (training steps carry no random key); the official recipe's 0.5 is regularisation, not architecture.
- 'pool': global average pooling and the classifier, for detection/segmentation or small inputs.
1.0x at 224 px with the 'fc' head: 15.47 G multiply-adds, 138.35 M parameters (138.36 M with the conv biases of the
BN-free original; BN replaces them here).
"""
from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mutualnet_jax import slim
from mutualnet_jax.errors import UserError
from mutualnet_jax.models.base import SlimmableModel

POOL = 'M'
# Output channels of the 3x3 convs at width 1.0, 'M' = 2x2 max pool, stride 2 (configuration D).
LAYERS = (64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512, POOL)
HEADS = ('fc', 'pool')


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
  """PyTorch's AdaptiveAvgPool2d(size) on NHWC: output cell i averages input rows floor(i*H/size) to
  ceil((i+1)*H/size) (cells overlap or repeat when H < size); an identity when H = W = size."""
  if x.shape[1:3] == (size, size):
    return x

  def weights(n: int) -> np.ndarray:
    w = np.zeros((size, n), np.float32)
    for i in range(size):
      lo, hi = (i * n) // size, -(-((i + 1) * n) // size)
      w[i, lo:hi] = 1.0 / (hi - lo)
    return w

  return jnp.einsum('ih,jw,nhwc->nijc', weights(x.shape[1]).astype(x.dtype), weights(x.shape[2]).astype(x.dtype), x)


class VGG16(SlimmableModel):
  """head: 'fc' (fc6, fc7, classifier) or 'pool' (global average pooling, classifier); fc_features: fc6/fc7 units
  at width 1.0; head_pool: the grid the 'fc' head pools to (7 = ImageNet; 1 suits 32 px inputs)."""
  layers: ClassVar[tuple[int | str, ...]] = LAYERS
  head: str = 'fc'
  fc_features: int = 4096
  head_pool: int = 7

  def channel_bases(self) -> tuple[int, ...]:
    convs = {c for c in self.layers if c != POOL}
    return tuple(sorted(convs | ({self.fc_features} if self.head == 'fc' else set())))

  def layer_strides(self) -> list[int]:
    return [2 if c == POOL else 1 for c in self.layers]

  @nn.compact
  def __call__(self, x: jax.Array, width: float | None = None, train: bool = False,
               active: jax.Array | None = None) -> jax.Array:
    if self.head not in HEADS:
      raise UserError(f'model.head must be one of {HEADS} for vgg16, got {self.head!r}.')
    x, width, impl = self.prepare(x, width, active)
    taps = self.feature_taps()
    cin, conv = None, 0
    for i, (c, s) in enumerate(zip(self.layers, self.stride_schedule(self.layer_strides()))):
      if c == POOL:
        if s == 2:  # a dropped downsampling (num_downsample < 5) skips its pool
          x = nn.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')
      else:
        x = nn.relu(self.conv_bn(c, cin, impl, kernel_size=3, relu=False, name=f'conv{conv}')(  # ReLU, not ReLU6
            x, self.channels(c, width), train, self.active(c, active)))
        cin, conv = c, conv + 1
      x = self.tap(taps, i, x)
    if self.head == 'pool':
      return self.classify(x, self.max_channels(cin))
    x = adaptive_avg_pool(x, self.head_pool)
    x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)  # channel-major: a width's features are a leading block
    in_max, used = self.head_pool ** 2 * self.max_channels(cin), self.active(self.fc_features, active)
    for name in ('fc6', 'fc7'):
      x = slim.SlimDense(self.max_channels(self.fc_features), in_max, self.dtype, name=name)(
          x, self.channels(self.fc_features, width))
      x, in_max = slim.keep_active(nn.relu(x), used), self.max_channels(self.fc_features)
    return self.logits(x, in_max)
