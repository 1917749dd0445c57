"""A standalone sub-network: the parameter slices one (width, resolution) uses, plus its BN statistics.

The slimmable model holds every parameter at full width and slices the leading channels on each call. An export
keeps only those slices (each array exactly the shape the sub-network uses) and that configuration's statistics,
saved with orbax next to a JSON config. `load(path)` gives an `ExportedModel` whose `predict` runs the same backbone
code with every slimmable layer rebuilt at the exported sizes, so each array is used whole: no slicing at run time,
and the outputs equal the slimmable model's at that configuration.

  model = export.load('workdir/export/w0.7_r160'); logits = model.predict(images)  # images (B, H, W, C), normalised
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mutualnet_jax import slim, workdir as workdir_lib
from mutualnet_jax.bn_calibration import store_key
from mutualnet_jax.errors import UserError
from mutualnet_jax.models import get_model
from mutualnet_jax.models.base import SlimmableModel
from mutualnet_jax.preprocess import resize

EXPORT_DIR = 'export'
FORMAT_VERSION = 1
_LAYERS = (slim.SlimConv, slim.SlimDense, slim.SlimBatchNorm)


def _has_input_axis(module: nn.Module, leaf: Any) -> bool:
  """Whether a parameter's second-to-last axis counts input channels (dense and regular conv kernels)."""
  return np.ndim(leaf) >= 2 and not getattr(module, 'depthwise', False)


def used_channels(model: SlimmableModel, params: Any, width: float, resolution: int,
                  channels: int) -> dict[tuple[str, ...], tuple[nn.Module, int, int]]:
  """(layer, input channels, output channels) of every slimmable layer at (width, resolution), by module path.

  Read off an abstract forward pass (no FLOPs spent), so any backbone built from `slim` layers exports."""
  calls = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and isinstance(context.module, _LAYERS):
      calls[context.module.scope.path] = (context.module, args[0].shape[-1], out.shape[-1])
    return out

  x = jax.ShapeDtypeStruct((1, resolution, resolution, channels), jnp.float32)
  traced = model.clone(conv_impl='xla', bn_groups=1)  # the kernel path and BN grouping change no channel count
  with nn.intercept_methods(record):
    jax.eval_shape(lambda p, x: traced.apply({'params': p}, x, width=width, train=True), params, x)
  return calls


def narrow_params(model: SlimmableModel, params: Any, width: float, resolution: int, channels: int) -> Any:
  """The slices of the full-width `params` that the sub-network at (width, resolution) reads, as host arrays."""
  used = used_channels(model, params, width, resolution, channels)

  def narrow(path: tuple[Any, ...], leaf: np.ndarray) -> np.ndarray:
    names = tuple(p.key for p in path)
    if names[:-1] not in used:
      raise ValueError(f'parameter {"/".join(names)} belongs to no slimmable layer the sub-network calls.')
    module, cin, cout = used[names[:-1]]
    index = [slice(None)] * leaf.ndim
    index[-1] = slice(cout)
    if _has_input_axis(module, leaf):
      index[-2] = slice(cin)
    return np.asarray(leaf[tuple(index)])

  return jax.tree_util.tree_map_with_path(narrow, jax.device_get(params))


def _fixed_sizes(module: nn.Module, params: Mapping[str, Any]) -> dict[str, int]:
  """Layer attributes under which `params` are the layer's full-size parameters."""
  if isinstance(module, slim.SlimBatchNorm):
    return {'features': params['scale'].shape[-1]}
  kernel = params['kernel']
  if getattr(module, 'depthwise', False):
    return {'features': kernel.shape[-1]}
  return {'features': kernel.shape[-1], 'in_features': kernel.shape[-2]}


def _fixed_layers(next_fun, args, kwargs, context):
  """Interceptor: runs each slimmable layer as a copy sized to its (narrow) parameters, which it then uses whole."""
  module = context.module
  if context.method_name != '__call__' or not isinstance(module, _LAYERS):
    return next_fun(*args, **kwargs)
  variables = module.variables
  sizes = _fixed_sizes(module, variables['params'])
  if all(getattr(module, k) == v for k, v in sizes.items()):
    return next_fun(*args, **kwargs)
  return module.clone(parent=None, name=None, **sizes).apply(dict(variables), *args, **kwargs)


