"""Model registry: config.model -> a slimmable Flax module, and parameter initialisation at full width."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from mutualnet_jax import config_fields
from mutualnet_jax.errors import UserError
from mutualnet_jax.models.base import NON_ARCHITECTURE_FIELDS, SlimmableModel
from mutualnet_jax.models.mobilenet_v1 import MobileNetV1
from mutualnet_jax.models.mobilenet_v2 import MobileNetV2
from mutualnet_jax.models.resnet import ResNet50
from mutualnet_jax.models.tiny import TinyConvNet
from mutualnet_jax.models.vgg import VGG16

# The one list of backbones: training, sweeps, export, profiling and fine-tuning find them here.
MODELS: dict[str, type[SlimmableModel]] = {'mobilenet_v1': MobileNetV1, 'mobilenet_v2': MobileNetV2,
                                           'resnet50': ResNet50, 'vgg16': VGG16, 'tiny_convnet': TinyConvNet}
DTYPES = {name: getattr(jnp, name) for name in config_fields.DTYPES}


def get_model(model_config: ml_collections.ConfigDict | Mapping[str, Any], *, bn_groups: int = 1) -> SlimmableModel:
  """Builds the backbone named by `model_config.name` with the rest of the fields as settings. The registry checks
  the names (of the model and of its settings); each field's own value is checked by its declaration
  (config_fields, run by config_check)."""
  fields = dict(model_config)
  name = fields.pop('name')
  if name not in MODELS:
    raise UserError(f'unknown model {name!r}: choose one of {sorted(MODELS)} (config.model.name).')
  dtype = fields.pop('dtype', 'float32')
  unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(MODELS[name])})
  if unknown:
    raise UserError(f'{name} has no setting {", ".join(unknown)}: remove config.model.{unknown[0]}.')
  return MODELS[name](**fields, dtype=DTYPES[dtype], bn_groups=bn_groups)


def architecture(model: SlimmableModel) -> str:
  """What fixes a model's parameter tree, as one line ('resnet50 max_width=1.0'): the registry name and every
  setting except those that only change the task or the run (classes, strides, kernels, dtype)."""
  name = next((n for n, cls in MODELS.items() if type(model) is cls), type(model).__name__)
  settings = [f'{f.name}={getattr(model, f.name)}' for f in dataclasses.fields(model)
              if f.name not in NON_ARCHITECTURE_FIELDS]
  return ' '.join([name, *settings])


def init_params(model: SlimmableModel, rng: jax.Array, resolution: int, channels: int) -> Any:
  """Full-width parameters (the one shared tree every sub-network slices), from a 1-image trace."""
  x = jnp.zeros((1, resolution, resolution, channels), jnp.float32)
  return jax.jit(lambda r: model.init(r, x, train=True)['params'])(rng)
