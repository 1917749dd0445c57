"""Top-1/top-5 accuracy of one (width, resolution) with its own BN statistics, sharded over all devices."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mutualnet_jax import parallel
from mutualnet_jax.models.base import SlimmableModel
from mutualnet_jax.preprocess import resize


class Evaluator:
  """Counts correct predictions over an eval iterator; one compiled function per (width, resolution)."""

  def __init__(self, model: SlimmableModel, mesh: Mesh, antialias: bool = False):
    self.model = model.clone(bn_groups=1)
    self.mesh = mesh
    self.antialias = antialias
    self._fns: dict[tuple[float, int], Any] = {}  # owned by this evaluator, freed with it

  def _counts(self, width: float, resolution: int):
    if (width, resolution) not in self._fns:
      self._fns[width, resolution] = self._make_counts(width, resolution)
    return self._fns[width, resolution]

  def _make_counts(self, width: float, resolution: int):
    def counts(variables, images, labels, mask):
      logits = self.model.apply(variables, resize(images, resolution, self.antialias), width=width, train=False)
      top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
      hit1 = (top5[:, 0] == labels) * mask
      hit5 = (top5 == labels[:, None]).any(-1) * mask
      return jnp.stack([hit1.sum(), hit5.sum(), mask.sum()])
    return jax.jit(counts)

  def evaluate(self, params: Any, batch_stats: Any, width: float, resolution: int,
               batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """{'top1', 'top5', 'count'} over `batches` (process-local dicts with image, label, mask).

    `batch_stats` may be host arrays (from the store) or device arrays: both are placed replicated, so either hits
    the same executable."""
    fn = self._counts(width, resolution)
    variables = {'params': params, 'batch_stats': parallel.replicate(batch_stats, self.mesh)}
    total = None
    for batch in batches:
      batch = parallel.global_batch(batch, self.mesh)
      c = fn(variables, batch['image'], batch['label'], batch['mask'])
      total = c if total is None else total + c
    if total is None:
      raise ValueError('evaluation got no batches.')
    hit1, hit5, n = (float(v) for v in jax.device_get(total))
    return {'top1': hit1 / n, 'top5': hit5 / n, 'count': n}
