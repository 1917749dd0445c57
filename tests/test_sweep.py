"""Query table: budget queries (ties, empty results), Pareto frontier, grid checks, and a sweep end to end."""
import json
import os
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from mutualnet_jax import checkpointing, export, parallel, plots, sweep, train, trained
from mutualnet_jax.errors import UserError
from mutualnet_jax.preprocess import resize
from tests.util import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def row(width, resolution, mmacs, top1, ms, top5=0.9):
  return sweep.Row(width, resolution, int(mmacs * 1e6), 1000, top1, top5, ms, 10 * ms)


# A hand-made table: (0.5, 24) and (0.75, 16) tie on top-1 at different costs; (0.5, 28) ties (0.5, 24) on top-1
# and MACs but is slower; (1.0, 16) is dominated by (0.75, 24).
TABLE = [
    row(0.25, 16, 10, 0.60, 1.0),
    row(0.25, 28, 30, 0.70, 2.0),
    row(0.5, 24, 50, 0.80, 3.0),
    row(0.5, 28, 50, 0.80, 3.5),
    row(0.75, 16, 60, 0.80, 2.5),
    row(0.75, 24, 100, 0.85, 5.0),
    row(1.0, 16, 110, 0.84, 4.0),
    row(1.0, 28, 200, 0.90, 9.0),
]


@pytest.mark.parametrize('mflops,ms,expected', [
    (1000, None, (1.0, 28)),   # everything fits: the most accurate
    (150, None, (0.75, 24)),   # (1.0, 16) fits too but is less accurate
    (60, None, (0.5, 24)),     # three rows tie at 0.80: fewest MACs, then lower latency
    (49.9, None, (0.25, 28)),
    (10, None, (0.25, 16)),    # exactly the budget
    (None, 3.0, (0.75, 16)),   # by latency: the 0.80 tie goes to the fastest
    (None, 2.4, (0.25, 28)),
    (55, 3.2, (0.5, 24)),      # both budgets
])
def test_query_picks_the_most_accurate_row_within_budget(mflops, ms, expected):
  best = sweep.query(TABLE, budget_mflops=mflops, budget_ms=ms)
  assert (best.width, best.resolution) == expected


def test_query_tie_on_everything_prefers_the_narrower_network():
  tied = [row(0.5, 16, 40, 0.8, 2.0), row(0.4, 20, 40, 0.8, 2.0)]
  assert sweep.query(tied, budget_mflops=50).width == 0.4


@pytest.mark.parametrize('mflops,ms,match', [
    (9.99, None, 'no configuration fits 9.99 MFLOPs: the smallest is width 0.25 at 16 px'),
    (None, 0.5, 'no configuration fits 0.5 ms'),
    (100, 0.9, 'no configuration fits 100 MFLOPs and 0.9 ms'),
    (None, None, 'give a budget'),
])
def test_query_with_nothing_in_budget_is_one_clear_error(mflops, ms, match):
  with pytest.raises(UserError, match=match):
    sweep.query(TABLE, budget_mflops=mflops, budget_ms=ms)


def test_query_on_an_empty_table_is_a_clear_error():
  with pytest.raises(UserError, match='empty'):
    sweep.query([], budget_mflops=100)


def test_pareto_frontier():
  by_macs = [(r.width, r.resolution) for r in sweep.pareto_frontier(TABLE)]
  assert by_macs == [(0.25, 16), (0.25, 28), (0.5, 24), (0.75, 24), (1.0, 28)]
  by_latency = [(r.width, r.resolution) for r in sweep.pareto_frontier(TABLE, 'latency_ms')]
  assert by_latency == [(0.25, 16), (0.25, 28), (0.75, 16), (1.0, 16), (0.75, 24), (1.0, 28)]
  assert sweep.pareto_frontier([]) == []


def test_table_round_trips_through_json_and_csv(tmp_path):
  csv_path, _ = sweep.write_table(TABLE, str(tmp_path), {'method': 'mutualnet'})
  rows, meta = sweep.read_table(str(tmp_path))
  assert rows == TABLE and meta == {'method': 'mutualnet'}
  assert sweep.read_csv(str(csv_path)) == TABLE


def test_missing_or_damaged_table_is_a_clear_error(tmp_path):
  with pytest.raises(UserError, match='run --mode=sweep'):
    sweep.read_table(str(tmp_path))
  (tmp_path / 'query_table.json').write_text('{"rows": [{"width": 1}]')
  with pytest.raises(UserError, match='damaged'):
    sweep.read_table(str(tmp_path))


