"""The reproduction report (benchmarks/reproduce/): verdict records follow the numbers and the noise (held, not held
and inconclusive, both directions), round 1's archived CSV gives the expected records, the data files and figures
are written, missing runs are listed, and the README summary is rewritten only between its markers. Synthetic query
tables, no training."""
from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib import colors
from PIL import Image

from mutualnet_jax import query

REPO = Path(__file__).resolve().parent.parent


def _load_report():
  spec = importlib.util.spec_from_file_location('reproduce_report', REPO / 'benchmarks/reproduce/report.py')
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


report = _load_report()
runs_lib, vd = report.runs_lib, report.vd


@pytest.fixture(autouse=True)
def _no_committed_records(tmp_path, monkeypatch):
  """Each test sees only the run records it writes, not the repository's (benchmarks/reproduce/round2/)."""
  monkeypatch.setattr(report.archive.REPRODUCTION, 'root', tmp_path / 'records')
N = 10_000  # eval images of the synthetic tables (their metadata)


def _macs(width: float, resolution: int) -> int:
  return int(42e6 * width ** 2 * (resolution / 28) ** 2)


def _rows(top1, pairs) -> list[query.Row]:
  return [query.Row(w, r, _macs(w, r), 1000, top1(w, r), 0.99, 1.0, 10.0) for w, r in pairs]


def base(w: float, r: int) -> float:
  return 0.70 + 0.1 * w + 0.002 * r


def _write_round2(out: Path, budget: str = 'overfit', usnet_offset: float = -0.03, independent_full: float = 0.70,
                  jitter: float = 0.002, skip: tuple[str, ...] = (), eval_images: int = N) -> list:
  """Every run of a round-2 budget: MutualNet base(w, r) (+-jitter by seed), US-Net base + usnet_offset at 28 px
  and 0.3 below, independent networks base + 0.05 except the full one (independent_full); runs whose name ends
  with an entry of `skip` are left out (not swept)."""
  runs = [r for r in runs_lib.ROUND2.runs if r.budget.name == budget and not r.name.endswith(skip)]
  for run in runs:
    sign = jitter * (1 if run.seed % 2 else -1)
    if run.method == 'independent':
      top1 = independent_full + sign if (run.width, run.resolution) == runs_lib.FULL else base(
          run.width, run.resolution) + 0.05
      rows = _rows(lambda *_: top1, [(run.width, run.resolution)])
    else:
      grid = sorted(run.sweep_configs())
      offset = 0.01 if run.diagnostic else 0.0
      rows = _rows((lambda w, r: base(w, r) + usnet_offset + sign if r == 28 else 0.3) if run.method == 'usnet'
                   else (lambda w, r: base(w, r) + sign + offset), grid)
    query.write_table(rows, str(out / run.name), {'eval_images': eval_images})
  return runs


def _budget(out: Path, name: str = 'overfit') -> report.BudgetData:
  budget = runs_lib.ROUND2.budget(name)
  bd = report.load_budget(out, budget, [r for r in runs_lib.ROUND2.runs if r.budget == budget], {})
  bd.verdicts = vd.compute(bd.tables, bd.eval_images, 2, name)
  return bd


def _verdict(verdicts, claim: str):
  return next(v for v in verdicts if v.claim == claim)


# ----------------------------------------------------------------------------------------------------------------------
# The rule.

@pytest.mark.parametrize('diff, noise, status', [(0.02, 0.005, 'held'), (-0.02, 0.005, 'not held'),
                                                 (0.009, 0.005, 'inconclusive'), (-0.009, 0.005, 'inconclusive')])
def test_judge(diff, noise, status):
  assert vd.judge(diff, noise) == status


def test_estimate_noise_combines_seed_spread_and_binomial_error():
  one = vd.Estimate((0.8,), N)
  assert one.noise == pytest.approx((0.8 * 0.2 / N) ** 0.5)  # one seed: the binomial error only
  two = vd.Estimate((0.79, 0.81), N)
  assert two.seed_term == pytest.approx(0.01)  # std/sqrt(2) = the half-range for 2 seeds
  assert two.noise == pytest.approx((0.01 ** 2 + 0.8 * 0.2 / N) ** 0.5)


def test_eval_images_inferred_from_accuracies():
  assert report.eval_images_from_accuracies([0.8351, 0.5, 0.7]) == 10_000
  assert report.eval_images_from_accuracies([0.5, 0.25, 0.75]) == 4


