"""The reproduction's report: per round and budget, verdict records, data files and figures (docs/reproduce/), then
docs/RESULTS.md and the README's short summary.

  load (round 1 from its archived CSV, round 2 from the runs' query tables and OUT/timings.json)
  -> compute (verdicts.compute: records, no text) -> render (Markdown) -> write (files).

Numbers come from the data: accuracies, MACs, configurations and the number of eval images from the query tables
(and their metadata), settings and image counts from the runs' config.json / logs as run.py recorded them in
timings.json; round 1, whose workdirs are gone, from benchmarks/reproduce/round1/ and its entry in runs.py.
Called by run.py (also with --report_only).
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import datetime
import fractions
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
for p in (str(HERE), str(REPO)):
  if p not in sys.path:
    sys.path.insert(0, p)

import numpy as np  # noqa: E402

import archive  # noqa: E402
import runs as runs_lib  # noqa: E402
import training_log  # noqa: E402
import verdicts as vd  # noqa: E402
from mutualnet_jax import plots, query  # noqa: E402
from mutualnet_jax.errors import UserError  # noqa: E402
from mutualnet_jax.query import Row  # noqa: E402

ROUND1_ARCHIVE = HERE / 'round1'  # query_tables.csv (every row of round 1), training_fit.json (from its logs)
SERIES = ('MutualNet', 'US-Net', 'US-Net+', 'Independent', 'Diagnostic', 'Official recipe')
COLOURS = {'MutualNet': 'C3', 'US-Net': 'C0', 'US-Net+': 'C2', 'Independent': 'black', 'Diagnostic': 'C1',
           'Official recipe': 'C4'}
VARIANTS = frozenset(d.series for d in runs_lib.DIAGNOSTICS.values())  # context series, not drawn in the overlay
README_MARKERS = ('<!-- reproduce-summary:start -->', '<!-- reproduce-summary:end -->')
# Settings shown per budget (config.json keys and what run.py adds), in this order, with their names in the text.
FACTS = (('dataset', 'dataset'), ('train_split', 'training split'), ('train_images', 'training images'),
         ('eval_split', 'eval split'), ('augmentation', 'augmentation'),
         ('crop_scale', 'crop area'), ('width_sampling', 'width sampling'), ('width_step', 'width grid'),
         ('width_range', 'width range'), ('resolutions', 'resolutions'), ('num_subnets', 'sub-networks per step'),
         ('num_epochs', 'epochs'), ('total_steps', 'steps'), ('batch_size', 'batch'),
         ('learning_rate', 'learning rate (cosine decay)'), ('warmup_epochs', 'warm-up epochs'),
         ('weight_decay', 'weight decay'), ('model', 'model'), ('num_downsample', 'stride-2 layers'),
         ('calibration_images', 'BN calibration images'))


def _git(*args: str) -> str:
  try:
    return subprocess.run(['git', *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


# ----------------------------------------------------------------------------------------------------------------------
# Loading.

@dataclasses.dataclass
class BudgetData:
  """Everything the report knows about one budget of one round."""
  budget: runs_lib.Budget
  tables: vd.Tables                         # {series: {seed: rows}}
  run_rows: dict[str, list[Row]]            # per present run
  missing: list[str]                        # run names without a query table
  eval_images: int | None
  eval_images_from: str
  facts: dict[str, list[Any]]               # FACTS key: the distinct values over the present runs
  facts_from: str
  fit: list[dict[str, Any]]                 # training fit of the labelled network, per run
  verdicts: list[vd.Verdict] = dataclasses.field(default_factory=list)
  pilot: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # pilot runs' curves and fit (round 2)

  @property
  def title(self) -> str:
    return f'Round {self.budget.round}, {self.budget.name}'


def add_run(tables: vd.Tables, run: runs_lib.RunSpec, rows: list[Row]) -> None:
  """Files a run's rows under the series it feeds (a US-Net run feeds US-Net at its training resolution and
  US-Net+ at every resolution; an independent run only its own configuration)."""
  if run.method == 'independent':
    rows = [r for r in rows if (r.width, r.resolution) == (run.width, run.resolution)]
    tables.setdefault('Independent', {}).setdefault(run.seed, []).extend(rows)
    return
  tables.setdefault(run.series, {})[run.seed] = rows
  if run.series == 'US-Net':
    tables['US-Net+'] = {**tables.get('US-Net+', {}), run.seed: rows}
    top = max(r.resolution for r in rows)
    tables['US-Net'][run.seed] = [r for r in rows if r.resolution == top]


def eval_images_from_accuracies(values: Sequence[float], most: int = 10 ** 6) -> int | None:
  """The smallest N for which every accuracy is a whole number of images out of N (k/N): the eval set's size when
  no table metadata survives. None when no N up to `most` fits."""
  n = 1
  for v in values:
    n = math.lcm(n, fractions.Fraction(v).limit_denominator(most).denominator)
  return n if n <= most and all(abs(round(v * n) - v * n) < 1e-6 for v in values) else None


RowsOf = Callable[[runs_lib.RunSpec], 'tuple[list[Row], dict[str, Any]] | None']


def assemble(budget: runs_lib.Budget, runs: Sequence[runs_lib.RunSpec], rows_of: RowsOf, facts: dict[str, list[Any]],
             facts_from: str, fit: list[dict[str, Any]]) -> BudgetData:
  """A budget's tables from each run's (rows, table metadata), None for a run without a table; the eval-image count
  from the metadata, else inferred from the accuracies; `facts`, when empty, from the budget's settings."""
  tables, run_rows, missing, counts = {}, {}, [], set()
  for run in runs:
    found = rows_of(run)
    if not found or not found[0]:
      missing.append(run.name)
      continue
    run_rows[run.name], meta = found
    counts.add(meta.get('eval_images'))
    add_run(tables, run, run_rows[run.name])
  counts.discard(None)
  if counts:
    n = min(counts)
    n_from = 'the query tables\' metadata (`eval_images`)' + (
        f'; the runs disagree ({", ".join(map(str, sorted(counts)))}): the smallest is used' if len(counts) > 1 else '')
  else:
    n = eval_images_from_accuracies([r.top1 for rows in run_rows.values() for r in rows]) if run_rows else None
    n_from = ('inferred: the smallest count of which every top-1 is a whole number of images (no `eval_images` '
              'metadata)')
  if not facts:
    facts = {**{k: [v] for k, v in budget.settings.items()}, 'num_epochs': [budget.epochs]}
  return BudgetData(budget, tables, run_rows, missing, n, n_from, facts, facts_from,
                    [f for f in fit if f['run'] in run_rows])


