"""The sweep of a trained run: width/resolution checks, and a sweep end to end on real data."""
import json
import os
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from mutualnet_jax import checkpointing, commands, export, parallel, query, sweep, train, trained_run, workdir as wd
from mutualnet_jax.errors import UserError
from mutualnet_jax.resizing import resize
from tests.util import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('config,width,match', [
    (tiny_config(), 0.1, r'outside the trained range \[0.25, 1\]'),
    (tiny_config(), 1.5, 'outside the trained range'),
    (tiny_config(method='independent', independent_width=0.5), 0.75, 'outside the trained width 0.5'),
    (tiny_config(), 'wide', 'must be a number'),
])
def test_width_outside_the_trained_range_is_one_clear_error(config, width, match):
  with pytest.raises(UserError, match=match):
    trained_run.check_request(config, width, 16)


def test_every_width_in_the_trained_range_and_valid_resolutions_are_accepted():
  config = tiny_config(width_step=0.25, sweep_width_step=0.05)
  assert trained_run.check_request(config, 0.7000000001, 8) == (0.7, 8)
  assert trained_run.check_request(config, 0.613, 16) == (0.613, 16)  # on no grid: every width is a sub-network
  assert trained_run.sweep_widths(config)[:3] == (0.25, 0.3, 0.35) and len(trained_run.sweep_widths(config)) == 16
  with pytest.raises(UserError, match='resolution 4 is outside'):
    trained_run.check_request(config, 0.7, 4)
  independent = tiny_config(method='independent', independent_width=0.5)
  assert trained_run.sweep_widths(independent) == (0.5,) and trained_run.trained_resolutions(independent) == (16,)
  assert trained_run.selection(config, [0.5], None) == [(0.5, 16), (0.5, 8)]
  saved_before_sweep_width_step = ml_collections.ConfigDict(
      {k: v for k, v in tiny_config(width_step=0.25).to_dict().items() if k != 'sweep_width_step'})
  assert trained_run.sweep_widths(saved_before_sweep_width_step) == (0.25, 0.5, 0.75, 1.0)


def test_workdir_without_checkpoint_is_one_clear_error(tmp_path):
  with pytest.raises(UserError, match='no checkpoint in'):
    trained_run.open_run(tiny_config(), str(tmp_path))


# ----------------------------------------------------------------------------------------------------------------------
# End to end on real Fashion-MNIST, with an untrained tiny checkpoint (accuracy does not matter here).

@pytest.fixture(scope='module')
def swept(fashion_data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('swept'))
  config = tiny_config(data_dir=str(fashion_data_dir), calibration_images=64, calibration_batch_size=32,
                       eval_batch_size=2000)
  trainer = train.Trainer(config, parallel.make_mesh(), channels=1, image_size=16, total_steps=1, steps_per_epoch=1)
  ckpt = checkpointing.Checkpoints(workdir, keep=1, expected=checkpointing.fingerprint(config, 1))
  ckpt.save(3, trainer.init_state(0), {'step': 3})
  ckpt.close()
  summary = sweep.run_sweep(config, workdir, latency_repeats=3, batch_latency=True)
  return config, workdir, summary, query.read_table(workdir)[0]


@pytest.mark.slow
def test_sweep_writes_table_plot_and_summary(swept):
  _, workdir, summary, rows = swept
  _, meta = query.read_table(workdir)
  assert [(r.width, r.resolution) for r in rows] == [(0.25, 16), (0.25, 8), (1.0, 16), (1.0, 8)]
  assert meta['checkpoint_step'] == 3 and meta['eval_images'] == 10_000
  for r in rows:
    assert 0 <= r.top1 <= r.top5 <= 1 and r.latency_ms > 0 and r.latency_batch_ms > 0
  assert rows[0].macs > rows[1].macs and rows[2].macs > rows[0].macs and rows[2].params > rows[0].params
  assert summary['calibrated'] == 4 and os.path.exists(summary['plot'])
  # One executable each for calibration and evaluation, two for latency (batch 1 and the eval batch), per bucket.
  assert 4 <= summary['compiles'] <= 4 * 4 + 3


