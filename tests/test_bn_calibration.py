"""BN calibration: exact cumulative statistics, one compile per bucket, and the per-configuration orbax store."""
import logging
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from mutualnet_jax import bn_calibration, evaluation, parallel, slim
from mutualnet_jax.models import get_model, init_params
from mutualnet_jax.resizing import resize
from mutualnet_jax.compilation import CompileCounter
from tests.util import snapshot_files, tiny_config

A, B = (0.25, 8), (1.0, 16)  # two (width, resolution) buckets of the tiny config
PROVENANCE = {'params_digest': 'abc', 'num_images': 24, 'batch_size': 8}


@pytest.fixture(scope='module')
def setup():
  """Tiny model, random full-width parameters, one calibrator (its compiled steps are shared by the tests)."""
  model = get_model(tiny_config().model)
  mesh = parallel.make_mesh()
  params = parallel.replicate(jax.device_get(init_params(model, jax.random.key(0), 16, 1)), mesh)
  rng = np.random.RandomState(0)
  batches = [{'image': (rng.randn(8, 16, 16, 1) + 0.5).astype(np.float32)} for _ in range(3)]
  return model, mesh, params, batches, bn_calibration.Calibrator(model, mesh)


def _bn_inputs(model, width, resolution):
  """A jitted function returning the input of every BN layer, by path, in training mode (as calibration runs)."""
  def fn(params, images):
    seen = {}

    def record(next_fun, args, kwargs, context):
      if isinstance(context.module, slim.SlimBatchNorm) and context.method_name == '__call__':
        seen['/'.join(context.module.scope.path)] = args[0]
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
      model.apply({'params': params}, resize(images, resolution), width=width, train=True)
    return seen
  return jax.jit(fn)


@pytest.mark.parametrize('width,resolution', [A, B])
def test_calibrated_statistics_equal_numpy_over_the_same_images(setup, width, resolution):
  model, _, params, batches, calibrator = setup
  stats = calibrator.calibrate(params, width, resolution, batches)
  inputs = _bn_inputs(model, width, resolution)
  per_batch = [jax.device_get(inputs(params, b['image'])) for b in batches]
  assert len(per_batch[0]) == len(jax.tree.leaves(stats)) // 2 >= 5
  for path, first in per_batch[0].items():
    layer, bn = path.split('/')
    everything = np.concatenate([np.asarray(p[path], np.float64) for p in per_batch])  # all 24 images
    assert stats[layer][bn]['mean'].shape == (first.shape[-1],)  # compact: this width's channels only
    np.testing.assert_allclose(stats[layer][bn]['mean'], everything.mean((0, 1, 2)), rtol=1e-5, atol=1e-5,
                               err_msg=path)
    np.testing.assert_allclose(stats[layer][bn]['var'], everything.var((0, 1, 2)), rtol=1e-4, atol=1e-5,
                               err_msg=path)


@pytest.mark.parametrize('width,resolution', [A, B])
def test_official_recalibration_averages_each_batchs_mean_and_unbiased_variance(setup, width, resolution):
  """bn_calibration='official': PyTorch's BatchNorm(momentum=None) over the same batches, i.e. the plain average of
  the per-batch means and of the per-batch variances times n / (n - 1), n = a layer's elements per channel."""
  model, mesh, params, batches, calibrator = setup
  official = bn_calibration.Calibrator(model, mesh, official=True).calibrate(params, width, resolution, batches)
  per_batch = [calibrator.calibrate(params, width, resolution, [b]) for b in batches]
  inputs = jax.device_get(_bn_inputs(model, width, resolution)(params, batches[0]['image']))
  for path, x in inputs.items():
    layer, bn = path.split('/')
    n = x.size // x.shape[-1]
    np.testing.assert_allclose(official[layer][bn]['mean'], np.mean([p[layer][bn]['mean'] for p in per_batch], 0),
                               rtol=1e-5, atol=1e-6, err_msg=path)
    np.testing.assert_allclose(official[layer][bn]['var'],
                               np.mean([p[layer][bn]['var'] for p in per_batch], 0) * n / (n - 1),
                               rtol=1e-4, atol=1e-6, err_msg=path)


def test_each_bucket_compiles_once(setup):
  _, _, params, batches, calibrator = setup
  calibrator.calibrate(params, *A, batches)
  with CompileCounter().counting() as counter:
    calibrator.calibrate(params, *A, batches + batches)
  assert counter.executables == 0
  with CompileCounter().counting() as control:  # a new bucket is seen by the counter
    calibrator.calibrate(params, 1.0, 12, batches)
  assert control.executables >= 1


def test_a_width_calibrated_in_its_capacitys_program_equals_exact_slicing(setup):
  """Off-grid widths through the capacity-1.0 program: the same statistics as their exact programs, compact (only
  the used channels), and no new compilation from one width to the next."""
  model, mesh, params, batches, calibrator = setup
  capacity = bn_calibration.Calibrator(model, mesh, capacities=(1.0,))
  for width in (0.37, 0.613):
    via_capacity = capacity.calibrate(params, width, 16, batches)
    exact = calibrator.calibrate(params, width, 16, batches)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(via_capacity), jax.tree.leaves(exact)):
      assert a.shape == b.shape, path
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  with CompileCounter().counting() as counter:
    capacity.calibrate(params, 0.5, 16, batches)
  assert counter.executables == 0 and capacity.programs.num_compiled == 1


