"""Which sub-networks a training step trains, and which compiled program runs each.

The sandwich rule (US-Net) with resolutions (MutualNet): the max width at the highest resolution learns from the
labels; the min width and `num_subnets - 2` random widths, each at a resolution drawn from the set, learn from its
prediction. Random widths are drawn as the official code does, uniformly and continuously in [min, max]
(`width_sampling='uniform'`), or from a grid (`'grid'`, `width_step`).

Each step's choice is a pure function of (config.seed, step), drawn on the host (big_vision's FlexiViT pattern), so
resuming needs no sampler state. A sub-network runs in the program of its *bucket*: the max and min widths have their
own exact programs; every other width runs in the program of the smallest `config.capacities` entry that holds it,
with its real channel counts passed at run time (`slim.keep_active`), so the number of programs does not grow with
the number of widths.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import ml_collections
import numpy as np

from mutualnet_jax import slim
from mutualnet_jax.errors import UserError
from mutualnet_jax.programs import Bucket, bucket_for

METHODS = ('mutualnet', 'usnet', 'independent')
_STREAM = 0x5A4D  # keeps the sampler's random stream apart from anything else seeded by config.seed


@dataclasses.dataclass(frozen=True)
class Subnet:
  """One sub-network of a step: its metric name ('max', 'min', 'rand1', ...; 'fixed' for one network), width,
  resolution and loss."""
  name: str
  width: float
  resolution: int
  loss: str


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """The sub-networks of one step. The teacher learns from the labels; every student learns from the teacher's
  prediction of the same batch ('kd') or, without inplace distillation, from the labels too ('ce')."""
  teacher: Subnet
  students: tuple[Subnet, ...] = ()

  @property
  def subnets(self) -> tuple[Subnet, ...]:
    return (self.teacher,) + self.students


def check_capacities(capacities: Sequence[float], width_range: Sequence[float], max_width: float) -> tuple[float, ...]:
  """Sorted capacities (each > 0 by its declaration); none above max_width, the largest covering the trained range
  (or none at all)."""
  caps = tuple(sorted({slim.canonical_width(c) for c in capacities}))
  if caps and caps[-1] > max_width + slim.WIDTH_TOL:
    raise UserError(f'config.capacities={tuple(capacities)} must lie in (0, model.max_width={max_width}].')
  if caps and caps[-1] < float(width_range[1]) - slim.WIDTH_TOL:
    raise UserError(f'config.capacities={tuple(capacities)} must include a capacity >= the max width '
                    f'{width_range[1]} (or be empty: every width exact).')
  return caps


class Sampler:
  """Draws the sub-networks of each step for `config.method` and maps each to its bucket.

  mutualnet: max width at the highest resolution (teacher), min width and `num_subnets - 2` random widths, each at a
    resolution drawn uniformly from the set (the highest included).
  usnet: the same sandwich of widths, every one at the highest resolution.
  independent: one fixed (width, resolution), trained with labels.

  Each field's own type and range are checked by its declaration (config_fields, run by config_check); the sampler
  checks what only it knows: method names, and widths and capacities against the model's max width.
  """

  def __init__(self, config: ml_collections.ConfigDict):
    self.method = config.method
    if self.method not in METHODS:
      raise UserError(f'unknown method {self.method!r}: choose one of {METHODS} (config.method).')
    min_w, max_w = (float(w) for w in config.width_range)
    if max_w > config.model.max_width + slim.WIDTH_TOL:
      raise UserError(f'config.width_range max {max_w} exceeds model.max_width {config.model.max_width}: '
                      'raise model.max_width or lower the range.')
    self.sampling = config.width_sampling
    self.seed = int(config.seed)
    self.min_width, self.max_width = slim.check_width(min_w, max_w), slim.check_width(max_w, max_w)
    self.grid = slim.width_grid(min_w, max_w, config.width_step)
    self.capacities = check_capacities(config.capacities, (min_w, max_w), config.model.max_width)
    if self.sampling == 'uniform' and not self.capacities and self.method != 'independent':
      raise UserError("width_sampling='uniform' draws unboundedly many widths: give config.capacities (e.g. "
                      "(0.5, 0.75, 1.0)) or use width_sampling='grid'.")
    self.resolutions = tuple(sorted({int(r) for r in config.resolutions}, reverse=True))
    self.max_resolution = self.resolutions[0]
    self.num_subnets = int(config.num_subnets)
    if self.method != 'independent' and self.num_subnets < 2:
      raise UserError(f'config.num_subnets must be >= 2 for the sandwich rule (max + min), got {self.num_subnets}.')
    self.student_loss = 'kd' if config.inplace_distillation else 'ce'
    self.fixed = None
    if self.method == 'independent':
      self.fixed = Subnet('fixed', slim.check_width(config.independent_width, config.model.max_width),
                          int(config.independent_resolution), 'ce')

  @property
  def teacher(self) -> Subnet:
    return self.fixed or Subnet('max', self.max_width, self.max_resolution, 'ce')

  @property
  def student_resolutions(self) -> tuple[int, ...]:
    return self.resolutions if self.method == 'mutualnet' else (self.max_resolution,)

  def _random_widths(self, rng: np.random.Generator, n: int) -> list[float]:
    if self.sampling == 'uniform':  # the official code: np.random.uniform(min, max, 2)
      return [slim.check_width(float(w), self.max_width) for w in rng.uniform(self.min_width, self.max_width, n)]
    interior = self.grid[1:-1] or self.grid
    return [float(w) for w in rng.choice(interior, n)]

  def plan(self, step: int) -> StepPlan:
    """The sub-networks of training step `step` (a pure function of the seed and the step)."""
    if self.fixed is not None:
      return StepPlan(self.fixed)
    rng = np.random.default_rng((self.seed, _STREAM, int(step)))
    widths = [self.min_width] + self._random_widths(rng, self.num_subnets - 2)
    resolutions = [int(r) for r in rng.choice(self.student_resolutions, len(widths))]
    names = ['min'] + [f'rand{i}' for i in range(1, len(widths))]
    return StepPlan(self.teacher, tuple(Subnet(n, w, r, self.student_loss)
                                        for n, w, r in zip(names, widths, resolutions)))

  def bucket(self, subnet: Subnet) -> Bucket:
    """The program a sub-network runs in: exact for the max and min widths (and for every width when no capacity
    holds it), else the capacity path."""
    exact = subnet.width in (self.min_width, self.max_width) or self.fixed is not None
    return bucket_for(subnet.width, subnet.resolution, self.capacities, loss=subnet.loss, exact=exact)

  def buckets(self) -> list[Bucket]:
    """Every bucket `plan` can lead to, teacher first: what an ahead-of-time compile must cover."""
    if self.fixed is not None:
      return [self.bucket(self.fixed)]
    if self.sampling == 'grid':
      widths = set(self.grid[1:-1] or self.grid)
    else:  # a representative width inside each capacity interval that uniform draws can reach
      bounds = (self.min_width,) + tuple(c for c in self.capacities if c > self.min_width)
      widths = {slim.canonical_width((lo + hi) / 2) for lo, hi in zip(bounds, bounds[1:])} or {self.max_width}
    students = {self.bucket(Subnet('', w, r, self.student_loss))
                for w in widths | {self.min_width} for r in self.student_resolutions}
    return [self.bucket(self.teacher)] + sorted(students)
