"""Post-training batch-norm statistics for one (width, resolution).

Statistics are not shared across configurations: after training, each (width, resolution) gets its own mean and
variance per BN layer, recomputed from a few thousand training images as an exact cumulative average. Each batch runs
the network in training mode (every BN normalises with its batch statistics, as the official code does while
calibrating) and its per-layer moments are merged with Chan's parallel formula, so the result equals the mean and
(biased) variance over all calibration images of each BN layer's input. One compiled function per bucket.
"""
from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mutualnet_jax import parallel
from mutualnet_jax.models.base import SlimmableModel
from mutualnet_jax.preprocess import resize


def _merge(acc: Any, count: jax.Array, batch: Any, batch_count: int) -> Any:
  """Chan et al.'s merge of (mean, M2) accumulators with a batch's (mean, variance)."""
  total = count + batch_count

  def merge_layer(a: Mapping[str, jax.Array], b: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    delta = b['mean'] - a['mean']
    mean = a['mean'] + delta * (batch_count / total)
    m2 = a['m2'] + b['var'] * batch_count + delta * delta * (count * batch_count / total)
    return {'mean': mean, 'm2': m2}

  return jax.tree.map(merge_layer, acc, batch, is_leaf=lambda x: isinstance(x, Mapping) and 'mean' in x)


class Calibrator:
  """Recomputes BN statistics of (width, resolution) sub-networks; compiled once per bucket and reused."""

  def __init__(self, model: SlimmableModel, mesh: Mesh, antialias: bool = False):
    # Calibration statistics are global (synchronised over devices), whatever BN grouping training used.
    self.model = model.clone(bn_groups=1)
    self.mesh = mesh
    self.antialias = antialias

  @functools.lru_cache(maxsize=None)
  def _step(self, width: float, resolution: int):
    def step(params, images, acc, count):
      x = resize(images, resolution, self.antialias)
      _, state = self.model.apply({'params': params}, x, width=width, train=True, mutable=['bn_moments'])
      return _merge(acc, count, state['bn_moments'], x.shape[0]), count + x.shape[0]
    return jax.jit(step, donate_argnums=(2,))

  def _zeros(self, params: Any, width: float, resolution: int, image_shape: tuple[int, ...]) -> Any:
    x = jax.ShapeDtypeStruct((1, resolution, resolution, image_shape[-1]), jnp.float32)
    shapes = jax.eval_shape(lambda p, x: self.model.apply({'params': p}, x, width=width, train=True,
                                                          mutable=['bn_moments'])[1]['bn_moments'], params, x)
    layer = lambda s: {'mean': jnp.zeros(s['mean'].shape), 'm2': jnp.zeros(s['mean'].shape)}
    zeros = jax.tree.map(layer, shapes, is_leaf=lambda x: isinstance(x, Mapping) and 'mean' in x)
    return parallel.replicate(zeros, self.mesh)

  def calibrate(self, params: Any, width: float, resolution: int, batches: Iterable[Mapping[str, Any]]) -> Any:
    """BN statistics {'layer': {'bn': {'mean', 'var'}}} (compact arrays of this width) over all `batches`.

    `batches` yields process-local dicts with an 'image' entry (full batches; see
    `input_pipeline.calibration_iterator`)."""
    step = self._step(width, resolution)
    acc, count = None, jnp.zeros((), jnp.float32)
    for batch in batches:
      images = parallel.global_batch({'image': batch['image']}, self.mesh)['image']
      if acc is None:
        acc = self._zeros(params, width, resolution, images.shape)
      acc, count = step(params, images, acc, count)
    if acc is None:
      raise ValueError('calibration got no batches.')
    to_stats = lambda a: {'mean': a['mean'], 'var': a['m2'] / count}
    return jax.tree.map(to_stats, acc, is_leaf=lambda x: isinstance(x, Mapping) and 'm2' in x)