# ----------------------------------------------------------------------------------------------------------------------
# Round 1 from its archive.

def test_round1_verdicts_from_the_archived_csv():
  short, longer = report.load_round1()
  assert (short.eval_images, longer.eval_images) == (10_000, 10_000)  # inferred, not typed in
  assert short.missing == [] and longer.missing == []
  verdicts = vd.compute(short.tables, short.eval_images, 1, short.budget.name)
  # The first report called these NOT HELD; its own noise says 2 seeds cannot resolve them.
  claim2, claim4 = _verdict(verdicts, '2'), _verdict(verdicts, '4')
  assert claim2.status == claim4.status == 'inconclusive'
  assert claim4.margins[0] == pytest.approx(0.8425 - 0.8549, abs=1e-4)  # seed means of 1@28, as the CSV has them
  assert abs(claim4.margins[0]) <= vd.K * claim4.noise[0]
  assert claim2.margins[0] == pytest.approx(0.0250 - 0.0320, abs=2e-4)
  claim4b = _verdict(verdicts, '4b')
  assert (claim4b.status, claim4b.not_held, len(claim4b.comparisons)) == ('not held', 15, 15)
  claim1 = _verdict(verdicts, '1')
  assert claim1.not_held == 0 and all(m > 0 for m in claim1.margins)  # never below US-Net, only not always beyond noise
  assert [c.where.split(' (')[0] for c in claim1.comparisons] == ['2.90 MFLOPs', '10.87 MFLOPs', '23.91 MFLOPs',
                                                                  '42.03 MFLOPs']
  assert _verdict(verdicts, 'diagnostic').kind == 'context'
  assert _verdict(vd.compute(longer.tables, longer.eval_images, 1, '4ep'), '4').comparisons[0].seeds_a == 1


# ----------------------------------------------------------------------------------------------------------------------
# Round 2: constructed cases.

@pytest.mark.parametrize('usnet_offset, independent_full, jitter, status1, status4', [
    (-0.03, 0.70, 0.002, 'held', 'held'),                 # MutualNet 3 points above US-Net; 15 above independent
    (+0.03, 0.95, 0.002, 'not held', 'not held'),         # the other way round
    (-0.003, 0.859, 0.002, 'inconclusive', 'inconclusive'),  # within the binomial error of 10k images
    (-0.03, 0.83, 0.03, 'inconclusive', 'inconclusive'),  # beyond the binomial error, within the seed spread
])
def test_verdicts_follow_the_numbers_and_the_noise(tmp_path, usnet_offset, independent_full, jitter, status1,
                                                   status4):
  _write_round2(tmp_path, usnet_offset=usnet_offset, independent_full=independent_full, jitter=jitter)
  bd = _budget(tmp_path)
  assert bd.eval_images == N and bd.missing == []
  claim1, claim3, claim4 = (_verdict(bd.verdicts, c) for c in ('1', '3', '4'))
  assert claim1.status == status1 and claim4.status == status4
  widths = runs_lib.ROUND2.budget('overfit').sweep_widths
  assert len(claim1.comparisons) == len(widths)  # one budget per US-Net configuration
  # US-Net's configurations are MutualNet's at 28 px plus usnet_offset; MutualNet may do better still at a lower
  # resolution within the same MACs.
  assert min(claim1.margins) == pytest.approx(-usnet_offset) == claim1.margins[-1]
  us_net_plus = {_macs(w, r) for w in widths for r in runs_lib.ROUND2.budget('overfit').sweep_resolutions}
  assert len(claim3.comparisons) == len(us_net_plus)  # one budget per distinct cost of a US-Net+ configuration
  counts = {'held': claim1.held, 'not held': claim1.not_held, 'inconclusive': claim1.inconclusive}
  assert counts[status1] >= 1 and sum(counts.values()) == len(widths)
  assert (status1 == 'not held') == (claim1.not_held > 0)
  assert claim4.comparisons[0].where == '1@28' and claim4.comparisons[0].seeds_b == len(runs_lib.CORE_SEEDS)
  assert _verdict(bd.verdicts, '4b').status == 'not held'  # the narrower independents are 5 points above


