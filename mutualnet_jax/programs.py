"""Compiled sub-network programs: what one is keyed by, what it receives at run time, and the cache that builds each
at most once.

A program is specialised to a `Bucket`: an exact width, or a capacity that runs any narrower width whose real
per-layer channel counts arrive at run time (`active`; the channels beyond them are zeroed, so outputs, gradients and
BN statistics equal the sliced sub-network's). Training, BN calibration and evaluation each supply only their own
function of a bucket (loss and gradient, moments, correct counts); `Programs` builds the key, the `active` argument,
compiles (lazily, or ahead of time in threads: XLA compiles outside the GIL) and counts what it compiled.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import threading
import time
from typing import Any, Callable, Hashable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mutualnet_jax import parallel, slim
from mutualnet_jax.models.base import SlimmableModel
from mutualnet_jax.resizing import Resize


@dataclasses.dataclass(frozen=True, order=True)
class Bucket:
  """What one compiled sub-network program is specialised to. `masked`: `width` is a capacity and the real width's
  channel counts arrive at run time; otherwise the program is the exact sub-network of `width`."""
  width: float
  resolution: int
  loss: str = ''  # training: 'ce' (labels) | 'kd' (the teacher's prediction); '' elsewhere
  masked: bool = False


Key = tuple[Bucket, Hashable]
is_layer = lambda x: isinstance(x, Mapping) and 'mean' in x  # noqa: E731  a BN layer's statistics


def bucket_for(width: float, resolution: int, capacities: Sequence[float] = (), *, loss: str = '',
               exact: bool = False) -> Bucket:
  """The program `width` runs in: its own exact program when `exact` or no capacity holds it, else the smallest
  capacity's (masked)."""
  capacity = None if exact else slim.capacity_for(width, capacities)
  if capacity is None:
    return Bucket(width, resolution, loss)
  return Bucket(capacity, resolution, loss, masked=True)


class Programs:
  """Programs built by `build(bucket, variant)` (a jitted function, or an executable compiled ahead of time), each
  at most once, keyed by (bucket, variant); `variant` is whatever else a caller's program is specialised to (the
  training step's first sub-network takes no gradient sum, say)."""

  def __init__(self, model: SlimmableModel, mesh: Mesh, build: Callable[[Bucket, Hashable], Any]):
    self.model, self.mesh, self._build = model, mesh, build
    self._programs: dict[Key, Any] = {}
    self._lock = threading.Lock()
    self.compile_seconds: dict[Key, float] = {}

  def __call__(self, bucket: Bucket, variant: Hashable = None) -> Any:
    key = (bucket, variant)
    if key in self._programs:
      return self._programs[key]
    start = time.perf_counter()
    program = self._build(bucket, variant)
    with self._lock:
      if key not in self._programs:
        self._programs[key] = program
        self.compile_seconds[key] = time.perf_counter() - start
    return self._programs[key]

  def precompile(self, keys: Sequence[Key], threads: int | None = None) -> float:
    """Builds every (bucket, variant) in parallel threads; returns the wall time."""
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
      list(pool.map(lambda key: self(*key), keys))
    return time.perf_counter() - start

  @property
  def num_compiled(self) -> int:
    return len(self._programs)

  def active(self, bucket: Bucket, width: float) -> jax.Array | None:
    """The run-time argument of `width` in `bucket`'s program: its per-layer channel counts, replicated on the mesh,
    for a capacity program; None for an exact one."""
    return parallel.replicate(self.model.channel_counts(width), self.mesh) if bucket.masked else None


class BucketPass:
  """A post-training pass over sub-networks (BN calibration, evaluation): the model with global BN statistics, the
  mesh, how inputs are resized, the capacities its widths run in, and its programs, built by `build`."""

  def __init__(self, model: SlimmableModel, mesh: Mesh, resize: Resize = Resize(), capacities: Sequence[float] = ()):
    self.model = model.clone(bn_groups=1)
    self.mesh, self.resize, self.capacities = mesh, resize, tuple(capacities)
    self.programs = Programs(self.model, mesh, self.build)
    self._bn_shapes: dict[int, BNShapes] = {}

  def build(self, bucket: Bucket, variant: Hashable) -> Callable[..., Any]:
    raise NotImplementedError

  def program(self, width: float, resolution: int) -> tuple[Bucket, Callable[..., Any], jax.Array | None]:
    """(bucket, its program, the run-time channel counts) of `width`: the smallest capacity that holds it."""
    bucket = bucket_for(width, resolution, self.capacities)
    return bucket, self.programs(bucket), self.programs.active(bucket, width)

  def bn_shapes(self, channels: int) -> BNShapes:
    if channels not in self._bn_shapes:
      self._bn_shapes[channels] = BNShapes(self.model, channels)
    return self._bn_shapes[channels]


class BNShapes:
  """Per-layer BN channel counts of each width (a tree shaped like 'batch_stats', leaves (C,)), from an abstract
  trace cached per width; what moves statistics between a width and the capacity that runs it."""

  def __init__(self, model: SlimmableModel, channels: int):
    self.model, self.channels = model.clone(bn_groups=1), channels
    self._shapes: dict[float, Any] = {}

  def __call__(self, params: Any, width: float) -> Any:
    if width not in self._shapes:
      r = self.model.min_resolution
      x = jax.ShapeDtypeStruct((1, r, r, self.channels), jnp.float32)
      moments = jax.eval_shape(lambda p, x: self.model.apply({'params': p}, x, width=width, train=True,
                                                             mutable=['bn_moments'])[1]['bn_moments'], params, x)
      self._shapes[width] = jax.tree.map(lambda s: s['mean'].shape, moments, is_leaf=is_layer)
    return self._shapes[width]


def is_shape(x: Any) -> bool:
  """A leaf of a BNShapes tree (a shape tuple)."""
  return isinstance(x, tuple)


def slice_stats(stats: Any, shapes: Any) -> Any:
  """Statistics computed at a capacity, cut to the channels a width uses."""
  return jax.tree.map(lambda shape, layer: {k: np.asarray(v)[:shape[0]] for k, v in layer.items()}, shapes, stats,
                      is_leaf=is_shape)


def pad_stats(stats: Any, shapes: Any) -> Any:
  """A width's statistics padded to a capacity's channels (mean 0, variance 1: finite, and zeroed downstream)."""
  def pad(shape: tuple[int, ...], layer: Mapping[str, Any]) -> dict[str, np.ndarray]:
    extra = shape[0] - np.shape(layer['mean'])[0]
    return {'mean': np.pad(np.asarray(layer['mean']), (0, extra)),
            'var': np.pad(np.asarray(layer['var']), (0, extra), constant_values=1.0)}
  return jax.tree.map(pad, shapes, stats, is_leaf=is_shape)