def load_round1(archive: Path = ROUND1_ARCHIVE) -> list[BudgetData]:
  """Round 1 from its CSV (columns method, seed, query.COLUMNS; `method` is each run's label) and the training fit
  its report parsed from the logs."""
  by_label: dict[tuple[str, int], list[Row]] = {}
  with open(archive / 'query_tables.csv', newline='') as f:
    for rec in csv.DictReader(f):
      by_label.setdefault((rec['method'], int(rec['seed'])), []).append(query._row(rec))  # pylint: disable=protected-access
  fit_path = archive / 'training_fit.json'
  fit = json.loads(fit_path.read_text())['training_fit'] if fit_path.exists() else []

  def rows_of(run: runs_lib.RunSpec) -> tuple[list[Row], dict[str, Any]]:
    rows = by_label.get((run.label, run.seed), [])
    if run.method == 'independent':  # one label holds every independent network of a seed
      rows = [r for r in rows if (r.width, r.resolution) == (run.width, run.resolution)]
    return rows, {}

  return [assemble(b, [r for r in runs_lib.ROUND1.runs if r.budget == b], rows_of, {}, 'runs.py, round 1 as it ran',
                   fit) for b in runs_lib.ROUND1.budgets]


def training_fit(out: Path, names: Sequence[str], records: archive.Records = archive.REPRODUCTION
                 ) -> list[dict[str, Any]]:
  """Each run's last training interval, from its log under OUT, else from its record."""
  fits = (training_log.last_interval(training_log.path(out, name), name) or (records.load(name) or {}).get(
      'last_interval') for name in names)
  return [fit for fit in fits if fit]


OVERFIT_TRAIN_TOP1 = 0.99  # the pilot's criterion: the full network fits its training images at least this well


def pilot_evidence(out: Path, run: runs_lib.RunSpec, eval_images: int = 10_000) -> dict[str, Any] | None:
  """Whether a pilot run over-fits: its full network's top-1 on its (un-augmented) training images against its
  test top-1 curve during training (peak and final); None before the run has a test curve. From OUT, else from
  the run's archive record."""
  record = archive.REPRODUCTION.load(run.name) or {}
  points = training_log.accuracy_curve(training_log.path(out, run.name)) or record.get('curve', [])
  full = 'eval_top1/fixed' if run.method == 'independent' else 'eval_top1/max'  # the full network's curve
  tests = [(p['step'], p[full]) for p in points if full in p]
  if not tests:
    return None
  peak_step, peak = max(tests, key=lambda t: (t[1], -t[0]))
  final_step, final = tests[-1]
  train_top1 = archive.fit_top1(out / run.name, runs_lib.FIT_DIR)
  if train_top1 is None:
    train_top1 = record.get('fit_top1')
  passed_peak = peak_step < final_step and final < peak
  noise = 2 * math.sqrt(2) * vd.binomial_se(peak, eval_images)  # K sigma of a difference of two accuracies
  return {'run': run.name, 'series': run.series, 'seed': run.seed, 'train_top1': train_top1,
          'test_peak': peak, 'test_peak_step': peak_step, 'test_final': final, 'test_final_step': final_step,
          'drop': peak - final, 'drop_noise': noise,
          'overfits': bool(train_top1 is not None and train_top1 >= OVERFIT_TRAIN_TOP1 and passed_peak),
          'curve': points}