def test_fewer_eval_images_widen_the_noise(tmp_path):
  _write_round2(tmp_path, usnet_offset=-0.02, jitter=0.0, eval_images=N)
  assert _verdict(_budget(tmp_path).verdicts, '1').status == 'held'
  _write_round2(tmp_path, usnet_offset=-0.02, jitter=0.0, eval_images=500)  # read from the tables' metadata
  assert _verdict(_budget(tmp_path).verdicts, '1').status == 'inconclusive'


@pytest.mark.parametrize('slope, status', [(-0.2, 'held'), (0.2, 'not held'), (0.0, 'inconclusive')])
def test_claim2_gap_at_small_budgets(slope, status):
  """US-Net below MutualNet by 0.05 + slope * (width - 0.25): a negative slope makes the gap largest at small
  budgets."""
  pairs = [(w, r) for w in (1.0, 0.75, 0.5, 0.25) for r in (28, 24)]
  tables = {'MutualNet': {s: _rows(lambda w, r: base(w, r), pairs) for s in (0, 1)},
            'US-Net': {s: _rows(lambda w, r: base(w, r) - 0.05 - slope * (w - 0.25), [p for p in pairs if p[1] == 28])
                       for s in (0, 1)}}
  claim2 = _verdict(vd.compute(tables, N, 2, 'test'), '2')
  assert claim2.status == status


def test_diagnostic_is_context(tmp_path):
  _write_round2(tmp_path)
  diag = _verdict(_budget(tmp_path).verdicts, 'diagnostic')
  assert diag.kind == 'context' and diag.a == 'Diagnostic'
  assert diag.margins == pytest.approx([0.01] * len(diag.comparisons), abs=0.003)


# ----------------------------------------------------------------------------------------------------------------------
# Files.

def _assert_figure(path: Path, size: tuple[int, int], colour: str | None = None) -> None:
  """`path` decodes as a PNG of `size` (width, height) that holds a drawing, not one flat colour; with `colour`
  (a matplotlib colour), some pixels are exactly it."""
  with Image.open(path) as image:
    assert image.format == 'PNG' and image.size == size
    pixels = np.asarray(image.convert('RGB')).reshape(-1, 3)
  assert len(np.unique(pixels, axis=0)) > 10
  if colour is not None:
    rgb = np.round(255 * np.asarray(colors.to_rgb(colour))).astype(np.uint8)
    assert (pixels == rgb).all(axis=1).sum() > 20


def test_report_writes_data_files_figures_and_lists_missing_runs(tmp_path):
  out, docs = tmp_path / 'runs', tmp_path / 'docs'
  runs = _write_round2(out, skip=('usnet_s3', 'independent_w0.5_r20_s1'))
  written = report.write_report(out, docs, {'runs': {}, 'invocations': []})
  overfit = docs / 'reproduce' / runs[0].budget.key
  long = docs / 'reproduce' / runs_lib.ROUND2.budget('long').key
  for name in ('query_tables.csv', 'budgets.csv', 'verdicts.json', 'overlay.png', 'mutualnet_fig5.png'):
    assert overfit / name in written
  # Pixel sizes: plots.axes' figsize at 120 dpi; the overlay draws MutualNet in its series colour.
  _assert_figure(overfit / 'overlay.png', (1008, 672), report.COLOURS['MutualNet'])
  _assert_figure(overfit / 'mutualnet_fig5.png', (768, 576))
  round1 = docs / 'reproduce' / runs_lib.ROUND1.budgets[0].key
  assert {round1 / 'overlay.png', round1 / 'mutualnet_fig5.png', docs / 'RESULTS.md',
          docs / 'reproduce' / 'verdicts.csv'} <= set(written)
  assert [p.name for p in written if p.parent == long] == ['verdicts.json']  # a budget without data: no figures

  summary = json.loads((overfit / 'verdicts.json').read_text())
  missing = sorted(r.name for r in runs_lib.ROUND2.runs
                   if r.budget.name == 'overfit' and r.name.endswith(('usnet_s3', 'independent_w0.5_r20_s1')))
  assert sorted(summary['runs']['missing']) == missing and len(missing) == 2
  assert summary['eval_images'] == N
  assert {v['claim'] for v in summary['verdicts']} >= {'1', '2', '3', '4', '4b'}
  text = (docs / 'RESULTS.md').read_text()
  assert all(name in text for name in missing)
  assert 'No run of this budget has been swept yet' in text  # the 'long' budget
  with open(docs / 'reproduce' / 'verdicts.csv', newline='') as f:
    records = list(csv.DictReader(f))
  assert {(r['round'], r['budget']) for r in records} == {('2', 'overfit'), ('1', '2ep'), ('1', '4ep')}

  with open(overfit / 'query_tables.csv', newline='') as f:
    reader = csv.DictReader(f)
    rows = list(reader)
  assert reader.fieldnames == ['method', 'seed', *query.COLUMNS]
  assert len(rows) == sum(len(query.read_table(str(out / r.name))[0]) for r in runs)  # every swept row, once
  assert {r['method'] for r in rows} == {r.label for r in runs} and len({r.label for r in runs}) > 2
  full = sorted(float(r['top1']) for r in rows if r['method'] == 'MutualNet' and float(r['width']) == 1.0
                and r['resolution'] == '28')
  assert full == pytest.approx([base(1.0, 28) - 0.002] * 2 + [base(1.0, 28) + 0.002] * 2)
  with open(overfit / 'budgets.csv', newline='') as f:
    budgets = {round(float(r['mflops']), 2): r for r in csv.DictReader(f)}
  top = budgets[round(_macs(1.0, 28) / 1e6, 2)]
  assert float(top['MutualNet mean_top1']) == pytest.approx(base(1.0, 28))
  assert top['MutualNet configs'] == ' '.join(['1@28'] * 4)


