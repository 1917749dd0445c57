"""Multiply-adds and parameters of any (model, width, resolution), read off the model itself.

The count follows the official US-Net/MutualNet convention: conv and dense multiply-adds plus global average
pooling (C*H*W); batch norm, activations and biases excluded from MACs; parameters are the conv and dense weights and
biases a sub-network uses (BN excluded). Each slimmable layer knows its own cost; this module runs the model
abstractly (`jax.eval_shape`, no FLOPs spent) and intercepts every layer call to add them up, so a new backbone needs
no table. It imports no TensorFlow.

  python -m mutualnet_jax.profile --model=mobilenet_v1 --widths=0.25,0.5 --resolutions=128,224 --format=json
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags

from mutualnet_jax import slim
from mutualnet_jax.cli import parse_numbers, run_cli
from mutualnet_jax.errors import UserError
from mutualnet_jax.models import get_model
from mutualnet_jax.models.base import SlimmableModel, trace_layers


@dataclasses.dataclass(frozen=True)
class Profile:
  model: str
  width: float
  resolution: int
  macs: int
  params: int


@functools.lru_cache(maxsize=32)
def _param_shapes(model: SlimmableModel, channels: int) -> Any:
  x = jax.ShapeDtypeStruct((1, model.min_resolution, model.min_resolution, channels), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=True)['params'], x)


LayerShapes = list[tuple[nn.Module, tuple[int, ...], tuple[int, ...]]]


def layer_shapes(model: SlimmableModel, width: float, resolution: int, channels: int = 3) -> LayerShapes:
  """(layer, input shape, output shape) of every layer that has a cost, in call order, for one image."""
  calls: LayerShapes = []

  def record(next_fun, args, kwargs, context):
    if context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    if isinstance(context.module, slim.SlimBatchNorm):
      return args[0]  # free by convention and shape-preserving: tracing it would cost time and count nothing
    out = next_fun(*args, **kwargs)
    if hasattr(context.module, 'cost'):
      calls.append((context.module, tuple(args[0].shape), tuple(out.shape)))
    return out

  trace_layers(model, _param_shapes(model, channels), width, resolution, channels, record)
  return calls


def _total(calls: LayerShapes) -> tuple[int, int]:
  costs = [module.cost(i, o) for module, i, o in calls]
  return sum(c[0] for c in costs), sum(c[1] for c in costs)


def count(model: SlimmableModel, width: float, resolution: int, channels: int = 3) -> tuple[int, int]:
  """(multiply-adds, parameters) per image of `model` at (width, resolution)."""
  return _total(layer_shapes(model, width, resolution, channels))


def _combine(by_width: LayerShapes, by_resolution: LayerShapes) -> LayerShapes:
  """Layer shapes at (w, r) from a trace at (w, any r) and one at (any w, r): spatial sizes depend only on the
  resolution and channel counts only on the width, so |W| + |R| traces give the whole grid."""
  if [m.name for m, _, _ in by_width] != [m.name for m, _, _ in by_resolution]:
    raise AssertionError('layer sequence changed between traces; profile each configuration with count().')
  mix = lambda c, s: s[:-1] + c[-1:]
  return [(m, mix(iw, ir), mix(ow, or_)) for (m, iw, ow), (_, ir, or_) in zip(by_width, by_resolution)]


def profile_grid(model_config: Any, widths: Iterable[float], resolutions: Iterable[int],
                 channels: int = 3) -> list[Profile]:
  """One `Profile` per (width, resolution), widths outer."""
  model = get_model(model_config)
  name = dict(model_config)['name']
  widths = [slim.check_width(w, model.max_width) for w in widths]
  resolutions = [int(r) for r in resolutions]
  by_res = {r: layer_shapes(model, model.max_width, r, channels) for r in resolutions}
  rows = []
  for w in widths:
    by_width = layer_shapes(model, w, max(resolutions), channels)
    rows += [Profile(name, w, r, *_total(_combine(by_width, by_res[r]))) for r in resolutions]
  return rows


def format_table(rows: Sequence[Profile]) -> str:
  lines = [f"{'model':<14} {'width':>6} {'res':>5} {'MMACs':>10} {'Mparams':>9}"]
  lines += [f'{r.model:<14} {r.width:>6.2f} {r.resolution:>5d} {r.macs / 1e6:>10.2f} {r.params / 1e6:>9.3f}'
            for r in rows]
  return '\n'.join(lines)


def main(argv: Sequence[str]) -> None:
  del argv
  f = flags.FLAGS
  for name in ('channels', 'num_classes'):
    if f[name].value < 1:
      raise UserError(f'--{name} must be at least 1, got {f[name].value}.')
  model_config = dict(name=f.model, num_classes=f.num_classes, max_width=f.max_width,
                      num_downsample=f.num_downsample, conv_impl='xla')
  rows = profile_grid(model_config, parse_numbers(f.widths, float, 'widths'),
                      parse_numbers(f.resolutions, int, 'resolutions'), f.channels)
  if f.format == 'json':
    print(json.dumps([dataclasses.asdict(r) for r in rows]))
  else:
    print(format_table(rows))


def _define_flags() -> None:
  flags.DEFINE_string('model', 'mobilenet_v1', 'Backbone name (mutualnet_jax.models.MODELS).')
  flags.DEFINE_list('widths', ['0.25', '0.5', '0.75', '1.0'], 'Comma-separated widths.')
  flags.DEFINE_list('resolutions', ['224'], 'Comma-separated input resolutions.')
  flags.DEFINE_integer('num_classes', 1000, 'Classifier outputs.')
  flags.DEFINE_float('max_width', 1.0, 'Maximum width the parameters are created at.')
  flags.DEFINE_integer('num_downsample', 5, 'Stride-2 layers kept (5 = ImageNet).')
  flags.DEFINE_integer('channels', 3, 'Input image channels.')
  flags.DEFINE_enum('format', 'table', ['table', 'json'], 'Output format.')


if __name__ == '__main__':
  _define_flags()
  run_cli(app, main)