def load_budget(out: Path, budget: runs_lib.Budget, runs: Sequence[runs_lib.RunSpec], timings: dict) -> BudgetData:
  """A budget from its runs' workdirs under `out` and the facts run.py recorded in timings.json."""
  def rows_of(run: runs_lib.RunSpec) -> tuple[list[Row], dict[str, Any]] | None:
    try:
      return query.read_table(str(out / run.name))
    except UserError:
      record = archive.REPRODUCTION.load(run.name)
      return ([query._row(r) for r in record['table']['rows']], record['table'].get('meta', {})) if record else None  # pylint: disable=protected-access

  facts: dict[str, list[Any]] = {}
  for run in runs:
    for key, value in timings.get('runs', {}).get(run.name, {}).get('facts', {}).items():
      if value not in facts.setdefault(key, []):
        facts[key].append(value)
  facts_from = ('the runs\' config.json, logs and sweep summaries (timings.json)' if facts else
                'runs.py: what run.py passes, no config.json recorded yet')
  bd = assemble(budget, runs, rows_of, facts, facts_from, training_fit(out, [r.name for r in runs]))
  bd.pilot = [e for e in (pilot_evidence(out, r, bd.eval_images or 10_000) for r in runs if r.pilot) if e]
  return bd


def load_all(out: Path, timings: dict, round1: Path = ROUND1_ARCHIVE) -> list[BudgetData]:
  """The recorded rounds' budgets (latest round first), then round 1's; each with its verdict records."""
  data = [load_budget(out, b, [r for r in rnd.runs if r.budget == b], timings)
          for rnd in runs_lib.RECORDED for b in rnd.budgets] + load_round1(round1)
  for bd in data:
    if bd.tables and bd.eval_images:
      bd.verdicts = vd.compute(bd.tables, bd.eval_images, bd.budget.round, bd.budget.name)
  return data


# ----------------------------------------------------------------------------------------------------------------------
# Derived numbers shared by figures, data files and text.

def seed_mean_rows(series: dict[int, list[Row]]) -> list[Row]:
  """One row per configuration with top-1 averaged over seeds."""
  by: dict[tuple[float, int], list[Row]] = {}
  for rows in series.values():
    for r in rows:
      by.setdefault((r.width, r.resolution), []).append(r)
  return [dataclasses.replace(rs[0], top1=float(np.mean([r.top1 for r in rs])),
                              top5=float(np.mean([r.top5 for r in rs]))) for _, rs in sorted(by.items())]


def budget_grid(tables: vd.Tables) -> list[tuple[float, str]]:
  """The MACs of every configuration any series has, cheapest first."""
  return vd.configuration_budgets({0: [r for series in tables.values() for rows in series.values() for r in rows]})


def budget_rows(bd: BudgetData) -> list[dict[str, Any]]:
  present = [s for s in SERIES if bd.tables.get(s)]
  return [{'mflops': mflops, 'source': source,
           **{s: vd.at_budget(bd.tables, s, mflops, bd.eval_images) for s in present}}
          for mflops, source in budget_grid(bd.tables)]


def full_config(rows: Sequence[Row]) -> tuple[float, int]:
  best = max(rows, key=lambda r: (r.macs, r.width))
  return best.width, best.resolution


# ----------------------------------------------------------------------------------------------------------------------
# Figures.

def overlay_figure(bd: BudgetData, path: Path) -> Path:
  """Figs. 4/6: each method's Pareto frontier of seed means, error bars 1 sigma (the verdicts' noise), faint dots
  every (seed, configuration); independent networks as stars with their frontier dotted and labelled."""
  seeds = ', '.join(f'{s}: {len(bd.tables[s])} seed{"s" * (len(bd.tables[s]) > 1)}' for s in SERIES
                    if bd.tables.get(s) and s not in ('Independent', 'US-Net'))
  fig, ax = plots.axes(f'{bd.title}: {bd.budget.purpose}\n{seeds}', ylabel='top-1 accuracy (%)', figsize=(8.4, 5.6))
  for name in SERIES:
    series = bd.tables.get(name)
    if not series or name in VARIANTS:
      continue
    points = vd.per_config(series, bd.eval_images)
    front = query.pareto_frontier(seed_mean_rows(series))
    x = [r.macs / 1e6 for r in front]
    y = [100 * r.top1 for r in front]
    err = [100 * points[r.width, r.resolution][1].noise for r in front]
    if name == 'Independent':
      every = seed_mean_rows(series)
      ax.plot([r.macs / 1e6 for r in every], [100 * r.top1 for r in every], '*', color='black', markersize=10,
              label='Independent (one network per star; frontier labelled)', zorder=5)
      ax.errorbar(x, y, yerr=err, fmt='none', color='black', capsize=3)
      ax.plot(x, y, ':', color='black', linewidth=1)
      for r in front:
        ax.annotate(vd.config_name(r.width, r.resolution), (r.macs / 1e6, 100 * r.top1), textcoords='offset points',
                    xytext=(4, -10), fontsize=7)
      continue
    if name != 'US-Net':  # US-Net's points are US-Net+'s at the training resolution: drawn once
      every = [r for rows in series.values() for r in rows]
      ax.plot([r.macs / 1e6 for r in every], [100 * r.top1 for r in every], 'o', color=COLOURS[name],
              markersize=2.5, alpha=0.3)
    wide = name == 'US-Net'  # under US-Net+'s dashes: a wide faint line keeps it visible
    ax.errorbar(x, y, yerr=err, fmt='o', color=COLOURS[name], markersize=4, linewidth=5 if wide else 1.5,
                alpha=0.45 if wide else 1.0, capsize=3, linestyle='--' if name == 'US-Net+' else '-',
                label=f'{name} (Pareto frontier of seed means)')
  ax.set_xscale('log')
  ax.legend(loc='lower right', fontsize='small')
  return Path(plots.save(fig, path))


