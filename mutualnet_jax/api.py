"""The Python API: open a trained workdir, pick a configuration from its query table under a budget, and get a
network of that (width, resolution) that takes raw images.

  import mutualnet_jax
  run = mutualnet_jax.open('runs/fashion_mnist')     # a trained (and swept) workdir
  row = run.best(budget_mflops=10)                   # the most accurate configuration within 10 M multiply-adds
  net = run.network(row.width, row.resolution)       # narrow parameters + this configuration's BN statistics
  logits = net(images)                               # raw uint8 / [0, 255] images, any size
  path = run.export(row.width, row.resolution)       # the same network on disk; mutualnet_jax.load(path) reads it
  run.calibrate(my_images, [0.5], [28])             # BN statistics from any raw images (no labels), kept in the store
  adaptive = run.adaptive(image_size=28)             # every configuration some budget picks, compiled for batch 1
  logits = adaptive(images[:1], budget_ms=2)         # the most accurate one within 2 ms; adaptive.last names it

A thin layer over `trained_run` (checkpoint, BN statistics per configuration), `query` (the table) and `export` (the
narrow network and its preprocessing): what `main.py --mode=query/export` do, as objects. `examples/python_api.py`
is the runnable version (tests/test_api.py runs it).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mutualnet_jax import checkpointing, export, input_pipeline, query, trained_run, workdir as workdir_lib
from mutualnet_jax.adaptive import AdaptiveNetwork, held_rows
from mutualnet_jax.errors import UserError
from mutualnet_jax.export import ExportedModel, TopK, load
from mutualnet_jax.resizing import Resize, input_size
from mutualnet_jax.query import Row

__all__ = ['AdaptiveNetwork', 'ExportedModel', 'Row', 'Run', 'TopK', 'UserError', 'load', 'open', 'preprocessing']


def preprocessing(config: ml_collections.ConfigDict, channels: int) -> export.Preprocessing:
  """The evaluation pipeline's treatment of raw pixels for a run trained with `config` (its mean/std: the config's,
  or the known dataset's; a UserError when neither is known)."""
  mean, std = input_pipeline.normalization(config, channels)
  # The ImageNet recipe evaluates a centre crop (input_pipeline's fraction of the shorter side); others the whole image.
  crop = input_pipeline.EVAL_CROP_FRACTION if config.augmentation == 'imagenet' else 1.0
  return export.Preprocessing(mean, std, input_size(config), crop)