def test_report_uses_recorded_facts(tmp_path):
  out, docs = tmp_path / 'runs', tmp_path / 'docs'
  runs = _write_round2(out)
  facts = {'train_split': 'train[:10000]', 'train_images': 10000, 'width_sampling': 'uniform', 'total_steps': 3120}
  report.write_report(out, docs, {'runs': {r.name: {'facts': facts} for r in runs}, 'invocations': []})
  text = (docs / 'RESULTS.md').read_text()
  assert 'width sampling `uniform`' in text and 'training images `10000`' in text and 'steps `3120`' in text


# ----------------------------------------------------------------------------------------------------------------------
# README summary.

def test_readme_summary_between_markers(tmp_path, capsys):
  start, end = report.README_MARKERS
  readme = tmp_path / 'README.md'
  readme.write_text(f'# Title\n\nbefore\n{start}\nold summary\n{end}\nafter\n')
  assert report.update_readme(readme, 'new summary\n| a | b |')
  assert readme.read_text() == f'# Title\n\nbefore\n{start}\nnew summary\n| a | b |\n{end}\nafter\n'

  plain = tmp_path / 'PLAIN.md'
  plain.write_text('# Title\n\nno markers here\n')
  assert not report.update_readme(plain, 'new summary')
  assert plain.read_text() == '# Title\n\nno markers here\n'
  assert 'left untouched' in capsys.readouterr().err


def test_write_report_fills_the_readme_summary(tmp_path):
  start, end = report.README_MARKERS
  readme = tmp_path / 'README.md'
  readme.write_text(f'intro\n{start}\n{end}\n')
  written = report.write_report(tmp_path / 'runs', tmp_path / 'docs', {'runs': {}, 'invocations': []}, readme=readme)
  assert readme in written
  text = readme.read_text()
  assert text.startswith('intro\n') and '(docs/RESULTS.md)' in text and 'Round 1, 2ep' in text


# ----------------------------------------------------------------------------------------------------------------------
# The run list.

