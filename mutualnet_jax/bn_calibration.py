"""Post-training batch-norm statistics for one (width, resolution), and the store that keeps them.

Statistics are not shared across configurations: after training, each (width, resolution) gets its own mean and
variance per BN layer, recomputed from a few thousand training images as an exact cumulative average. Each batch runs
the network in training mode (every BN normalises with its batch statistics, as the official code does while
calibrating) and its per-layer moments are merged with Chan's parallel formula, so the result equals the mean and
(biased) variance over all calibration images of each BN layer's input. `official=True` instead averages each
batch's mean and unbiased variance with equal weight, as PyTorch's BatchNorm with momentum=None does in the official
code (on augmented batches there: input_pipeline.calibration_iterator). One compiled program per bucket
(`mutualnet_jax.programs`).

`StatsStore` keeps one orbax item per (width, resolution) under `workdir/bn_stats/`, holding only the compact arrays
of that sub-network, a checksum and where they came from (checkpoint, calibration settings). Items are written
atomically and never touch each other; an item that fails to restore or to match its checksum is reported and
recomputed, and one from another checkpoint or other settings is recomputed.
"""
from __future__ import annotations

import contextlib
import hashlib
from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from mutualnet_jax import config_fields, parallel, programs, slim, workdir as workdir_lib
from mutualnet_jax.errors import UserError, reason

STORE_DIR = 'bn_stats'


def _bn_elements(record: dict[tuple[str, ...], int]) -> Callable[..., Any]:
  """A flax interceptor noting each BN layer's elements per channel (batch x height x width) by its path, at trace
  time (shapes are static: nothing is computed at run time)."""
  def intercept(next_fun, args, kwargs, context):
    if isinstance(context.module, slim.SlimBatchNorm) and context.method_name == '__call__':
      record[tuple(context.module.scope.path)] = args[0].size // args[0].shape[-1]
    return next_fun(*args, **kwargs)
  return intercept


