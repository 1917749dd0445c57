"""The Python API on a workdir with real Fashion-MNIST data: table queries, raw-image networks equal to what the sweep
measures, exports that keep their preprocessing, and the README's example (examples/python_api.py) run as is."""
import os
import runpy
import shutil
import subprocess
import sys

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import mutualnet_jax
from mutualnet_jax import checkpointing, export, input_pipeline, parallel, query, workdir as wd
from mutualnet_jax.errors import UserError
from mutualnet_jax.models import get_model
from mutualnet_jax.resizing import resize
from mutualnet_jax.train_state import create_optimizer, init_state
from tests.util import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, 'examples', 'python_api.py')


def _rows():
  """A made-up table (the API only reads it): (0.25, 16) is the most accurate row under 1 MFLOPs."""
  return [query.Row(0.25, 16, 300_000, 5_000, 0.60, 0.90, 0.2, 2.0),
          query.Row(0.25, 8, 80_000, 5_000, 0.50, 0.85, 0.1, 1.0),
          query.Row(1.0, 16, 3_000_000, 60_000, 0.70, 0.95, 0.5, 5.0),
          query.Row(1.0, 8, 800_000, 60_000, 0.55, 0.90, 0.3, 3.0)]


@pytest.fixture(scope='module')
def workdir(fashion_data_dir, tmp_path_factory):
  """An untrained tiny run on Fashion-MNIST (accuracy does not matter here): checkpoint, config.json, table."""
  path = str(tmp_path_factory.mktemp('api_run'))
  config = tiny_config(data_dir=str(fashion_data_dir), calibration_images=64, calibration_batch_size=32,
                       eval_batch_size=50)
  tx = create_optimizer(config, optax.constant_schedule(0.0))
  state = init_state(get_model(config.model), tx, 0, 1, parallel.make_mesh())
  with checkpointing.Checkpoints(path, keep=1, expected=checkpointing.fingerprint(config, 1)) as ckpt:
    ckpt.save(1, state, {'step': 1})
  wd.save_config(config, path)
  query.write_table(_rows(), path, {'checkpoint_step': 1})
  return path


def test_table_queries_need_no_checkpoint(workdir):
  run = mutualnet_jax.open(workdir)
  assert run.config.model.name == 'tiny_convnet'
  assert [(r.width, r.resolution) for r in run.frontier()] == [(0.25, 8), (0.25, 16), (1.0, 16)]
  assert (run.best(budget_mflops=1).width, run.best(budget_mflops=1).resolution) == (0.25, 16)
  assert run.best(budget_ms=0.15).resolution == 8
  assert 'trained' not in run.__dict__  # nothing restored yet
  with pytest.raises(UserError, match='no configuration fits'):
    run.best(budget_mflops=0.01)


def test_network_on_raw_images_equals_the_sweeps_evaluation(workdir):
  """Raw uint8 28 px images through the network = the slimmable model on the eval pipeline's normalised 16 px
  batch (what the sweep scored), at the same BN statistics."""
  run = mutualnet_jax.open(workdir)
  net = run.network(0.25, 8)
  assert net.preprocessing == export.Preprocessing((0.2860,), (0.3530,), 16, 1.0)
  images, labels = run.examples(50)
  assert images.dtype == np.uint8 and images.shape == (50, 28, 28, 1) and labels.shape == (50,)
  batch = next(input_pipeline.eval_iterator(run.config, global_batch_size=50))
  np.testing.assert_array_equal(batch['label'], labels)  # the same images, in the same order
  stats, computed = run.trained.stats(0.25, 8)
  assert not computed  # network() calibrated and stored them
  expected = jax.jit(lambda p, s, x: run.trained.model.apply({'params': p, 'batch_stats': s}, resize(x, 8),
                                                             width=0.25, train=False))(run.trained.params, stats,
                                                                                       batch['image'])
  assert float(np.abs(expected).max()) > 1e-3  # not a trivially zero output
  logits = net(images)
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(net(images.astype(np.float32)), logits, rtol=1e-6, atol=1e-7)  # floats in [0, 255]
  np.testing.assert_allclose(net(images[3]), logits[3], rtol=1e-5, atol=1e-6)  # one unbatched image
  top = net.top_k(images, k=3)
  probabilities = np.asarray(net.probabilities(images))
  np.testing.assert_array_equal(top.classes[:, 0], probabilities.argmax(-1))
  np.testing.assert_allclose(top.probabilities[:, 0], probabilities.max(-1), rtol=1e-6)
  assert np.all(np.diff(top.probabilities, axis=1) <= 0)


def test_export_keeps_the_preprocessing(workdir, tmp_path):
  run = mutualnet_jax.open(workdir)
  path = run.export(0.25, 8, tmp_path / 'net')
  loaded = mutualnet_jax.load(path)
  assert loaded.preprocessing == run.network(0.25, 8).preprocessing
  images, _ = run.examples(4)
  np.testing.assert_allclose(loaded(images), run.network(0.25, 8)(images), rtol=1e-6, atol=1e-7)
  assert run.export(0.25, 8) == export.default_path(workdir, 0.25, 8)


