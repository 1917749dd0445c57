"""Model registry: config.model -> a slimmable Flax module, and parameter initialisation at full width."""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from mutualnet_jax.errors import UserError
from mutualnet_jax.models.base import SlimmableModel
from mutualnet_jax.models.mobilenet_v1 import MobileNetV1
from mutualnet_jax.models.mobilenet_v2 import MobileNetV2
from mutualnet_jax.models.tiny import TinyConvNet

MODELS: dict[str, type[SlimmableModel]] = {'mobilenet_v1': MobileNetV1, 'mobilenet_v2': MobileNetV2,
                                           'tiny_convnet': TinyConvNet}
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def get_model(model_config: ml_collections.ConfigDict | Mapping[str, Any], *, bn_groups: int = 1) -> SlimmableModel:
  """Builds the backbone named by `model_config.name` with the rest of the fields as settings."""
  fields = dict(model_config)
  name = fields.pop('name')
  if name not in MODELS:
    raise UserError(f'unknown model {name!r}: choose one of {sorted(MODELS)} (config.model.name).')
  dtype = fields.pop('dtype', 'float32')
  if dtype not in DTYPES:
    raise UserError(f'unknown model dtype {dtype!r}: choose one of {sorted(DTYPES)} (config.model.dtype).')
  if fields.get('max_width', 1.0) <= 0:
    raise UserError(f"model.max_width must be > 0, got {fields['max_width']}.")
  return MODELS[name](**fields, dtype=DTYPES[dtype], bn_groups=bn_groups)


def init_params(model: SlimmableModel, rng: jax.Array, resolution: int, channels: int) -> Any:
  """Full-width parameters (the one shared tree every sub-network slices), from a 1-image trace."""
  x = jnp.zeros((1, resolution, resolution, channels), jnp.float32)
  return jax.jit(lambda r: model.init(r, x, train=True)['params'])(rng)