def apply_narrow(model: SlimmableModel, variables: Mapping[str, Any], images: jax.Array, width: float) -> jax.Array:
  """Logits of the exported sub-network; `images` already at its resolution."""
  with nn.intercept_methods(_fixed_layers):
    return model.apply(variables, images, width=width, train=False)


@dataclasses.dataclass(frozen=True)
class ExportedModel:
  """A fixed (width, resolution) network: narrow parameters, its BN statistics and the backbone that runs them."""
  model: SlimmableModel
  variables: Mapping[str, Any]  # {'params': narrow, 'batch_stats': this configuration's statistics}
  width: float
  resolution: int
  channels: int
  antialias: bool = False

  @functools.cached_property
  def _predict(self):
    def predict(variables, images):
      return apply_narrow(self.model, variables, resize(images, self.resolution, self.antialias), self.width)
    return jax.jit(predict)

  def predict(self, images: Any) -> jax.Array:
    """Logits for a (B, H, W, C) batch normalised like the training pipeline; resized to the resolution if needed."""
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or images.shape[-1] != self.channels:
      raise UserError(f'expected images shaped (batch, height, width, {self.channels}), got {images.shape}.')
    return self._predict(self.variables, images)


def build(model: SlimmableModel, params: Any, stats: Any, width: float, resolution: int, channels: int,
          antialias: bool = False) -> ExportedModel:
  """The exported form of the slimmable `model` at (width, resolution), in memory."""
  variables = {'params': narrow_params(model, params, width, resolution, channels),
               'batch_stats': jax.device_get(stats)}
  return ExportedModel(model.clone(bn_groups=1), variables, width, int(resolution), channels, antialias)


def save(exported: ExportedModel, path: str | epath.PathLike, model_config: Mapping[str, Any],
         source: Mapping[str, Any] | None = None) -> epath.Path:
  """Writes items 'params', 'batch_stats' and 'config' (JSON) atomically; replaces an earlier export."""
  path = workdir_lib.absolute(path)
  config = {'format_version': FORMAT_VERSION, 'model': dict(model_config), 'width': exported.width,
            'resolution': exported.resolution, 'channels': exported.channels, 'antialias': exported.antialias,
            'source': dict(source or {})}
  path.parent.mkdir(parents=True, exist_ok=True)
  ocp.Checkpointer(ocp.CompositeCheckpointHandler()).save(path, args=ocp.args.Composite(
      params=ocp.args.StandardSave(exported.variables['params']),
      batch_stats=ocp.args.StandardSave(exported.variables['batch_stats']),
      config=ocp.args.JsonSave(config)), force=True)
  return path


def load(path: str | epath.PathLike) -> ExportedModel:
  """An exported sub-network, ready to `predict`; a UserError when `path` holds no readable export."""
  path = workdir_lib.absolute(path)
  try:
    item = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(path, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(), batch_stats=ocp.args.StandardRestore(), config=ocp.args.JsonRestore()))
  except Exception as e:  # orbax raises many types for a missing or damaged directory
    raise UserError(f'{path} is not a readable export ({type(e).__name__}): export again with --mode=export.') from e
  config = item['config']
  if config.get('format_version') != FORMAT_VERSION:
    raise UserError(f'{path} has export format {config.get("format_version")}, this code reads {FORMAT_VERSION}: '
                    'export again with --mode=export.')
  variables = {'params': item['params'], 'batch_stats': item['batch_stats']}
  return ExportedModel(get_model(config['model']), variables, config['width'], config['resolution'],
                       config['channels'], config['antialias'])


def default_path(workdir: str, width: float, resolution: int) -> epath.Path:
  return epath.Path(workdir) / EXPORT_DIR / store_key(width, resolution)