def test_run_list_is_data():
  names = runs_lib.by_name()  # asserts that no two runs share a workdir
  assert len(names) == sum(len(r.runs) for r in runs_lib.ROUNDS)
  assert not runs_lib.ROUND1.run_by_default and all(r.budget.round in (2, 3) for r in runs_lib.select())
  # The pilot first: the independent full network and MutualNet, seed 0, with their test curves.
  first = runs_lib.select(max_priority=1)
  assert [(r.budget.name, r.series, r.seed, r.pilot) for r in first] == [
      ('overfit', 'Independent', 0, True), ('overfit', 'MutualNet', 0, True), ('pilot5k', 'Independent', 0, True)]
  assert all((r.width, r.resolution) == runs_lib.FULL for r in first if r.method == 'independent')
  # Claim 4 with 4 seeds comes next, before any other method.
  claim4 = runs_lib.select(budgets=['overfit'], max_priority=2)
  assert {(r.series, r.seed) for r in claim4} == {(m, s) for m in ('MutualNet', 'Independent') for s in range(4)}
  assert all(r.budget.settings['warmup_epochs'] * runs_lib.STEPS_PER_EPOCH[r.budget.name] == pytest.approx(
      runs_lib.WARMUP_STEPS, abs=0.5) for r in runs_lib.ROUND2.runs)  # the same warm-up in steps everywhere
  overfit = [r for r in runs_lib.ROUND2.runs if r.budget.name == 'overfit']
  seeds = lambda pred: {r.seed for r in overfit if pred(r)}  # noqa: E731
  assert len(seeds(lambda r: r.method == 'usnet')) >= 4
  grid = {(r.width, r.resolution) for r in overfit if r.method == 'independent'} - {runs_lib.FULL}
  assert len(grid) == 3 and all(len(seeds(lambda r, k=k: (r.width, r.resolution) == k)) >= 2 for k in grid)
  for budget in runs_lib.ROUND2.budgets:
    runs = [r for r in runs_lib.ROUND2.runs if r.budget == budget]
    assert all(f'--config.num_epochs={budget.epochs}' in r.overrides() for r in runs)  # same schedule for all
    assert all(len({o.split("=")[0] for o in r.overrides()}) == len(r.overrides()) for r in runs)  # each once
    assert all('--config.weight_decay_params=all' in r.overrides() for r in runs)     # the official rule
    for mutualnet in (r for r in runs if r.method == 'mutualnet'):
      assert {(0.9, 28), (0.6, 28), (0.35, 28)} <= mutualnet.sweep_configs()
  assert {r.budget.name for r in runs_lib.select()[-2:]} == {'long'}  # the long budget is last, after round 3
  # Round 2's plan fits about 8 hours of 2 cores.
  assert sum(runs_lib.estimated_seconds(r) for r in runs_lib.select(rounds=[2])) < 8 * 3600
  # Round 3: round 2's overfit comparisons (every method, 4 core seeds, the 3 other independent networks), each run
  # under the official resize and BN recalibration, given once.
  round3 = runs_lib.select(rounds=[3])
  assert {(r.series, r.seed, r.width, r.resolution) for r in round3} == {
      (r.series, r.seed, r.width, r.resolution) for r in overfit if not r.diagnostic}
  for r in round3:
    assert {'--config.resize_align_corners=True', '--config.bn_calibration=official'} <= set(r.overrides())
    assert len({o.split("=")[0] for o in r.overrides()}) == len(r.overrides()) and r.name.startswith('round3/')
  assert runs_lib.ROUND1.runs[0].overrides()[:1] == ['--config.num_epochs=2']


@pytest.mark.parametrize('dip, status', [(0.05, 'not held'), (0.0, 'held')])
def test_width_dip_is_found(dip, status):
  """An off-grid width (0.35) scoring `dip` below the narrower 0.25 is a dip beyond the noise."""
  pairs = [(w, 28) for w in (1.0, 0.75, 0.5, 0.35, 0.25)]
  top1 = lambda w, r: base(w, r) - (dip + 0.01 if w == 0.35 else 0.0)  # noqa: E731
  widths = _verdict(vd.compute({'MutualNet': {s: _rows(top1, pairs) for s in (0, 1)}}, N, 2, 'test'), 'widths')
  assert widths.kind == 'context' and widths.status == status
  assert [c.where for c in widths.comparisons if c.status == 'not held'] == (['0.35@28 vs 0.25@28'] if dip else [])


@pytest.mark.parametrize('final, train_top1, overfits', [(0.80, 0.995, True), (0.86, 0.995, False),
                                                          (0.80, 0.95, False)])
