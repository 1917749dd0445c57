"""Export: narrow parameters + statistics saved with orbax; `predict` equals the slimmable model and slices nothing;
the TensorFlow forms (SavedModel, TFLite) equal the JAX network on real images."""
import dataclasses
import os
import subprocess
import sys

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from mutualnet_jax import api, bn_calibration, errors, export, input_pipeline, native, parallel, tf_export
from mutualnet_jax.errors import UserError
from mutualnet_jax.models import get_model, init_params
from mutualnet_jax.resizing import Resize, resize
from tests.util import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODELS = {'tiny_convnet': dict(num_downsample=3), 'mobilenet_v2': dict(num_downsample=3)}


def _setup(name, width, resolution):
  model = get_model(dict(name=name, num_classes=10, conv_impl='xla', **MODELS[name]))
  params = jax.device_get(init_params(model, jax.random.key(0), 8, 1))
  moments = jax.eval_shape(lambda p, x: model.apply({'params': p}, x, width=width, train=True,
                                                    mutable=['bn_moments'])[1]['bn_moments'],
                           params, jnp.zeros((1, resolution, resolution, 1)))
  rng = np.random.RandomState(1)
  stats = jax.tree.map(lambda s: {'mean': (0.01 * rng.randn(*s['mean'].shape)).astype(np.float32),
                                  'var': (0.001 + 0.01 * rng.rand(*s['mean'].shape)).astype(np.float32)},
                       moments, is_leaf=lambda d: isinstance(d, dict) and 'mean' in d)
  return model, params, stats


def _slimmable(model, width, resolution):
  return jax.jit(lambda v, x: model.apply(v, resize(x, resolution), width=width, train=False))


def test_exported_model_matches_the_slimmable_one(tmp_path):
  name, width, resolution = 'tiny_convnet', 0.25, 8
  model, params, stats = _setup(name, width, resolution)
  path = export.save(export.build(model, params, stats, width, resolution, channels=1), tmp_path / 'net',
                     dict(name=name, num_classes=10, conv_impl='xla', **MODELS[name]))
  loaded = export.load(path)
  assert (loaded.width, loaded.resolution, loaded.channels) == (width, resolution, 1)
  narrow = sum(x.size for x in jax.tree.leaves(loaded.variables['params']))
  assert narrow < sum(x.size for x in jax.tree.leaves(params)) / 4
  images = np.random.RandomState(0).randn(3, 16, 16, 1).astype(np.float32)
  expected = _slimmable(model, width, resolution)({'params': params, 'batch_stats': stats}, images)
  assert float(jnp.abs(expected).max()) > 1e-3  # not a trivially zero output
  np.testing.assert_allclose(loaded.predict(images), expected, rtol=1e-5, atol=1e-6)


def test_an_export_resizes_as_its_run_did(tmp_path):
  """A run trained with resize_align_corners exports, saves and reloads a network that resizes the same way."""
  name, width, resolution = 'tiny_convnet', 0.25, 8
  model, params, stats = _setup(name, width, resolution)
  path = export.save(export.build(model, params, stats, width, resolution, 1, Resize(align_corners=True)),
                     tmp_path / 'net', dict(name=name, num_classes=10, conv_impl='xla', **MODELS[name]))
  loaded = export.load(path)
  assert loaded.align_corners and not loaded.antialias
  images = np.random.RandomState(0).randn(3, 16, 16, 1).astype(np.float32)
  expected = jax.jit(lambda v, x: model.apply(v, resize(x, resolution, align_corners=True), width=width,
                                              train=False))({'params': params, 'batch_stats': stats}, images)
  np.testing.assert_allclose(loaded.predict(images), expected, rtol=1e-5, atol=1e-6)


def test_every_layer_of_mobilenet_v2_runs_at_its_exported_size():
  """Its expansion layers use make_divisible(c * w) * t channels, which no narrower max_width reproduces: the export
  must take each layer's size from the sub-network itself (checked by tracing; Flax rejects a mis-sized parameter)."""
  model, params, stats = _setup('mobilenet_v2', 0.35, 8)
  exported = export.build(model, params, stats, 0.35, 8, channels=1)
  expand = exported.variables['params']['block1_expand']['conv']['kernel']
  assert expand.shape == (1, 1, 8, 48)  # 16 * 0.35 -> 8 input channels, times t = 6
  out = jax.eval_shape(exported.predict, jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32))
  assert out.shape == (2, 10)