class PooledMoments:
  """The exact statistics: running (mean, M2) per channel, merged with each batch's (mean, biased variance) by Chan
  et al.'s formula, so the result is the mean and biased variance over all calibration images."""
  counts_elements = False

  @staticmethod
  def zeros(shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    return {'mean': np.zeros(shape, np.float32), 'm2': np.zeros(shape, np.float32)}

  @staticmethod
  def update(acc: Mapping[str, jax.Array], count: jax.Array, batch: Mapping[str, jax.Array], batch_count: int,
             unbias: jax.Array | None) -> dict[str, jax.Array]:
    del unbias
    total = count + batch_count
    delta = batch['mean'] - acc['mean']
    return {'mean': acc['mean'] + delta * (batch_count / total),
            'm2': acc['m2'] + batch['var'] * batch_count + delta * delta * (count * batch_count / total)}

  @staticmethod
  def finish(layer: Mapping[str, np.ndarray], count: int, num_batches: int) -> dict[str, np.ndarray]:
    del num_batches
    return {'mean': layer['mean'], 'var': layer['m2'] / np.float32(count)}


class BatchAverage:
  """The official code's cumulative average (PyTorch BatchNorm with momentum=None): per-batch means and unbiased
  variances (a layer's batch variance times n / (n - 1), n its elements per channel) summed with equal weight, then
  divided by the number of batches."""
  counts_elements = True  # needs each layer's n: the calibration program traces with an interceptor that notes it

  @staticmethod
  def zeros(shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    return {'mean_sum': np.zeros(shape, np.float32), 'var_sum': np.zeros(shape, np.float32)}

  @staticmethod
  def update(acc: Mapping[str, jax.Array], count: jax.Array, batch: Mapping[str, jax.Array], batch_count: int,
             unbias: jax.Array | None) -> dict[str, jax.Array]:
    del count, batch_count
    return {'mean_sum': acc['mean_sum'] + batch['mean'], 'var_sum': acc['var_sum'] + batch['var'] * unbias}

  @staticmethod
  def finish(layer: Mapping[str, np.ndarray], count: int, num_batches: int) -> dict[str, np.ndarray]:
    del count
    return {'mean': layer['mean_sum'] / np.float32(num_batches), 'var': layer['var_sum'] / np.float32(num_batches)}


def is_official(config: ml_collections.ConfigDict) -> bool:
  """Whether the run recalibrates as the official code does (config.bn_calibration; 'exact' when absent)."""
  return config_fields.read(config, 'bn_calibration') == 'official'


class Calibrator(programs.BucketPass):
  """Recomputes BN statistics of (width, resolution) sub-networks; one compiled program per bucket (an exact width,
  or a capacity reused for every width it holds). Statistics are global (over all devices), whatever BN grouping
  training used."""

  def __init__(self, *args: Any, official: bool = False, **kwargs: Any):
    super().__init__(*args, **kwargs)
    self.moments = BatchAverage() if official else PooledMoments()

  def build(self, bucket: programs.Bucket, variant: None) -> Callable[..., Any]:
    del variant

    def step(params, images, acc, count, active):
      x = self.resize(images, bucket.resolution)
      elements: dict[tuple[str, ...], int] = {}
      counting = (nn.intercept_methods(_bn_elements(elements)) if self.moments.counts_elements
                  else contextlib.nullcontext())
      with counting:
        _, state = self.model.apply({'params': params}, x, width=bucket.width, train=True, active=active,
                                    mutable=['bn_moments'])
      layers = jax.tree_util.tree_flatten_with_path(state['bn_moments'], is_leaf=programs.is_layer)[0]
      batch = {k: jnp.concatenate([layer[k] for _, layer in layers]) for k in ('mean', 'var')}
      unbias = None  # per channel n / (n - 1), n the layer's elements per channel
      if self.moments.counts_elements:
        unbias = jnp.concatenate([jnp.full(layer['mean'].shape, n / (n - 1), jnp.float32) for path, layer in layers
                                  for n in [elements[tuple(k.key for k in path)]]])
      return self.moments.update(acc, count, batch, x.shape[0], unbias)
    # Outputs placed like the inputs, so the second batch hits the first batch's executable.
    return jax.jit(step, donate_argnums=(2,), out_shardings=parallel.replicated_sharding(self.mesh))

  def _zeros(self, shapes: Any) -> Any:
    """Replicated zero accumulators with these BN shapes, every layer's channels in one vector per quantity."""
    total = (sum(shape[0] for shape in jax.tree.leaves(shapes, is_leaf=programs.is_shape)),)
    return parallel.replicate(self.moments.zeros(total), self.mesh)

  def calibrate(self, params: Any, width: float, resolution: int, batches: Iterable[Mapping[str, Any]]) -> Any:
    """BN statistics {'layer': {'bn': {'mean', 'var'}}} (compact NumPy arrays of this width) over all `batches`,
    in the program of the smallest capacity that holds `width` (the same statistics, one program for many widths).

    `batches` yields process-local dicts with an 'image' entry (full batches; see
    `input_pipeline.calibration_iterator`)."""
    bucket, step, active = self.program(width, resolution)
    acc, count, num_batches = None, 0, 0
    for batch in batches:
      images = parallel.global_batch({'image': batch['image']}, self.mesh)['image']
      if acc is None:
        shapes = self.bn_shapes(images.shape[-1])
        acc = self._zeros(shapes(params, bucket.width))
      acc = step(params, images, acc, np.float32(count), active)
      count += images.shape[0]
      num_batches += 1
    if acc is None:
      raise UserError('BN calibration got no batch: the training split holds fewer images than '
                      'config.calibration_batch_size; lower it.')
    stats = jax.tree.map(lambda layer: self.moments.finish(layer, count, num_batches),
                         _split(jax.device_get(acc), shapes(params, bucket.width)), is_leaf=_is_accumulator)
    return programs.slice_stats(stats, shapes(params, width)) if bucket.masked else stats


def _is_accumulator(x: Any) -> bool:
  return isinstance(x, Mapping) and not any(isinstance(v, Mapping) for v in x.values())


def _split(flat: Mapping[str, Any], shapes: Any) -> Any:
  """Per-layer accumulators (a tree shaped like `shapes`, a BNShapes tree) cut from the flat vectors they are carried
  in: one vector per quantity, every layer's channels in tree order. Carried flat, a calibration program updates all
  layers in one fused kernel instead of one small kernel per layer and quantity."""
  sizes, treedef = jax.tree.flatten(shapes, is_leaf=programs.is_shape)
  offsets = np.cumsum([0] + [shape[0] for shape in sizes])
  return jax.tree.unflatten(treedef, [{k: v[a:b] for k, v in flat.items()} for a, b in zip(offsets, offsets[1:])])


def tree_digest(tree: Any) -> str:
  """SHA-256 of a tree's paths, dtypes, shapes and bytes: equal digests mean equal contents."""
  digest = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0],
                           key=lambda kv: jax.tree_util.keystr(kv[0])):
    leaf = np.ascontiguousarray(leaf)
    digest.update(f'{jax.tree_util.keystr(path)}|{leaf.dtype}|{leaf.shape}|'.encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


def store_key(width: float, resolution: int) -> str:
  """Directory name of one configuration, e.g. 'w0.7_r160'."""
  return f'w{width:g}_r{int(resolution)}'


class StatsStore:
  """BN statistics per (width, resolution) in `workdir/bn_stats/<key>/`: items 'stats' (arrays) and 'meta' (JSON:
  width, resolution, checksum, provenance).

  `provenance` describes what the statistics depend on (checkpoint parameters, calibration images and batch size,
  preprocessing); an item saved under another provenance is stale and is recalibrated, never reused, except as
  `accepts` says.
  """

  def __init__(self, workdir: str):
    self.directory = workdir_lib.absolute(workdir) / STORE_DIR
    self._checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())

  def path(self, width: float, resolution: int) -> epath.Path:
    return self.directory / store_key(width, resolution)

  def keys(self) -> list[str]:
    """Keys of the finished items (orbax's temporary directories of interrupted writes are skipped)."""
    if not self.directory.exists():
      return []
    return sorted(p.name for p in self.directory.iterdir() if (p / 'meta').exists() and '.orbax' not in p.name)

  def load(self, width: float, resolution: int, provenance: Mapping[str, Any]) -> Any | None:
    """The stored statistics, or None when absent, stale or corrupt (corrupt ones are reported)."""
    path = self.path(width, resolution)
    if not path.exists():
      return None
    try:
      item = self._checkpointer.restore(path, args=ocp.args.Composite(stats=ocp.args.StandardRestore(),
                                                                      meta=ocp.args.JsonRestore()))
      stats, meta = item['stats'], item['meta']
      checksum_ok = tree_digest(stats) == meta['checksum']
    except Exception as e:  # orbax/tensorstore raise many types for a damaged directory
      logging.warning('BN statistics %s are unreadable (%s); recomputing them.', path, reason(e))
      return None
    if not checksum_ok:
      logging.warning('BN statistics %s do not match their checksum (corrupt); recomputing them.', path)
      return None
    if not accepts(meta.get('provenance') or {}, provenance):
      logging.info('BN statistics %s were calibrated for another checkpoint or settings; recomputing them.', path)
      return None
    return stats

  def save(self, width: float, resolution: int, stats: Any, provenance: Mapping[str, Any]) -> epath.Path:
    """Writes (or replaces) one configuration's item; orbax writes a temporary directory and renames it."""
    stats = jax.device_get(stats)
    meta = {'width': width, 'resolution': int(resolution), 'checksum': tree_digest(stats),
            'provenance': dict(provenance)}
    path = self.path(width, resolution)
    self.directory.mkdir(parents=True, exist_ok=True)
    self._checkpointer.save(path, args=ocp.args.Composite(stats=ocp.args.StandardSave(stats),
                                                          meta=ocp.args.JsonSave(meta)), force=True)
    return path


