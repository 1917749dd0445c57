"""How a sub-network gets its input size: the pipeline's one square size, and the on-device resize to each
resolution that training, BN calibration, evaluation and exports share."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from mutualnet_jax import config_fields


def input_size(config: ml_collections.ConfigDict) -> int:
  """The square size the host pipeline delivers: the highest resolution unless `config.image_size` asks for more.

  Every sub-network's resolution is reached from it by `resize`, so training, calibration and evaluation must agree.
  """
  return config.image_size if config.image_size > 0 else max(config.resolutions)


def resize(images: jax.Array, resolution: int, antialias: bool = False, align_corners: bool = False) -> jax.Array:
  """Bilinear resize of a (B, H, W, C) batch to (B, resolution, resolution, C) on the device.

  The pipeline ships one batch at the highest resolution; every sub-network resizes it inside its own compiled step,
  so the host never sends a batch per resolution. Pixel centres are aligned (half-pixel, like TF2 and PIL) unless
  `align_corners`, which maps the corner pixels onto each other like the official MutualNet code's
  `F.interpolate(..., mode='bilinear', align_corners=True)` (no antialiasing then, as there).
  """
  b, h, w, c = images.shape
  if (h, w) == (resolution, resolution):
    return images
  if not align_corners:
    return jax.image.resize(images, (b, resolution, resolution, c), method='bilinear', antialias=antialias)
  # scale_and_translate samples input coordinate (o + 0.5 - t) / s - 0.5 for output pixel o; with
  # s = (out - 1) / (in - 1) and t = (1 - s) / 2 that is o * (in - 1) / (out - 1): corners onto corners.
  scale = jnp.array([(resolution - 1) / (h - 1), (resolution - 1) / (w - 1)], jnp.float32)
  return jax.image.scale_and_translate(images, (b, resolution, resolution, c), (1, 2), scale, (1.0 - scale) / 2,
                                       method='linear', antialias=False)


@dataclasses.dataclass(frozen=True)
class Resize:
  """How every sub-network resizes the one input batch: one value from the config, so training, BN calibration,
  evaluation and exports resize alike (`resize_antialias`, `resize_align_corners`)."""
  antialias: bool = False
  align_corners: bool = False

  @classmethod
  def of(cls, config: ml_collections.ConfigDict) -> Resize:
    return cls(bool(config.resize_antialias), bool(config_fields.read(config, 'resize_align_corners')))

  def __call__(self, images: jax.Array, resolution: int) -> jax.Array:
    return resize(images, resolution, self.antialias, self.align_corners)
