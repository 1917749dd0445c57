"""Export: narrow parameters + statistics saved with orbax; `predict` equals the slimmable model and slices nothing."""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from mutualnet_jax import export
from mutualnet_jax.errors import UserError
from mutualnet_jax.models import get_model, init_params
from mutualnet_jax.preprocess import resize

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


def test_every_layer_of_mobilenet_v2_runs_at_its_exported_size():
  """Its expansion layers use make_divisible(c * w) * t channels, which no narrower max_width reproduces: the export
  must take each layer's size from the sub-network itself (checked by tracing; Flax rejects a mis-sized parameter)."""
  model, params, stats = _setup('mobilenet_v2', 0.35, 8)
  exported = export.build(model, params, stats, 0.35, 8, channels=1)
  expand = exported.variables['params']['block1_expand']['conv']['kernel']
  assert expand.shape == (1, 1, 8, 48)  # 16 * 0.35 -> 8 input channels, times t = 6
  out = jax.eval_shape(exported.predict, jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32))
  assert out.shape == (2, 10)


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
  with pytest.raises(UserError, match='not a readable export'):
    export.load(tmp_path / 'missing')
  model, params, stats = _setup('tiny_convnet', 0.25, 8)
  exported = export.build(model, params, stats, 0.25, 8, channels=1)
  with pytest.raises(UserError, match=r'expected images shaped \(batch, height, width, 1\)'):
    exported.predict(np.zeros((2, 8, 8, 3), np.float32))