WEIGHTS = ('params_digest', 'checkpoint_step')  # the provenance entries that name the weights


def accepts(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
  """Whether statistics stored under `stored` serve a lookup for `wanted`: the same provenance; statistics of the
  same weights kept from an official checkpoint ('official'), for any lookup (they come from its whole training
  set, where a calibration here would only replace them with fewer images); and, for a lookup from the run's own
  dataset (no 'images' entry), statistics of the same weights from explicitly given images (`--images`,
  `run.calibrate`): what the user chose stands until replaced."""
  if dict(stored) == dict(wanted):
    return True
  same_weights = all(stored.get(k) == wanted.get(k) for k in WEIGHTS)
  return same_weights and (bool(stored.get('official')) or ('images' in stored and 'images' not in wanted))


def get_or_calibrate(store: StatsStore, calibrator: Calibrator, params: Any, width: float, resolution: int,
                     batches: Callable[[], Iterable[Mapping[str, Any]]],
                     provenance: Mapping[str, Any]) -> tuple[Any, bool]:
  """(statistics, whether they were computed now): from the store when valid, else calibrated and stored."""
  stats = store.load(width, resolution, provenance)
  if stats is not None:
    return stats, False
  stats = calibrator.calibrate(params, width, resolution, batches())
  if workdir_lib.is_writable(store.directory):
    store.save(width, resolution, stats, provenance)
  else:  # a read-only workdir opened from Python: the statistics are used, not kept
    logging.info('%s is read-only: BN statistics of width %g @ %d px are not stored.', store.directory, width,
                 resolution)
  return stats, True
