"""TensorFlow SavedModel and TFLite forms of an exported sub-network, preprocessing built in, and the TFLite
interpreter's latency (what a budget query can target when the network is deployed with TFLite).

Both are made with `jax2tf` (native serialization: the StableHLO of the JAX network itself; TFLite's converter
legalises it to builtin ops), on the `xla` kernel path, whose convolutions map to TFLite's CONV_2D and
DEPTHWISE_CONV_2D. The models take raw pixels: a float32 (batch, height, width, channels) tensor in [0, 255] at a
fixed height and width (default: the size the run's pipeline delivered), any batch size; the output is 'logits'.

  python -m mutualnet_jax.tf_export --export=runs/fmnist/export/w0.6_r20 --format=tflite [--out=net.tflite]
  python -m mutualnet_jax.tf_export --export=... --format=saved_model [--platforms=cpu,cuda] [--input_size=64,48]
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Sequence

import jax
import numpy as np
import tensorflow as tf
from absl import app, flags
from etils import epath
from jax.experimental import jax2tf

from mutualnet_jax import export, latency, workdir as workdir_lib
from mutualnet_jax.cli import parse_numbers, run_cli
from mutualnet_jax.errors import UserError
from mutualnet_jax.export import ExportedModel

try:  # LiteRT's interpreter when installed (pip install ai-edge-litert); TF's own is deprecated but equivalent
  from ai_edge_litert.interpreter import Interpreter
except ImportError:
  Interpreter = tf.lite.Interpreter

FORMATS = ('saved_model', 'tflite')
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')


def _input_shape(exported: ExportedModel, input_size: Sequence[int] | None, raw: bool) -> tuple[int, int, int]:
  """(height, width, channels) of the model's input: raw pixels at `input_size` (default: the pipeline's size), or
  normalised images at the network's resolution."""
  if not raw:
    return exported.resolution, exported.resolution, exported.channels
  exported.require_preprocessing()  # the same one-line error as raw-image calls in JAX
  height, width = input_size or (exported.preprocessing.input_size,) * 2
  if min(height, width) < 1:
    raise UserError(f'input size must be positive, got {height}x{width}.')
  return int(height), int(width), exported.channels


def tf_module(exported: ExportedModel, input_size: Sequence[int] | None = None, *, raw: bool = True,
              platforms: Sequence[str] = ('cpu',)) -> tf.Module:
  """A tf.Module whose `serve(images)` returns {'logits'}; parameters and BN statistics are tf.Variables.

  raw: the input is raw [0, 255] pixels of `input_size` (height, width), preprocessing included; else normalised
  images at the network's resolution (the bare network, as the sweep times it)."""
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown or not platforms:
    raise UserError(f'unknown platform(s) {unknown or platforms}: choose from {PLATFORMS}.')
  net = dataclasses.replace(exported, model=exported.model.clone(conv_impl='xla'))
  height, width, channels = _input_shape(exported, input_size, raw)
  converted = jax2tf.convert(net.forward_raw if raw else net.forward, with_gradient=False,
                             polymorphic_shapes=[None, f'(b, {height}, {width}, {channels})'],
                             native_serialization_platforms=tuple(platforms))
  module = tf.Module()
  module.params = tf.nest.map_structure(tf.Variable, jax.device_get(dict(exported.variables)))
  module.serve = tf.function(lambda images: {'logits': converted(module.params, images)}, autograph=False,
                             input_signature=[tf.TensorSpec([None, height, width, channels], tf.float32, 'images')])
  return module


def _is_saved_model(path: epath.Path) -> bool:
  return (path / 'saved_model.pb').exists()


def _is_tflite(path: epath.Path) -> bool:
  """A TFLite flatbuffer: its file identifier 'TFL3' at bytes 4-8."""
  try:
    with open(path, 'rb') as f:
      return f.read(8)[4:] == b'TFL3'
  except OSError:
    return False


def save_saved_model(exported: ExportedModel, path: str | os.PathLike, input_size: Sequence[int] | None = None,
                     platforms: Sequence[str] = ('cpu',), *, overwrite: bool = False) -> epath.Path:
  """A SavedModel with signature 'serving_default': images (float32 [0, 255]) -> logits. An earlier SavedModel at
  `path` is replaced only with `overwrite`; anything else there is refused."""
  workdir_lib.check_output(path, overwrite=overwrite, ours=_is_saved_model, what='SavedModel')
  module = tf_module(exported, input_size, platforms=platforms)
  return workdir_lib.replace_with(path, lambda tmp: tf.saved_model.save(
      module, os.fspath(tmp), signatures={'serving_default': module.serve}))


def tflite_model(exported: ExportedModel, input_size: Sequence[int] | None = None, *, raw: bool = True) -> bytes:
  """The TFLite flatbuffer (float32, builtin ops only) of the network; see `tf_module` for `raw`."""
  module = tf_module(exported, input_size, raw=raw)
  converter = tf.lite.TFLiteConverter.from_concrete_functions([module.serve.get_concrete_function()], module)
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  return converter.convert()


