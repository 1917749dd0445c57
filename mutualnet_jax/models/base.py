"""What every slimmable backbone shares: its settings, width/resolution checks, stride placement and feature taps."""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mutualnet_jax import slim
from mutualnet_jax.errors import UserError

# Feature-map levels a backbone sows into the 'features' collection (mutualnet_jax.features), named by their output
# stride in the ImageNet definition (num_downsample=5): the inputs of an FPN-style detection or segmentation head.
FEATURE_LEVELS = (8, 16, 32)
# Model settings that leave the backbone's parameters alone (the task, strides, kernels, precision, BN grouping): a
# backbone trained under other values of them loads into this one (mutualnet_jax.init_from).
NON_ARCHITECTURE_FIELDS = frozenset({'num_classes', 'num_downsample', 'conv_impl', 'fused_bn', 'bn_groups', 'dtype',
                                     'parent', 'name'})


class SlimmableModel(nn.Module):
  """Base settings. `width` is a static call argument in (0, max_width]; parameters exist at `max_width`.

  Call: `model.apply(variables, x, width=w, train=..., active=None)`. With `active` (the capacity path), `width` is a
  capacity and `active` is `channel_counts(real_width)`, an int32 array given at run time: any real width up to the
  capacity runs in the program compiled for the capacity, with the exact sub-network's result.

  num_downsample: how many of the backbone's stride-2 layers keep stride 2 (the earliest ones become stride 1), so
    28-32 px inputs (Fashion-MNIST, CIFAR) keep useful spatial size; 5 is the ImageNet definition.
  fused_bn: on the 'cpu_fast' path, training-mode BN + ReLU6 + channel mask run as one native kernel each way
    (slim.SlimBatchNorm.fused); False keeps XLA's kernels (the numerics of runs trained before it existed).
  bn_groups: BN statistics are computed per group of the batch (one group per device = per-device BN); 1 = the
    whole global batch (synchronised BN).
  """
  num_classes: int = 1000
  max_width: float = 1.0
  num_downsample: int = 5
  conv_impl: str = 'auto'
  fused_bn: bool = True
  bn_groups: int = 1
  dtype: Any = jnp.float32

  def layer_strides(self) -> list[int]:
    """Stride of every spatial layer (conv, pooling, block) in call order, as in the ImageNet definition."""
    raise NotImplementedError

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

  def feature_taps(self) -> dict[int, int]:
    """{layer index: level}: the last layer of `layer_strides` at each FEATURE_LEVELS output stride (the ImageNet
    definition's, so the same layers are tapped whatever num_downsample is); levels the backbone never reaches are
    absent."""
    last, total = {}, 1
    for i, s in enumerate(self.layer_strides()):
      total *= s
      if total in FEATURE_LEVELS:
        last[total] = i
    return {i: level for level, i in last.items()}

  def feature_strides(self) -> dict[int, int]:
    """{level: the tapped map's real output stride} under this num_downsample (the level itself at 5)."""
    strides, total, out = self.stride_schedule(self.layer_strides()), 1, {}
    taps = self.feature_taps()
    for i, s in enumerate(strides):
      total *= s
      if i in taps:
        out[taps[i]] = total
    return out

  def tap(self, taps: dict[int, int], index: int, x: jax.Array) -> jax.Array:
    """Sows layer `index`'s output as its feature level (when it is one); a no-op unless 'features' is mutable."""
    if index in taps:
      self.sow('features', f'stride{taps[index]}', x, reduce_fn=lambda _, v: v, init_fn=lambda: None)
    return x

  def prepare(self, x: jax.Array, width: float | None,
              active: jax.Array | None = None) -> tuple[jax.Array, float, str]:
    """Validates (width, input) and returns the input in the compute dtype, the width and the kernel path."""
    if active is not None and tuple(active.shape) != (len(self.channel_bases()),):
      raise ValueError(f'active must hold {len(self.channel_bases())} channel counts (model.channel_counts(width)), '
                       f'got shape {tuple(active.shape)}.')
    width = slim.check_width(self.max_width if width is None else width, self.max_width)
    if self.is_initializing() and abs(width - self.max_width) > slim.WIDTH_TOL:
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

  def channel_bases(self) -> tuple[int, ...]:
    """The width-1.0 channel counts whose slimmed sizes the model reads from `active` (every `channels` base)."""
    raise NotImplementedError

  def channel_counts(self, width: float) -> np.ndarray:
    """What `active` holds for a real width: make_divisible(base * width) per `channel_bases` entry, computed on the
    host with the exact rounding of the sliced path."""
    return np.asarray([slim.scaled_channels(b, width) for b in self.channel_bases()], np.int32)

  def check_capacity(self, width: float, capacity: float) -> None:
    """The capacity must hold every layer of the width (make_divisible is monotone, so capacity >= width does)."""
    if np.any(self.channel_counts(width) > self.channel_counts(capacity)):
      raise ValueError(f'capacity {capacity} is smaller than width {width} in some layer.')

  def active(self, base: int, active: jax.Array | None) -> jax.Array | None:
    """The run-time channel count of layers with `base` channels at width 1.0 (None on the exact path)."""
    return None if active is None else active[self.channel_bases().index(base)]

  def max_channels(self, base: int) -> int:
    return slim.scaled_channels(base, self.max_width)

  def conv_bn(self, base: int, base_in: int | None, impl: str, **kwargs: Any) -> slim.ConvBN:
    """A ConvBN holding `base_in` -> `base` channels (1.0x counts) at max width; base_in=None: not slimmed."""
    in_features = None if base_in is None else self.max_channels(base_in)
    return self.unit(self.max_channels(base), in_features, impl, **kwargs)

  def unit(self, features: int, in_features: int | None, impl: str, **kwargs: Any) -> slim.ConvBN:
    """A ConvBN holding `in_features` -> `features` channels (counts at max width, for layers whose size is not
    make_divisible of a base, e.g. ResNet's bottleneck quarter)."""
    return slim.ConvBN(features, in_features, conv_impl=impl, bn_groups=self.bn_groups, dtype=self.dtype,
                       fused_bn=self.fused_bn and impl == 'cpu_fast', **kwargs)

  def classify(self, x: jax.Array, in_features: int) -> jax.Array:
    """Global average pooling + the class outputs (never slimmed), in at least float32 for the losses."""
    return self.logits(slim.GlobalAvgPool(name='pool')(x), in_features)

  def logits(self, x: jax.Array, in_features: int) -> jax.Array:
    """The class outputs of pooled features (the 'classifier' layer fine-tuning replaces), in at least float32."""
    logits = slim.SlimDense(self.num_classes, in_features, self.dtype, name='classifier')(x)
    return logits.astype(jnp.promote_types(self.dtype, jnp.float32))


def trace_layers(model: SlimmableModel, params: Any, width: float, resolution: int, channels: int,
                 interceptor: Any) -> None:
  """An abstract forward pass of one image at (width, resolution), in training mode, with `interceptor` (a flax
  method interceptor) seeing every module call: how per-layer facts (channels, shapes, costs) are read off any
  backbone without spending FLOPs. The kernel path and BN grouping change no shape, so the trace uses the cheapest."""
  traced = model.clone(conv_impl='xla', bn_groups=1)
  x = jax.ShapeDtypeStruct((1, resolution, resolution, channels), jnp.float32)
  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda p, x: traced.apply({'params': p}, x, width=width, train=True), params, x)