def test_evaluation_in_a_capacitys_program_equals_exact_slicing(setup):
  model, mesh, params, batches, calibrator = setup
  evaluator = evaluation.Evaluator(model, mesh)
  capacity = evaluation.Evaluator(model, mesh, capacities=(1.0,))
  capacity_calibrator = bn_calibration.Calibrator(model, mesh, capacities=(1.0,))
  for width in (0.37, 0.613):
    stats = calibrator.calibrate(params, width, 16, batches)
    predict = jax.jit(lambda v, x, w=width: model.apply(v, x, width=w, train=False).argmax(-1))
    # Labels = the exact sub-network's own predictions: 100 % top-1 exactly when the capacity path predicts alike.
    eval_batches = [{'image': b['image'], 'label': np.asarray(predict({'params': params, 'batch_stats': stats},
                                                                      b['image']), np.int32),
                     'mask': np.ones(8, np.float32)} for b in batches]
    assert evaluator.evaluate(params, stats, width, 16, eval_batches)['top1'] == 1.0
    assert capacity.evaluate(params, stats, width, 16, eval_batches)['top1'] == 1.0
  stats = capacity_calibrator.calibrate(params, 0.45, 16, batches)
  with CompileCounter().counting() as counter:
    capacity.evaluate(params, stats, 0.45, 16, eval_batches)
  assert counter.executables == 0 and capacity.programs.num_compiled == 1


def test_folded_statistics_are_the_inference_map_of_the_leading_channels(setup):
  """slim.fold_batch_norm reads scale/bias from a replicated (device) tree, as many leading channels as the
  statistics hold: mul = scale / sqrt(var + eps), shift = bias - mean * mul."""
  model, mesh, params, batches, calibrator = setup
  stats = calibrator.calibrate(params, 0.37, 16, batches)
  folded = slim.fold_batch_norm(parallel.replicate(params, mesh), stats)
  layers = jax.tree_util.tree_leaves_with_path(stats, is_leaf=lambda x: isinstance(x, dict) and 'mean' in x)
  assert layers
  for path, layer in layers:
    keys = [k.key for k in path]
    node, out = params, folded
    for k in keys:
      node, out = node[k], out[k]
    c = layer['mean'].shape[0]
    mul = np.asarray(node['scale'])[:c] / np.sqrt(np.asarray(layer['var']) + slim.BN_EPSILON)
    np.testing.assert_allclose(out['mul'], mul, rtol=1e-6, err_msg=str(keys))
    np.testing.assert_allclose(out['shift'], np.asarray(node['bias'])[:c] - np.asarray(layer['mean']) * mul,
                               rtol=1e-6, atol=1e-7, err_msg=str(keys))
    assert c < np.shape(node['scale'])[0]  # the leading channels of a wider parameter


def _assert_equal_trees(a, b):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_store_keeps_configurations_apart_and_reuse_is_idempotent(setup, tmp_path):
  _, _, params, batches, calibrator = setup
  store = bn_calibration.StatsStore(str(tmp_path))
  get = lambda bucket: bn_calibration.get_or_calibrate(  # noqa: E731
      store, calibrator, params, *bucket, lambda: batches, PROVENANCE)
  stats_a, computed = get(A)
  assert computed and store.keys() == ['w0.25_r8']
  files_a = snapshot_files(store.path(*A))
  stats_b, computed = get(B)
  assert computed and store.keys() == ['w0.25_r8', 'w1_r16']
  assert snapshot_files(store.path(*A)) == files_a  # calibrating B touched nothing of A
  again, computed = get(A)
  assert not computed
  _assert_equal_trees(again, stats_a)
  assert snapshot_files(store.path(*A)) == files_a  # reuse writes nothing
  assert jax.tree.map(np.shape, stats_b) != jax.tree.map(np.shape, stats_a)


def test_stale_provenance_is_recalibrated(setup, tmp_path):
  _, _, params, batches, calibrator = setup
  store = bn_calibration.StatsStore(str(tmp_path))
  stats = calibrator.calibrate(params, *A, batches)
  store.save(*A, jax.tree.map(np.zeros_like, stats), PROVENANCE)
  assert store.load(*A, {**PROVENANCE, 'params_digest': 'retrained'}) is None
  fresh, computed = bn_calibration.get_or_calibrate(store, calibrator, params, *A, lambda: batches,
                                                    {**PROVENANCE, 'params_digest': 'retrained'})
  assert computed
  _assert_equal_trees(fresh, stats)


def _damage_arrays(path):
  for root, _, names in os.walk(path / 'stats'):
    for name in names:
      if 'METADATA' not in name and 'commit' not in name:
        with open(os.path.join(root, name), 'r+b') as f:
          f.write(b'\0' * 64)


def _forge_checksum(path):
  meta = path / 'meta' / 'metadata'
  meta.write_text(meta.read_text().replace('"checksum": "', '"checksum": "0'))


# A failed tensorstore read leaves callbacks aimed at orbax's closed event loop; they are harmless noise.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('damage,message', [(_damage_arrays, 'unreadable'), (_forge_checksum, 'checksum')])
def test_corrupt_entry_is_reported_and_recomputed(setup, tmp_path, caplog, damage, message):
  _, _, params, batches, calibrator = setup
  store = bn_calibration.StatsStore(str(tmp_path))
  stats, _ = bn_calibration.get_or_calibrate(store, calibrator, params, *A, lambda: batches, PROVENANCE)
  damage(store.path(*A))
  with caplog.at_level(logging.WARNING):
    assert store.load(*A, PROVENANCE) is None
  assert message in caplog.text and 'recomputing' in caplog.text
  fresh, computed = bn_calibration.get_or_calibrate(store, calibrator, params, *A, lambda: batches, PROVENANCE)
  assert computed
  _assert_equal_trees(fresh, stats)
  _assert_equal_trees(store.load(*A, PROVENANCE), stats)  # the entry was rewritten whole
