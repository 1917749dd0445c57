"""On-device input transforms shared by training, calibration and evaluation."""
from __future__ import annotations

import jax


def resize(images: jax.Array, resolution: int, antialias: bool = False) -> jax.Array:
  """Bilinear resize of a (B, H, W, C) batch to (B, resolution, resolution, C) on the device.

  The pipeline ships one batch at the highest resolution; every sub-network resizes it inside its own compiled step,
  so the host never sends a batch per resolution.
  """
  b, h, w, c = images.shape
  if (h, w) == (resolution, resolution):
    return images
  return jax.image.resize(images, (b, resolution, resolution, c), method='bilinear', antialias=antialias)
