"""One line for every fault a user can cause (issue 25): each is a UserError whose message names the problem and the
fix, which `cli.run_cli` prints as 'error: <message>' with exit status 2, never a traceback. Promised here:

- a --config file with a syntax error, one that raises while loading, one without get_config(): the file and what
  is wrong with it;
- config.init_from naming a truncated .npz or random bytes: not a readable .npz parameter file, and what init_from
  takes;
- a data directory that cannot be written when the offline dataset is prepared on first use (a read-only HOME with
  data_dir ''): pass --config.data_dir=<a writable directory>; nothing is written;
- an exported network called on strings, on float images in [0, 1] (raw pixels are [0, 255]: multiply by 255) or on
  NaN/infinite pixels (how many); uint8, all-zero and [0, 255] float images still run;
- a query table's rows without a top-1 accuracy (NaN) are never picked and do not cut the Pareto frontier short, and
  a warning counts them; a damaged table (JSON/CSV of the wrong shape, a string for a number) names the file and
  says to re-run --mode=sweep;
- main.py prints that one line and nothing else: no traceback before TensorFlow loads, no TensorFlow/XLA start-up
  notices after TensorFlow and JAX are loaded.
"""
import dataclasses
import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from mutualnet_jax import cli, export, init_from, query
from mutualnet_jax.errors import UserError
from mutualnet_jax.models import get_model, init_params
from tests.util import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _row(width: float, macs: int, top1: float) -> query.Row:
  return query.Row(width, 16, macs, 1000, top1, 0.99, 1.0)


def _tiny_network() -> export.ExportedModel:
  """tiny_convnet at width 0.25 and 8 px with unit BN statistics and Fashion-MNIST's preprocessing to 16 px."""
  model = get_model({'name': 'tiny_convnet', 'num_classes': 10, 'conv_impl': 'xla', 'num_downsample': 3})
  params = jax.device_get(init_params(model, jax.random.key(0), 8, 1))
  moments = jax.eval_shape(lambda p, x: model.apply({'params': p}, x, width=0.25, train=True,
                                                    mutable=['bn_moments'])[1]['bn_moments'],
                           params, jnp.zeros((1, 8, 8, 1)))
  stats = jax.tree.map(lambda s: {'mean': np.zeros(s['mean'].shape, np.float32),
                                  'var': np.ones(s['mean'].shape, np.float32)},
                       moments, is_leaf=lambda d: isinstance(d, dict) and 'mean' in d)
  return export.build(model, params, stats, 0.25, 8, channels=1,
                      preprocessing=export.Preprocessing((0.2860,), (0.3530,), 16))


@pytest.mark.parametrize('source,message', [
    ('def get_config()\n  return None\n', r'^{path} line 1: expected .:.: fix the config file\.$'),
    ('import ml_collections\n\nraise ValueError("no\\nway")\n',
     r'^{path} raised ValueError: no way \(line 3\) while loading: fix the config file\.$'),
    ('X = 1\n', r'^{path} has no get_config\(\): a config file defines get_config\(\) returning')])
def test_a_config_file_that_does_not_load_is_one_line_naming_it(tmp_path, source, message):
  path = tmp_path / 'x.py'
  path.write_text(source)
  parser = cli._ConfigFileParser(ConfigFileFlagParser('config'))  # pylint: disable=protected-access  (as parse_flags)
  with pytest.raises(cli._BadConfigFile, match=message.format(path=path)):  # pylint: disable=protected-access
    parser.parse(str(path))


@pytest.mark.parametrize('damage', ['truncated', 'random bytes'])
def test_init_from_a_damaged_parameter_file_is_one_line(tmp_path, damage):
  path = init_from.save_params(tmp_path / 'p.npz', {'dense': {'kernel': np.ones((64, 64), np.float32)}})
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2] if damage == 'truncated' else np.random.RandomState(0).bytes(len(data)))
  with pytest.raises(UserError, match=rf'^config.init_from={path} is not a readable .npz parameter file .*: init_from '
                                      r'takes a training workdir, an export \(--mode=export\) or a .npz written by'):
    init_from.load_source(str(path))


def test_an_unwritable_data_dir_is_one_line_and_nothing_is_written(tmp_path):
  """As a read-only HOME does to ~/tensorflow_datasets (root writes anywhere, so here a file blocks the path)."""
  import tensorflow_datasets as tfds  # noqa: PLC0415  heavy (TensorFlow): only this test needs it

  from mutualnet_jax import input_pipeline  # noqa: PLC0415
  (tmp_path / 'file').write_text('')
  builder = tfds.builder('fashion_mnist_local', data_dir=str(tmp_path / 'file' / 'tensorflow_datasets'))
  with pytest.raises(UserError, match=r'^the TFDS default data directory .* is not writable \(Not a directory\), and '
                                      r'fashion_mnist_local is prepared there on first use: pass '
                                      r'--config.data_dir=<a writable directory>\.$'):
    input_pipeline._prepare(builder, tiny_config(data_dir=''))  # pylint: disable=protected-access
  assert os.listdir(tmp_path) == ['file']