def test_folded_batch_norm_is_the_same_network_with_fewer_kernels():
  """The sweep times batch-1 latency on the export with BN folded on the host: the same logits (on either kernel
  path), no per-layer kernel left that computes scale / sqrt(var + eps) at run time, and on the native path no
  separate map after a depthwise layer."""
  model, params, stats = _setup('mobilenet_v2', 0.35, 8)
  # Variances near 1: a well-conditioned network, where float32 rounding of the map stays rounding in the logits
  # (with _setup's variances of ~0.005 every layer multiplies a 1-ulp difference by ~15).
  stats = jax.tree.map(lambda layer: {'mean': layer['mean'], 'var': 0.5 + layer['var'] / layer['var'].max()}, stats,
                       is_leaf=lambda d: isinstance(d, dict) and 'mean' in d)
  images = np.random.RandomState(0).randn(3, 8, 8, 1).astype(np.float32)
  exported = export.build(model, params, stats, 0.35, 8, channels=1)
  folded = export.fold_batch_norm(exported.variables)
  names = {path[-1].key for path, _ in jax.tree_util.tree_leaves_with_path(folded['batch_stats'])}
  assert names == {'mul', 'shift'}
  forward = jax.jit(lambda v, x: export.apply_narrow(exported.model, v, x, 0.35))
  expected = forward(exported.variables, images)
  np.testing.assert_allclose(forward(folded, images), expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))
  count_rsqrt = lambda v: str(jax.make_jaxpr(forward)(v, images)).count('rsqrt')  # noqa: E731
  assert count_rsqrt(exported.variables) > 0 and count_rsqrt(folded) == 0
  # On the native path each depthwise layer's folded map and ReLU6 run inside its kernel call.
  fast = jax.jit(lambda v, x: export.apply_narrow(exported.model.clone(conv_impl='cpu_fast'), v, x, 0.35))
  np.testing.assert_allclose(fast(folded, images), expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))
  if native.available(jnp.zeros((1,), jnp.float32)):
    layers = sum(1 for name in params if name.endswith('_dw'))
    assert fast.lower(folded, images).as_text().count('MutualnetDepthwiseForwardAffine') == layers > 0
    assert 'MutualnetDepthwiseForwardAffine' not in fast.lower(exported.variables, images).as_text()


def _slices_of_parameters(fn, variables, images):
  """How many slice ops read a parameter directly in `fn`'s program."""
  closed = jax.make_jaxpr(fn)(variables, images)
  params = set(closed.jaxpr.invars[:len(jax.tree.leaves(variables['params']))])
  reads_param = lambda eqn: any(isinstance(v, jax.extend.core.Var) and v in params for v in eqn.invars)  # noqa: E731
  return sum(eqn.primitive.name in ('slice', 'dynamic_slice', 'gather') and reads_param(eqn)
             for eqn in closed.jaxpr.eqns)


def test_predict_slices_no_parameter():
  model, params, stats = _setup('tiny_convnet', 0.25, 8)
  exported = export.build(model, params, stats, 0.25, 8, channels=1)
  images = jnp.zeros((1, 8, 8, 1))
  slimmable = lambda v, x: model.apply(v, x, width=0.25, train=False)  # noqa: E731
  assert _slices_of_parameters(slimmable, {'params': params, 'batch_stats': stats}, images) > 0
  narrow = lambda v, x: export.apply_narrow(exported.model, v, x, 0.25)  # noqa: E731
  assert _slices_of_parameters(narrow, exported.variables, images) == 0


