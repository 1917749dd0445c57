"""A finished (or paused) training run opened for post-training work: calibration, sweep and export.

It restores the parameters of the latest checkpoint in a workdir and knows which (width, resolution) settings that
run was trained for, so every later mode validates a user's width against the trained range and the sweep grid in
one place.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Callable, Iterable, Iterator, Mapping

import ml_collections
from etils import epath
from jax.sharding import Mesh

from mutualnet_jax import bn_calibration, checkpointing, evaluation, parallel, slim
from mutualnet_jax.bn_calibration import tree_digest
from mutualnet_jax.errors import UserError
from mutualnet_jax.models.base import SlimmableModel
from mutualnet_jax.preprocess import input_size

_TOL = 1e-6
_REPLAY_LIMIT_BYTES = 1 << 30  # passes up to this size are kept in host memory after the first


class Replay:
  """Re-iterable batches from an iterator factory; the first full pass is kept in memory when it is small, so a
  sweep decodes the calibration images and the eval split once instead of once per configuration."""

  def __init__(self, make: Callable[[], Iterable[Mapping[str, Any]]], limit_bytes: int = _REPLAY_LIMIT_BYTES):
    self._make, self._limit = make, limit_bytes
    self._kept: list[Mapping[str, Any]] | None = None

  def __iter__(self) -> Iterator[Mapping[str, Any]]:
    if self._kept is not None:
      yield from self._kept
      return
    kept, size = [], 0
    for batch in self._make():
      size += sum(v.nbytes for v in batch.values())
      kept = kept if kept is not None and size <= self._limit else None
      if kept is not None:
        kept.append(batch)
      yield batch
    self._kept = kept


def sweep_widths(config: ml_collections.ConfigDict) -> tuple[float, ...]:
  """Widths a run is measured at: the `sweep_width_step` grid of the trained `width_range` together with the
  training grid (`width_step`), or the one width of an independent network. (A config.json saved before
  `sweep_width_step` existed sweeps its training grid.)"""
  if config.method == 'independent':
    return (slim.check_width(config.independent_width, config.model.max_width),)
  lo, hi = (float(w) for w in config.width_range)
  return tuple(sorted(set(slim.width_grid(lo, hi, config.get('sweep_width_step', config.width_step))) |
                      set(slim.width_grid(lo, hi, config.width_step))))


def trained_resolutions(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The resolution set, highest first (an independent network: its one resolution)."""
  if config.method == 'independent':
    return (int(config.independent_resolution),)
  return tuple(sorted({int(r) for r in config.resolutions}, reverse=True))


def check_width(config: ml_collections.ConfigDict, width: float) -> float:
  """`width` as its canonical grid value; a UserError for one outside the trained range or off the grid."""
  grid = sweep_widths(config)
  if not isinstance(width, (int, float)) or isinstance(width, bool):
    raise UserError(f'width must be a number, got {width!r}.')
  if not grid[0] - _TOL <= width <= grid[-1] + _TOL:
    raise UserError(f'width {width:g} is outside the trained range [{grid[0]:g}, {grid[-1]:g}]: pick a width in '
                    'it.')
  nearest = min(grid, key=lambda g: abs(g - width))
  if abs(nearest - width) > _TOL:
    neighbours = ', '.join(f'{g:g}' for g in sorted(grid, key=lambda g: abs(g - width))[:2])
    raise UserError(f'width {width:g} is not on the sweep grid ({", ".join(f"{g:g}" for g in grid)}; set by '
                    f'config.sweep_width_step and config.width_step): use a grid width such as {neighbours}.')
  return nearest


def check_resolution(resolution: int, model: SlimmableModel, image_size: int) -> int:
  """A resolution the model accepts and the input pipeline can deliver without upsampling."""
  if isinstance(resolution, bool) or int(resolution) != resolution:
    raise UserError(f'resolution must be an integer number of pixels, got {resolution!r}.')
  resolution = int(resolution)
  if not model.min_resolution <= resolution <= image_size:
    raise UserError(f'resolution {resolution} is outside [{model.min_resolution}, {image_size}]: the model needs at '
                    f'least {model.min_resolution} px and the pipeline delivers {image_size} px '
                    '(raise config.image_size for larger inputs).')
  return resolution


def check_request(config: ml_collections.ConfigDict, width: float, resolution: int) -> tuple[float, int]:
  """Validates a (width, resolution) from the config alone, before any checkpoint is read."""
  from mutualnet_jax.models import get_model  # pylint: disable=g-import-not-at-top
  return check_width(config, width), check_resolution(resolution, get_model(config.model), input_size(config))


CONFIG_FILE = 'config.json'


