"""Nothing a user had is removed or overwritten without an explicit flag, and a stop never loses a promised save.

- An export (orbax, SavedModel, TFLite) never replaces a training workdir, a regular file or a directory of other
  files, with or without --overwrite; an earlier export is replaced only with --overwrite, and only once the new one
  is complete (a failed write leaves the old one as it was).
- Post-training writers (calibrate, sweep, export, the API's network) run beside a training of the same workdir;
  two of them exclude each other in one line.
- A read-only workdir is only read: the sweep asks for --out in one line, and with it writes only there.
- config.json gone or damaged: the checkpoint's own record of its settings decides what a resume may change; a
  damaged file is set aside (kept), never silently trusted; a wrong-shaped one is one line naming the file.
- SIGTERM or SIGINT, once or several times in a row, leave the checkpoint of the step they stopped at complete, and
  the same command resumes from it.
"""
import errno
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import mutualnet_jax
from mutualnet_jax import checkpointing, commands, export, tf_export, train, workdir as wd
from mutualnet_jax.errors import UserError
from mutualnet_jax.models import get_model, init_params
from tests.test_main import ROOT, _main, _tiny_overrides, run_config
from tests.util import tiny_config


def _snapshot(path):
  """Every file under `path` with its bytes: what must not change."""
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      with open(full, 'rb') as f:
        out[os.path.relpath(full, path)] = f.read()
  return out


@pytest.fixture(scope='module')
def net():
  config = tiny_config()
  model = get_model(config.model)
  params = jax.device_get(init_params(model, jax.random.key(0), 8, 1))
  stats = jax.tree.map(lambda s: {'mean': np.zeros(s['mean'].shape, np.float32),
                                  'var': np.ones(s['mean'].shape, np.float32)},
                       jax.eval_shape(lambda p, x: model.apply({'params': p}, x, width=0.5, train=True,
                                                               mutable=['bn_moments'])[1]['bn_moments'],
                                      params, np.zeros((1, 8, 8, 1), np.float32)),
                       is_leaf=lambda d: isinstance(d, dict) and 'mean' in d)
  return export.build(model, params, stats, 0.5, 8, channels=1), config.model.to_dict()


def _training_workdir(path):
  (path / 'checkpoints' / '7').mkdir(parents=True)
  (path / 'checkpoints' / '7' / 'state').write_bytes(b'weights')
  (path / 'config.json').write_text('{"seed": 0}')
  return path


# ----------------------------------------------------------------------------------------------------------------------
# Exports.

@pytest.mark.parametrize('overwrite', [False, True])
def test_export_never_replaces_a_training_workdir_a_file_or_foreign_files(net, tmp_path, overwrite):
  exported, model_config = net
  workdir = _training_workdir(tmp_path / 'run_copy')
  foreign = tmp_path / 'mine'
  foreign.mkdir()
  (foreign / 'notes.txt').write_text('my notes')
  regular = tmp_path / 'file.bin'
  regular.write_bytes(b'data')
  before = _snapshot(tmp_path)
  for path, message in [(workdir, 'is a training workdir'), (foreign, 'is not an export'),
                        (regular, 'is not an export')]:
    with pytest.raises(UserError, match=message) as error:
      export.save(exported, path, model_config, overwrite=overwrite)
    assert '\n' not in str(error.value)
  assert _snapshot(tmp_path) == before


def test_an_earlier_export_is_replaced_only_with_overwrite_and_only_once_the_new_one_is_complete(net, tmp_path,
                                                                                                 monkeypatch):
  exported, model_config = net
  path = export.save(exported, tmp_path / 'net', model_config)
  assert export.is_export(path) and export.load(path).width == 0.5
  before = _snapshot(tmp_path)
  with pytest.raises(UserError, match='already holds an export: pass --overwrite'):
    export.save(exported, path, model_config)
  assert _snapshot(tmp_path) == before

  def broken_write(*args, **kwargs):
    raise OSError(28, 'No space left on device')
  with monkeypatch.context() as m:
    m.setattr(export.ocp.Checkpointer, 'save', broken_write)
    with pytest.raises(OSError):
      export.save(exported, path, model_config, overwrite=True)
  assert _snapshot(tmp_path) == before  # the old export as it was, no temporary left beside it

  assert export.save(exported, path, model_config, overwrite=True) == path
  assert sorted(os.listdir(tmp_path)) == ['net'] and export.load(path).resolution == 8
  empty = tmp_path / 'empty'
  empty.mkdir()
  assert export.is_export(export.save(exported, empty, model_config))  # an empty directory is free


