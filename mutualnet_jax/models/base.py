"""What every slimmable backbone shares: its settings, width/resolution checks and stride placement."""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mutualnet_jax import slim
from mutualnet_jax.errors import UserError


class SlimmableModel(nn.Module):
  """Base settings. `width` is a static call argument in (0, max_width]; parameters exist at `max_width`.

  num_downsample: how many of the backbone's stride-2 layers keep stride 2 (the earliest ones become stride 1), so
    28-32 px inputs (Fashion-MNIST, CIFAR) keep useful spatial size; 5 is the ImageNet definition.
  bn_groups: BN statistics are computed per group of the batch (one group per device = per-device BN); 1 = the
    whole global batch (synchronised BN).
  """
  num_classes: int = 1000
  max_width: float = 1.0
  num_downsample: int = 5
  conv_impl: str = 'auto'
  bn_groups: int = 1
  dtype: Any = jnp.float32

  def stride_schedule(self, strides: Sequence[int]) -> list[int]:
    """Turns the first stride-2 layers into stride 1 until `num_downsample` remain."""
    total = sum(s == 2 for s in strides)
    if not 0 <= self.num_downsample <= total:
      raise UserError(f'model.num_downsample must be in [0, {total}] for {type(self).__name__}, '
                      f'got {self.num_downsample}.')
    drop, out = total - self.num_downsample, []
    for s in strides:
      if s == 2 and drop:
        s, drop = 1, drop - 1
      out.append(s)
    return out

  @property
  def min_resolution(self) -> int:
    return 2 ** self.num_downsample

  def prepare(self, x: jax.Array, width: float | None) -> tuple[jax.Array, float, str]:
    """Validates (width, input) and returns the input in the compute dtype, the width and the kernel path."""
    width = slim.check_width(self.max_width if width is None else width, self.max_width)
    if self.is_initializing() and abs(width - self.max_width) > 1e-6:
      raise ValueError('initialise a slimmable model at its maximum width, so parameters get their full shape.')
    if x.ndim != 4:
      raise UserError(f'expected images shaped (batch, height, width, channels), got {x.shape}.')
    if min(x.shape[1:3]) < self.min_resolution:
      raise UserError(f'resolution {x.shape[1]}x{x.shape[2]} is too small for {type(self).__name__} with '
                      f'{self.num_downsample} stride-2 layers: use at least {self.min_resolution} px '
                      '(or lower model.num_downsample).')
    return x.astype(self.dtype), width, slim.resolve_conv_impl(self.conv_impl)

  def channels(self, base: int, width: float) -> int:
    return slim.scaled_channels(base, width)

  def max_channels(self, base: int) -> int:
    return slim.scaled_channels(base, self.max_width)

  def conv_bn(self, base: int, base_in: int | None, impl: str, **kwargs: Any) -> slim.ConvBN:
    """A ConvBN holding `base_in` -> `base` channels (1.0x counts) at max width; base_in=None: not slimmed."""
    in_features = None if base_in is None else self.max_channels(base_in)
    return slim.ConvBN(self.max_channels(base), in_features, conv_impl=impl, bn_groups=self.bn_groups,
                       dtype=self.dtype, **kwargs)

  def classify(self, x: jax.Array, in_features: int) -> jax.Array:
    """Global average pooling + the class outputs (never slimmed), in float32 for the losses."""
    x = slim.GlobalAvgPool(name='pool')(x)
    return slim.SlimDense(self.num_classes, in_features, self.dtype, name='classifier')(x).astype(jnp.float32)