def fig5(bd: BudgetData, path: Path) -> Path:
  series = bd.tables['MutualNet']
  return Path(plots.accuracy_macs(seed_mean_rows(series), path, title=(
      f'{bd.title}: MutualNet, mean of {len(series)} seed(s), configurations by resolution')))


# ----------------------------------------------------------------------------------------------------------------------
# Data files.

def _estimate_fields(est: vd.Estimate | None) -> list[Any]:
  return ['', '', '', ''] if est is None else [est.mean, est.noise, est.seeds, ' '.join(est.picks)]


def write_budget_files(bd: BudgetData, folder: Path) -> list[Path]:
  """verdicts.json (records, runs present and missing, facts), and when the budget has data: budgets.csv, the
  figures and, except for round 1 (whose archive is its data file), query_tables.csv."""
  folder.mkdir(parents=True, exist_ok=True)
  written = [write_verdicts_json(bd, folder / 'verdicts.json')]
  if not bd.run_rows:
    return written
  if bd.budget.round != 1:  # round 1's rows are its archive (benchmarks/reproduce/round1/query_tables.csv)
    by_name = runs_lib.by_name()
    with open(folder / 'query_tables.csv', 'w', newline='') as f:
      w = csv.writer(f)
      w.writerow(['method', 'seed'] + list(query.COLUMNS))
      for name, rows in bd.run_rows.items():
        w.writerows([by_name[name].label, by_name[name].seed] + [getattr(r, c) for c in query.COLUMNS] for r in rows)
    written.append(folder / 'query_tables.csv')
  present = [s for s in SERIES if bd.tables.get(s)]
  with open(folder / 'budgets.csv', 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['mflops', 'source'] + [f'{s} {k}' for s in present for k in ('mean_top1', 'noise', 'seeds', 'configs')])
    for row in budget_rows(bd):
      w.writerow([row['mflops'], row['source']] + [x for s in present for x in _estimate_fields(row[s])])
  written.append(folder / 'budgets.csv')
  if bd.pilot:
    keys = sorted({k for e in bd.pilot for p in e['curve'] for k in p if k != 'step'})
    with open(folder / 'pilot_curves.csv', 'w', newline='') as f:
      w = csv.writer(f)
      w.writerow(['run', 'step'] + keys)
      w.writerows([e['run'], p['step']] + [p.get(k, '') for k in keys] for e in bd.pilot for p in e['curve'])
    written.append(folder / 'pilot_curves.csv')
  written.append(overlay_figure(bd, folder / 'overlay.png'))
  if bd.tables.get('MutualNet'):
    written.append(fig5(bd, folder / 'mutualnet_fig5.png'))
  return written


def write_verdicts_json(bd: BudgetData, path: Path) -> Path:
  path.write_text(json.dumps({
      'round': bd.budget.round, 'budget': bd.budget.name, 'rule': vd.RULE, 'k': vd.K,
      'eval_images': bd.eval_images, 'eval_images_from': bd.eval_images_from,
      'runs': {'present': list(bd.run_rows), 'missing': bd.missing}, 'facts': bd.facts, 'facts_from': bd.facts_from,
      'training_fit': bd.fit, 'verdicts': [v.as_dict() for v in bd.verdicts]}, indent=1))
  return path


def write_verdicts_csv(data: Sequence[BudgetData], path: Path) -> Path:
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['round', 'budget', 'claim', 'kind', 'a', 'b', 'status', 'held', 'not_held', 'inconclusive',
                'margins', 'noise', 'k'])
    for v in (v for bd in data for v in bd.verdicts):
      w.writerow([v.round, v.budget, v.claim, v.kind, v.a, v.b, v.status, v.held, v.not_held, v.inconclusive,
                  ' '.join(f'{m:.5f}' for m in v.margins), ' '.join(f'{s:.5f}' for s in v.noise), v.k])
  return path


# ----------------------------------------------------------------------------------------------------------------------
# Markdown.

def _pct(x: float) -> str:
  return f'{100 * x:.2f}'


def _est(est: vd.Estimate | None, picks: bool = False) -> str:
  """'mean ± sigma (seeds)', or with the configurations picked instead of the seed count."""
  if est is None:
    return '—'
  return f'{_pct(est.mean)} ± {_pct(est.noise)} ({", ".join(est.picks) if picks else est.seeds})'


def _comparison(c: vd.Comparison) -> str:
  seeds = f', seeds {c.seeds_a} vs {c.seeds_b}' if c.seeds_a and c.seeds_b else ''
  return (f'{c.where}: {_pct(c.a)} vs {_pct(c.b)}, Δ {100 * c.diff:+.2f} '
          f'(threshold ±{100 * vd.K * c.noise:.2f}{seeds}) {c.status}')


