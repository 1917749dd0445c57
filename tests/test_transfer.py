"""The transfer experiment's machinery (benchmarks/transfer): the kernel-norm diagnostic (||W|| / ||W_init|| is 1 for
a checkpoint of the initialisation itself and follows a known rescaling, whole tree and narrow slice), the report's
sources section (flatness, held-out fit, norms), and finished runs' records surviving a fresh machine."""
import importlib.util
import sys
from pathlib import Path

import jax
import optax
import pytest

from mutualnet_jax import checkpointing, parallel, workdir as wd
from mutualnet_jax.models import get_model
from mutualnet_jax.train_state import create_optimizer, init_state
from tests.util import tiny_config

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location('kernel_norms', REPO / 'benchmarks/transfer/kernel_norms.py')
kernel_norms = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kernel_norms)


def _workdir(path: Path, data_dir: str, scale: dict[str, float]) -> str:
  """A checkpoint of seed 3's initial state with the conv kernels of the named layers multiplied by `scale`."""
  config = tiny_config(data_dir=data_dir, seed=3)
  tx = create_optimizer(config, optax.constant_schedule(0.0))
  state = init_state(get_model(config.model), tx, 3, 1, parallel.make_mesh())
  params = jax.tree_util.tree_map_with_path(
      lambda p, leaf: leaf * scale.get(str(p[0].key), 1.0) if leaf.ndim == 4 else leaf, state.params)
  with checkpointing.Checkpoints(str(path), keep=1, expected=checkpointing.fingerprint(config, 1)) as ckpt:
    ckpt.save(1, state.replace(params=params), {'step': 1})
  wd.save_config(config, str(path))
  return str(path)


def test_initial_weights_have_ratio_one_and_a_rescaling_shows(tmp_path, fashion_data_dir):
  same = kernel_norms.ratios(_workdir(tmp_path / 'init', str(fashion_data_dir), {}))
  assert same['whole'] == pytest.approx(1.0) and same['narrow'] == pytest.approx(1.0)
  assert same['per_layer'] and all(r == pytest.approx(1.0) for r in same['per_layer'].values())
  layers = sorted({name.split('/')[0] for name in same['per_layer']})
  doubled = kernel_norms.ratios(_workdir(tmp_path / 'x2', str(fashion_data_dir), {k: 2.0 for k in layers}))
  assert doubled['whole'] == pytest.approx(2.0) and doubled['narrow'] == pytest.approx(2.0)
  one = kernel_norms.ratios(_workdir(tmp_path / 'one', str(fashion_data_dir), {layers[0]: 3.0}))
  assert one['per_layer'][next(k for k in one['per_layer'] if k.startswith(layers[0] + '/'))] == pytest.approx(3.0)
  assert 1.0 < one['whole'] < 3.0


