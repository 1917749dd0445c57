"""A budget-adaptive network: the configurations of one trained run that some budget makes the best, each compiled
ahead of time, and a call that runs the most accurate one within the budget it is given.

MutualNet's promise is one network for a resource budget that changes while it runs (battery, load, a frame-rate
target). Here a switch is a look-up in the query table plus a call of a program compiled at construction, so no call
ever waits for XLA:

  net = mutualnet_jax.open(workdir).adaptive(image_size=28)  # compiles every held configuration for batch 1
  logits = net(images, budget_ms=2)                          # the most accurate configuration within 2 ms
  net.last                                                   # the query-table Row that ran
  logits = net(images, budget_mflops=5)                      # maybe another configuration; nothing compiles

Budgets mean what they mean in the query table: millions of multiply-adds per image, and batch-1 milliseconds of JAX
as the sweep measured them on its device.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mutualnet_jax import query, slim
from mutualnet_jax.errors import UserError
from mutualnet_jax.export import ExportedModel
from mutualnet_jax.query import Row

COSTS = ('macs', 'latency_ms')  # what a budget can bound


def _beats(a: Row, b: Row, costs: Sequence[str]) -> bool:
  """Whether `a` is no costlier than `b` on every cost and no less accurate, and better on one of them."""
  no_worse = a.top1 >= b.top1 and all(getattr(a, c) <= getattr(b, c) for c in costs)
  return no_worse and (a.top1 > b.top1 or any(getattr(a, c) < getattr(b, c) for c in costs))


def pareto_set(rows: Sequence[Row], costs: Sequence[str] = COSTS) -> list[Row]:
  """The rows with a top-1 accuracy that no other row beats on all `costs` and top-1 at once, cheapest first.

  `query.query` over these picks the row it picks over all of `rows`, for any budgets of these costs. The frontier by
  MACs alone would not: a row that is fast but not frugal in MACs is what a budget in milliseconds picks."""
  rows = query.scored(rows)
  return sorted((r for r in rows if not any(_beats(o, r, costs) for o in rows)),
                key=lambda r: tuple(getattr(r, c) for c in costs))


def held_rows(table: Sequence[Row], configurations: Sequence[Row | tuple[float, int]] | None = None) -> list[Row]:
  """The rows an adaptive network holds: the table's `pareto_set`, or `configurations` (rows, or (width, resolution)
  pairs looked up in the table, whose costs decide the choice). Rows without a top-1 accuracy are never picked, so
  they are not held."""
  if configurations is None:
    rows = pareto_set(table)
  else:
    by_key = {_key(r.width, r.resolution): r for r in table}
    chosen = {}
    for c in configurations:
      row = c if isinstance(c, Row) else by_key.get(_key(*c))
      if row is None:
        width, resolution = _key(*c)
        raise UserError(f'width {width:g} at {resolution} px is not in the query table, so its cost is unknown: sweep '
                        f'it first (--mode=sweep --widths={width:g} --resolutions={resolution}).')
      chosen[_key(row.width, row.resolution)] = row
    rows = query.scored(list(chosen.values()))
  if not rows:
    raise UserError('no configuration to hold has a top-1 accuracy (NaN, or not measured: a sweep on images without '
                    'labels): the adaptive network picks by accuracy, so sweep on a labelled eval split first.')
  return rows


def _key(width: float, resolution: int) -> tuple[float, int]:
  return slim.canonical_width(width), int(resolution)


@dataclasses.dataclass(frozen=True)
class Configuration:
  """One held configuration: its query-table row, its network, and that network's raw-image program compiled for
  the adaptive network's input shape, with the variables already on the device (so a call moves only the images)."""
  row: Row
  network: ExportedModel
  program: jax.stages.Compiled
  variables: Any

  def __call__(self, batch: np.ndarray) -> jax.Array:
    """Logits of a float32 batch of raw pixels shaped as compiled."""
    return self.program(self.variables, batch)


