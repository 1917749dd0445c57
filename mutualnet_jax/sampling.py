"""Which sub-networks a training step trains: the sandwich rule with resolutions (MutualNet) and its baselines.

A host-side NumPy generator draws discrete (width, resolution) settings each step; they are static arguments of the
compiled step (big_vision's FlexiViT pattern), so every bucket compiles once. Random widths come from a grid, which
bounds the number of buckets. The generator's state is plain JSON, saved with each checkpoint.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import ml_collections
import numpy as np

from mutualnet_jax import slim
from mutualnet_jax.errors import UserError

METHODS = ('mutualnet', 'usnet', 'independent')


@dataclasses.dataclass(frozen=True, order=True)
class Subnet:
  """One sub-network of a step and its loss: 'ce' (labels) or 'kd' (the step's first sub-network's prediction)."""
  width: float
  resolution: int
  loss: str = 'kd'


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
    self.widths = slim.width_grid(min_w, max_w, config.width_step)
    self.resolutions = tuple(sorted(set(resolutions), reverse=True))
    self.max_resolution = self.resolutions[0]
    self.num_subnets = int(config.num_subnets)
    if self.method != 'independent' and self.num_subnets < 2:
      raise UserError(f'config.num_subnets must be >= 2 for the sandwich rule (max + min), got {self.num_subnets}.')
    self.student_loss = 'kd' if config.inplace_distillation else 'ce'
    if self.method == 'independent':
      self.fixed = Subnet(slim.check_width(config.independent_width, config.model.max_width),
                          int(config.independent_resolution), 'ce')
    self.rng = np.random.default_rng(config.seed)

  def sample(self) -> list[Subnet]:
    """The sub-networks of one step; the first (max width, highest resolution, 'ce') is the teacher."""
    if self.method == 'independent':
      return [self.fixed]
    interior = self.widths[1:-1] or self.widths
    widths = [self.widths[0]] + [float(w) for w in self.rng.choice(interior, self.num_subnets - 2)]
    if self.method == 'mutualnet':
      resolutions = [int(r) for r in self.rng.choice(self.resolutions, len(widths))]
    else:
      resolutions = [self.max_resolution] * len(widths)
    return [Subnet(self.widths[-1], self.max_resolution, 'ce')] + [
        Subnet(w, r, self.student_loss) for w, r in zip(widths, resolutions)]

  def buckets(self) -> list[Subnet]:
    """Every sub-network `sample` can return: what an ahead-of-time compile must cover."""
    if self.method == 'independent':
      return [self.fixed]
    interior = self.widths[1:-1] or self.widths
    resolutions = self.resolutions if self.method == 'mutualnet' else (self.max_resolution,)
    students = {Subnet(w, r, self.student_loss) for w in (self.widths[0],) + tuple(interior) for r in resolutions}
    return [Subnet(self.widths[-1], self.max_resolution, 'ce')] + sorted(students)

  def state_dict(self) -> dict[str, Any]:
    return self.rng.bit_generator.state

  def load_state_dict(self, state: dict[str, Any]) -> None:
    self.rng.bit_generator.state = state


def describe(subnets: Sequence[Subnet]) -> str:
  return ' '.join(f'{s.width:g}@{s.resolution}/{s.loss}' for s in subnets)