def _load(name: str, path: str):
  spec = importlib.util.spec_from_file_location(name, REPO / path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


@pytest.fixture
def report(tmp_path, monkeypatch):
  """benchmarks/transfer/transfer_report.py, its runs' records kept under tmp_path (not the repository's)."""
  module = _load('transfer_report', 'benchmarks/transfer/transfer_report.py')
  monkeypatch.setattr(module.experiment.RECORDS, 'root', tmp_path / 'records')
  return module


@pytest.mark.parametrize('tail, flattened', [(0.50, True), (0.30, False)])
def test_the_report_shows_each_sources_flattening_and_norms(tmp_path, report, tail, flattened):
  runs = report.experiment.runs(str(tmp_path))
  source = runs[0]
  log = tmp_path / 'logs' / f'{source.name}.train.log'
  log.parent.mkdir(parents=True)
  losses = [2.0, 1.0, 0.8, 0.6, 0.55, 0.52, 0.51, tail]  # quarters of 2 points: (0.55 + 0.52) vs (0.51 + tail)
  log.write_text(''.join(f'I1 logging_writer.py:48] [{25 * (i + 1)}] accuracy/max=0.9, loss/max={x}\n'
                         for i, x in enumerate(losses)))
  timings = {'runs': {source.name: {'kernel_norms': {'step': 936, 'whole': 3.5, 'narrow': 7.25,
                                                     'narrow_width': 0.25}}}, 'invocations': []}
  report.write_report(tmp_path, tmp_path / 'docs', timings, runs)
  text = (tmp_path / 'docs' / 'TRANSFER.md').read_text()
  row = next(line for line in text.splitlines() if line.startswith(f'| {source.name} |'))
  assert row.split(' | ')[2] == ('yes' if flattened else 'no')
  assert row.endswith('| 3.50 | 7.25 |')
  assert 'Independent-1.0@28-pre-trained' in text and 'one independent network per configuration' in text


def test_finished_runs_are_recorded_and_survive_a_fresh_machine(tmp_path, report):
  """A swept fine-tuning and a source with its kernel norms are recorded; with an empty OUT the fine-tuning is not
  trained again and the report keeps its rows; a source is skipped only once every fine-tuning from it is recorded."""
  from mutualnet_jax import query  # pylint: disable=g-import-not-at-top
  driver = _load('transfer_run', 'benchmarks/transfer/run.py')
  out, fresh = tmp_path / 'old', tmp_path / 'fresh'
  runs = report.experiment.runs(str(out))
  source = runs[0]
  tuned = [r for r in runs if r.source == source.name]
  timings = driver.runner.Timings(tmp_path / 'timings.json')
  for run in [source, *tuned]:
    (out / run.name / 'checkpoints' / '100').mkdir(parents=True)
    log = driver.runner.log_path(out, run, 'train')
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(''.join(f'I1 logging_writer.py:48] [{s}] accuracy/max=0.9, grad_norm=1.0, loss/max={1 / s}\n'
                           for s in range(10, 101, 10)) + 'Trained to step 100 of 100\n')
  def sweep(run, top1):
    rows = [query.Row(w, r, int(1e6 * w * r), 100, top1(w), 0.9, 1.0) for w, r in run.sweep_configs()]
    query.write_table(rows, str(out / run.name), {'eval_images': 5000, 'checkpoint_step': 100})

  assert not driver.record(source, out, timings)  # no kernel norms yet
  timings.run(source.name)['kernel_norms'] = {'step': 100, 'whole': 2.0, 'narrow': 4.0, 'narrow_width': 0.25}
  assert not driver.record(source, out, timings)  # its held-out fit not swept yet
  assert source.sweep_configs() == set(report.experiment.SOURCE_CONFIGS)
  independent = next(r for r in runs if r.phase == 'pretrain' and r.method == 'independent')
  assert independent.sweep_configs() == {report.experiment.INDEPENDENT}  # it runs at no other width
  sweep(source, lambda w: 0.8 + w / 10)
  assert driver.record(source, out, timings) and not driver.record(source, out, timings)
  assert not driver.record(tuned[0], out, timings)  # not swept yet
  sweep(tuned[0], lambda w: 0.5 + w / 10)
  assert driver.record(tuned[0], out, timings)

  assert driver.finished_elsewhere(tuned[0], fresh, runs) and not driver.finished_elsewhere(tuned[0], out, runs)
  assert len(tuned) == 1 and driver.finished_elsewhere(source, fresh, runs)
  assert not driver.finished_elsewhere(runs[1], fresh, runs)  # never recorded
  docs = tmp_path / 'docs'
  report.write_report(fresh, docs, {'runs': {}, 'invocations': []}, runs)
  text = (docs / 'TRANSFER.md').read_text()
  assert tuned[0].name not in text.split('**Missing**')[1].split('\n')[0]
  row = next(line for line in text.splitlines() if line.startswith(f'| {source.name} |'))
  assert row.endswith('| 90.00 / 82.50 | 2.00 | 4.00 |')  # held-out top-1 at 1.0@28 / 0.25@28, then the norms