def render_verdict(v: vd.Verdict) -> str:
  n = len(v.comparisons)
  counts = f' ({v.held} held, {v.not_held} not held, {v.inconclusive} inconclusive of {n})' if n > 1 else ''
  if v.claim == 'widths':
    dips = [c for c in v.comparisons if c.status == vd.NOT_HELD]
    return (f'Width profile of {v.a} (context; each swept width against the next narrower one): '
            f'{len(dips)} dip(s) beyond the noise over {n} width steps ({v.status})'
            + (': ' + '; '.join(_comparison(c) for c in dips) if dips else '') + '.')
  if v.kind == 'context':
    return f'{v.a} — {vd.CLAIMS[v.claim]}{counts}: ' + '; '.join(map(_comparison, v.comparisons)) + '.'
  return f'**Claim {v.claim} — {vd.CLAIMS[v.claim]}: {v.status}**{counts}. ' + '; '.join(
      map(_comparison, v.comparisons)) + '.'


def _fact_value(values: list[Any]) -> str:
  def one(v: Any) -> str:
    return ', '.join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
  return ' / '.join(f'`{one(v)}`' for v in values)


def render_setup(bd: BudgetData) -> list[str]:
  shown = [f'{label} {_fact_value(bd.facts[key])}' for key, label in FACTS if key in bd.facts]
  lines = [f'- **Settings** (from {bd.facts_from}): ' + '; '.join(shown) + '.']
  if bd.budget.round == 1:
    lines.append('- **Then the library\'s defaults**: ' + '; '.join(
        f'{k}: {v}' for k, v in runs_lib.ROUND1.described.items()) + '.')
  if bd.eval_images:
    lines.append(f'- **Eval images** N = {bd.eval_images} ({bd.eval_images_from}).')
  every = [r for rows in bd.run_rows.values() for r in rows]
  if every:
    full = max(every, key=lambda r: r.macs)
    cheap = min(every, key=lambda r: r.macs)
    lines.append(f'- **Cost** (from the tables): {vd.config_name(full.width, full.resolution)} '
                 f'{full.macs / 1e6:.2f} MFLOPs down to {vd.config_name(cheap.width, cheap.resolution)} '
                 f'{cheap.macs / 1e6:.2f} MFLOPs ({full.macs / cheap.macs:.0f}x).')
  seeds = {s: len(bd.tables[s]) for s in SERIES if bd.tables.get(s) and s not in ('US-Net+', 'Independent')}
  if bd.tables.get('Independent'):
    per = collections.Counter((r.width, r.resolution) for rows in bd.tables['Independent'].values() for r in rows)
    groups = collections.Counter(per.values())
    seeds['Independent'] = ', '.join(f'{n} for {groups[n]} configuration(s)' for n in sorted(groups, reverse=True))
  lines.append('- **Seeds**: ' + '; '.join(f'{s} {n}' for s, n in seeds.items()) + '.')
  lines.append(f'- **Runs**: {len(bd.run_rows)} swept' + (
      f'; **missing** (not trained or not swept yet): {", ".join(bd.missing)}' if bd.missing else '') + '.')
  return lines


def render_budget_table(bd: BudgetData) -> list[str]:
  present = [s for s in SERIES if bd.tables.get(s)]
  lines = ['| MFLOPs | configuration | ' + ' | '.join(present) + ' |', '|---:|---|' + '---|' * len(present)]
  for row in budget_rows(bd):
    lines.append(f'| {row["mflops"]:.2f} | {row["source"]} | '
                 + ' | '.join(_est(row[s], picks=True) for s in present) + ' |')
  return lines


def render_config_table(bd: BudgetData) -> list[str]:
  present = [s for s in ('Independent', 'MutualNet', 'US-Net+', 'Diagnostic', 'Official recipe') if bd.tables.get(s)]
  points = {s: vd.per_config(bd.tables[s], bd.eval_images) for s in present}
  keys = sorted(set().union(*points.values()), key=lambda k: (-k[1], -k[0]))
  lines = ['| config | MFLOPs | ' + ' | '.join(present) + ' |', '|---|---:|' + '---:|' * len(present)]
  for k in keys:
    macs = next(points[s][k][0] for s in present if k in points[s])
    lines.append(f'| {vd.config_name(*k)} | {macs / 1e6:.2f} | '
                 + ' | '.join(_est(points[s][k][1]) if k in points[s] else '—' for s in present) + ' |')
  return lines


def render_fit(bd: BudgetData) -> list[str]:
  """Training fit against test accuracy of the labelled network (the full one of MutualNet/US-Net runs)."""
  if not bd.fit:
    return []
  lines = ['| run | step | train top-1 (%) | train CE | test top-1 (%) | train − test |',
           '|---|---:|---:|---:|---:|---:|']
  for f in bd.fit:
    rows = bd.run_rows[f['run']]
    test = next(r.top1 for r in rows if (r.width, r.resolution) == full_config(rows))
    lines.append(f'| {f["run"]} | {f["step"]} | {_pct(f["train_accuracy"])} | {f["train_ce"]:.3f} | {_pct(test)} | '
                 f'{100 * (f["train_accuracy"] - test):+.2f} |')
  return lines


def _overfit_words(evidence: dict[str, Any]) -> str:
  if not evidence['overfits']:
    return 'no'
  return 'yes' if evidence['drop'] > evidence['drop_noise'] else 'yes, a plateau: its drop is within the noise'


