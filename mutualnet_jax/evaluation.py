"""Top-1/top-5 accuracy of one (width, resolution) with its own BN statistics (folded into each layer's inference
map), sharded over all devices."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mutualnet_jax import parallel, programs, slim
from mutualnet_jax.errors import UserError


class Evaluator(programs.BucketPass):
  """Counts correct predictions over an eval iterator; one compiled program per bucket (an exact width, or a
  capacity reused for every width it holds)."""

  def build(self, bucket: programs.Bucket, variant: None):
    del variant
    def counts(variables, images, labels, mask, active):
      logits = self.model.apply(variables, self.resize(images, bucket.resolution), width=bucket.width,
                                train=False, active=active)
      top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
      hit1 = (top5[:, 0] == labels) * mask
      hit5 = (top5 == labels[:, None]).any(-1) * mask
      return jnp.stack([hit1.sum(), hit5.sum(), mask.sum()])
    return jax.jit(counts)

  def evaluate(self, params: Any, batch_stats: Any, width: float, resolution: int,
               batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """{'top1', 'top5', 'count'} over `batches` (process-local dicts with image, label, mask), in the program of the
    smallest capacity that holds `width` (the same predictions, one program for many widths).

    `batch_stats` may be host arrays (from the store) or device arrays: both are folded on the host into each BN
    layer's inference map (slim.fold_batch_norm: the program computes no map per layer) and placed replicated, so
    either hits the same executable."""
    bucket, fn, active = self.program(width, resolution)
    total, variables = None, None
    for batch in batches:
      if variables is None:
        shapes = self.bn_shapes(batch['image'].shape[-1])
        stats = (programs.pad_stats(jax.device_get(batch_stats), shapes(params, bucket.width)) if bucket.masked
                 else batch_stats)
        variables = {'params': params,
                     'batch_stats': parallel.replicate(slim.fold_batch_norm(params, stats), self.mesh)}
      batch = parallel.global_batch(batch, self.mesh)
      c = fn(variables, batch['image'], batch['label'], batch['mask'], active)
      total = c if total is None else total + c
    if total is None:
      raise UserError('evaluation got no batch: the eval split is empty; set --config.eval_split to one with images.')
    hit1, hit5, n = (float(v) for v in jax.device_get(total))
    return {'top1': hit1 / n, 'top5': hit5 / n, 'count': n}
