"""Which sub-networks a training step trains: the sandwich rule with resolutions (MutualNet) and its baselines.

Each step's choice is a pure function of (config.seed, step), drawn on the host (big_vision's FlexiViT pattern), so
resuming needs no sampler state and any step's sub-networks can be recomputed. Widths and resolutions are static
arguments of the compiled step: each bucket compiles once.
"""
from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from mutualnet_jax import slim
from mutualnet_jax.errors import UserError

METHODS = ('mutualnet', 'usnet', 'independent')
_STREAM = 0x5A4D  # keeps the sampler's random stream apart from anything else seeded by config.seed


@dataclasses.dataclass(frozen=True, order=True)
class Bucket:
  """What a compiled sub-network step is specialised to: width, resolution and loss ('ce' labels, 'kd' teacher)."""
  width: float
  resolution: int
  loss: str


@dataclasses.dataclass(frozen=True)
class Subnet:
  """One sub-network of a step: its metric name ('max', 'min', 'rand1', ...; 'fixed' for one network) and bucket."""
  name: str
  width: float
  resolution: int
  loss: str

  @property
  def bucket(self) -> Bucket:
    return Bucket(self.width, self.resolution, self.loss)


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """The sub-networks of one step. The teacher learns from the labels; every student learns from the teacher's
  prediction of the same batch ('kd') or, without inplace distillation, from the labels too ('ce')."""
  teacher: Subnet
  students: tuple[Subnet, ...] = ()

  @property
  def subnets(self) -> tuple[Subnet, ...]:
    return (self.teacher,) + self.students


class Sampler:
  """Draws the sub-networks of each step for `config.method`.

  mutualnet: max width at the highest resolution (teacher), min width and `num_subnets - 2` random widths, each at a
    resolution drawn uniformly from the set (the highest included).
  usnet: the same sandwich of widths, every one at the highest resolution.
  independent: one fixed (width, resolution), trained with labels.
  """

  def __init__(self, config: ml_collections.ConfigDict):
    self.method = config.method
    if self.method not in METHODS:
      raise UserError(f'unknown method {self.method!r}: choose one of {METHODS} (config.method).')
    resolutions = tuple(int(r) for r in config.resolutions)
    if not resolutions:
      raise UserError('config.resolutions is empty: give at least one input resolution, e.g. (224, 192, 160, 128).')
    if min(resolutions) <= 0:
      raise UserError(f'config.resolutions must be positive, got {resolutions}.')
    min_w, max_w = (float(w) for w in config.width_range)
    if not 0 < min_w <= max_w:
      raise UserError(f'config.width_range must be (min, max) with 0 < min <= max, got {tuple(config.width_range)}.')
    if max_w > config.model.max_width + 1e-6:
      raise UserError(f'config.width_range max {max_w} exceeds model.max_width {config.model.max_width}: '
                      'raise model.max_width or lower the range.')
    self.seed = int(config.seed)
    self.widths = slim.width_grid(min_w, max_w, config.width_step)
    self.resolutions = tuple(sorted(set(resolutions), reverse=True))
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
    return self.fixed or Subnet('max', self.widths[-1], self.max_resolution, 'ce')

  def plan(self, step: int) -> StepPlan:
    """The sub-networks of training step `step` (a pure function of the seed and the step)."""
    if self.fixed is not None:
      return StepPlan(self.fixed)
    rng = np.random.default_rng((self.seed, _STREAM, int(step)))
    interior = self.widths[1:-1] or self.widths
    widths = [self.widths[0]] + [float(w) for w in rng.choice(interior, self.num_subnets - 2)]
    if self.method == 'mutualnet':
      resolutions = [int(r) for r in rng.choice(self.resolutions, len(widths))]
    else:
      resolutions = [self.max_resolution] * len(widths)
    names = ['min'] + [f'rand{i}' for i in range(1, len(widths))]
    return StepPlan(self.teacher, tuple(Subnet(n, w, r, self.student_loss)
                                        for n, w, r in zip(names, widths, resolutions)))

  def buckets(self) -> list[Bucket]:
    """Every bucket `plan` can return, teacher first: what an ahead-of-time compile must cover."""
    if self.fixed is not None:
      return [self.fixed.bucket]
    interior = self.widths[1:-1] or self.widths
    resolutions = self.resolutions if self.method == 'mutualnet' else (self.max_resolution,)
    students = {Bucket(w, r, self.student_loss) for w in (self.widths[0],) + tuple(interior) for r in resolutions}
    return [self.teacher.bucket] + sorted(students)
