"""Fine-tuning: a fresh run's full-width parameters with a backbone loaded from another run or a parameter file.

`config.init_from` names the source:
- a training workdir: the parameters of its latest checkpoint; its config.json says what model they belong to;
- an export (`main.py --mode=export`): one sub-network's narrow parameters. They fill the leading slice of each
  parameter, which is exactly where the sub-network was cut from; the rest keeps its fresh initialisation. Widths
  up to the exported one start from trained weights (nested sub-networks of it when the source was slimmable),
  wider ones only partly, which fine-tuning at every width then has to make up;
- a parameter file (`.npz`): '/'-joined parameter paths -> full-width arrays, plus an optional `__model__` entry
  (the model config as JSON) for the architecture check; `save_params` writes one (e.g. from converted weights).

The source must be the same architecture (`models.architecture`: backbone, max width and any setting that shapes the
parameters); classes, strides (num_downsample), kernels and dtype may differ. The classifier is loaded or
re-initialised per `config.init_classifier`: 'auto' re-initialises it when the class counts differ, 'fresh' always
(new classes that happen to be as many), 'load' insists on loading it. Only parameters move: BN statistics are
calibrated per configuration after training anyway, and the optimizer starts afresh. The parameter tree keeps its
full-width shape, so the fine-tuned run trains, calibrates, sweeps and exports like any other, with any method.

Wiring (where `train_and_evaluate` creates a fresh state; a run resuming its own checkpoint never reads init_from):
  state = init_from.initial_state(config, trainer.init_state(config.seed), trainer.tx, mesh)
"""
from __future__ import annotations

import dataclasses
import json
import os
import zipfile
import zlib
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import traverse_util
from jax.sharding import Mesh

from mutualnet_jax import checkpointing, export, parallel, workdir as workdir_lib
from mutualnet_jax.errors import UserError
from mutualnet_jax.models import architecture, get_model
from mutualnet_jax.models.base import SlimmableModel
from mutualnet_jax.train_state import TrainState, abstract_run_state

CLASSIFIER = 'classifier'
CLASSIFIER_MODES = ('auto', 'fresh', 'load')
MODEL_KEY = '__model__'  # the model config (JSON) inside a parameter file
SEP = '/'

Flat = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Source:
  """Parameters read from `config.init_from`, flat ('layer/sub/leaf' -> host array)."""
  params: Flat
  model: SlimmableModel | None  # None: a parameter file without `__model__` (checked by names and shapes alone)
  narrow: bool                  # an export: arrays may be leading slices of the full-width ones
  description: str


@dataclasses.dataclass(frozen=True)
class Report:
  """What `merge` did to each parameter of the fresh tree."""
  loaded: tuple[str, ...]       # replaced whole by the source's array
  sliced: tuple[str, ...]       # only their leading slice (an export's narrow array)
  fresh: tuple[str, ...]        # re-initialised (the classifier)

  def summary(self) -> str:
    layers = sorted({p.split(SEP)[0] for p in self.loaded + self.sliced})
    return (f'{len(self.loaded) + len(self.sliced)} arrays loaded ({len(self.sliced)} into their leading slice only) '
            f'in layers {", ".join(layers)}; re-initialised: {", ".join(self.fresh) or "none"}')


# ----------------------------------------------------------------------------------------------------------------------
# Pure parts: flat trees and the merge.

def flatten(tree: Any) -> Flat:
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(dict(jax.device_get(tree)), sep=SEP).items()}


def unflatten(flat: Flat) -> dict[str, Any]:
  return traverse_util.unflatten_dict(flat, sep=SEP)


def _fill(fresh: np.ndarray, source: np.ndarray) -> np.ndarray:
  out = np.array(fresh, copy=True)
  out[tuple(slice(0, n) for n in source.shape)] = source
  return out