@dataclasses.dataclass(frozen=True)
class Run:
  """A workdir and the config it was trained with. Reading the table needs neither JAX devices nor the checkpoint;
  the checkpoint is restored on the first `network`/`export` call and kept."""
  workdir: str
  config: ml_collections.ConfigDict

  @property
  def table(self) -> list[Row]:
    """Every measured configuration (read afresh each time: a sweep may have added rows)."""
    return query.read_table(self.workdir)[0]

  def frontier(self, cost: str = 'macs') -> list[Row]:
    """The Pareto frontier of the table by `cost` ('macs' or 'latency_ms'), cheapest first."""
    return query.pareto_frontier(self.table, cost)

  def best(self, budget_mflops: float | None = None, budget_ms: float | None = None) -> Row:
    """The most accurate configuration within the budgets (millions of MACs, batch-1 ms on the sweep's device)."""
    return query.query(self.table, budget_mflops, budget_ms)

  @functools.cached_property
  def trained(self) -> trained_run.TrainedRun:
    """The restored checkpoint (parameters, model, BN statistics store), opened once."""
    return trained_run.open_run(self.config, self.workdir)

  def network(self, width: float, resolution: int) -> ExportedModel:
    """The sub-network at (width, resolution) with its BN statistics (from the workdir's store; calibrated and
    stored first when missing) and the run's preprocessing, so it takes raw images."""
    with workdir_lib.lock(self.workdir, 'mutualnet_jax.api network', post_training=True):  # it may store statistics
      return self._network(width, resolution)

  def export(self, width: float, resolution: int, path: str | os.PathLike | None = None, *,
             overwrite: bool = False) -> epath.Path:
    """Saves `network(width, resolution)` (default: workdir/export/w<width>_r<resolution>); `load` reads it. An
    earlier export at `path` is replaced only with `overwrite`; anything else there is never touched."""
    if path is None and not workdir_lib.is_writable(self.workdir):
      raise UserError(f'workdir {self.workdir} is read-only: pass a writable path for the export (--out=...).')
    with workdir_lib.lock(self.workdir, 'mutualnet_jax.api export', post_training=True):
      net = self._network(width, resolution)
      run = self.trained
      source = {'workdir': os.fspath(self.workdir), 'checkpoint_step': run.step, 'params_digest': run.params_digest}
      path = path or export.default_path(self.workdir, net.width, net.resolution)
      return export.save(net, path, self.config.model.to_dict(), source, overwrite=overwrite)

  def calibrate(self, images: Any, widths: Sequence[float] | None = None, resolutions: Sequence[int] | None = None,
                split: str | None = None) -> dict[str, Any]:
    """BN statistics of the selected configurations (default: the sweep grid) calibrated on `images` instead of
    the run's training split, stored in the workdir, where `network`, `export` and the sweep then find them (they
    read no dataset for these). `images`: raw pixels (N, H, W, C) (or a list of differently sized images), a
    folder of image files, an .npy, or 'tfds:NAME' (a prepared TFDS dataset of any classes; its `split`, default
    'train'); labels are not needed. At most config.calibration_images are used. Returns counts and time."""
    run = self.trained
    source = input_pipeline.image_source(self.config, images, run.channels, split)
    pairs = trained_run.selection(self.config, widths, resolutions)
    with workdir_lib.lock(self.workdir, 'mutualnet_jax.api calibrate', post_training=True):
      return run.calibrate(pairs, source)

  def adaptive(self, budget_mflops: float | None = None, budget_ms: float | None = None,
               configurations: Sequence[Row | tuple[float, int]] | None = None, batch_size: int = 1,
               image_size: int | tuple[int, int] | None = None) -> AdaptiveNetwork:
    """One network for a changing budget: each call runs the most accurate configuration within that call's budget
    (default: these budgets). It holds the table's Pareto set by MACs and latency (or `configurations`), each
    compiled now for batches of `batch_size` raw images of `image_size` (default: the pipeline input size), so a
    switch compiles nothing."""
    rows = held_rows(self.table, configurations)
    with workdir_lib.lock(self.workdir, 'mutualnet_jax.api adaptive', post_training=True):  # it may store statistics
      networks = [(r, self._network(r.width, r.resolution)) for r in rows]
    return AdaptiveNetwork(networks, batch_size, image_size, budget_mflops, budget_ms)

  def _network(self, width: float, resolution: int) -> ExportedModel:
    width, resolution = trained_run.check_request(self.config, width, resolution)  # before the checkpoint is read
    run = self.trained
    stats, _ = run.stats(width, resolution)
    return export.build(run.model, run.params, stats, width, resolution, run.channels, Resize.of(self.config),
                        preprocessing(self.config, run.channels))

  def examples(self, count: int = 8, split: str | None = None) -> tuple[np.ndarray | list[np.ndarray], np.ndarray]:
    """The first `count` raw images (uint8, as stored) and labels of a split of the run's dataset (default: its
    eval split), to try a network on; images of different sizes come as a list."""
    input_pipeline.get_dataset_info(self.config)  # checks the dataset, prepares the offline builders on first use
    builder = tfds.builder(self.config.dataset, data_dir=os.path.expanduser(self.config.data_dir) or None)
    examples = list(builder.as_dataset(split=split or self.config.eval_split).take(count).as_numpy_iterator())
    if not examples:
      raise UserError(f'split {split or self.config.eval_split!r} of {self.config.dataset} has no images.')
    images = [e['image'] for e in examples]
    same_shape = len({i.shape for i in images}) == 1
    return np.stack(images) if same_shape else images, np.asarray([e['label'] for e in examples])


def open(workdir: str | os.PathLike, config: ml_collections.ConfigDict | None = None) -> Run:  # noqa: A001
  """A trained workdir; `config` defaults to the config.json that training saved there."""
  workdir = os.fspath(workdir)
  if not os.path.isdir(workdir) and '://' not in workdir:
    raise UserError(f'workdir {workdir} does not exist: pass the --workdir of a trained run.')
  return Run(workdir, checkpointing.training_config(workdir) if config is None else config)