def save_tflite(exported: ExportedModel, path: str | os.PathLike, input_size: Sequence[int] | None = None, *,
                overwrite: bool = False) -> epath.Path:
  """A .tflite file: images (float32 [0, 255]) -> logits, for the TFLite / LiteRT interpreter. An earlier TFLite
  model at `path` is replaced only with `overwrite`; anything else there is refused."""
  workdir_lib.check_output(path, overwrite=overwrite, ours=_is_tflite, what='TFLite model')
  model = tflite_model(exported, input_size)
  return workdir_lib.replace_with(path, lambda tmp: tmp.write_bytes(model))


def interpreter(model: str | os.PathLike | bytes, batch: int | None = None,
                num_threads: int | None = None) -> Any:
  """A TFLite interpreter of a model file or flatbuffer, its input resized to `batch` images, tensors allocated."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # tf.lite.Interpreter's deprecation notice
    try:
      if isinstance(model, bytes):
        runner = Interpreter(model_content=model, num_threads=num_threads)
      else:
        runner = Interpreter(model_path=os.fspath(model), num_threads=num_threads)
    except ValueError as e:
      raise UserError(f'{model if not isinstance(model, bytes) else "the model"} is not a TFLite model '
                      f'({str(e).splitlines()[0][:120]}): pass a .tflite file (python -m mutualnet_jax.tf_export).'
                      ) from None
  if batch is not None:
    if batch < 1:
      raise UserError(f'batch must be >= 1, got {batch}.')
    details = runner.get_input_details()[0]
    runner.resize_tensor_input(details['index'], [batch, *details['shape'][1:]])
  runner.allocate_tensors()
  return runner


def _median_invoke_ms(runner: Any, repeats: int, warmup: int) -> float:
  details = runner.get_input_details()[0]
  runner.set_tensor(details['index'], np.zeros(details['shape'], details['dtype']))
  return latency.median_ms(runner.invoke, warmup=warmup, repeats=repeats)


def tflite_latency_ms(path: str | os.PathLike | bytes, batch: int = 1, *, repeats: int = 10, warmup: int = 1,
                      num_threads: int | None = None) -> float:
  """Median milliseconds of one TFLite `invoke` on `batch` images, on this machine's CPU, after `warmup` discarded
  calls (`latency.median_ms`: stops after 3 calls once 2 s are spent). `path`: a .tflite file or its bytes."""
  return _median_invoke_ms(interpreter(path, batch, num_threads), repeats, warmup)


def network_tflite_latency_ms(exported: ExportedModel, batch: int = 1, *, repeats: int = 10,
                              num_threads: int | None = None) -> float:
  """TFLite latency of the bare network at its resolution (normalised input, no preprocessing), converted in
  memory: the TFLite counterpart of the sweep's `latency_ms` column."""
  return tflite_latency_ms(tflite_model(exported, raw=False), batch, repeats=repeats, num_threads=num_threads)


def convert_export(export_path: str | os.PathLike, fmt: str, out: str | os.PathLike | None = None,
                   input_size: Sequence[int] | None = None, platforms: Sequence[str] = ('cpu',), *,
                   overwrite: bool = False) -> epath.Path:
  """An orbax export (--mode=export) as a SavedModel directory or .tflite file (default: beside it); an earlier
  one at the output path is replaced only with `overwrite`."""
  if fmt not in FORMATS:
    raise UserError(f'unknown format {fmt!r}: choose one of {FORMATS}.')
  exported = export.load(export_path)
  base = os.fspath(workdir_lib.absolute(export_path)).rstrip('/')
  if fmt == 'tflite':
    if tuple(platforms) != ('cpu',):
      raise UserError('TFLite models run on the CPU interpreter: leave --platforms out for --format=tflite.')
    return save_tflite(exported, out or f'{base}.tflite', input_size, overwrite=overwrite)
  return save_saved_model(exported, out or f'{base}_saved_model', input_size, platforms, overwrite=overwrite)


def _define_flags() -> None:
  """Flags of the command line only (defined when run as a program, so importing this module defines none)."""
  flags.DEFINE_string('export', None, 'An export directory written by --mode=export (or mutualnet_jax Run.export).')
  flags.DEFINE_enum('format', 'tflite', FORMATS, 'What to write.')
  flags.DEFINE_string('out', None, 'Output path (default: beside the export, <export>.tflite / <export>_saved_model).')
  flags.DEFINE_list('input_size', None, 'HEIGHT,WIDTH (or one size) of the raw images the model takes (default: the '
                    "size the run's pipeline delivered).")
  flags.DEFINE_list('platforms', ['cpu'], 'saved_model: platforms it runs on (cpu, cuda, rocm, tpu).')
  flags.DEFINE_bool('overwrite', False, 'Replace an earlier output of the same format at the output path (nothing '
                    'else is ever replaced).')
  flags.DEFINE_bool('latency', False, "tflite: also print the interpreter's batch-1 latency on this machine.")
  flags.mark_flags_as_required(['export'])


def _main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  size = parse_numbers(f.input_size, int, 'input_size')
  if size is not None and len(size) not in (1, 2):
    raise UserError(f'--input_size takes HEIGHT,WIDTH or one size, got {",".join(f.input_size)}.')
  path = convert_export(f.export, f.format, f.out, None if size is None else (size[0], size[-1]), f.platforms,
                        overwrite=f.overwrite)
  print(path)
  if f.latency and f.format == 'tflite':
    print(f'{tflite_latency_ms(path):.3f} ms at batch 1 (TFLite interpreter, median)')


if __name__ == '__main__':
  _define_flags()
  run_cli(app, _main)
