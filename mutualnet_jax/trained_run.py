"""A finished (or paused) training run opened for post-training work: BN calibration, the sweep and export.

`open_run` restores the latest checkpoint of a workdir; `TrainedRun` knows what that run was trained for, so every
later mode checks a requested (width, resolution) in one place, and it hands out BN statistics per configuration from
the workdir's store (calibrating the missing ones).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Sequence

import ml_collections
from absl import logging
from clu import periodic_actions
from jax.sharding import Mesh

from mutualnet_jax import (bn_calibration, checkpointing, compilation, evaluation, input_pipeline, parallel, slim,
                           workdir as workdir_lib)
from mutualnet_jax.bn_calibration import tree_digest
from mutualnet_jax.errors import UserError
from mutualnet_jax.models import get_model
from mutualnet_jax.models.base import SlimmableModel
from mutualnet_jax.resizing import Resize, input_size
from mutualnet_jax.train_state import abstract_run_state


def trained_width_range(config: ml_collections.ConfigDict) -> tuple[float, float]:
  """(min, max) width the run's weights were trained for (an independent network: its one width, twice)."""
  if config.method == 'independent':
    w = slim.check_width(config.independent_width, config.model.max_width)
    return w, w
  lo, hi = (float(w) for w in config.width_range)
  return lo, hi