def test_format_1_exports_load_and_predict_but_refuse_raw_images(workdir, tmp_path):
  current = mutualnet_jax.open(workdir).network(0.25, 8)
  path = tmp_path / 'old'
  ocp.Checkpointer(ocp.CompositeCheckpointHandler()).save(path, args=ocp.args.Composite(
      params=ocp.args.StandardSave(current.variables['params']),
      batch_stats=ocp.args.StandardSave(current.variables['batch_stats']),
      config=ocp.args.JsonSave({'format_version': 1, 'model': tiny_config().model.to_dict(), 'width': 0.25,
                                'resolution': 8, 'channels': 1, 'antialias': False, 'source': {}})))
  old = mutualnet_jax.load(path)
  normalised = np.random.RandomState(0).randn(2, 16, 16, 1).astype(np.float32)
  np.testing.assert_allclose(old.predict(normalised), current.predict(normalised), rtol=1e-6)
  with pytest.raises(UserError, match=r'no saved preprocessing \(exports before format 2 lack it\).*export it again'):
    old(np.zeros((2, 28, 28, 1), np.uint8))


def test_mistakes_are_one_line_errors(workdir, tmp_path):
  with pytest.raises(UserError, match='does not exist'):
    mutualnet_jax.open(tmp_path / 'nope')
  with pytest.raises(UserError, match='config.json not found'):
    mutualnet_jax.open(tmp_path)
  run = mutualnet_jax.open(workdir)
  with pytest.raises(UserError, match='outside the trained range'):
    run.network(0.1, 8)
  net = run.network(0.25, 8)
  with pytest.raises(UserError, match=r'channels last \(add one with images\[..., None\]\)'):
    net(np.zeros((2, 28, 28), np.uint8))
  with pytest.raises(UserError, match='expected pixel values'):
    net(np.zeros((2, 28, 28, 1), bool))
  with pytest.raises(UserError, match=r'k must be an integer in \[1, 10\]'):
    net.top_k(np.zeros((2, 28, 28, 1), np.uint8), k=11)
  with wd.lock(workdir, 'a sweep', post_training=True), pytest.raises(UserError, match=f'workdir {workdir} is in use by a sweep'):
    run.export(0.25, 8)  # a writer of the workdir, like --mode=export
  unswept = tmp_path / 'unswept'
  unswept.mkdir()
  wd.save_config(run.config, str(unswept))
  with pytest.raises(UserError, match='run --mode=sweep on this workdir first'):
    mutualnet_jax.open(unswept).best(budget_mflops=1)


def test_the_readme_example_runs(workdir, capsys, monkeypatch):
  monkeypatch.setattr(sys, 'argv', [EXAMPLE, workdir, '1'])
  runpy.run_path(EXAMPLE, run_name='__main__')
  out = capsys.readouterr().out
  assert 'width 0.25 at 16 px: top-1 60.00%' in out and 'exported to' in out


def test_importing_the_package_stays_light():
  """The API is re-exported lazily (the other tests use it): `import mutualnet_jax` loads neither JAX nor
  TensorFlow, so --mode=query/plot, which import submodules of the package, stay fast."""
  code = 'import sys, mutualnet_jax; print(sorted(m for m in ("jax", "tensorflow") if m in sys.modules))'
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True, cwd=ROOT)
  assert out.stdout.strip() == '[]'
  assert mutualnet_jax.open is mutualnet_jax.api.open and 'open' in mutualnet_jax.__all__


def test_the_readme_shows_the_example_verbatim():
  """The README's Python API block is examples/python_api.py from its first import on (the file the test above
  runs), so the README's code cannot drift from code that runs."""
  with open(os.path.join(ROOT, 'README.md')) as f:
    readme = f.read()
  if 'examples/python_api.py' not in readme:
    pytest.skip('the README has no Python API section yet')
  with open(EXAMPLE) as f:
    code = f.read()
  body = code[code.index('import sys'):]
  assert f'```python\n{body}```' in readme


def test_calibrate_on_any_images_then_the_network_uses_them(workdir, tmp_path):
  """run.calibrate(array): BN statistics of the array's images (the run's preprocessing), stored so that network()
  takes them without reading the training split; the same images again are reused, other images recalibrate."""
  run = mutualnet_jax.open(shutil.copytree(workdir, tmp_path / 'run'))  # the shared workdir keeps its statistics
  images, _ = run.examples(20)
  summary = run.calibrate(images, [0.25], [8])
  assert (summary['calibrated'], summary['images']) == (1, 'an array')
  trained = run.trained
  source = input_pipeline.image_source(run.config, images, 1)
  expected = trained.calibrator.calibrate(trained.params, 0.25, 8, source.batches)
  stats, computed = trained.stats(0.25, 8)  # the lookup every network() makes
  assert not computed
  for got, want in zip(jax.tree.leaves(stats), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(got, want)
  for got, want in zip(jax.tree.leaves(run.network(0.25, 8).variables['batch_stats']), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(got, want)
  assert run.calibrate(images, [0.25], [8])['calibrated'] == 0
  assert run.calibrate(images[::-1], [0.25], [8])['calibrated'] == 1
  with pytest.raises(UserError, match=r'^got images shaped \(2, 28, 28, 3\) \(uint8\) from the array: expected raw '
                                      r'pixels shaped \(N, height, width, 1\)\.$'):
    run.calibrate(np.zeros((2, 28, 28, 3), np.uint8))