def merge(fresh: Any, source: Source, reinitialise: frozenset[str] = frozenset()) -> tuple[Any, Report]:
  """The fresh tree with every parameter the source holds, except the top-level layers in `reinitialise`.

  Shapes must match exactly, or, for a narrow source, the source's array must fit in the leading corner. A
  parameter one side lacks, or a shape that does not fit, is a UserError naming it (another architecture)."""
  target, loaded, sliced, kept = flatten(fresh), [], [], []
  wanted = {p for p in target if p.split(SEP)[0] not in reinitialise}
  have = {p for p in source.params if p.split(SEP)[0] not in reinitialise}
  for what, paths in (('lacks', sorted(wanted - have)), ('has the extra', sorted(have - wanted))):
    if paths:
      raise UserError(f'init_from {source.description} {what} parameter {paths[0]} ({len(paths)} in all): it is '
                      'another architecture; fine-tune from a source of config.model\'s backbone.')
  out = {}
  for path, value in target.items():
    if path not in wanted:
      out[path] = value
      kept.append(path)
      continue
    src = source.params[path]
    fits = src.ndim == value.ndim and all(a <= b for a, b in zip(src.shape, value.shape))
    if src.shape != value.shape and not (source.narrow and fits):
      raise UserError(f'init_from {source.description}: parameter {path} is {src.shape}, config.model needs '
                      f'{value.shape} (another architecture, max width or number of image channels).')
    out[path] = src.astype(value.dtype) if src.shape == value.shape else _fill(value, src.astype(value.dtype))
    (loaded if src.shape == value.shape else sliced).append(path)
  return unflatten(out), Report(tuple(loaded), tuple(sliced), tuple(kept))


def classifier_classes(params: Flat) -> int | None:
  bias = params.get(f'{CLASSIFIER}{SEP}bias')
  return None if bias is None else int(bias.shape[0])


def reinitialised_layers(mode: str, source_classes: int | None, classes: int, description: str) -> frozenset[str]:
  """The layers to re-initialise: the classifier under 'fresh', or under 'auto' when the class counts differ."""
  if mode not in CLASSIFIER_MODES:
    raise UserError(f'config.init_classifier must be one of {CLASSIFIER_MODES}, got {mode!r}.')
  differs = source_classes is not None and source_classes != classes
  if mode == 'load' and differs:
    raise UserError(f'init_from {description} classifies {source_classes} classes, config.model.num_classes is '
                    f'{classes}: set --config.init_classifier=auto (a fresh classifier) or match the classes.')
  return frozenset({CLASSIFIER}) if mode == 'fresh' or (mode == 'auto' and differs) else frozenset()


def check_architecture(source: Source, model_config: Mapping[str, Any]) -> None:
  """A UserError naming both architectures when the source's differs from config.model's."""
  if source.model is None:
    return  # a bare parameter file: `merge` checks every name and shape instead
  theirs, ours = architecture(source.model), architecture(get_model(model_config))
  if theirs != ours:
    raise UserError(f'init_from {source.description} holds a {theirs} network but config.model is a {ours}: '
                    'fine-tune from a source of the same backbone and max width, or set config.model to match it.')


# ----------------------------------------------------------------------------------------------------------------------
# Reading sources.

def save_params(path: str | os.PathLike, params: Any, model_config: Mapping[str, Any] | None = None) -> epath.Path:
  """Writes a parameter file init_from reads: full-width `params` and, if given, the model config they belong to."""
  path = epath.Path(path)
  arrays = flatten(params)
  if model_config is not None:
    arrays[MODEL_KEY] = np.asarray(json.dumps(dict(model_config), sort_keys=True))
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open('wb') as f:
    np.savez(f, **arrays)
  return path


