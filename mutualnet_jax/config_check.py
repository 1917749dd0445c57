"""Every config field checked up front, in one place: a bad value is one line naming the field and a valid example,
before any data is read, any program compiled or any file written.

Each field's own check is its declaration (`config_fields.FIELDS`); relations between fields (the width range against
the model, the pipeline size against the resolutions, ...) follow here. The sampler and the model registry keep their
own checks of what only they know (method names, model names, capacities), and `check` runs them too, so nothing is
checked twice.
"""
from __future__ import annotations

from typing import Any

import ml_collections

from mutualnet_jax import config_fields
from mutualnet_jax.errors import UserError
from mutualnet_jax.models import get_model
from mutualnet_jax.sampling import Sampler


def _fail(field: str, value: Any, must: str, example: str) -> None:
  raise UserError(f'config.{field}={value!r} is invalid: it must be {must} (e.g. --config.{field}={example}).')


def check_fields(config: ml_collections.ConfigDict) -> None:
  """Types and ranges of every known field (fields a config does not have are skipped: old config.json files)."""
  for name, field in config_fields.FIELDS.items():
    try:
      value = config_fields.value(config, name)
    except (KeyError, AttributeError):
      continue
    if field.ok is not None and not field.ok(value):
      _fail(name, value, field.must, field.example)


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