def render_pilot(bd: BudgetData) -> list[str]:
  """The pilot's evidence that the budget over-fits (or that it does not)."""
  if not bd.pilot:
    return []
  lines = ['| run | train top-1 (%, training images) | test top-1 peak (%) at step | test top-1 final (%) at step | '
           'peak − final (points; 2σ) | over-fits |', '|---|---:|---:|---:|---:|---|']
  for e in bd.pilot:
    train = _pct(e['train_top1']) if e['train_top1'] is not None else 'not measured yet'
    lines.append(f'| {e["run"]} | {train} | {_pct(e["test_peak"])} at {e["test_peak_step"]} | '
                 f'{_pct(e["test_final"])} at {e["test_final_step"]} | {100 * e["drop"]:.2f}; '
                 f'{100 * e["drop_noise"]:.2f} | {_overfit_words(e)} |')
  return lines


def render_budget(bd: BudgetData, docs: Path, folder: Path) -> list[str]:
  rel = os.path.relpath(folder, docs)
  md = [f'## {bd.title}: {bd.budget.purpose}', '']
  if not bd.run_rows:
    return md + [f'No run of this budget has been swept yet ({len(bd.missing)} listed in runs.py): nothing to '
                 'report.', '']
  md += render_setup(bd)
  pilot = render_pilot(bd)
  if pilot:
    md += ['', '### Pilot: does this budget over-fit?', '',
           f'The criterion: the full network reaches ≥ {100 * OVERFIT_TRAIN_TOP1:g} % top-1 on its own training '
           f'images (un-augmented, as evaluated) while its test top-1, evaluated {runs_lib.PILOT_EVALS} times during '
           'training, '
           'has passed its peak (its final value below its peak; a drop within 2σ of the binomial noise of the '
           'difference is a plateau, not a decline). Curves: `pilot_curves.csv`.', '', *pilot]
  md += ['', '### Verdicts', '']
  claims = [v for v in bd.verdicts if v.kind == 'claim']
  md += [f'- {render_verdict(v)}' for v in claims] or ['- No claim can be checked: a compared method has no run.']
  md += [f'- {render_verdict(v)}' for v in bd.verdicts if v.kind == 'context']
  md += ['', '### Figures', '', f'![overlay]({rel}/overlay.png)'
         + (f' ![MutualNet Fig. 5]({rel}/mutualnet_fig5.png)' if bd.tables.get('MutualNet') else ''), '',
         '### Accuracy at matched MACs budgets', '',
         'Best top-1 (%) within each budget (the MACs of every configuration present), picked per seed (for the '
         'independent networks: the best seed mean), mean ± sigma, and the configurations picked.', '',
         *render_budget_table(bd), '', '### Same configuration, different training', '',
         'Top-1 (%) of one configuration taken from each model: mean ± sigma (seeds).', '', *render_config_table(bd)]
  fit = render_fit(bd)
  if fit:
    md += ['', '### Training fit of the labelled network', '',
           'Top-1 and cross-entropy on the augmented training batches of the last logged interval (training logs) '
           'against the test top-1 of the same configuration; a large positive train − test is over-fitting.', '',
           *fit]
  return md + ['']


def render_overview(data: Sequence[BudgetData]) -> list[str]:
  with_data = [bd for bd in data if bd.verdicts]
  empty = [bd.title for bd in data if not bd.verdicts and not bd.run_rows]
  no_claim = [bd.title for bd in data if not bd.verdicts and bd.run_rows]
  note = ([f'No data yet: {", ".join(empty)}.'] if empty else []) + (
      [f'Runs but no claim to check (a compared method has no run): {", ".join(no_claim)}.'] if no_claim else [])
  if not with_data:
    return note
  header = '| claim | ' + ' | '.join(bd.title for bd in with_data) + ' |'
  lines = [header, '|---|' + '---|' * len(with_data)]
  for claim in (c for c in vd.CLAIMS if c not in vd.CONTEXT):
    cells = []
    for bd in with_data:
      v = next((v for v in bd.verdicts if v.claim == claim), None)
      cells.append('—' if v is None else f'**{v.status}** ({v.held}/{len(v.comparisons)} held)')
    lines.append(f'| {claim}: {vd.CLAIMS[claim]} | ' + ' | '.join(cells) + ' |')
  return lines + ([''] + note if note else [])


def _commands(data: Sequence[BudgetData], timings: dict) -> list[str]:
  out = []
  for bd in data:
    for name in list(bd.run_rows) + bd.missing:
      t = timings.get('runs', {}).get(name, {})
      out += [t[phase][-1]['command'].replace(str(REPO) + '/', '') for phase in ('train', 'sweep') if t.get(phase)]
  return out


def render_timings(data: Sequence[BudgetData], timings: dict) -> list[str]:
  lines = ['| run | training wall (s) | steps | s/step | sweep wall (s) | attempts (train/sweep) |',
           '|---|---:|---:|---:|---:|---:|']
  total = 0.0
  for bd in data:
    for name in list(bd.run_rows) + bd.missing:
      t = timings.get('runs', {}).get(name)
      if not t:
        continue
      train, sweep = (sum(a['seconds'] for a in t.get(p, [])) for p in ('train', 'sweep'))
      steps = sum((a.get('to_step') or 0) - (a.get('from_step') or 0) for a in t.get('train', []))
      total += train + sweep
      lines.append(f'| {name} | {train:.0f} | {steps} | {train / steps if steps else float("nan"):.2f} | '
                   f'{sweep:.0f} | {len(t.get("train", []))}/{len(t.get("sweep", []))} |')
  if len(lines) == 2:
    return ['No wall times recorded in timings.json yet.']
  return lines + [f'| **total** | {total:.0f} s = {total / 3600:.1f} h | | | | |']