def test_the_network_refuses_strings_unit_floats_and_nan_pixels():
  net = _tiny_network()
  images = np.random.RandomState(0).randint(0, 256, (2, 12, 12, 1)).astype(np.uint8)
  with pytest.raises(UserError, match=r'^expected pixel values \(uint8, or floats in \[0, 255\]\), got dtype <U1\.$'):
    net(np.full((2, 12, 12, 1), 'a'))
  with pytest.raises(UserError, match=r'^the images are floats in \[0, 1\] \(largest pixel 1\), but raw pixels are '
                                      r'in \[0, 255\]: multiply them by 255'):
    net.top_k(np.ones((12, 12, 1), np.float32))
  nan = images.astype(np.float32)
  nan[0, :3, 0, 0] = [np.nan, np.inf, -np.inf]
  with pytest.raises(UserError, match=r'^3 of 288 pixel values are NaN or infinite'):
    net.probabilities(nan)
  for accepted in (images, images.astype(np.float32), np.zeros_like(images, np.float32)):
    assert np.isfinite(np.asarray(net(accepted))).all()


def test_rows_without_accuracy_are_never_picked_nor_cut_the_frontier(tmp_path, caplog):
  rows = [_row(0.25, 1_000_000, float('nan')), _row(0.5, 2_000_000, 0.7), _row(0.75, 3_000_000, float('nan')),
          _row(1.0, 4_000_000, 0.8)]
  query.write_table(rows, str(tmp_path), {})
  with caplog.at_level(logging.WARNING):
    read, _ = query.read_table(str(tmp_path))
  assert '2 of 4 rows have no top-1 accuracy' in caplog.text
  assert [r.width for r in query.pareto_frontier(read)] == [0.5, 1.0]
  assert query.query(read, budget_mflops=3.5).width == 0.5
  assert query.query(query.read_csv(str(tmp_path / 'query_table.csv')), budget_mflops=10).width == 1.0
  with pytest.raises(UserError, match=r'no row of the query table has a top-1 accuracy \(all NaN\): run --mode=sweep'):
    query.query(read[:1], budget_mflops=10)


@pytest.mark.parametrize('name,text', [
    ('query_table.json', '[]'),
    ('query_table.json', '{"meta": {}, "rows": {"width": 0.5}}'),
    ('query_table.json', '{"meta": {}, "rows": [[0.5, 16]]}'),
    ('query_table.json', '{"meta": [], "rows": []}'),
    ('query_table.json', json.dumps({'rows': [{**dataclasses.asdict(_row(0.5, 1, 0.7)), 'top1': 'high'}]})),
    ('query_table.csv', f'{",".join(query.COLUMNS)}\n0.5,16,many,1000,0.7,0.9,1.0,,\n'),
    ('query_table.csv', 'a,b\n1,2\n')])
def test_a_damaged_table_is_one_line_naming_the_file(tmp_path, name, text):
  (tmp_path / name).write_text(text)
  with pytest.raises(UserError, match=rf'^{tmp_path / name} is not a readable query table \(damaged: .*\): run '
                                      r'--mode=sweep again\.$'):
    if name.endswith('.json'):
      query.read_table(str(tmp_path))
    else:
      query.read_csv(str(tmp_path / name))


def test_main_prints_the_error_line_and_nothing_else(tmp_path):
  """Before TensorFlow loads (a config file that does not parse) and after TensorFlow and JAX loaded (training with
  a data_dir that does not exist): no traceback, no start-up notices; TensorFlow's log settings left to main.py."""
  env = {k: v for k, v in os.environ.items() if k not in ('TF_CPP_MIN_LOG_LEVEL', 'TF_ENABLE_ONEDNN_OPTS')}
  (tmp_path / 'broken.py').write_text('def get_config()\n  return None\n')
  cases = {f'--config={tmp_path / "broken.py"}': f"error: {tmp_path / 'broken.py'} line 1: expected ':': fix the "
                                                 'config file.',
           f'--config.data_dir={tmp_path / "nope"}': f"error: config.data_dir='{tmp_path / 'nope'}' does not exist"}
  for flag, line in cases.items():
    config = [] if flag.startswith('--config=') else ['--config=configs/default.py']
    out = subprocess.run([sys.executable, 'main.py', *config, flag, f'--workdir={tmp_path / "w"}'], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1, out.stderr
    assert out.stderr.startswith(line)
