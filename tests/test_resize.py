"""The on-device resize (mutualnet_jax/resizing.py): half-pixel centres by default, and the official code's
align_corners=True on request, equal to PyTorch's F.interpolate."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mutualnet_jax.resizing import resize


@pytest.mark.parametrize('size, out', [(28, 16), (28, 20), (28, 24), (224, 128), (16, 28)])
@pytest.mark.parametrize('align_corners', [False, True])
def test_bilinear_resize_equals_pytorch_interpolate(size, out, align_corners):
  images = np.random.default_rng(size + out).normal(size=(2, size, size, 3)).astype(np.float32)
  ours = np.asarray(resize(jnp.asarray(images), out, align_corners=align_corners))
  theirs = F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2), size=(out, out), mode='bilinear',
                         align_corners=align_corners).permute(0, 2, 3, 1).numpy()
  assert ours.shape == (2, out, out, 3)
  # float32 sampling positions: up to ~1e-5 px at 224 px, times neighbour differences of a few units.
  np.testing.assert_allclose(ours, theirs, atol=2e-4)


def test_align_corners_keeps_the_corner_pixels_and_differs_inside():
  images = jnp.asarray(np.random.default_rng(0).normal(size=(1, 28, 28, 1)), jnp.float32)
  aligned, centred = resize(images, 16, align_corners=True), resize(images, 16)
  np.testing.assert_allclose(aligned[0, [0, 0, -1, -1], [0, -1, 0, -1]], images[0, [0, 0, -1, -1], [0, -1, 0, -1]],
                             atol=1e-6)
  assert float(jnp.abs(aligned - centred).max()) > 0.1