def _from_file(path: epath.Path) -> Source:
  """A parameter file's arrays; anything else (truncated, random bytes, a lone .npy, pickled objects) is one
  UserError, not numpy's message, which for a file without the .npy/.npz magic is about allow_pickle."""
  try:
    with path.open('rb') as f:
      data = np.load(f, allow_pickle=False)
      if not isinstance(data, np.lib.npyio.NpzFile):  # a lone .npy array
        raise ValueError('not an archive of named arrays')  # noqa: TRY004  reported below, as unreadable
      with data:
        arrays = {k: np.asarray(data[k]) for k in data.files}
      model = arrays.pop(MODEL_KEY, None)
      model_config = None if model is None else json.loads(str(model))
  except OSError as e:  # unreadable: permissions, a directory, I/O
    raise UserError(f'config.init_from={path} cannot be read ({e.strerror or e}): fix its permissions or pass '
                    'another source.') from None
  except (ValueError, EOFError, zipfile.BadZipFile, zlib.error):
    raise UserError(f'config.init_from={path} is not a readable .npz parameter file (truncated, damaged or another '
                    'format): init_from takes a training workdir, an export (--mode=export) or a .npz written by '
                    'mutualnet_jax.init_from.save_params.') from None
  return Source(arrays, None if model_config is None else get_model(model_config), False, f'parameter file {path}')


def _from_workdir(path: epath.Path) -> Source:
  """The latest checkpoint's parameters, restored with the source's own config (its optimizer, image channels)."""
  workdir = os.fspath(path)
  workdir_lib.require_checkpoint(workdir)
  config = workdir_lib.saved_config(workdir)
  ckpt = checkpointing.Checkpoints(workdir, keep=1, expected={}, read_only=True)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise UserError(f'init_from={workdir} has no finished checkpoint: train it first, or pass another source.')
    meta = ckpt.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    channels = int(meta.get('fingerprint', {}).get('channels', 3))
    ckpt.expected = checkpointing.fingerprint(config, channels)  # config.json must describe this checkpoint
    state, _ = ckpt.restore(step, abstract_run_state(config, channels, parallel.make_mesh()))
  finally:
    ckpt.close()
  return Source(flatten(state.params), get_model(config.model), False, f'workdir {workdir} (step {step})')


def _from_export(path: epath.Path) -> Source:
  exported = export.load(path)
  return Source(flatten(exported.variables['params']), exported.model, True,
                f'export {path} (width {exported.width:g}, {exported.resolution} px)')


def load_source(init_from: str) -> Source:
  """Reads a workdir, an export or a .npz parameter file (which one is decided by what the path holds)."""
  path = workdir_lib.absolute(os.path.expanduser(init_from))
  if not path.exists():
    raise UserError(f'config.init_from={init_from} does not exist: pass a training workdir, an export or a .npz '
                    'parameter file.')
  if path.is_file():
    return _from_file(path)
  if (path / workdir_lib.CHECKPOINT_DIR).exists() or (path / workdir_lib.CONFIG_FILE).exists():
    return _from_workdir(path)
  try:
    return _from_export(path)
  except UserError:
    raise UserError(f'config.init_from={init_from} is neither a training workdir (no {workdir_lib.CHECKPOINT_DIR}/), '
                    'an export (--mode=export) nor a .npz parameter file: pass one of those.') from None


# ----------------------------------------------------------------------------------------------------------------------
# Entry points.

def initial_params(config: ml_collections.ConfigDict, fresh_params: Any) -> Any:
  """`fresh_params` (full width, any method) with the backbone of `config.init_from` loaded and the classifier
  loaded or re-initialised, as host arrays; logs what was loaded. `fresh_params` itself when init_from is empty.
  (The images' channel count needs no argument: the stem kernel's shape checks it.)"""
  if not config.get('init_from'):
    return fresh_params
  source = load_source(config.init_from)
  check_architecture(source, config.model)
  reset = reinitialised_layers(config.get('init_classifier', 'auto'), classifier_classes(source.params),
                               int(config.model.num_classes), source.description)
  params, report = merge(fresh_params, source, reset)
  logging.info('init_from %s: %s.', source.description, report.summary())
  return params


def initial_state(config: ml_collections.ConfigDict, state: TrainState, tx: Any, mesh: Mesh) -> TrainState:
  """A fresh `state` with `initial_params` and the optimizer state re-initialised for them, replicated over `mesh`
  (`state` itself when config.init_from is empty)."""
  if not config.get('init_from'):
    return state
  params = initial_params(config, jax.device_get(state.params))
  return parallel.replicate(state.replace(params=params, opt_state=tx.init(params)), mesh)