def test_bad_inputs_are_clear_errors(tmp_path):
  with pytest.raises(UserError, match='not a readable export') as error:
    export.load(tmp_path / 'missing')
  assert f'({errors.reason(error.value.__cause__)})' in str(error.value) and '\n' not in str(error.value)
  model, params, stats = _setup('tiny_convnet', 0.25, 8)
  exported = export.build(model, params, stats, 0.25, 8, channels=1)
  with pytest.raises(UserError, match=r'expected images shaped \(batch, height, width, 1\)'):
    exported.predict(np.zeros((2, 8, 8, 3), np.float32))


def test_a_library_failure_is_quoted_in_one_line():
  """What the orbax callers (export, checkpoints, BN statistics) put in their one-line messages."""
  assert errors.reason(ValueError('\n  first line \nsecond')) == 'ValueError: first line'
  assert errors.reason(KeyError()) == 'KeyError'
  assert errors.reason(OSError('x' * 300)) == 'OSError: ' + 'x' * 160


# ----------------------------------------------------------------------------------------------------------------------
# TensorFlow forms (SavedModel, TFLite) on real Fashion-MNIST test images, preprocessing built in.

@pytest.fixture(scope='module')
def fashion_net(fashion_data_dir):
  """A tiny network with BN statistics calibrated on real images and a classifier scaled so logits are O(1) (an
  untrained one's are ~0.01: equality of near-zero outputs would prove little); plus 64 raw uint8 test images."""
  config = tiny_config(data_dir=str(fashion_data_dir))
  model = get_model(dict(config.model, conv_impl='xla'))
  params = jax.device_get(init_params(model, jax.random.key(0), 8, 1))
  params['classifier']['kernel'] = params['classifier']['kernel'] * 300.0
  batches = input_pipeline.calibration_iterator(config, num_images=128, global_batch_size=64)
  stats = bn_calibration.Calibrator(model, parallel.make_mesh()).calibrate(params, 0.5, 16, batches)
  net = export.build(model, params, stats, 0.5, 16, 1, preprocessing=api.preprocessing(config, 1))
  data = tfds.builder(config.dataset, data_dir=str(fashion_data_dir)).as_dataset(split='test').take(64)
  images = np.stack([e['image'] for e in data.as_numpy_iterator()])
  return net, images


def _tflite_logits(model: str | os.PathLike | bytes, images: np.ndarray) -> np.ndarray:
  runner = tf_export.interpreter(model, batch=len(images))
  runner.set_tensor(runner.get_input_details()[0]['index'], images.astype(np.float32))
  runner.invoke()
  return runner.get_tensor(runner.get_output_details()[0]['index'])


def _saved_model_logits(path: str | os.PathLike, images: np.ndarray) -> np.ndarray:
  serve = tf.saved_model.load(str(path)).signatures['serving_default']
  return serve(images=tf.constant(images, tf.float32))['logits'].numpy()


def _assert_close(got: np.ndarray, expected: np.ndarray, relative: float) -> None:
  """Equal up to `relative` x the largest logit, and the same top-1 class for every image."""
  np.testing.assert_allclose(got, expected, rtol=0, atol=relative * float(np.abs(expected).max()))
  np.testing.assert_array_equal(got.argmax(-1), expected.argmax(-1))


def _at_input_size(net: export.ExportedModel, images: np.ndarray) -> np.ndarray:
  """Raw images resized to the pipeline's size: what a converted model without --input_size takes."""
  size = net.preprocessing.input_size
  return np.asarray(jax.image.resize(images.astype(np.float32), (len(images), size, size, images.shape[-1]),
                                     'bilinear'))


def test_saved_model_equals_the_jax_network_on_real_images(fashion_net, tmp_path):
  """Same StableHLO on XLA:CPU: equal up to float32 rounding (|difference| <= 1e-5 x the largest logit)."""
  net, images = fashion_net
  expected = np.asarray(net(images))
  scale = float(np.abs(expected).max())
  assert scale > 1.0
  path = tf_export.save_saved_model(net, tmp_path / 'saved_model', input_size=(28, 28))
  np.testing.assert_allclose(_saved_model_logits(path, images), expected, rtol=0, atol=1e-5 * scale)