def test_tf_exports_refuse_foreign_outputs(net, tmp_path):
  exported, _ = net
  regular = tmp_path / 'net.tflite'
  regular.write_bytes(b'not a model')
  foreign = tmp_path / 'saved'
  foreign.mkdir()
  (foreign / 'keep.txt').write_text('mine')
  before = _snapshot(tmp_path)
  with pytest.raises(UserError, match='is not a TFLite model'):
    tf_export.save_tflite(exported, regular, overwrite=True)
  with pytest.raises(UserError, match='is not a SavedModel'):
    tf_export.save_saved_model(exported, foreign, overwrite=True)
  assert _snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------------------------------------
# Post-training beside training; read-only workdirs.

@pytest.fixture(scope='module')
def trained(fashion_data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('trained')
  train.train_and_evaluate(run_config(fashion_data_dir, num_train_steps=1), str(workdir))
  return str(workdir)


@pytest.mark.slow
def test_post_training_runs_beside_training_and_post_training_writers_exclude_each_other(trained, tmp_path):
  with wd.lock(trained, 'training'):
    result = commands.run('calibrate', None, trained, commands.Options(width=1.0, resolution=16, format='json'))
    assert '"calibrated": 1' in result or '"reused": 1' in result
    net = mutualnet_jax.open(trained).network(1.0, 16)
    assert net(np.zeros((1, 28, 28, 1), np.uint8)).shape == (1, 10)
    out = commands.run('export', None, trained, commands.Options(width=1.0, resolution=16, out=str(tmp_path / 'e')))
    assert export.is_export(out)
  with wd.lock(trained, 'a sweep', post_training=True):
    with pytest.raises(UserError, match='is in use by a sweep'):
      commands.run('calibrate', None, trained, commands.Options(width=1.0, resolution=16))
    with pytest.raises(UserError, match='no query_table.json'):  # readers are never blocked
      commands.run('query', None, trained, commands.Options())


@pytest.mark.slow
def test_a_read_only_workdir_is_only_read(trained, tmp_path, monkeypatch):
  """Root ignores file modes, so the read-only workdir is simulated where the library asks whether it may write."""
  workdir = str(tmp_path / 'ro')
  shutil.copytree(trained, workdir, ignore=shutil.ignore_patterns('bn_stats', 'export', '.*lock'))
  writable = wd.is_writable
  monkeypatch.setattr(wd, 'is_writable', lambda p: not os.path.abspath(os.fspath(p)).startswith(workdir)
                      and writable(p))
  before = _snapshot(workdir)
  options = commands.Options(widths=[1.0], resolutions=[16], latency_repeats=1)
  with pytest.raises(UserError, match=f'workdir {workdir} is read-only: pass --out=DIR') as error:
    commands.run('sweep', None, workdir, options)
  assert '\n' not in str(error.value)
  out = tmp_path / 'tables'
  commands.run('sweep', None, workdir, commands.Options(widths=[1.0], resolutions=[16], latency_repeats=1,
                                                         out=str(out)))
  assert (out / 'query_table.json').exists() and (out / 'bn_stats').is_dir()
  assert 'Pareto frontier' in commands.run('query', None, str(out), commands.Options())
  with pytest.raises(UserError, match='is read-only: pass a writable path for the export'):
    mutualnet_jax.open(workdir).export(1.0, 16)
  assert mutualnet_jax.open(workdir).network(1.0, 16)(np.zeros((1, 28, 28, 1), np.uint8)).shape == (1, 10)
  assert _snapshot(workdir) == before


# ----------------------------------------------------------------------------------------------------------------------
# config.json damage.

@pytest.fixture
def resumable(fashion_data_dir, tmp_path):
  config = run_config(fashion_data_dir, num_train_steps=2)
  train.train_and_evaluate(config, str(tmp_path))
  return config, tmp_path


@pytest.mark.slow
def test_without_config_json_the_checkpoint_decides_what_a_resume_may_change(resumable):
  config, workdir = resumable
  (workdir / 'config.json').unlink()
  changed = config.copy_and_resolve_references()
  changed.learning_rate, changed.num_train_steps = 0.5, 4
  with pytest.raises(UserError, match=r'with changed settings \(learning_rate 0.05 -> 0.5, num_train_steps 2 -> 4'):
    train.train_and_evaluate(changed, str(workdir))
  assert train.train_and_evaluate(changed, str(workdir), accept_changes=True)['step'] == 4
  history = wd.bookkeeping(str(workdir))[wd.HISTORY_KEY]
  assert history[-1]['changes']['learning_rate'] == [0.05, 0.5]


@pytest.mark.slow
def test_a_truncated_config_json_is_set_aside_and_the_run_resumes_with_its_config(resumable):
  config, workdir = resumable
  text = (workdir / 'config.json').read_text()
  (workdir / 'config.json').write_text(text[:len(text) // 2])
  longer = config.copy_and_resolve_references()
  longer.num_train_steps = 3
  with pytest.raises(UserError, match='num_train_steps 2 -> 3'):  # judged against the checkpoint's record
    train.train_and_evaluate(longer, str(workdir))
  (damaged,) = [p for p in os.listdir(workdir) if p.startswith('config.json.damaged-')]
  assert (workdir / damaged).read_text() == text[:len(text) // 2]  # kept as it was
  assert train.train_and_evaluate(config, str(workdir))['step'] == 2  # the same settings resume (nothing to do)
  assert wd.saved_config(str(workdir)).learning_rate == config.learning_rate


@pytest.mark.slow
@pytest.mark.parametrize('content, fragment', [
    ('[1, 2]', r'is damaged \(not a JSON object of settings\)'),
    ('{"model": "mobilenet"}', r'is damaged \(not a JSON object of settings\)'),
])
def test_a_wrong_shaped_config_json_falls_back_to_the_checkpoint_or_is_one_line(resumable, content, fragment):
  config, workdir = resumable
  (workdir / 'config.json').write_text(content)
  with pytest.raises(UserError, match=fragment):
    wd.saved_config(str(workdir))
  result = commands.run('calibrate', None, str(workdir), commands.Options(width=1.0, resolution=16, format='json'))
  assert '"configurations": 1' in result  # the checkpoint's record of the settings
  (workdir / 'config.json').write_text(json.dumps({**wd.config_record(config), 'batch_size': '16'}))
  with pytest.raises(UserError, match=r'config.json: .*batch_size.*fix the file, or pass --config') as error:
    commands.run('calibrate', None, str(workdir), commands.Options(width=1.0, resolution=16))
  assert '\n' not in str(error.value)


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_the_run_resumes(fashion_data_dir, tmp_path,
                                                                              monkeypatch):
  config = run_config(fashion_data_dir, num_train_steps=4, checkpoint_every_steps=2)
  save = checkpointing.ocp.CheckpointManager.save

  def full_after_step_two(self, step, *args, **kwargs):
    if step > 2:
      raise OSError(errno.ENOSPC, 'No space left on device')
    return save(self, step, *args, **kwargs)
  with monkeypatch.context() as m:
    m.setattr(checkpointing.ocp.CheckpointManager, 'save', full_after_step_two)
    with pytest.raises(UserError, match='disk full while saving a checkpoint .*the checkpoint of step 2 is complete; '
                                        'free some space, then run the same command') as error:
      train.train_and_evaluate(config, str(tmp_path))
  assert '\n' not in str(error.value)
  assert train.train_and_evaluate(config, str(tmp_path))['step'] == 4


# ----------------------------------------------------------------------------------------------------------------------
# Signals.

@pytest.mark.slow
@pytest.mark.parametrize('signals', ['SIGTERM,SIGTERM', 'SIGINT,SIGINT,SIGTERM'])
def test_repeated_signals_leave_the_promised_checkpoint_complete(fashion_data_dir, tmp_path, signals):
  steps, stop_at = 8, 3
  cmd = _main(tmp_path, *_tiny_overrides(fashion_data_dir, steps, '--config.checkpoint_every_steps=100'))
  stopped = subprocess.run([sys.executable, os.path.join(ROOT, 'tests', 'sigterm_at_step.py'), *cmd[2:]], cwd=ROOT,
                           capture_output=True, text=True, timeout=600,
                           env={**os.environ, 'SIGTERM_AT_STEP': str(stop_at), 'SIGNALS': signals,
                                'SIGNAL_GAP_S': '0.05'})
  first = signals.split(',')[0]
  assert stopped.returncode == 0, stopped.stderr[-3000:]
  assert 'Traceback' not in stopped.stderr and 'KeyboardInterrupt' not in stopped.stderr
  assert f'Stopped at step {stop_at} after {first}' in stopped.stderr
  assert f'(stopped by {first}; the same command resumes)' in stopped.stdout
  entries = os.listdir(tmp_path / 'checkpoints')
  assert sorted(e for e in entries if e.isdigit()) == [str(stop_at)] and not [e for e in entries if 'tmp' in e]
  resumed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0 and f'Resumed from step {stop_at}.' in resumed.stderr, resumed.stderr[-3000:]