def _compile(row: Row, network: ExportedModel, spec: jax.ShapeDtypeStruct) -> Configuration:
  network.require_preprocessing()  # a format-1 export takes no raw images: say so now, not on some later call
  variables = jax.device_put(network.variables)
  return Configuration(row, network, jax.jit(network.forward_raw).lower(variables, spec).compile(), variables)


class AdaptiveNetwork:
  """Configurations of one run, each compiled for batches of `batch_size` raw images of `image_size` (an int for
  square images, or (height, width); default: the run's pipeline input size), and a call that runs the most accurate
  one within a budget: the call's, else the construction's `budget_mflops` / `budget_ms`."""

  def __init__(self, networks: Sequence[tuple[Row, ExportedModel]], batch_size: int = 1,
               image_size: int | tuple[int, int] | None = None, budget_mflops: float | None = None,
               budget_ms: float | None = None):
    if not networks:
      raise UserError('an adaptive network needs at least one configuration.')
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
      raise UserError(f'batch_size must be a positive integer, got {batch_size!r}.')
    first = networks[0][1]
    size = first.require_preprocessing().input_size if image_size is None else image_size
    height, width = (size, size) if isinstance(size, (int, np.integer)) else size
    self.input_shape = (int(batch_size), int(height), int(width), first.channels)
    spec = jax.ShapeDtypeStruct(self.input_shape, jnp.float32)
    self.configurations = tuple(_compile(row, network, spec) for row, network in networks)
    self._by_key = {_key(c.row.width, c.row.resolution): c for c in self.configurations}
    self.rows = [c.row for c in self.configurations]
    self.budget_mflops, self.budget_ms = budget_mflops, budget_ms
    self.last: Row | None = None  # the configuration the latest call ran

  def choose(self, budget_mflops: float | None = None, budget_ms: float | None = None) -> Row:
    """The most accurate held configuration within the budgets (the construction's when none are given), by
    `query.query`: with the default configurations, the row `Run.best` picks from the whole table."""
    if budget_mflops is None and budget_ms is None:
      budget_mflops, budget_ms = self.budget_mflops, self.budget_ms
    return query.query(self.rows, budget_mflops, budget_ms)

  def configuration(self, row: Row) -> Configuration:
    """The held configuration of `row` (e.g. `net.last`)."""
    return self._by_key[_key(row.width, row.resolution)]

  def __call__(self, images: Any, budget_mflops: float | None = None, budget_ms: float | None = None) -> jax.Array:
    """Logits of a batch of raw images (uint8, or floats in [0, 255]) shaped `input_shape`, from the configuration
    `choose` picks; `last` then names it."""
    row = self.choose(budget_mflops, budget_ms)
    logits = self.configuration(row)(self._batch(images))
    self.last = row
    return logits

  def _batch(self, images: Any) -> np.ndarray:
    """Raw pixels as the float32 batch the programs take, checked on the host: a check on the device (as
    ExportedModel's) would compile a little program for each new input shape or dtype."""
    try:
      array = np.asarray(images)
    except ValueError:  # a ragged nested list
      raise UserError(f'expected an array of pixel values, got a ragged {type(images).__name__}.') from None
    floating = np.issubdtype(array.dtype, np.floating)
    if not (floating or np.issubdtype(array.dtype, np.integer)) or array.dtype == np.bool_:
      raise UserError(f'expected pixel values (uint8, or floats in [0, 255]), got dtype {array.dtype}.')
    if array.shape != self.input_shape:
      raise UserError(f'this adaptive network is compiled for raw images shaped {self.input_shape} (batch, height, '
                      f'width, channels), got {array.shape}: build one for that shape with '
                      'run.adaptive(batch_size=..., image_size=...).')
    batch = array.astype(np.float32)
    if floating:
      bad = batch.size - int(np.count_nonzero(np.isfinite(batch)))
      if bad:
        raise UserError(f'{bad} of {batch.size} pixel values are NaN or infinite: fix or drop those images.')
      peak = float(batch.max())
      if 0.0 < peak <= 1.0:
        raise UserError(f'the images are floats in [0, 1] (largest pixel {peak:g}), but raw pixels are in [0, 255]: '
                        'multiply them by 255 (or pass uint8 images).')
    return batch