def _tuples(value: Any) -> Any:
  """JSON has no tuples; configs declare sequences as tuples, so `--config.x=(...)` overrides keep type-checking."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the training config next to the checkpoints, so post-training modes need only --workdir."""
  (epath.Path(workdir) / CONFIG_FILE).write_text(config.to_json(indent=2, sort_keys=True))


def saved_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (a UserError when the workdir has none or it is damaged)."""
  path = epath.Path(workdir) / CONFIG_FILE
  try:
    return ml_collections.ConfigDict(_tuples(json.loads(path.read_text())))
  except FileNotFoundError:
    raise UserError(f'{path} not found: pass --config (the config the run was trained with), or the --workdir '
                    'of a run trained by main.py.') from None
  except (OSError, ValueError) as e:
    raise UserError(f'{path} is unreadable ({e}): pass --config (the config the run was trained with).') from None


@dataclasses.dataclass(frozen=True)
class TrainedRun:
  """The latest checkpoint of a workdir plus what post-training modes need to know about its run."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: Mesh
  model: SlimmableModel  # global BN statistics (bn_groups=1): what calibration and inference use
  params: Any            # full-width parameters, replicated over the mesh
  step: int
  channels: int
  image_size: int
  params_digest: str     # checksum of `params`: stored statistics name the exact weights they belong to

  @property
  def widths(self) -> tuple[float, ...]:
    return sweep_widths(self.config)

  @property
  def resolutions(self) -> tuple[int, ...]:
    return trained_resolutions(self.config)

  def check(self, width: float, resolution: int) -> tuple[float, int]:
    return check_width(self.config, width), check_resolution(resolution, self.model, self.image_size)

  @property
  def provenance(self) -> dict[str, Any]:
    """What calibrated statistics depend on; statistics stored under a different provenance are stale."""
    c = self.config
    return {'params_digest': self.params_digest, 'checkpoint_step': self.step, 'dataset': c.dataset,
            'train_split': c.train_split, 'seed': c.seed, 'num_images': c.calibration_images,
            'batch_size': c.calibration_batch_size, 'image_size': self.image_size,
            'antialias': bool(c.resize_antialias)}

  @functools.cached_property
  def store(self) -> bn_calibration.StatsStore:
    return bn_calibration.StatsStore(self.workdir)

  @functools.cached_property
  def calibrator(self) -> bn_calibration.Calibrator:
    return bn_calibration.Calibrator(self.model, self.mesh, self.config.resize_antialias)

  @functools.cached_property
  def evaluator(self) -> evaluation.Evaluator:
    return evaluation.Evaluator(self.model, self.mesh, self.config.resize_antialias)

  @functools.cached_property
  def calibration_batches(self) -> Replay:
    from mutualnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    return Replay(lambda: input_pipeline.calibration_iterator(
        self.config, num_images=self.config.calibration_images,
        global_batch_size=self.config.calibration_batch_size))

  def stats(self, width: float, resolution: int) -> tuple[Any, bool]:
    """BN statistics of (width, resolution) from the store, calibrated and stored first when missing, stale or
    corrupt; the flag says whether they were computed now."""
    width, resolution = self.check(width, resolution)
    return bn_calibration.get_or_calibrate(self.store, self.calibrator, self.params, width, resolution,
                                           lambda: self.calibration_batches, self.provenance)


def open_run(config: ml_collections.ConfigDict, workdir: str) -> TrainedRun:
  """Restores the latest checkpoint of `workdir` (a UserError when there is none or it is of another model)."""
  checkpointing.require_checkpoint(workdir)
  from mutualnet_jax import input_pipeline, train  # pylint: disable=g-import-not-at-top
  train.enable_compilation_cache(config.compilation_cache_dir)
  mesh = parallel.make_mesh()
  info = input_pipeline.get_dataset_info(config)
  trainer = train.Trainer(config, mesh, channels=info.channels, image_size=input_size(config), total_steps=1,
                          steps_per_epoch=1)
  ckpt = checkpointing.Checkpoints(workdir, keep=config.keep_checkpoints,
                                   expected=checkpointing.fingerprint(config, info.channels), read_only=True)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise UserError(f'no finished checkpoint in {ckpt.directory}: train first or pass the --workdir of a trained '
                      'run.')
    state, _ = ckpt.restore(step, trainer.abstract_state())
  finally:
    ckpt.close()
  return TrainedRun(config=config, workdir=workdir, mesh=mesh, model=trainer.model.clone(bn_groups=1),
                    params=state.params, step=int(step), channels=info.channels, image_size=input_size(config),
                    params_digest=tree_digest(state.params))