def _paper_span() -> str:
  """The MACs span of the paper's MobileNet v1 grid (configs/mobilenet_v1_imagenet.py), computed."""
  try:
    from configs import mobilenet_v1_imagenet  # pylint: disable=g-import-not-at-top
    from mutualnet_jax import profile  # pylint: disable=g-import-not-at-top
    c = mobilenet_v1_imagenet.get_config()
    (lo, hi), res = c.width_range, c.resolutions
    p = {(x.width, x.resolution): x.macs for x in profile.profile_grid(c.model, [lo, hi], [min(res), max(res)])}
    return (f'the paper\'s MobileNet v1 grid on {c.dataset} (configs/mobilenet_v1_imagenet.py), '
            f'{vd.config_name(lo, min(res))} to {vd.config_name(hi, max(res))}: '
            f'{p[hi, max(res)] / p[lo, min(res)]:.0f}x')
  except Exception as e:  # pylint: disable=broad-except
    return f'(the paper\'s grid could not be profiled: {type(e).__name__})'


def render_limitations(data: Sequence[BudgetData]) -> list[str]:
  lines = [f'- Verdicts use the noise the data show ({vd.RULE}; K = {vd.K:g}). With 2 seeds the seed term is '
           'itself a rough estimate; "inconclusive" means the seeds run so far cannot separate the methods, not that '
           'they are equal.',
           '- A single-seed series has no seed term, only the binomial error: its verdicts understate the noise.',
           '- Equal training steps and images for every method, as in the paper, but not equal compute: MutualNet '
           'and US-Net update the shared weights through several sub-networks per step (`sub-networks per step` in '
           'each setup), an independent network through one.']
  spans = []
  for bd in (bd for bd in data if bd.run_rows):
    every = [r for rows in bd.run_rows.values() for r in rows]
    spans.append(f'{bd.title}: inputs up to {max(r.resolution for r in every)} px, '
                 f'{max(r.macs for r in every) / min(r.macs for r in every):.0f}x')
  if spans:
    lines.append(f'- A small-input model: the MACs span here ({"; ".join(spans)}) against {_paper_span()}.')
  return lines


CALIBRATION_ONLY = 'recipe_calibration_only.csv'  # docs/reproduce/: a default-trained run re-swept the official way


def _calibration_only(path: Path, noise: dict[str, float]) -> str | None:
  """The line splitting the two switches, from `path` (a default-trained MutualNet re-swept with
  `--config.bn_calibration=official`; columns width, resolution, delta_points), each configuration judged against
  the recipe pair's noise there; None when the file is absent."""
  if not path.exists():
    return None
  with path.open() as f:
    rows = [(vd.config_name(float(r['width']), int(r['resolution'])), float(r['delta_points'])) for r in
            csv.DictReader(f)]
  beyond = [where for where, d in rows if where in noise and vd.judge(d / 100, noise[where]) != vd.INCONCLUSIVE]
  deltas = [d for _, d in rows]
  return (f'- Which switch: BN recalibration alone (`{path.name}`: a default-trained MutualNet, seed 2, re-swept with '
          '`--config.bn_calibration=official`, no training) moves top-1 by '
          f'{min(deltas):+.2f} to {max(deltas):+.2f} points (mean {np.mean(deltas):+.2f}) at {len(rows)} '
          f'configurations, beyond the pair\'s noise at {len(beyond)}: '
          + ('the calibration is not what changes the result; the training-time `align_corners` resize is.'
             if not beyond else 'the calibration alone changes the result at ' + ', '.join(beyond) + '.'))


def render_recipe(data: Sequence[BudgetData], docs: Path) -> list[str]:
  """The official code's two remaining recipe differences, and what the pair of runs (and, when recorded, the
  calibration-only re-sweep) says about them."""
  lines = ['Two details of the official code differ from this project\'s defaults: it resizes with '
           '`align_corners=True` (here: half-pixel centres, like TF2 and PIL) and recalibrates BN on augmented '
           'training batches, averaging per-batch unbiased variances (here: exact pooled statistics of un-augmented '
           'images). Both are matched behind switches (`--config.resize_align_corners=True`, '
           '`--config.bn_calibration=official`). They are decided on one pair of runs: MutualNet with both switches '
           'against MutualNet with the defaults, same seed and budget (`DIAGNOSTICS[\'official\']` in runs.py).', '']
  found = [(bd, v) for bd in data for v in bd.verdicts if v.claim == 'recipe']
  if not found:
    return lines + ['Not decided yet: the pair\'s official-recipe run has not been swept.']
  for bd, v in found:
    within = len(v.comparisons) - v.held - v.not_held
    if not v.held and not v.not_held:
      outcome = 'the deviations do not change the result beyond the noise; the reproduction keeps the defaults.'
    else:
      outcome = ('the deviations change the result (official recipe above the defaults at '
                 f'{v.held}, below at {v.not_held}); round 3 repeats the comparisons with both switches on.')
    lines.append(f'- {bd.title}: official recipe minus defaults, **{v.status}** at {len(v.comparisons)} '
                 f'configurations ({v.held} above, {v.not_held} below beyond the noise, {within} within it): '
                 + outcome)
  split = _calibration_only(docs / 'reproduce' / CALIBRATION_ONLY,
                            {c.where: c.noise for _, v in found for c in v.comparisons})
  return lines + ([split] if split else [])


