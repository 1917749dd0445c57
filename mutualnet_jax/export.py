"""A standalone sub-network: the parameter slices one (width, resolution) uses, its BN statistics, and the
preprocessing that turns raw pixels into its input.

The slimmable model holds every parameter at full width and slices the leading channels on each call. An export
keeps only those slices (each array exactly the shape the sub-network uses) and that configuration's statistics,
saved with orbax next to a JSON config. `load(path)` gives an `ExportedModel` whose `predict` runs the same backbone
code with every slimmable layer rebuilt at the exported sizes, so each array is used whole: no slicing at run time,
and the outputs equal the slimmable model's at that configuration.

An export also keeps the run's evaluation preprocessing (normalisation constants, pipeline input size, centre crop),
so the model itself takes raw pixels, as a camera or an image file gives them:

  net = export.load('workdir/export/w0.7_r160')
  logits = net(images)                  # raw uint8 or [0, 255] float images (B, H, W, C), any size
  top = net.top_k(images, k=5)          # classes and probabilities
  logits = net.predict(normalised)      # images already normalised like the training pipeline

Logits and probabilities are JAX arrays (they stay on the device for further computation; `np.asarray` copies
them); `top_k` is the end of a computation and gives NumPy arrays on the host, ready to print or index.

Exports of format 1 (before the preprocessing was saved) still load and `predict`; calling them on raw images is
refused with a message saying to export again.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mutualnet_jax import slim, workdir as workdir_lib
from mutualnet_jax.bn_calibration import store_key
from mutualnet_jax.errors import UserError, reason
from mutualnet_jax.models import get_model
from mutualnet_jax.models.base import SlimmableModel, trace_layers
from mutualnet_jax.resizing import Resize, resize

EXPORT_DIR = 'export'
FORMAT_VERSION = 2  # 2: the preprocessing of raw pixels is saved with the network
READABLE_VERSIONS = (1, 2)
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

  trace_layers(model, params, width, resolution, channels, record)
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
class Preprocessing:
  """Raw pixels -> the network's normalised input, as the run's evaluation pipeline made it: centre crop (the
  ImageNet recipe's 0.875 of the shorter side; 1.0 keeps the whole image), antialiased bilinear resize to the square
  size the pipeline delivered, then per-channel normalisation. The model then resizes to its resolution."""
  mean: tuple[float, ...]  # per channel, in [0, 1] pixel units
  std: tuple[float, ...]
  input_size: int          # the square size the pipeline delivered (max resolution or config.image_size)
  crop_fraction: float = 1.0

  def __call__(self, images: jax.Array) -> jax.Array:
    """A (B, H, W, C) batch of [0, 255] pixels (any H, W) -> (B, input_size, input_size, C), normalised."""
    images = images.astype(jnp.float32)
    b, h, w, c = images.shape
    if self.crop_fraction < 1.0:
      side = int(self.crop_fraction * min(h, w))
      top, left = (h - side + 1) // 2, (w - side + 1) // 2
      images = images[:, top:top + side, left:left + side]
    if images.shape[1:3] != (self.input_size, self.input_size):
      images = jax.image.resize(images, (b, self.input_size, self.input_size, c), 'bilinear', antialias=True)
    mean = 255.0 * jnp.asarray(self.mean, jnp.float32)
    return (images - mean) / (255.0 * jnp.asarray(self.std, jnp.float32))

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> Preprocessing:
    return cls(tuple(data['mean']), tuple(data['std']), int(data['input_size']), float(data['crop_fraction']))


@dataclasses.dataclass(frozen=True)
class TopK:
  """The k most probable classes per image, most probable first."""
  classes: np.ndarray        # (B, k) int
  probabilities: np.ndarray  # (B, k) float


@dataclasses.dataclass(frozen=True)
class ExportedModel:
  """A fixed (width, resolution) network: narrow parameters, its BN statistics, the backbone that runs them and the
  preprocessing of raw pixels (None for format-1 exports, which only `predict` normalised images)."""
  model: SlimmableModel
  variables: Mapping[str, Any]  # {'params': narrow, 'batch_stats': this configuration's statistics}
  width: float
  resolution: int
  channels: int
  antialias: bool = False
  preprocessing: Preprocessing | None = None
  align_corners: bool = False  # the run's resize (resizing.Resize); absent from exports written before it

  def forward(self, variables: Mapping[str, Any], images: jax.Array) -> jax.Array:
    """Logits of normalised (B, H, W, C) images, resized to the resolution: pure, for jit and jax2tf."""
    return apply_narrow(self.model, variables, resize(images, self.resolution, self.antialias, self.align_corners),
                        self.width)

  def forward_raw(self, variables: Mapping[str, Any], images: jax.Array) -> jax.Array:
    """Logits of raw [0, 255] (B, H, W, C) images: the preprocessing, then `forward` (pure, for jit and jax2tf)."""
    return self.forward(variables, self.require_preprocessing()(images))

  @functools.cached_property
  def _predict(self):
    return jax.jit(self.forward)

  @functools.cached_property
  def _logits(self):
    return jax.jit(self.forward_raw)

  def predict(self, images: Any) -> jax.Array:
    """Logits for a (B, H, W, C) batch normalised like the training pipeline; resized to the resolution if needed."""
    images = _numeric(images, 'normalised images (floats)')
    if images.ndim != 4 or images.shape[-1] != self.channels:
      raise UserError(f'expected images shaped (batch, height, width, {self.channels}), got {images.shape}.')
    return self._predict(self.variables, _finite(images.astype(jnp.float32)))

  def __call__(self, images: Any) -> jax.Array:
    """Logits of raw images: uint8 or float in [0, 255], (B, H, W, C) or one (H, W, C) image, any H and W.

    Float pixels are refused when some are NaN or infinite (every logit would be NaN), and when all of them lie in
    [0, 1] with one above 0: in [0, 255] units such input is all but black, so it is almost surely scaled to [0, 1]
    and would silently mis-predict (multiply it by 255). The check is over the whole call, so a dark image batched
    with others runs; so do all-zero images, float images with any pixel above 1 and integer images."""
    batch, single = self._raw_batch(images)
    logits = self._logits(self.variables, batch)
    return logits[0] if single else logits

  def probabilities(self, images: Any) -> jax.Array:
    """Class probabilities (softmax of the logits) of raw images, shaped like `__call__`'s output."""
    return jax.nn.softmax(self(images), axis=-1)

  def top_k(self, images: Any, k: int = 5) -> TopK:
    """The k most probable classes of raw images and their probabilities (one row per image; a single image gives
    one row too), as NumPy arrays on the host."""
    if not isinstance(k, int) or not 1 <= k <= self.model.num_classes:
      raise UserError(f'k must be an integer in [1, {self.model.num_classes}] (the number of classes), got {k!r}.')
    probabilities, classes = jax.lax.top_k(jnp.atleast_2d(self.probabilities(images)), k)
    return TopK(np.asarray(classes), np.asarray(probabilities))

  def require_preprocessing(self) -> Preprocessing:
    """The preprocessing of raw images, or a one-line error saying how to get a network that has one."""
    if self.preprocessing is None:
      raise UserError('this network has no saved preprocessing (exports before format 2 lack it), so it cannot take '
                      'raw images: export it again (mutualnet_jax.open(workdir).export(...)), or pass normalised '
                      'images to .predict().')
    return self.preprocessing

  def _raw_batch(self, images: Any) -> tuple[jax.Array, bool]:
    """Raw images as a float32 (B, H, W, C) batch, and whether one unbatched image was given."""
    self.require_preprocessing()
    images = _numeric(images, 'pixel values (uint8, or floats in [0, 255])')
    if images.ndim not in (3, 4) or images.shape[-1] != self.channels:
      raise UserError(f'expected images shaped (batch, height, width, {self.channels}) or (height, width, '
                      f'{self.channels}), got {images.shape}: channels last (add one with images[..., None]).')
    single = images.ndim == 3
    if jnp.issubdtype(images.dtype, jnp.floating) and images.size:
      peak = float(jnp.max(_finite(images)))
      if 0.0 < peak <= 1.0:
        raise UserError(f'the images are floats in [0, 1] (largest pixel {peak:g}), but raw pixels are in [0, 255]: '
                        'multiply them by 255 (or pass uint8 images).')
    return (images[None] if single else images).astype(jnp.float32), single


def _numeric(images: Any, expected: str) -> jax.Array:
  """`images` as a JAX array of numbers, or a UserError naming `expected` (strings, objects and ragged lists would
  otherwise fail inside JAX with a TypeError about dtypes)."""
  try:
    array = images if isinstance(images, jax.Array) else np.asarray(images)
  except ValueError:  # a ragged nested list
    raise UserError(f'expected an array of {expected}, got a ragged {type(images).__name__}.') from None
  if array.dtype == np.bool_ or not (jnp.issubdtype(array.dtype, jnp.integer)
                                     or jnp.issubdtype(array.dtype, jnp.floating)):
    raise UserError(f'expected {expected}, got dtype {array.dtype}.')
  return jnp.asarray(array)


def _finite(images: jax.Array) -> jax.Array:
  """`images`, or a UserError when some pixels are NaN or infinite (every logit would be NaN). Traced images (under
  jit or eval_shape) have no values to check and pass through."""
  if jnp.issubdtype(images.dtype, jnp.floating) and not isinstance(images, jax.core.Tracer):
    bad = int(jnp.size(images) - jnp.count_nonzero(jnp.isfinite(images)))
    if bad:
      raise UserError(f'{bad} of {images.size} pixel values are NaN or infinite: fix or drop those images.')
  return images


def build(model: SlimmableModel, params: Any, stats: Any, width: float, resolution: int, channels: int,
          resizing: Resize = Resize(), preprocessing: Preprocessing | None = None) -> ExportedModel:
  """The exported form of the slimmable `model` at (width, resolution), in memory, resizing as its run did."""
  variables = {'params': narrow_params(model, params, width, resolution, channels),
               'batch_stats': jax.device_get(stats)}
  return ExportedModel(model.clone(bn_groups=1), variables, width, int(resolution), channels, resizing.antialias,
                       preprocessing, resizing.align_corners)


def fold_batch_norm(variables: Mapping[str, Any]) -> dict[str, Any]:
  """`variables` with every BN layer's statistics replaced by its folded inference map (slim.fold_batch_norm)."""
  return {**variables, 'batch_stats': slim.fold_batch_norm(variables['params'], variables['batch_stats'])}


def is_export(path: epath.Path) -> bool:
  """Whether `path` holds an export written by `save` (its JSON config item names an export format)."""
  try:
    return 'format_version' in json.loads((epath.Path(path) / 'config' / 'metadata').read_text())
  except (OSError, ValueError, TypeError):
    return False


def save(exported: ExportedModel, path: str | epath.PathLike, model_config: Mapping[str, Any],
         source: Mapping[str, Any] | None = None, *, overwrite: bool = False) -> epath.Path:
  """Writes items 'params', 'batch_stats' and 'config' (JSON), complete before it appears at `path`. An earlier
  export there is replaced only with `overwrite`; anything else at `path` is refused (workdir.check_output)."""
  path = workdir_lib.absolute(path)
  workdir_lib.check_output(path, overwrite=overwrite, ours=is_export, what='export')
  preprocessing = exported.preprocessing.to_json() if exported.preprocessing else None
  config = {'format_version': FORMAT_VERSION, 'model': dict(model_config), 'width': exported.width,
            'resolution': exported.resolution, 'channels': exported.channels, 'antialias': exported.antialias,
            'align_corners': exported.align_corners, 'preprocessing': preprocessing, 'source': dict(source or {})}

  def write(tmp: epath.Path) -> None:
    ocp.Checkpointer(ocp.CompositeCheckpointHandler()).save(tmp, args=ocp.args.Composite(
        params=ocp.args.StandardSave(exported.variables['params']),
        batch_stats=ocp.args.StandardSave(exported.variables['batch_stats']),
        config=ocp.args.JsonSave(config)))
  return workdir_lib.replace_with(path, write)


def load(path: str | epath.PathLike) -> ExportedModel:
  """An exported sub-network, ready to `predict` (and, from format 2 on, to take raw images); a UserError when
  `path` holds no readable export."""
  path = workdir_lib.absolute(path)
  try:
    item = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(path, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(), batch_stats=ocp.args.StandardRestore(), config=ocp.args.JsonRestore()))
  except Exception as e:  # orbax/tensorstore raise many types for a missing or damaged directory
    raise UserError(f'{path} is not a readable export ({reason(e)}): export again with --mode=export.') from e
  config = item['config']
  if config.get('format_version') not in READABLE_VERSIONS:
    raise UserError(f'{path} has export format {config.get("format_version")}, this code reads '
                    f'{", ".join(map(str, READABLE_VERSIONS))}: export again with --mode=export.')
  variables = {'params': item['params'], 'batch_stats': item['batch_stats']}
  preprocessing = config.get('preprocessing')  # absent in format 1
  return ExportedModel(get_model(config['model']), variables, config['width'], config['resolution'],
                       config['channels'], config['antialias'],
                       Preprocessing.from_json(preprocessing) if preprocessing else None,
                       bool(config.get('align_corners', False)))


def default_path(workdir: str, width: float, resolution: int) -> epath.Path:
  return epath.Path(workdir) / EXPORT_DIR / store_key(width, resolution)