def trained_resolutions(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The resolution set, highest first (an independent network: its one resolution)."""
  if config.method == 'independent':
    return (int(config.independent_resolution),)
  return tuple(sorted({int(r) for r in config.resolutions}, reverse=True))


def check_trained_width(config: ml_collections.ConfigDict, width: float) -> float:
  """`width` as a canonical float; a UserError for one outside the range the run was trained for."""
  return slim.check_width(width, config.model.max_width, trained=trained_width_range(config))


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
  return (check_trained_width(config, width),
          check_resolution(resolution, get_model(config.model), input_size(config)))


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
  store_dir: str = ''    # where the BN statistics store lives ('' = the workdir; --out for a read-only workdir)

  def check(self, width: float, resolution: int) -> tuple[float, int]:
    return check_trained_width(self.config, width), check_resolution(resolution, self.model, self.image_size)

  @property
  def capacities(self) -> tuple[float, ...]:
    """The capacity programs that calibrate and evaluate its widths (none for runs trained before they existed)."""
    return tuple(self.config.get('capacities', ()))

  def provenance(self, images: input_pipeline.ImageSource | None = None) -> dict[str, Any]:
    """What statistics calibrated on the run's training split (or on `images`) depend on; statistics stored under
    a different provenance are stale (see `bn_calibration.accepts`)."""
    c = self.config
    weights = {'params_digest': self.params_digest, 'checkpoint_step': self.step}
    # Settings added later enter only when they differ from the old behaviour: existing stores stay current.
    common = {'image_size': self.image_size, 'antialias': bool(c.resize_antialias),
              **({'align_corners': True} if Resize.of(c).align_corners else {}),
              **({'calibration': 'official'} if bn_calibration.is_official(c) else {})}
    if images is not None:
      return {**weights, **images.provenance, **common}
    return {**weights, 'dataset': c.dataset, 'train_split': c.train_split, 'seed': c.seed,
            'num_images': c.calibration_images, 'batch_size': c.calibration_batch_size, **common}

  @functools.cached_property
  def store(self) -> bn_calibration.StatsStore:
    return bn_calibration.StatsStore(self.store_dir or self.workdir)

  @functools.cached_property
  def calibrator(self) -> bn_calibration.Calibrator:
    return bn_calibration.Calibrator(self.model, self.mesh, Resize.of(self.config), self.capacities,
                                     official=bn_calibration.is_official(self.config))

  @functools.cached_property
  def evaluator(self) -> evaluation.Evaluator:
    return evaluation.Evaluator(self.model, self.mesh, Resize.of(self.config), self.capacities)

  @functools.cached_property
  def calibration_batches(self) -> input_pipeline.Replay:
    return input_pipeline.Replay(lambda: input_pipeline.calibration_iterator(
        self.config, num_images=self.config.calibration_images,
        global_batch_size=self.config.calibration_batch_size))

  def stats(self, width: float, resolution: int,
            images: input_pipeline.ImageSource | None = None) -> tuple[Any, bool]:
    """BN statistics of (width, resolution) from the store, calibrated (on the training split, or on `images`)
    and stored first when missing, stale or corrupt; the flag says whether they were computed now."""
    width, resolution = self.check(width, resolution)
    batches = self.calibration_batches if images is None else images.batches
    return bn_calibration.get_or_calibrate(self.store, self.calibrator, self.params, width, resolution,
                                           lambda: batches, self.provenance(images))

  def calibrate(self, pairs: Sequence[tuple[float, int]],
                images: input_pipeline.ImageSource | None = None) -> dict[str, Any]:
    """`stats` of every pair (calibrated on `images` when given, else on the training split), logged as it goes;
    counts and time."""
    start, computed = time.perf_counter(), 0
    progress = periodic_actions.ReportProgress(num_train_steps=len(pairs), every_secs=30.0)
    with compilation.CompileCounter().counting() as counter:
      for i, (w, r) in enumerate(pairs, 1):
        _, new = self.stats(w, r, images)
        computed += new
        logging.info('[%d/%d] width %g @ %d px: %s', i, len(pairs), w, r, 'calibrated' if new else 'reused')
        progress(i)
    return {'configurations': len(pairs), 'calibrated': computed, 'reused': len(pairs) - computed,
            'seconds': time.perf_counter() - start, 'compiles': counter.compiles,
            'store': os.fspath(self.store.directory),
            'images': 'the training split' if images is None else images.description}

  def evaluate(self, stats: Any, width: float, resolution: int, batches: Any) -> dict[str, float]:
    """Top-1/top-5 of (width, resolution) with `stats`, in its capacity's program."""
    return self.evaluator.evaluate(self.params, stats, width, resolution, batches)


def open_run(config: ml_collections.ConfigDict, workdir: str, store_dir: str = '') -> TrainedRun:
  """Restores the newest checkpoint of `workdir` that restores (a UserError when there is none, it is of another
  model, or its parameters are not finite). The dataset is not read: the checkpoint records its input channels."""
  workdir_lib.require_checkpoint(workdir)
  compilation.enable_cache(config.compilation_cache_dir)
  mesh = parallel.make_mesh()
  channels = checkpointing.recorded_channels(workdir) or input_pipeline.get_dataset_info(config).channels
  with checkpointing.Checkpoints(workdir, keep=config.keep_checkpoints, read_only=True,
                                 expected=checkpointing.fingerprint(config, channels)) as ckpt:
    restored = ckpt.restore_latest(abstract_run_state(config, channels, mesh))
  if restored is None:
    raise UserError(f'no checkpoint in {ckpt.directory} restores: train again, or pass the --workdir of a trained '
                    'run.')
  step, state, _ = restored
  if not checkpointing.all_finite(state.params):
    raise UserError(f'the checkpoint of step {step} in {ckpt.directory} holds non-finite parameters (the run '
                    'diverged before it was saved): retrain with a lower learning rate in a fresh --workdir.')
  return TrainedRun(config=config, workdir=workdir, mesh=mesh, model=get_model(config.model), params=state.params,
                    step=int(step), channels=channels, image_size=input_size(config),
                    params_digest=tree_digest(state.params), store_dir=store_dir)


def sweep_widths(config: ml_collections.ConfigDict) -> tuple[float, ...]:
  """The widths a run is measured at by default: the `sweep_width_step` grid over the trained range (an
  independent network: its one width). A config.json saved before `sweep_width_step` existed uses `width_step`."""
  lo, hi = trained_width_range(config)
  return slim.width_grid(lo, hi, config.get('sweep_width_step', config.width_step))


def selection(config: ml_collections.ConfigDict, widths: Sequence[float] | None = None,
              resolutions: Sequence[int] | None = None) -> list[tuple[float, int]]:
  """Checked (width, resolution) pairs, widths outer; None means the sweep grid / the trained resolutions."""
  ws = widths or sweep_widths(config)
  rs = resolutions or trained_resolutions(config)
  return [check_request(config, w, r) for w in ws for r in rs]