def render_results(data: Sequence[BudgetData], timings: dict, docs: Path, folders: dict[str, Path]) -> str:
  attempts = [a for t in timings.get('runs', {}).values() for phase in ('train', 'sweep') for a in t.get(phase, [])]
  commits = sorted({a['commit'] for a in attempts if a.get('commit')})
  recovered = ' (runs recovered from a replaced machine record no commit: see the git history of this file)' if any(
      not a.get('commit') for a in attempts) else ''
  md = ['# Reproducing MutualNet\'s claims at CPU scale', '',
        f'_Generated by `benchmarks/reproduce/run.py` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} '
        'UTC from the runs\' query tables, their committed records (`benchmarks/reproduce/round<N>/`) and the round-1 '
        'archive; do not edit by hand (re-run the command '
        'below)._', '',
        '## Verdicts at a glance', '', *render_overview(data), '',
        f'How a difference is judged (every claim, every round): {vd.RULE}; K = {vd.K:g}. Held / not held: the '
        'difference is beyond K sigma in the claimed / the opposite direction; inconclusive: within it. A claim over '
        'several budgets or configurations is held when all are held, not held when any is not held. Errors shown '
        'as ± are 1 sigma.', '']
  for bd in data:
    md += render_budget(bd, docs, folders[bd.budget.key])
  md += ['## Recipe deviations', '', *render_recipe(data, docs), '',
         '## Commands', '',
         '```', 'export MUTUALNET_FASHION_MNIST_DIR=/usr/share/datasets/fashion-mnist',
         'nohup python benchmarks/reproduce/run.py --out=benchmarks/results/reproduce > reproduce.log 2>&1 &',
         'python benchmarks/reproduce/run.py --out=benchmarks/results/reproduce --report_only   # this file', '```', '',
         'Round 1\'s workdirs and timings.json are gone; its rows are in `benchmarks/reproduce/round1/`, its wall '
         'times and commands in the git history of this file. The commands run.py issued (last attempt of each; '
         'run list: `benchmarks/reproduce/runs.py`):', '',
         '<details><summary>commands</summary>', '', '```', *(_commands(data, timings) or ['(none recorded yet)']),
         '```', '', '</details>', '',
         f'Code of the runs: {", ".join(f"`{c}`" for c in commits) or "(none recorded)"}{recovered}; report generated '
         f'at `{_git("rev-parse", "HEAD")}`.', '',
         '## Wall times', '', *render_timings(data, timings), '',
         '## Limitations', '', *render_limitations(data), '']
  return '\n'.join(md)


# ----------------------------------------------------------------------------------------------------------------------
# README summary.

def readme_summary(data: Sequence[BudgetData], results_link: str) -> str:
  lines = [f'Reproduction of the paper\'s claims at CPU scale ([{results_link}]({results_link}), regenerated by '
           '`python benchmarks/reproduce/run.py --report_only`):', '']
  lines += render_overview(data)
  return '\n'.join(lines)


def update_readme(readme: Path, summary: str) -> bool:
  """Rewrites the text between README_MARKERS; leaves the file untouched (and says so) when they are absent."""
  text = readme.read_text() if readme.exists() else ''
  start, end = README_MARKERS
  i, j = text.find(start), text.find(end)
  if i < 0 or j < i:
    print(f'report: {readme} has no {start} ... {end} markers: left untouched', file=sys.stderr)
    return False
  new = text[:i + len(start)] + '\n' + summary.strip() + '\n' + text[j:]
  if new != text:
    readme.write_text(new)
  return True


# ----------------------------------------------------------------------------------------------------------------------
# Writing.

def write_report(out: Path, docs: Path, timings: dict, readme: Path | None = None,
                 round1: Path = ROUND1_ARCHIVE) -> list[Path]:
  """Loads every round, writes docs/reproduce/<round>_<budget>/ (data files, figures), docs/reproduce/verdicts.csv,
  docs/RESULTS.md and, when given, the README's summary; returns the files written."""
  timings = archive.REPRODUCTION.merged_timings(timings, [r.name for rnd in runs_lib.RECORDED for r in rnd.runs])
  data = load_all(out, timings, round1)
  folders = {bd.budget.key: docs / 'reproduce' / bd.budget.key for bd in data}
  written = [p for bd in data for p in write_budget_files(bd, folders[bd.budget.key])]
  written.append(write_verdicts_csv(data, docs / 'reproduce' / 'verdicts.csv'))
  (docs / 'RESULTS.md').write_text(render_results(data, timings, docs, folders))
  written.append(docs / 'RESULTS.md')
  if readme is not None:
    link = os.path.relpath(docs / 'RESULTS.md', readme.parent)
    if update_readme(readme, readme_summary(data, link)):
      written.append(readme)
  return written
