"""A 5-layer slimmable ConvNet (MobileNet v1's blocks, 3 stages) that compiles in about a second.

For smoke tests, CI and trying the pipeline end to end: everything that works on a MobileNet works on it, since it
is MobileNet v1 with a shorter block list (same layers and slicing rules), at a fraction of XLA:CPU's compile time.
"""
from __future__ import annotations

from mutualnet_jax.models.mobilenet_v1 import MobileNetV1


class TinyConvNet(MobileNetV1):
  stem = 16
  blocks = ((32, 2), (64, 2))
  num_downsample: int = 3