def test_plots_write_pngs(tmp_path):
  single = plots.accuracy_macs(TABLE, tmp_path / 'a.png', title='t')
  both = plots.overlay({'MutualNet': TABLE, 'US-Net': [r for r in TABLE if r.resolution == 28]}, tmp_path / 'b.png')
  for path in (single, both):
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_overlay_of_workdirs_pools_equal_labels_and_filters_a_resolution(tmp_path):
  for name, rows in (('mutualnet', TABLE), ('usnet', TABLE[:4]), ('ind1', TABLE[5:6]), ('ind2', TABLE[7:])):
    sweep.write_table(rows, str(tmp_path / name), {'method': name})
  path = plots.from_workdirs([str(tmp_path / 'mutualnet'), str(tmp_path / 'usnet') + '@28', str(tmp_path / 'usnet'),
                              str(tmp_path / 'ind1'), str(tmp_path / 'ind2')],
                             ['MutualNet', 'US-Net', 'US-Net+', 'independent', 'independent'], tmp_path / 'all.png')
  assert path.exists()
  with pytest.raises(UserError, match='no rows at resolution 20'):
    plots.from_workdirs([str(tmp_path / 'usnet') + '@20'], None, tmp_path / 'x.png')
  with pytest.raises(UserError, match='one label per workdir'):
    plots.from_workdirs([str(tmp_path / 'usnet')], ['a', 'b'], tmp_path / 'x.png')


@pytest.mark.parametrize('width,match', [
    (0.3, 'not on the sweep grid'), (0.1, 'outside the trained range'), (1.5, 'outside the trained range'),
])
def test_width_off_the_grid_or_outside_the_range_is_one_clear_error(width, match):
  config = tiny_config(width_step=0.25, sweep_width_step=0.25)
  with pytest.raises(UserError, match=match):
    trained.check_request(config, width, 16)


def test_grid_widths_and_resolutions_are_accepted():
  config = tiny_config(width_step=0.25, sweep_width_step=0.05)
  assert trained.check_request(config, 0.7000000001, 8) == (0.7, 8)
  assert trained.sweep_widths(config)[:3] == (0.25, 0.3, 0.35) and len(trained.sweep_widths(config)) == 16
  assert trained.sweep_widths(tiny_config(width_step=0.25, sweep_width_step=0.3)) == (0.25, 0.5, 0.55, 0.75, 0.85,
                                                                                        1.0)
  with pytest.raises(UserError, match='resolution 4 is outside'):
    trained.check_request(config, 0.7, 4)
  independent = tiny_config(method='independent', independent_width=0.5)
  assert trained.sweep_widths(independent) == (0.5,) and trained.trained_resolutions(independent) == (16,)
  saved_before_sweep_width_step = ml_collections.ConfigDict(
      {k: v for k, v in tiny_config(width_step=0.25).to_dict().items() if k != 'sweep_width_step'})
  assert trained.sweep_widths(saved_before_sweep_width_step) == (0.25, 0.5, 0.75, 1.0)


def test_workdir_without_checkpoint_is_one_clear_error(tmp_path):
  with pytest.raises(UserError, match='no checkpoint in'):
    trained.open_run(tiny_config(), str(tmp_path))


# ----------------------------------------------------------------------------------------------------------------------
# End to end on real Fashion-MNIST, with an untrained tiny checkpoint (accuracy does not matter here).

@pytest.fixture(scope='module')
def swept(fashion_data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('swept'))
  config = tiny_config(data_dir=str(fashion_data_dir), calibration_images=64, calibration_batch_size=32,
                       eval_batch_size=2000)
  trainer = train.Trainer(config, parallel.make_mesh(), channels=1, image_size=16, total_steps=1, steps_per_epoch=1)
  ckpt = checkpointing.Checkpoints(workdir, keep=1, expected=checkpointing.fingerprint(config, 1))
  ckpt.save(3, trainer.init_state(0), {'step': 3, 'sampler': trainer.sampler.state_dict()})
  ckpt.close()
  summary = sweep.run_sweep(config, workdir, latency_repeats=3)
  return config, workdir, summary, sweep.read_table(workdir)[0]


