"""Top-1/top-5 accuracy of one (width, resolution) with its own BN statistics, sharded over all devices."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mutualnet_jax import parallel
from mutualnet_jax.bn_calibration import BNShapes, pad_stats
from mutualnet_jax.errors import UserError
from mutualnet_jax.models.base import SlimmableModel
from mutualnet_jax.preprocess import resize


class Evaluator:
  """Counts correct predictions over an eval iterator; one compiled program per (width or capacity, resolution)."""

  def __init__(self, model: SlimmableModel, mesh: Mesh, antialias: bool = False):
    self.model = model.clone(bn_groups=1)
    self.mesh = mesh
    self.antialias = antialias
    self._fns: dict[tuple[float, int, bool], Any] = {}  # owned by this evaluator, freed with it
    self._shapes: dict[int, BNShapes] = {}

  def _counts(self, width: float, resolution: int, masked: bool):
    if (width, resolution, masked) not in self._fns:
      self._fns[width, resolution, masked] = self._make_counts(width, resolution)
    return self._fns[width, resolution, masked]

  def _make_counts(self, width: float, resolution: int):
    def counts(variables, images, labels, mask, active):
      logits = self.model.apply(variables, resize(images, resolution, self.antialias), width=width, train=False,
                                active=active)
      top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
      hit1 = (top5[:, 0] == labels) * mask
      hit5 = (top5 == labels[:, None]).any(-1) * mask
      return jnp.stack([hit1.sum(), hit5.sum(), mask.sum()])
    return jax.jit(counts)

  def _capacity_stats(self, params: Any, batch_stats: Any, capacity: float, channels: int) -> Any:
    if channels not in self._shapes:
      self._shapes[channels] = BNShapes(self.model, channels)
    return pad_stats(jax.device_get(batch_stats), self._shapes[channels](params, capacity))

  def evaluate(self, params: Any, batch_stats: Any, width: float, resolution: int,
               batches: Iterable[Mapping[str, np.ndarray]], capacity: float | None = None) -> dict[str, float]:
    """{'top1', 'top5', 'count'} over `batches` (process-local dicts with image, label, mask).

    `capacity`: run the width in the program of this capacity (the same predictions, one program for many widths).
    `batch_stats` may be host arrays (from the store) or device arrays: both are placed replicated, so either hits
    the same executable."""
    masked = capacity is not None
    fn = self._counts(capacity if masked else width, resolution, masked)
    active = parallel.replicate(self.model.channel_counts(width), self.mesh) if masked else None
    total, variables = None, None
    for batch in batches:
      if variables is None:
        stats = (self._capacity_stats(params, batch_stats, capacity, batch['image'].shape[-1]) if masked else
                 batch_stats)
        variables = {'params': params, 'batch_stats': parallel.replicate(stats, self.mesh)}
      batch = parallel.global_batch(batch, self.mesh)
      c = fn(variables, batch['image'], batch['label'], batch['mask'], active)
      total = c if total is None else total + c
    if total is None:
      raise UserError('evaluation got no batch: the eval split is empty; set --config.eval_split to one with images.')
    hit1, hit5, n = (float(v) for v in jax.device_get(total))
    return {'top1': hit1 / n, 'top5': hit5 / n, 'count': n}
