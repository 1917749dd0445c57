"""Every config field checked up front, in one place: a bad value is one line naming the field and a valid example,
before any data is read, any program compiled or any file written.

Field rules are data (`RULES`); relations between fields (the width range against the model, the pipeline size
against the resolutions, ...) follow. The sampler and the model registry keep their own checks of what only they
know (method names, model names, capacities), and `check` runs them too, so nothing is checked twice.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable

import ml_collections

from mutualnet_jax import slim
from mutualnet_jax.errors import UserError
from mutualnet_jax.models import get_model
from mutualnet_jax.sampling import Sampler

Predicate = Callable[[Any], bool]


def _int(lo: int | None = None) -> Predicate:
  return lambda v: isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo)


def _num(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Predicate:
  def ok(v: Any) -> bool:
    if not isinstance(v, numbers.Real) or isinstance(v, bool) or v != v:
      return False
    return ((lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi)))
  return ok


def _tuple_of(item: Predicate, length: int | None = None, nonempty: bool = False) -> Predicate:
  return lambda v: (isinstance(v, tuple) and all(item(x) for x in v) and (length is None or len(v) == length)
                    and (not nonempty or len(v) > 0))


def _one_of(*choices: str) -> Predicate:
  return lambda v: v in choices


_STR = lambda v: isinstance(v, str)  # noqa: E731
_BOOL = lambda v: isinstance(v, bool)  # noqa: E731
_STEPS = lambda v: _int()(v) and (v == -1 or v >= 1)  # noqa: E731  -1 = off / derived, else a positive count

# field: (rule, what it must be, a valid example for --config.field=...)
RULES: dict[str, tuple[Predicate, str, str]] = {
    'model.max_width': (_num(0, lo_open=True), 'a width > 0', '1.0'),
    'model.num_classes': (_int(1), 'an integer >= 1', '10'),
    'model.num_downsample': (_int(0), 'an integer >= 0', '5'),
    'model.conv_impl': (_one_of(*slim.CONV_IMPLS), f'one of {slim.CONV_IMPLS}', 'auto'),
    'model.dtype': (_one_of('float32', 'bfloat16', 'float16'), "'float32', 'bfloat16' or 'float16'", 'float32'),
    'width_range': (_tuple_of(_num(0, lo_open=True), 2), '(min, max) widths > 0', '(0.25,1.0)'),
    'width_step': (_num(0, lo_open=True), 'a width step > 0', '0.25'),
    'sweep_width_step': (_num(0, lo_open=True), 'a width step > 0', '0.05'),
    'capacities': (_tuple_of(_num(0, lo_open=True)), 'a tuple of widths > 0 (or empty)', '(0.5,0.75,1.0)'),
    'num_subnets': (_int(1), 'an integer >= 1 (>= 2 for the sandwich rule)', '4'),
    'resolutions': (_tuple_of(_int(1), nonempty=True), 'a non-empty tuple of resolutions', '(224,192,160,128)'),
    'independent_width': (_num(0, lo_open=True), 'a width > 0', '1.0'),
    'independent_resolution': (_int(1), 'a resolution >= 1', '224'),
    'inplace_distillation': (_BOOL, 'True or False', 'True'),
    'kd_temperature': (_num(0, lo_open=True), 'a temperature > 0', '1.0'),
    'label_smoothing': (_num(0, 1, hi_open=True), 'in [0, 1)', '0.1'),
    'resize_antialias': (_BOOL, 'True or False', 'False'),
    'dataset': (lambda v: isinstance(v, str) and bool(v), 'a TFDS dataset name', 'fashion_mnist_local'),
    'data_dir': (_STR, 'a directory (or empty)', "''"),
    'manual_dir': (_STR, 'a directory (or empty)', "''"),
    'train_split': (lambda v: isinstance(v, str) and bool(v), 'a TFDS split', 'train'),
    'eval_split': (lambda v: isinstance(v, str) and bool(v), 'a TFDS split', 'test'),
    'crop_scale': (_tuple_of(_num(0, 1, lo_open=True), 2), '(min, max) area fractions in (0, 1]', '(0.25,1.0)'),
    'pad_crop': (_int(0), 'an integer >= 0', '4'),
    'color_jitter': (_num(0, 1, hi_open=True), 'in [0, 1)', '0.4'),
    'lighting': (_num(0), 'a std >= 0', '0.1'),
    'mean': (_tuple_of(_num()), 'a tuple of per-channel means (or empty)', '(0.5,0.5,0.5)'),
    'std': (_tuple_of(_num(0, lo_open=True)), 'a tuple of per-channel stds > 0 (or empty)', '(0.25,0.25,0.25)'),
    'shuffle_buffer': (_int(1), 'an integer >= 1', '16384'),
    'image_size': (lambda v: _int()(v) and (v == -1 or v >= 1), '-1 (the highest resolution) or a size', '-1'),
    'batch_size': (_int(1), 'an integer >= 1 (the global batch)', '128'),
    'num_epochs': (_num(0), 'a number of epochs >= 0', '2'),
    'num_train_steps': (_STEPS, '-1 (use num_epochs) or a step count >= 1', '1000'),
    'steps_per_run': (_STEPS, '-1 (run to the end) or a step count >= 1', '500'),
    'learning_rate': (_num(0, lo_open=True), 'a learning rate > 0', '0.1'),
    'warmup_epochs': (_num(0), 'a number of epochs >= 0', '0.1'),
    'momentum': (_num(0, 1, hi_open=True), 'in [0, 1)', '0.9'),
    'nesterov': (_BOOL, 'True or False', 'True'),
    'weight_decay': (_num(0), 'a weight decay >= 0', '1e-4'),
    'weight_decay_params': (_one_of('kernels', 'all'), "'kernels' or 'all'", 'kernels'),
    'bn_sync': (_BOOL, 'True or False', 'False'),
    'init_from': (_STR, 'a training workdir, an export or a .npz parameter file (or empty)', "''"),
    'init_classifier': (_one_of('auto', 'fresh', 'load'), "'auto', 'fresh' or 'load'", 'auto'),
    'calibration_images': (_int(1), 'an integer >= 1', '2000'),
    'calibration_batch_size': (_int(1), 'an integer >= 1', '200'),
    'eval_batch_size': (_int(1), 'an integer >= 1', '500'),
    'eval_every_steps': (lambda v: _int()(v) and v >= -1, '-1 (each epoch), 0 (never) or a step count', '-1'),
    'eval_calibration_images': (_int(1), 'an integer >= 1', '1000'),
    'seed': (_int(0), 'an integer >= 0', '0'),
    'log_every_steps': (_int(1), 'an integer >= 1', '50'),
    'checkpoint_every_steps': (_int(1), 'an integer >= 1', '500'),
    'keep_checkpoints': (_int(1), 'an integer >= 1 (the latest finite checkpoint is always kept)', '3'),
    'compilation_cache_dir': (_STR, 'a directory (or empty: no persistent cache)', "''"),
    'precompile': (_BOOL, 'True or False', 'False'),
    'profile_steps': (_int(0), 'an integer >= 0 (0: no profile)', '5'),
}


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
  value: Any = config
  for part in dotted.split('.'):
    value = value[part]
  return value


def _fail(field: str, value: Any, must: str, example: str) -> None:
  raise UserError(f'config.{field}={value!r} is invalid: it must be {must} (e.g. --config.{field}={example}).')


def check_fields(config: ml_collections.ConfigDict) -> None:
  """Types and ranges of every known field (fields a config does not have are skipped: old config.json files)."""
  for field, (ok, must, example) in RULES.items():
    try:
      value = _get(config, field)
    except (KeyError, AttributeError):
      continue
    if not ok(value):
      _fail(field, value, must, example)


def check_relations(config: ml_collections.ConfigDict) -> None:
  """Relations between fields, and the checks the sampler and the model registry own."""
  model = get_model(config.model)
  Sampler(config)
  resolutions = tuple(config.resolutions) + (config.independent_resolution,)
  too_small = [r for r in resolutions if r < model.min_resolution]
  if too_small:
    raise UserError(f'resolution {too_small[0]} is below {model.min_resolution} px, the least that '
                    f'model.num_downsample={config.model.num_downsample} allows: raise the resolution or lower '
                    'model.num_downsample.')
  if config.image_size != -1 and config.image_size < max(config.resolutions):
    _fail('image_size', config.image_size, f'-1 or at least the highest resolution {max(config.resolutions)}', '-1')
  lo, hi = config.crop_scale
  if lo > hi:
    _fail('crop_scale', tuple(config.crop_scale), '(min, max) with min <= max', '(0.25,1.0)')
  if len(config.mean) != len(config.std):
    _fail('std', tuple(config.std), f'as many values as config.mean ({len(config.mean)})', '(0.25,)')
  for images in ('calibration_images', 'eval_calibration_images'):
    if config[images] < config.calibration_batch_size:
      _fail(images, config[images], f'at least config.calibration_batch_size={config.calibration_batch_size}',
            str(config.calibration_batch_size))
  if config.num_train_steps == -1 and config.num_epochs <= 0:
    _fail('num_epochs', config.num_epochs, 'positive (or set config.num_train_steps)', '2')


def check(config: ml_collections.ConfigDict) -> None:
  """All checks; a UserError naming the first bad field."""
  check_fields(config)
  check_relations(config)
