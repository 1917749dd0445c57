"""Multi-scale feature maps of any backbone at any width: the inputs of a detection or segmentation head.

Every backbone sows, into the Flax 'features' collection, the output of its last layer at each output stride 8, 16
and 32 of its ImageNet definition (`SlimmableModel.tap`: MobileNet v1's 256/512/1024-channel blocks, v2's 32/96/320,
ResNet-50's stages 2-4, VGG-16's conv4_3, conv5_3 and pool5). Levels keep those names under a small-input variant
(num_downsample < 5), whose real strides `feature_strides` gives. A width's maps hold exactly its channels on the
exact path; on the capacity path (`active`) they hold the capacity's channels, those beyond the width's count zero,
so a head whose input convs slice their input channels (`FeaturePyramid`) computes the same thing either way.

  maps = features.feature_maps(model, variables, images, width=0.5)   # {8: (B, H/8, W/8, C8), 16: ..., 32: ...}
  features.feature_channels(model, 0.5)                               # {8: 128, 16: 256, 32: 512}

Under jit the classifier's output is unused and compiled away, so the backbone runs only as far as it must.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mutualnet_jax import slim
from mutualnet_jax.models.base import SlimmableModel

COLLECTION = 'features'
_PREFIX = 'stride'


def feature_maps(model: SlimmableModel, variables: Mapping[str, Any], x: jax.Array, width: float | None = None, *,
                 train: bool = False, active: jax.Array | None = None) -> dict[int, jax.Array]:
  """{level: feature map} of `model` at `width` (a capacity when `active` is given), finest level first.

  train=True normalises with the batch's statistics (fine-tuning a head and backbone); train=False reads the
  'batch_stats' in `variables` (statistics calibrated for this width and resolution)."""
  _, state = model.apply(variables, x, width=width, train=train, active=active, mutable=[COLLECTION])
  maps = {int(k.removeprefix(_PREFIX)): v for k, v in state[COLLECTION].items()}
  return dict(sorted(maps.items()))


@functools.lru_cache(maxsize=64)
def feature_channels(model: SlimmableModel, width: float) -> dict[int, int]:
  """{level: channels} of the maps at `width` on the exact path, read off an abstract trace (no FLOPs spent)."""
  r = model.min_resolution
  x = jax.ShapeDtypeStruct((1, r, r, 1), jnp.float32)

  def maps(x: jax.Array) -> dict[int, jax.Array]:
    params = model.init(jax.random.key(0), x, train=True)['params']
    return feature_maps(model, {'params': params}, x, width, train=True)

  return {level: shape.shape[-1] for level, shape in jax.eval_shape(maps, x).items()}


def feature_strides(model: SlimmableModel) -> dict[int, int]:
  """{level: real output stride} (the level itself at num_downsample=5)."""
  return model.feature_strides()


class FeaturePyramid(nn.Module):
  """A minimal top-down pyramid (FPN without its 3x3 smoothing): a 1x1 lateral conv per level to `features` channels,
  each coarser result upsampled (nearest) and added into the next finer level.

  The lateral convs hold the backbone's maximum channels and slice what a width delivers, so one head serves every
  width; build it with `FeaturePyramid.for_model`."""
  features: int
  in_channels: tuple[tuple[int, int], ...]  # (level, the backbone's channels at max width)
  conv_impl: str = 'xla'

  @classmethod
  def for_model(cls, model: SlimmableModel, features: int, **kwargs: Any) -> FeaturePyramid:
    return cls(features, tuple(feature_channels(model, model.max_width).items()), **kwargs)

  @nn.compact
  def __call__(self, maps: Mapping[int, jax.Array]) -> dict[int, jax.Array]:
    impl = slim.resolve_conv_impl(self.conv_impl)
    channels = dict(self.in_channels)
    out, above = {}, None
    for level in sorted(maps, reverse=True):
      x = slim.SlimConv(self.features, channels[level], conv_impl=impl, name=f'lateral{level}')(maps[level])
      if above is not None:
        x = x + jax.image.resize(above, x.shape[:3] + above.shape[3:], 'nearest')
      out[level] = above = x
    return dict(sorted(out.items()))