def _events(run_dir) -> dict[str, list]:
  """{tag: [(step, value)]} of one TensorBoard run, read back as TensorBoard reads it."""
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  acc = event_accumulator.EventAccumulator(os.fspath(run_dir), size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  return {tag: [(e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]
          for tag in acc.Tags()['tensors']}


@pytest.mark.slow
def test_sweep_tensorboard_has_a_run_per_resolution_along_the_widths(swept):
  _, _, summary, rows = swept
  logdir = summary['tensorboard']
  assert sorted(d for d in os.listdir(logdir) if d.endswith('px')) == ['16px', '8px']
  for res in (16, 8):
    events = _events(os.path.join(logdir, f'{res}px'))
    assert set(events) == {f'{sweep.WIDTH_AXIS}/{m}' for m in ('top1', 'top5', 'mflops', 'latency_ms')}
    mine = sorted((r for r in rows if r.resolution == res), key=lambda r: r.width)
    assert [(s, float(v)) for s, v in events[f'{sweep.WIDTH_AXIS}/top1']] == [
        (round(100 * r.width), pytest.approx(r.top1)) for r in mine]
    assert [float(v) for _, v in events[f'{sweep.WIDTH_AXIS}/mflops']] == pytest.approx([r.macs / 1e6 for r in mine])
  root = _events(logdir)
  assert set(root) == {'all_configurations', 'pareto_frontier', 'accuracy_macs'}
  assert {s for tag in root.values() for s, _ in tag} == {3}  # the checkpoint's training step
  table = root['all_configurations'][0][1].item().decode()
  assert len(table.splitlines()) == 2 + len(rows) and '| 0.25 | 8 |' in table
  frontier = root['pareto_frontier'][0][1].item().decode()
  assert len(frontier.splitlines()) == 2 + len(query.pareto_frontier(rows))


@pytest.mark.slow
def test_partial_sweep_reuses_the_store_and_updates_only_its_row(swept):
  config, workdir, _, rows = swept
  again = sweep.run_sweep(config, workdir, widths=[1.0], resolutions=[16], latency_repeats=3)
  assert again['calibrated'] == 0 and again['reused'] == 1
  merged, _ = query.read_table(workdir)
  assert [(r.width, r.resolution) for r in merged] == [(r.width, r.resolution) for r in rows]
  for old, new in zip(rows, merged):  # same statistics and images: the same accuracy
    assert (old.top1, old.top5, old.macs) == (new.top1, new.top5, new.macs)
  # The eval-batch latency is timed only when asked: the re-measured row has none, the table prints '-'.
  remeasured = next(r for r in merged if (r.width, r.resolution) == (1.0, 16))
  assert remeasured.latency_batch_ms is None and remeasured.latency_ms > 0
  assert query.format_rows([remeasured]).splitlines()[1].split()[-1] == '-'
  # TensorBoard shows the merged table once: the earlier sweep's event files are replaced, not added to.
  for run_dir in ('', '16px', '8px'):
    path = os.path.join(again['tensorboard'], run_dir)
    assert len([f for f in os.listdir(path) if f.startswith('events.out.tfevents.')]) == 1
  assert [s for s, _ in _events(os.path.join(again['tensorboard'], '16px'))[f'{sweep.WIDTH_AXIS}/top1']] == [25, 100]


@pytest.mark.slow
def test_sweep_times_the_tflite_interpreter_when_asked(swept):
  config, workdir, _, rows = swept
  sweep.run_sweep(config, workdir, widths=[0.25], resolutions=[8], latency_repeats=3, tflite_latency=True)
  merged, _ = query.read_table(workdir)
  timed = [r for r in merged if r.tflite_latency_ms is not None]
  assert [(r.width, r.resolution) for r in timed] == [(0.25, 8)] and timed[0].tflite_latency_ms > 0
  assert query.query(merged, budget_ms=1e3, latency='tflite') == timed[0]


@pytest.mark.slow
def test_export_of_the_run_matches_the_slimmable_model(swept, tmp_path):
  config, workdir, _, _ = swept
  path = commands.run('export', config, workdir, commands.Options(width=0.25, resolution=8,
                                                                  out=str(tmp_path / 'w0.25_r8')))
  model = export.load(path)
  run = trained_run.open_run(config, workdir)
  stats, computed = run.stats(0.25, 8)
  assert not computed
  images = np.random.RandomState(0).randn(5, 16, 16, 1).astype(np.float32)
  expected = jax.jit(lambda p, s, x: run.model.apply({'params': p, 'batch_stats': s}, resize(x, 8), width=0.25,
                                                     train=False))(run.params, stats, images)
  np.testing.assert_allclose(model.predict(images), expected, rtol=1e-5, atol=1e-6)


def _main(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *args], capture_output=True, text=True,
                        cwd=ROOT, timeout=300)


@pytest.mark.slow
def test_query_command_line(swept):
  _, workdir, _, rows = swept
  out = _main('--mode=query', f'--workdir={workdir}', '--budget_mflops=1000', '--format=json')
  assert out.returncode == 0, out.stderr[-2000:]
  best = json.loads(out.stdout)
  assert set(best) == set(query.COLUMNS)
  assert best['top1'] == max(r.top1 for r in rows)
  out = _main('--mode=query', f'--workdir={workdir}', '--budget_mflops=0.000001')
  assert out.returncode == 2 and out.stderr.startswith('error: no configuration fits')
  assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_export_command_line_uses_the_config_saved_in_the_workdir(swept, tmp_path):
  config, workdir, _, _ = swept
  out = _main('--mode=export', f'--workdir={tmp_path}', '--width=0.25', '--resolution=8')
  assert out.returncode == 2 and out.stderr.startswith('error: no checkpoint in ')  # what an empty workdir lacks
  no_config = tmp_path / 'no_config'
  shutil.copytree(os.path.join(workdir, 'checkpoints'), no_config / 'checkpoints')
  out = _main('--mode=export', f'--workdir={no_config}', '--width=0.25', '--resolution=8')
  assert out.returncode == 2 and out.stderr.startswith('error: ') and 'config.json not found' in out.stderr
  wd.save_config(config, workdir)
  out = _main('--mode=export', f'--workdir={workdir}', '--width=0.25', '--resolution=8', f'--out={tmp_path / "net"}')
  assert out.returncode == 0, out.stderr[-2000:]
  assert export.load(tmp_path / 'net').width == 0.25


@pytest.mark.slow
def test_post_training_modes_leave_a_running_trainings_unfinished_save_alone(swept):
  """Sweeps may run while training still writes to the workdir: its in-progress save must survive open_run."""
  config, workdir, _, _ = swept
  in_progress = os.path.join(workdir, 'checkpoints', '9.orbax-checkpoint-tmp-1795690000000000')
  os.makedirs(in_progress)
  try:
    assert trained_run.open_run(config, workdir).step == 3
    assert os.path.isdir(in_progress)
  finally:
    shutil.rmtree(in_progress)