def test_pilot_evidence_needs_a_fitted_training_set_and_a_test_peak_behind(tmp_path, final, train_top1, overfits):
  """Over-fitting is judged on the pilot's own numbers: training-image top-1 >= 99 % and a test curve whose last
  point is below its earlier peak."""
  run = runs_lib.select(max_priority=1)[0]
  assert run.pilot
  log = tmp_path / 'logs' / f'{run.name}.train.log'
  log.parent.mkdir(parents=True)
  lines = [f'I1206 03:49:05.0 1 logging_writer.py:48] [{s}] accuracy/fixed={a}, loss/fixed=0.5' for s, a in
           ((78, 0.6), (156, 0.9))]
  lines += [f'I1206 03:49:05.0 1 logging_writer.py:48] [{s}] eval_top1/fixed={t}, eval_top5/fixed=0.99' for s, t in
            ((78, 0.70), (156, 0.85), (234, final))]
  log.write_text('\n'.join(lines) + '\n')
  query.write_table(_rows(lambda *_: train_top1, [runs_lib.FULL]), str(tmp_path / run.name / runs_lib.FIT_DIR),
                    {'eval_images': 5000})
  evidence = report.pilot_evidence(tmp_path, run)
  assert evidence['overfits'] is overfits and evidence['train_top1'] == pytest.approx(train_top1)
  assert (evidence['test_peak'], evidence['test_final_step']) == (max(0.85, final), 234)
  assert [p['step'] for p in evidence['curve']] == [78, 156, 234]
  assert '--config.eval_split=train[:' in ' '.join(run.fit_args())


def test_pilot_evidence_of_a_slimmable_run_follows_its_full_network(tmp_path):
  """MutualNet's log holds the full and the narrowest network's test top-1 at each step: the curve is the full one."""
  run = next(r for r in runs_lib.select(max_priority=1) if r.method == 'mutualnet')
  log = tmp_path / 'logs' / f'{run.name}.train.log'
  log.parent.mkdir(parents=True)
  log.write_text(''.join(f'I1206 1 logging_writer.py:48] [{s}] eval_top1/max={a}, eval_top1/min={b}\n'
                         for s, a, b in ((70, 0.80, 0.90), (140, 0.82, 0.70))))
  evidence = report.pilot_evidence(tmp_path, run)
  assert (evidence['test_peak'], evidence['test_peak_step'], evidence['test_final']) == (0.82, 140, 0.82)


def test_the_overview_tells_a_budget_without_runs_from_one_without_a_claim(tmp_path):
  out = tmp_path / 'runs'
  _write_round2(out, budget='pilot5k')  # the independent network alone: no claim compares it with anything
  lines = report.render_overview(report.load_all(out, {'runs': {}, 'invocations': []}))
  assert 'Runs but no claim to check (a compared method has no run): Round 2, pilot5k.' in lines
  assert any(line.startswith('No data yet: ') and 'Round 2, overfit' in line and 'pilot5k' not in line
             for line in lines)


