"""On-device input transforms shared by training, calibration and evaluation."""
from __future__ import annotations

import jax
import ml_collections


def input_size(config: ml_collections.ConfigDict) -> int:
  """The square size the host pipeline delivers: the highest resolution unless `config.image_size` asks for more.

  Every sub-network's resolution is reached from it by `resize`, so training, calibration and evaluation must agree.
  """
  return config.image_size if config.image_size > 0 else max(config.resolutions)


def resize(images: jax.Array, resolution: int, antialias: bool = False) -> jax.Array:
  """Bilinear resize of a (B, H, W, C) batch to (B, resolution, resolution, C) on the device.

  The pipeline ships one batch at the highest resolution; every sub-network resizes it inside its own compiled step,
  so the host never sends a batch per resolution.
  """
  b, h, w, c = images.shape
  if (h, w) == (resolution, resolution):
    return images
  return jax.image.resize(images, (b, resolution, resolution, c), method='bilinear', antialias=antialias)