def test_sweep_writes_table_plot_and_summary(swept):
  _, workdir, summary, rows = swept
  _, meta = sweep.read_table(workdir)
  assert [(r.width, r.resolution) for r in rows] == [(0.25, 16), (0.25, 8), (1.0, 16), (1.0, 8)]
  assert meta['checkpoint_step'] == 3 and meta['eval_images'] == 10_000
  for r in rows:
    assert 0 <= r.top1 <= r.top5 <= 1 and r.latency_ms > 0 and r.latency_batch_ms > 0
  assert rows[0].macs > rows[1].macs and rows[2].macs > rows[0].macs and rows[2].params > rows[0].params
  assert summary['calibrated'] == 4 and os.path.exists(summary['plot'])
  # One executable each for calibration and evaluation, two for latency (batch 1 and the eval batch), per bucket.
  assert 4 <= summary['compiles'] <= 4 * 4 + 3


def test_partial_sweep_reuses_the_store_and_updates_only_its_row(swept):
  config, workdir, _, rows = swept
  again = sweep.run_sweep(config, workdir, widths=[1.0], resolutions=[16], latency_repeats=3)
  assert again['calibrated'] == 0 and again['reused'] == 1
  merged, _ = sweep.read_table(workdir)
  assert [(r.width, r.resolution) for r in merged] == [(r.width, r.resolution) for r in rows]
  for old, new in zip(rows, merged):  # same statistics and images: the same accuracy
    assert (old.top1, old.top5, old.macs) == (new.top1, new.top5, new.macs)


def test_export_of_the_run_matches_the_slimmable_model(swept, tmp_path):
  config, workdir, _, _ = swept
  path = export.export_run(config, workdir, 0.25, 8, tmp_path / 'w0.25_r8')
  model = export.load(path)
  run = trained.open_run(config, workdir)
  stats, computed = run.stats(0.25, 8)
  assert not computed
  images = np.random.RandomState(0).randn(5, 16, 16, 1).astype(np.float32)
  expected = jax.jit(lambda p, s, x: run.model.apply({'params': p, 'batch_stats': s}, resize(x, 8), width=0.25,
                                                     train=False))(run.params, stats, images)
  np.testing.assert_allclose(model.predict(images), expected, rtol=1e-5, atol=1e-6)


def _main(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *args], capture_output=True, text=True,
                        cwd=ROOT, timeout=300)


def test_query_command_line(swept):
  _, workdir, _, rows = swept
  out = _main('--mode=query', f'--workdir={workdir}', '--budget_mflops=1000', '--format=json')
  assert out.returncode == 0, out.stderr[-2000:]
  best = json.loads(out.stdout)
  assert set(best) == {'width', 'resolution', 'macs', 'top1', 'latency_ms'}
  assert best['top1'] == max(r.top1 for r in rows)
  out = _main('--mode=query', f'--workdir={workdir}', '--budget_mflops=0.000001')
  assert out.returncode == 2 and out.stderr.startswith('error: no configuration fits')
  assert len(out.stderr.strip().splitlines()) == 1


def test_export_command_line_uses_the_config_saved_in_the_workdir(swept, tmp_path):
  config, workdir, _, _ = swept
  out = _main('--mode=export', f'--workdir={tmp_path}', '--width=0.25', '--resolution=8')
  assert out.returncode == 2 and out.stderr.startswith('error: no checkpoint in ')  # what an empty workdir lacks
  no_config = tmp_path / 'no_config'
  shutil.copytree(os.path.join(workdir, 'checkpoints'), no_config / 'checkpoints')
  out = _main('--mode=export', f'--workdir={no_config}', '--width=0.25', '--resolution=8')
  assert out.returncode == 2 and out.stderr.startswith('error: ') and 'config.json not found' in out.stderr
  trained.save_config(config, workdir)
  out = _main('--mode=export', f'--workdir={workdir}', '--width=0.25', '--resolution=8', f'--out={tmp_path / "net"}')
  assert out.returncode == 0, out.stderr[-2000:]
  assert export.load(tmp_path / 'net').width == 0.25


def test_post_training_modes_leave_a_running_trainings_unfinished_save_alone(swept):
  """Sweeps may run while training still writes to the workdir: its in-progress save must survive open_run."""
  config, workdir, _, _ = swept
  in_progress = os.path.join(workdir, 'checkpoints', '9.orbax-checkpoint-tmp-1795690000000000')
  os.makedirs(in_progress)
  try:
    assert trained.open_run(config, workdir).step == 3
    assert os.path.isdir(in_progress)
  finally:
    shutil.rmtree(in_progress)