def _load_run_driver():
  spec = importlib.util.spec_from_file_location('reproduce_run', REPO / 'benchmarks/reproduce/run.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _finish(out: Path, run, steps: int = 2100) -> None:
  """What a finished run leaves under OUT: a checkpoint at its last step, the training log saying so (with its
  logged curve), then its sweep's table."""
  (out / run.name / 'checkpoints' / str(steps)).mkdir(parents=True)
  log = out / 'logs' / f'{run.name}.train.log'
  log.parent.mkdir(parents=True, exist_ok=True)
  log.write_text(f'I1206 1 logging_writer.py:48] [70] accuracy/max=0.5, grad_norm=1.5, loss/max=1.2\n'
                 f'I1206 1 logging_writer.py:48] [{steps}] accuracy/max=0.9, grad_norm=0.5, loss/max=0.2\n'
                 f'Trained to step {steps} of {steps}\n')
  rows = _rows(lambda w, r: base(w, r), sorted(run.sweep_configs()))
  query.write_table(rows, str(out / run.name), {'eval_images': N, 'checkpoint_step': steps})


def test_a_finished_run_is_recorded_and_survives_a_fresh_machine(tmp_path):
  """run.py records a trained and swept run beside runs.py; on a machine whose OUT lacks it, the run is skipped
  and the report still holds its rows, training fit and timings."""
  driver = _load_run_driver()
  run = next(r for r in runs_lib.ROUND2.runs if r.method == 'mutualnet' and not r.pilot)
  out, fresh = tmp_path / 'old', tmp_path / 'fresh'
  timings = driver.Timings(tmp_path / 'timings.json')
  assert driver.archive_run(run, out, timings) is None  # nothing finished yet
  _finish(out, run)
  timings.record(run.name, 'train', {'seconds': 1234.0, 'from_step': 0, 'to_step': 2100, 'commit': 'abc',
                                     'command': 'python main.py x'})
  path = driver.archive_run(run, out, timings)
  assert path == tmp_path / 'records' / f'{run.name}.json'
  assert driver.archive_run(run, out, timings) is None  # unchanged: not rewritten
  assert not driver.finished_elsewhere(run, out) and driver.finished_elsewhere(run, fresh)

  docs = tmp_path / 'docs'
  report.write_report(fresh, docs, {'runs': {}, 'invocations': []})
  summary = json.loads((docs / 'reproduce' / run.budget.key / 'verdicts.json').read_text())
  assert run.name in summary['runs']['present']
  assert [f['train_accuracy'] for f in summary['training_fit']] == [0.9]
  with open(docs / 'reproduce' / run.budget.key / 'query_tables.csv', newline='') as f:
    assert len(list(csv.DictReader(f))) == len(run.sweep_configs())
  text = (docs / 'RESULTS.md').read_text()
  assert f'| {run.name} | 1234 | 2100 |' in text and '`abc`' in text


def test_a_pilot_is_recorded_only_with_its_fit_measured(tmp_path):
  driver = _load_run_driver()
  run = runs_lib.select(max_priority=1)[0]
  assert run.pilot
  out = tmp_path / 'old'
  _finish(out, run)
  timings = driver.Timings(tmp_path / 'timings.json')
  assert driver.archive_run(run, out, timings) is None
  query.write_table(_rows(lambda *_: 0.995, [runs_lib.FULL]), str(out / run.name / runs_lib.FIT_DIR),
                    {'eval_images': 1000})
  assert driver.archive_run(run, out, timings) is not None
  assert report.archive.REPRODUCTION.load(run.name)['fit_top1'] == pytest.approx(0.995)


def test_the_recipe_deviations_are_decided_by_their_pair_of_runs(tmp_path):
  """Without the official-recipe run RESULTS.md says the decision is pending; with it, a context record compares it
  with MutualNet at every configuration and the section states the outcome."""
  out, docs = tmp_path / 'runs', tmp_path / 'docs'
  official = next(r for r in runs_lib.ROUND2.runs if r.diagnostic == 'official' and r.budget.name == 'overfit')
  assert {'--config.resize_align_corners=True', '--config.bn_calibration=official'} <= set(official.overrides())
  _write_round2(out, skip=(official.name.rsplit('/', 1)[1],))
  report.write_report(out, docs, {'runs': {}, 'invocations': []})
  assert 'Not decided yet' in (docs / 'RESULTS.md').read_text().split('## Recipe deviations')[1]
  _write_round2(out, jitter=0.0)
  bd = _budget(out)
  recipe = _verdict(bd.verdicts, 'recipe')
  assert recipe.kind == 'context' and recipe.a == 'Official recipe' and len(recipe.comparisons) == 28
  report.write_report(out, docs, {'runs': {}, 'invocations': []})
  section = (docs / 'RESULTS.md').read_text().split('## Recipe deviations')[1].split('##')[0]
  assert f'{bd.title}: official recipe minus defaults, **{recipe.status}** at 28 configurations' in section


def test_calibration_only_split_is_judged_against_the_recipe_pairs_noise(tmp_path):
  path = tmp_path / report.CALIBRATION_ONLY
  path.write_text('width,resolution,top1_exact_calibration,top1_official_calibration,delta_points\n'
                  '0.25,16,0.80,0.799,-0.1\n1.0,28,0.82,0.835,1.5\n')
  noise = {'0.25@16': 0.005, '1@28': 0.005}  # K sigma = 1 point
  line = report._calibration_only(path, noise)
  assert '-0.10 to +1.50 points' in line and 'beyond the pair\'s noise at 1' in line and line.endswith('1@28.')
  within = report._calibration_only(path, {'0.25@16': 0.005, '1@28': 0.01})
  assert 'beyond the pair\'s noise at 0' in within and 'the training-time `align_corners` resize is' in within
  assert report._calibration_only(tmp_path / 'absent.csv', noise) is None


@pytest.mark.parametrize('flag, message', [
    ('--rounds=round2_long', '--rounds takes round numbers'), ('--budgets=lng', 'unknown --budgets lng'),
    ('--only=nope', 'unknown --only run names nope')])
def test_a_selection_that_names_nothing_is_a_one_line_error(flag, message):
  out = subprocess.run([sys.executable, str(REPO / 'benchmarks/reproduce/run.py'), '--list', flag],
                       capture_output=True, text=True, check=False)
  assert out.returncode == 2 and message in out.stderr and 'Traceback' not in out.stderr