def test_tflite_equals_the_jax_network_on_real_images(fashion_net, tmp_path):
  """TFLite's float32 kernels (XNNPACK) sum in another order: |difference| <= 1e-4 x the largest logit, and the
  same top-1 class for every image."""
  net, images = fashion_net
  expected = np.asarray(net(images))
  path = tf_export.save_tflite(net, tmp_path / 'net.tflite', input_size=(28, 28))
  _assert_close(_tflite_logits(path, images), expected, 1e-4)


@pytest.mark.parametrize('size', [(40, 36), None])  # None: the pipeline's size (16 px here)
def test_other_raw_input_sizes_are_resized_inside(fashion_net, size):
  net, images = fashion_net
  resized = np.asarray(jax.image.resize(images[:8].astype(np.float32), (8, *(size or (16, 16)), 1), 'bilinear'))
  expected = np.asarray(net(resized))
  got = _tflite_logits(tf_export.tflite_model(net, input_size=size), resized)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * float(np.abs(expected).max()))


def test_tflite_latency(fashion_net, tmp_path):
  net = fashion_net[0]
  path = tf_export.save_tflite(net, tmp_path / 'net.tflite')
  for batch in (1, 4):
    ms = tf_export.tflite_latency_ms(path, batch=batch, repeats=3)
    assert np.isfinite(ms) and ms > 0
  assert tf_export.network_tflite_latency_ms(net, repeats=3) > 0  # the bare network, for the sweep
  (tmp_path / 'bad.tflite').write_bytes(b'not a flatbuffer')
  with pytest.raises(UserError, match='is not a TFLite model'):
    tf_export.tflite_latency_ms(tmp_path / 'bad.tflite')


def test_convert_an_export_from_disk(fashion_net, tmp_path):
  """The converted files run the weights read back from disk: their logits are the JAX network's."""
  net, images = fashion_net
  raw = _at_input_size(net, images[:16])
  expected = np.asarray(net(raw))
  path = export.save(net, tmp_path / 'w0.5_r16', tiny_config().model.to_dict())
  tflite = tf_export.convert_export(path, 'tflite')
  assert tflite == tmp_path / 'w0.5_r16.tflite'
  _assert_close(_tflite_logits(tflite, raw), expected, 1e-4)
  saved = tf_export.convert_export(path, 'saved_model', platforms=('cpu', 'cuda'))
  _assert_close(_saved_model_logits(saved, raw), expected, 1e-5)  # the CPU lowering of a two-platform model
  with pytest.raises(UserError, match='unknown format'):
    tf_export.convert_export(path, 'onnx')
  with pytest.raises(UserError, match='TFLite models run on the CPU'):
    tf_export.convert_export(path, 'tflite', platforms=('tpu',))
  no_preprocessing = dataclasses.replace(net, preprocessing=None)
  with pytest.raises(UserError, match='has no saved preprocessing'):
    tf_export.tflite_model(no_preprocessing)
  normalised = np.asarray(net.preprocessing(raw))  # the bare network (raw=False) needs no preprocessing
  _assert_close(_tflite_logits(tf_export.tflite_model(no_preprocessing, raw=False), normalised), expected, 1e-4)


@pytest.mark.slow
def test_tf_export_command_line(fashion_net, tmp_path):
  net = fashion_net[0]
  path = export.save(net, tmp_path / 'net', tiny_config().model.to_dict())
  out = subprocess.run([sys.executable, '-m', 'mutualnet_jax.tf_export', f'--export={path}', '--format=tflite',
                        '--latency'], capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.splitlines()[0] == f'{path}.tflite' and 'ms at batch 1' in out.stdout
  raw = _at_input_size(net, fashion_net[1][:8])
  _assert_close(_tflite_logits(f'{path}.tflite', raw), np.asarray(net(raw)), 1e-4)
  out = subprocess.run([sys.executable, '-m', 'mutualnet_jax.tf_export', f'--export={tmp_path / "missing"}'],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
  last = out.stderr.strip().splitlines()[-1]  # TensorFlow's own start-up notices come first
  assert out.returncode == 2 and last.startswith('error: ') and 'not a readable export' in last
