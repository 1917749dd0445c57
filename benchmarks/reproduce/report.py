"""The reproduction's report: data files, figures and docs/RESULTS.md, from the runs' query tables and timings.

Everything here is derived from OUT/<run>/query_table.json (written by `main.py --mode=sweep`) and OUT/timings.json
(written by run.py); nothing is typed in by hand. Called by run.py (also with --report_only).

Methods compared (the paper's Figs. 4-6):
  MutualNet    every swept (width, resolution) of the MutualNet runs;
  US-Net       the US-Net runs at their training resolution (28 px) only;
  US-Net+      the same US-Net runs evaluated at every resolution (BN recalibrated per configuration);
  Independent  one network per (width, resolution), trained alone with labels (seed 0; the full one also seed 1
               when time allowed); at a budget, the per-network seed means are used.
Seeds are aggregated per configuration (mean, half-range); at a MACs budget each seed picks its own best
configuration under the budget (what a user of that one trained model would get), then the picks are aggregated.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
for p in (str(HERE), str(REPO)):
  if p not in sys.path:
    sys.path.insert(0, p)

import numpy as np  # noqa: E402

import runs as runs_lib  # noqa: E402
from mutualnet_jax import plots, profile, query  # noqa: E402
from mutualnet_jax.errors import UserError  # noqa: E402
from mutualnet_jax.query import Row  # noqa: E402

METHODS = ('MutualNet', 'US-Net', 'US-Net+', 'Independent', runs_lib.ABLATION)
FIXED_BUDGETS = (1.0, 3.0, 6.0, 15.0, 30.0)  # MFLOPs, besides the MACs of each width at 28 px / independent net
COLOURS = {'MutualNet': 'C3', 'US-Net': 'C0', 'US-Net+': 'C2', 'Independent': 'C7', runs_lib.ABLATION: 'C1'}
FULL = (1.0, 28)


def _git(*args: str) -> str:
  try:
    return subprocess.run(['git', *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


# ----------------------------------------------------------------------------------------------------------------------
# Loading.

def load(out: Path) -> tuple[dict[str, dict[int, list[Row]]], dict[str, list[str]]]:
  """{method: {seed: rows}} and {'present': [...], 'missing': [...]} run names."""
  tables: dict[str, dict[int, list[Row]]] = {m: {} for m in METHODS}
  status = {'present': [], 'missing': []}
  for run in runs_lib.RUNS:
    try:
      rows, _ = query.read_table(str(out / run.name))
    except UserError:
      status['missing'].append(run.name)
      continue
    status['present'].append(run.name)
    if run.tag:
      tables.setdefault(run.tag, {})[run.seed] = rows
    elif run.method == 'mutualnet':
      tables['MutualNet'][run.seed] = rows
    elif run.method == 'usnet':
      tables['US-Net+'][run.seed] = rows
      tables['US-Net'][run.seed] = [r for r in rows if r.resolution == max(runs_lib.SWEEP_RESOLUTIONS)]
    else:
      tables['Independent'].setdefault(run.seed, []).extend(
          r for r in rows if (r.width, r.resolution) == (run.width, run.resolution))
  return {m: t for m, t in tables.items() if t}, status


def mean_rows(per_seed: dict[int, list[Row]]) -> tuple[list[Row], dict[tuple[float, int], tuple[float, float, int]]]:
  """Rows with top-1/top-5 averaged over seeds per (width, resolution), and {(w, r): (mean, half-range, n)}."""
  by_config: dict[tuple[float, int], list[Row]] = {}
  for rows in per_seed.values():
    for r in rows:
      by_config.setdefault((r.width, r.resolution), []).append(r)
  out, spread = [], {}
  for key, rs in sorted(by_config.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
    top1 = np.array([r.top1 for r in rs])
    out.append(dataclasses.replace(rs[0], top1=float(top1.mean()), top5=float(np.mean([r.top5 for r in rs])),
                                   latency_ms=float(np.median([r.latency_ms for r in rs])),
                                   latency_batch_ms=float(np.median([r.latency_batch_ms for r in rs]))))
    spread[key] = (float(top1.mean()), float((top1.max() - top1.min()) / 2), len(rs))
  return out, spread


@dataclasses.dataclass
class Pick:
  mean: float | None            # top-1 (fraction) averaged over seeds; None when nothing fits in some seed
  half_range: float | None
  n: int
  configs: list[str]            # the configuration each seed picked, 'w@res'


def at_budget(per_seed: dict[int, list[Row]], mflops: float) -> Pick:
  picks, configs = [], []
  for seed in sorted(per_seed):
    fits = [r for r in per_seed[seed] if r.macs <= mflops * 1e6 * (1 + 1e-9)]
    if not fits:
      return Pick(None, None, 0, [])
    best = query.query(fits, budget_mflops=mflops * (1 + 1e-9))
    picks.append(best.top1)
    configs.append(f'{best.width:g}@{best.resolution}')
  a = np.array(picks)
  return Pick(float(a.mean()), float((a.max() - a.min()) / 2), len(a), configs)


def for_budgets(tables: dict[str, dict[int, list[Row]]], method: str) -> dict[int, list[Row]]:
  """Per-seed tables for budget picks; independent networks (separate runs, not every one with every seed) as
  one table of per-network seed means."""
  if method == 'Independent':
    return {0: mean_rows(tables[method])[0]}
  return tables[method]


def budgets(tables: dict[str, dict[int, list[Row]]]) -> list[tuple[float, str]]:
  """(MFLOPs, where it comes from): the MACs of each independent network and of each swept width at the highest
  resolution (the like-for-like budgets: US-Net's own configurations), and FIXED_BUDGETS; ascending."""
  out: dict[float, str] = {}
  top = max(runs_lib.SWEEP_RESOLUTIONS)
  indep = [r for rows in tables.get('Independent', {}).values() for r in rows]
  at_top = [r for m in ('MutualNet', 'US-Net') for rows in tables.get(m, {}).values() for r in rows
            if r.resolution == top]
  for r in indep + at_top:
    out.setdefault(r.macs / 1e6, f'MACs of {r.width:g}@{r.resolution}')
  derived = list(out)
  for b in FIXED_BUDGETS:  # skipped when within 10% of a derived budget (it would repeat the same picks)
    if all(abs(b - d) > 0.1 * d for d in derived):
      out.setdefault(b, 'fixed')
  return sorted(out.items())


# ----------------------------------------------------------------------------------------------------------------------
# Figures.

def overlay_figure(tables: dict[str, dict[int, list[Row]]], path: Path) -> Path:
  """Figs. 4/6: each method's Pareto frontier of seed-averaged configurations, error bars = half-range over seeds,
  faint markers = every (seed, configuration); independent networks as stars, their frontier dotted."""
  seeds = {m: len(tables[m]) for m in METHODS if m in tables and m != 'Independent'}
  fig, ax = plots.axes(f'Fashion-MNIST, MobileNet v1 (small input), {runs_lib.COMMON["num_epochs"]:g} epoch(s)\n' +
                       ', '.join(f'{m}: {n} seed{"s" * (n > 1)}' for m, n in seeds.items()),
                       ylabel='top-1 accuracy (%), Fashion-MNIST test', figsize=(8.4, 5.6))
  for method in METHODS:
    if method not in tables:
      continue
    colour = COLOURS[method]
    rows, spread = mean_rows(tables[method])
    if method == 'Independent':
      x = [r.macs / 1e6 for r in rows]
      y = [100 * r.top1 for r in rows]
      ax.plot(x, y, '*', color='black', markersize=10, label='Independent (one net per point; frontier labelled)',
              zorder=5)
      front = query.pareto_frontier(rows)
      ax.plot([r.macs / 1e6 for r in front], [100 * r.top1 for r in front], ':', color='black', linewidth=1)
      for r in front:  # labelling every star makes them unreadable once the grid is complete
        ax.annotate(f'{r.width:g}@{r.resolution}', (r.macs / 1e6, 100 * r.top1), textcoords='offset points',
                    xytext=(4, -10), fontsize=7)
      continue
    every = [r for rs in tables[method].values() for r in rs]
    if method != 'US-Net+':  # US-Net+'s points include US-Net's: draw each point once
      ax.plot([r.macs / 1e6 for r in every], [100 * r.top1 for r in every], 'o', color=colour, markersize=2.5,
              alpha=0.3)
    else:
      low = [r for r in every if r.resolution != max(runs_lib.SWEEP_RESOLUTIONS)]
      ax.plot([r.macs / 1e6 for r in low], [100 * r.top1 for r in low], 'o', color=colour, markersize=2.5, alpha=0.3)
    front = query.pareto_frontier(rows)
    # US-Net's frontier is US-Net+'s at 28 px: a wide, faint line keeps it visible under US-Net+'s dashes.
    wide = method == 'US-Net'
    ax.errorbar([r.macs / 1e6 for r in front], [100 * r.top1 for r in front],
                yerr=[100 * spread[r.width, r.resolution][1] for r in front], fmt='o', color=colour, markersize=4,
                linewidth=5 if wide else 1.5, alpha=0.45 if wide else 1.0, capsize=3,
                label=f'{method} (Pareto frontier of seed means)', linestyle='--' if method == 'US-Net+' else '-')
  ax.set_xscale('log')
  ax.legend(loc='lower right', fontsize='small')
  return Path(plots.save(fig, path))


# ----------------------------------------------------------------------------------------------------------------------
# Data files.

def write_rows_csv(tables: dict[str, dict[int, list[Row]]], path: Path) -> None:
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['method', 'seed'] + list(query.COLUMNS))
    for method in ('MutualNet', 'US-Net+', 'Independent', runs_lib.ABLATION, *runs_lib.LONGER):
      for seed, rows in sorted(tables.get(method, {}).items()):
        for r in rows:
          w.writerow([method if method != 'US-Net+' else 'US-Net', seed] + [getattr(r, c) for c in query.COLUMNS])


def _pct(x: float | None, hr: float | None = None, n: int = 1) -> str:
  if x is None:
    return '—'
  return f'{100 * x:.2f}' + (f' ± {100 * hr:.2f}' if hr is not None and n > 1 else '')


# ----------------------------------------------------------------------------------------------------------------------
# Verdicts.

def compare(tables, a: str, b: str, grid: Sequence[tuple[float, str]]) -> list[dict]:
  """Per budget where both methods have a configuration: a's and b's picks and the difference of the means."""
  out = []
  for mflops, source in grid:
    pa, pb = at_budget(tables[a], mflops), at_budget(tables[b], mflops)
    if pa.mean is None or pb.mean is None:
      continue
    out.append({'mflops': mflops, 'source': source, a: dataclasses.asdict(pa), b: dataclasses.asdict(pb),
                'diff': pa.mean - pb.mean, 'noise': (pa.half_range or 0) + (pb.half_range or 0),
                'per_seed_all_positive': _per_seed_positive(tables, a, b, mflops)})
  return out


def _per_seed_positive(tables, a: str, b: str, mflops: float) -> bool | None:
  """Whether a beats b in every pairing of a seed of a with a seed of b."""
  va = [at_budget({s: rows}, mflops).mean for s, rows in tables[a].items()]
  vb = [at_budget({s: rows}, mflops).mean for s, rows in tables[b].items()]
  if None in va or None in vb:
    return None
  return min(va) > max(vb)


def _fmt_cmp(c: dict, a: str, b: str) -> str:
  return (f'{c["mflops"]:.2f} MFLOPs: {_pct(c[a]["mean"], c[a]["half_range"], c[a]["n"])} vs '
          f'{_pct(c[b]["mean"], c[b]["half_range"], c[b]["n"])} (Δ {100 * c["diff"]:+.2f} pts)')


def _word(held, robust, c) -> str:
  if not held:
    return 'NOT HELD'
  if len(robust) == len(c):
    return 'HELD (every seed pairing, every budget)'
  return f'HELD on the seed means (every seed pairing at only {len(robust)}/{len(c)} budgets)'


def verdicts(tables, grid) -> tuple[list[str], dict]:
  lines, data = [], {}
  have = lambda *ms: all(m in tables for m in ms)  # noqa: E731

  def above(baseline: str, claim: str) -> list[dict]:
    """'MutualNet above `baseline` at every budget': the verdict line, and the comparison data."""
    c = compare(tables, 'MutualNet', baseline, grid)
    data[f'mutualnet_vs_{baseline.lower().replace("-", "").replace("+", "_plus")}'] = c
    wins = [x for x in c if x['diff'] > 0]
    robust = [x for x in c if x['per_seed_all_positive']]
    lines.append(
        f'**{claim}: {_word(len(wins) == len(c) and c, robust, c)}** here. At the {len(c)} budgets where '
        f'{baseline} has a configuration, MutualNet\'s mean top-1 is higher at {len(wins)}/{len(c)}; at '
        f'{len(robust)}/{len(c)} every MutualNet seed beats every {baseline} seed. '
        + '; '.join(_fmt_cmp(x, 'MutualNet', baseline) for x in c) + '.')
    return c

  # Claim 1: above US-Net at every budget.
  if have('MutualNet', 'US-Net'):
    c = above('US-Net', 'Claim 1 — MutualNet above US-Net at every budget')
    below = [b for b, _ in grid if at_budget(tables['US-Net'], b).mean is None
             and at_budget(tables['MutualNet'], b).mean is not None]
    if below:
      lines[-1] += (f' Below US-Net\'s smallest configuration ({", ".join(f"{b:.2f}" for b in below)} MFLOPs) only '
                    'MutualNet has a model at all.')
    # Claim 2: the gap is largest at small budgets.
    # Like-for-like budgets only (the MACs of US-Net's own configurations): between them US-Net's frontier is a
    # step function, which would inflate the gap at the fixed budgets.
    top = max(runs_lib.SWEEP_RESOLUTIONS)
    like = [x for x in c if x['source'].startswith('MACs of') and x['source'].endswith(f'@{top}')]
    if len(like) >= 2:
      gaps = [(x['mflops'], x['diff']) for x in like]
      biggest = max(gaps, key=lambda g: g[1])
      half = len(gaps) // 2
      small_mean = float(np.mean([g for _, g in gaps[:max(half, 1)]]))
      large_mean = float(np.mean([g for _, g in gaps[max(half, 1):]]))
      held2 = small_mean > large_mean and small_mean > 0 and biggest[0] == gaps[0][0]
      noise_small = max(x['noise'] for x in like[:max(half, 1)])
      data['gap_small_vs_large'] = {'small_mean_gap': small_mean, 'large_mean_gap': large_mean,
                                    'largest_gap_at_mflops': biggest[0], 'largest_gap': biggest[1]}
      lines.append(
          f'**Claim 2 — the MutualNet–US-Net gap is largest at small budgets: {"HELD" if held2 else "NOT HELD"}**. '
          f'At the like-for-like budgets (the MACs of each width at {top} px, where US-Net has exactly that '
          f'configuration): mean gap over the {max(half, 1)} smallest budgets ({gaps[0][0]:.2f}–{gaps[max(half, 1) - 1][0]:.2f} MFLOPs): '
          f'{100 * small_mean:+.2f} pts; over the {len(gaps) - max(half, 1)} larger ones: {100 * large_mean:+.2f} '
          f'pts; the largest gap is {100 * biggest[1]:+.2f} pts at {biggest[0]:.2f} MFLOPs (gaps: '
          + ', '.join(f'{m:.2f}: {100 * g:+.2f}' for m, g in gaps) + '). Criterion: the largest gap at the '
          'smallest budget and a larger mean gap on the small half.'
          + (f' The seed spread at the small budgets (up to ±{100 * noise_small:.2f} pts, summed over the two '
             'methods) is larger than the differences between gaps, so 2 seeds do not resolve this either way.'
             if noise_small > abs(small_mean - large_mean) else ''))

  # Claim 3: above US-Net+.
  if have('MutualNet', 'US-Net+'):
    above('US-Net+', 'Claim 3 — MutualNet above US-Net+ (US-Net evaluated at '
          + '/'.join(map(str, runs_lib.SWEEP_RESOLUTIONS)) + ' px)')

  # Claim 4: same configuration vs an independently trained network.
  if have('MutualNet', 'Independent'):
    _, mspread = mean_rows(tables['MutualNet'])
    _, uspread = mean_rows(tables['US-Net+']) if 'US-Net+' in tables else ({}, {})
    indep, ispread = mean_rows(tables['Independent'])
    rows = []
    for r in sorted(indep, key=lambda r: (-r.resolution, -r.width)):
      key = (r.width, r.resolution)
      if key not in mspread:
        continue
      m, hr, n = mspread[key]
      u = uspread.get(key)
      rows.append({'config': f'{r.width:g}@{r.resolution}', 'mflops': r.macs / 1e6, 'independent': r.top1,
                   'independent_half_range': ispread[key][1], 'independent_seeds': ispread[key][2],
                   'mutualnet': m, 'mutualnet_half_range': hr, 'mutualnet_seeds': n,
                   'mutualnet_seeds_above_independent_mean': sum(x.top1 > r.top1 for rs in tables['MutualNet'].values() for x in rs
                                                if (x.width, x.resolution) == key),
                   'usnet': u[0] if u else None, 'usnet_half_range': u[1] if u else None,
                   'usnet_seeds': u[2] if u else 0})
    data['same_config_vs_independent'] = rows
    full = next((x for x in rows if x['config'] == f'{FULL[0]:g}@{FULL[1]}'), None)
    if full:
      held4 = full['mutualnet'] > full['independent']
      lines.append(
          f'**Claim 4 — MutualNet\'s full configuration (1.0@28) beats an independently trained 1.0@28 network: '
          f'{"HELD" if held4 else "NOT HELD"}**: {_pct(full["mutualnet"], full["mutualnet_half_range"], full["mutualnet_seeds"])}'
          f' vs {_pct(full["independent"], full["independent_half_range"], full["independent_seeds"])} (Δ {100 * (full["mutualnet"] - full["independent"]):+.2f} pts; '
          f'{full["mutualnet_seeds_above_independent_mean"]}/{full["mutualnet_seeds"]} MutualNet seeds above the '
          f'independent network\'s mean over {full["independent_seeds"]} seed(s)).')
    others = [x for x in rows if x is not full]
    if others:
      above = [x for x in others if x['mutualnet'] > x['independent']]
      lines.append(
          f'**Claim 4b — same configuration, other widths/resolutions: MutualNet above the independent network at '
          f'{len(above)}/{len(others)}**: ' + '; '.join(
              f'{x["config"]} {_pct(x["mutualnet"], x["mutualnet_half_range"], x["mutualnet_seeds"])} vs '
              f'{_pct(x["independent"], x["independent_half_range"], x["independent_seeds"])} '
              f'(Δ {100 * (x["mutualnet"] - x["independent"]):+.2f})' for x in others) + '.')

  # Claim 4 again with a longer schedule (same seed as the shorter runs, so the trend is visible).
  if all(m in tables for m in runs_lib.LONGER):
    def full_top1(method: str, seed: int = 0) -> float | None:
      return next((r.top1 for r in tables.get(method, {}).get(seed, []) if (r.width, r.resolution) == FULL), None)
    long_m, long_i = full_top1(runs_lib.LONG_MUTUALNET), full_top1(runs_lib.LONG_INDEPENDENT)
    short_m, short_i = full_top1('MutualNet'), full_top1('Independent')
    data['claim4_longer'] = {'epochs': runs_lib.LONG_EPOCHS, 'mutualnet': long_m, 'independent': long_i,
                             'mutualnet_short': short_m, 'independent_short': short_i}
    if None not in (long_m, long_i):
      trend = (f'; with {runs_lib.COMMON["num_epochs"]:g} epochs (same seed 0) it was {_pct(short_m)} vs '
               f'{_pct(short_i)} (Δ {100 * (short_m - short_i):+.2f})' if None not in (short_m, short_i) else '')
      lines.append(
          f'**Claim 4 with a {runs_lib.LONG_EPOCHS}-epoch schedule (seed 0): '
          f'{"HELD" if long_m > long_i else "NOT HELD"}**: MutualNet 1.0@28 {_pct(long_m)} vs independent '
          f'{_pct(long_i)} (Δ {100 * (long_m - long_i):+.2f} pts){trend}. One seed each: read it against the seed '
          'spread reported above.')
  return lines, data


# ----------------------------------------------------------------------------------------------------------------------
# RESULTS.md.

def _seed_counts(tables: dict[str, dict[int, list[Row]]]) -> str:
  """'2 seeds for 1@28, 1 for the other 15 configurations': seeds per independent configuration, grouped."""
  if 'Independent' not in tables:
    return 'none'
  counts: dict[int, list[str]] = {}
  for (w, r), v in mean_rows(tables['Independent'])[1].items():
    counts.setdefault(v[2], []).append(f'{w:g}@{r}')
  groups = sorted(counts.items(), key=lambda kv: len(kv[1]))
  return ', '.join(f'{n} seed{"s" * (n > 1)} for ' + (', '.join(cfgs) if i < len(groups) - 1 or len(groups) == 1
                                                      else f'the other {len(cfgs)} configurations')
                   for i, (n, cfgs) in enumerate(groups))


def _timing_rows(timings: dict) -> tuple[list[str], float]:
  lines = ['| run | training wall (s) | sweep wall (s) | attempts (train/sweep) |', '|---|---:|---:|---:|']
  total = 0.0
  for run in runs_lib.RUNS:
    t = timings.get('runs', {}).get(run.name)
    if not t:
      continue
    tr = sum(a['seconds'] for a in t.get('train', []))
    sw = sum(a['seconds'] for a in t.get('sweep', []))
    total += tr + sw
    lines.append(f'| {run.name} | {tr:.0f} | {sw:.0f} | {len(t.get("train", []))}/{len(t.get("sweep", []))} |')
  lines.append(f'| **total** | | | {total:.0f} s = {total / 60:.1f} min |')
  return lines, total


def _hours_for(timings: dict, epochs: float, *names: str) -> str:
  """Wall time the named runs would take at `epochs` epochs, scaled from their measured training time."""
  seconds = sum(a['seconds'] for n in names for a in timings.get('runs', {}).get(n, {}).get('train', []))
  if not seconds:
    return 'an unmeasured time'
  return f'{seconds * epochs / runs_lib.COMMON["num_epochs"] / 3600:.1f} h'


def _commands(timings: dict) -> list[str]:
  out = []
  for run in runs_lib.RUNS:
    t = timings.get('runs', {}).get(run.name, {})
    for phase in ('train', 'sweep'):
      if t.get(phase):
        out.append(t[phase][-1]['command'].replace(str(REPO) + '/', ''))
  return out


_FIT = re.compile(r'\[(\d+)\] accuracy/(?:max|fixed)=([0-9.eE+-]+).*?grad_norm=([0-9.eE+-]+).*?'
                  r'loss/(?:max|fixed)=([0-9.eE+-]+)')


def training_fit(out: Path) -> list[dict]:
  """The labelled (full / fixed) network's training accuracy and cross-entropy over the last logged interval of each
  run, parsed from OUT/logs/<run>.train.log (the last occurrence: logs are appended across attempts)."""
  rows = []
  for run in runs_lib.RUNS:
    log = out / 'logs' / f'{run.name}.train.log'
    if not log.exists():
      continue
    found = _FIT.findall(log.read_text())
    if found:
      step, acc, gnorm, loss = found[-1]
      rows.append({'run': run.name, 'step': int(step), 'train_accuracy': float(acc), 'train_ce': float(loss),
                   'grad_norm': float(gnorm)})
  return rows


def write_report(out: Path, docs: Path, timings: dict) -> list[Path]:
  tables, status = load(out)
  data_dir = docs / 'reproduce'
  data_dir.mkdir(parents=True, exist_ok=True)
  written: list[Path] = []
  if not tables:
    print('report: no swept runs yet', file=sys.stderr)
    return written
  grid = budgets(tables)

  # Data files.
  write_rows_csv(tables, data_dir / 'query_tables.csv')
  written.append(data_dir / 'query_tables.csv')
  budget_rows = []
  for mflops, source in grid:
    row = {'mflops': mflops, 'source': source}
    for m in METHODS:
      if m in tables:
        p = at_budget(for_budgets(tables, m), mflops)
        row[m] = dataclasses.asdict(p)
    budget_rows.append(row)
  with open(data_dir / 'budgets.csv', 'w', newline='') as f:
    w = csv.writer(f)
    present = [m for m in METHODS if m in tables]
    w.writerow(['mflops', 'source'] + [f'{m} {k}' for m in present for k in ('mean_top1', 'half_range', 'seeds',
                                                                          'configs')])
    for row in budget_rows:
      w.writerow([row['mflops'], row['source']] + [x for m in present for x in (
          row[m]['mean'], row[m]['half_range'], row[m]['n'], ' '.join(row[m]['configs']))])
  written.append(data_dir / 'budgets.csv')
  verdict_lines, verdict_data = verdicts(tables, grid)
  (data_dir / 'summary.json').write_text(json.dumps(
      {'budgets': budget_rows, 'verdicts': verdict_data, 'runs': status, 'training_fit': training_fit(out),
       'seed_means': {m: [dict(width=r.width, resolution=r.resolution, macs=r.macs, top1=r.top1,
                               half_range=mean_rows(t)[1][r.width, r.resolution][1],
                               seeds=mean_rows(t)[1][r.width, r.resolution][2]) for r in mean_rows(t)[0]]
                      for m, t in tables.items()}}, indent=1))
  written.append(data_dir / 'summary.json')

  # Figures.
  written.append(overlay_figure(tables, data_dir / 'overlay.png'))
  if 'MutualNet' in tables:
    rows, _ = mean_rows(tables['MutualNet'])
    written.append(plots.accuracy_macs(rows, data_dir / 'mutualnet_fig5.png',
                                       title=f'MutualNet, mean of {len(tables["MutualNet"])} seed(s): '
                                             'configurations by resolution'))
  if 'US-Net+' in tables:
    rows, _ = mean_rows(tables['US-Net+'])
    written.append(plots.accuracy_macs(rows, data_dir / 'usnet_plus_fig5.png',
                                       title=f'US-Net evaluated at every resolution (US-Net+), mean of '
                                             f'{len(tables["US-Net+"])} seed(s)'))

  # Markdown.
  invocations = timings.get('invocations', [])
  commits = sorted({i['commit'] for i in invocations})
  dirty = sorted({d for i in invocations for d in i.get('dirty_library_files', [])})
  timing_lines, total = _timing_rows(timings)
  present = [m for m in METHODS if m in tables]
  c = runs_lib.COMMON
  md = [
      '# Reproducing MutualNet\'s claims at CPU scale (Fashion-MNIST)',
      '',
      f'_Generated by `benchmarks/reproduce/run.py` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} '
      'UTC from the runs\' query tables; do not edit by hand (re-run the command below)._',
      '',
      '## Setup',
      '',
      '- **Data**: Fashion-MNIST (offline raw files, `MUTUALNET_FASHION_MNIST_DIR`), 60k train / 10k test; top-1 on '
      'the full 10k test split. BN statistics of every (width, resolution) are recalibrated on 2000 training images '
      'before evaluation (the sweep), for every method alike.',
      '- **Model**: MobileNet v1, small-input variant (`num_downsample=4`), parameters at width 1.0; sub-networks '
      'are the first `width x channels` of every layer. Full network 1.0@28: '
      + (f'{next(r.macs for rs in tables[present[0]].values() for r in rs if (r.width, r.resolution) == FULL) / 1e6:.2f}'
         if any((r.width, r.resolution) == FULL for rs in tables[present[0]].values() for r in rs) else '?')
      + ' MFLOPs (multiply-adds).',
      f'- **Same training budget for every run**: {c["num_epochs"]:g} epoch{"s" * (c["num_epochs"] != 1)} = {int(c["num_epochs"] * (60000 // c["batch_size"]))} '
      f'steps of batch {c["batch_size"]}, SGD Nesterov momentum 0.9, lr {c["learning_rate"]} after a '
      f'{c["warmup_epochs"]}-epoch linear warm-up, then cosine decay, '
      f'weight decay {c["weight_decay"]}, pad-crop + flip augmentation; seeds as listed. Only `config.method` (and '
      'for independent networks the one width/resolution) differs.',
      '- **MutualNet**: each step trains the full network (1.0@28, labels) plus min width 0.25 and 2 random widths '
      '(grid step 0.25), each at a resolution drawn from {28, 24, 20, 16}, distilled from the full network '
      '(in-place distillation, KL).',
      '- **US-Net**: the same sandwich of widths and distillation, all at 28 px. **US-Net+**: the US-Net model '
      'evaluated at every resolution (28, 24, 20, 16), i.e. the paper\'s "US-Net + resolution at test time".',
      '- **Independent**: one network per (width, resolution), trained alone with labels; it does 1 forward/backward '
      'per step where MutualNet/US-Net do 4 (same steps, epochs and images; as in the paper, the budget is the '
      'training schedule, not the FLOPs).',
      *([f'- **Longer schedule** (claim 4 only): MutualNet seed 0 and the independent 1.0@28 network seed 0 '
         f'again with `--config.num_epochs={runs_lib.LONG_EPOCHS}`, everything else unchanged.']
        if all(m in tables for m in runs_lib.LONGER) else []),
      *([f'- **Diagnostic** ({runs_lib.ABLATION}): MutualNet with `--config.inplace_distillation=False` (every '
         'sub-network learns from the labels), to test whether distilling from a not yet converged full network explains '
         'the gap to the independent networks. Not part of the claims.'] if runs_lib.ABLATION in tables else []),
      '- Sweep grid for MutualNet and US-Net: widths {1.0, 0.75, 0.5, 0.25} x resolutions {28, 24, 20, 16} (the '
      'whole trained width grid). Independent networks: their own configuration only.',
      f'- **Runs present**: {", ".join(status["present"])}.'
      + (f' **Not run (time budget)**: {", ".join(status["missing"])}.' if status['missing'] else ''),
      f'- **Commit** of the code the runs used: {", ".join(f"`{x}`" for x in commits) or "unknown"}; report '
      f'generated at `{_git("rev-parse", "HEAD")}`.'
      + (f' Library files had uncommitted edits while runs started ({"; ".join(f"`{d.strip()}`" for d in dirty)}).'
         if dirty else ''),
      '- Machine: 2 CPU cores (no accelerator), shared with other jobs during the runs, so wall times are upper '
      'bounds.',
      '',
      '## Commands',
      '',
      'Everything (training resumes; finished trainings and current sweeps are skipped), in the background:',
      '',
      '```',
      'export MUTUALNET_FASHION_MNIST_DIR=/usr/share/datasets/fashion-mnist',
      'nohup python benchmarks/reproduce/run.py --out=benchmarks/results/reproduce > reproduce.log 2>&1 &',
      'python benchmarks/reproduce/run.py --out=benchmarks/results/reproduce --report_only   # figures + this file',
      '```',
      '',
      'The individual commands it ran (last attempt of each; the run list is `benchmarks/reproduce/runs.py`):',
      '',
      '```',
      *_commands(timings),
      '```',
      '',
      '## Wall times (2 shared CPU cores)',
      '',
      *timing_lines,
      '',
      'Pipeline invocations: ' + '; '.join(f'{i["start"]} → {i.get("end", "(interrupted or running)")}'
                                         + (f' ({i["seconds"] / 60:.1f} min)' if 'seconds' in i else '')
                                         for i in invocations) + '.',
      '',
      '## Figures',
      '',
      'Accuracy–MFLOPs of every method (Figs. 4/6 of the paper): lines are Pareto frontiers of the seed-averaged '
      'configurations, error bars the half-range over seeds, faint dots every (seed, configuration); stars the '
      'independently trained networks, the dotted line and labels their frontier. Log x axis.',
      '',
      '![overlay](reproduce/overlay.png)',
      '',
      'MutualNet\'s configurations coloured by resolution (Fig. 5 of the paper), seed means, with the Pareto frontier; '
      'and the same for the US-Net model (US-Net+) for comparison:',
      '',
      '![MutualNet Fig. 5](reproduce/mutualnet_fig5.png) ![US-Net+](reproduce/usnet_plus_fig5.png)',
      '',
      '## Accuracy at matched MACs budgets',
      '',
      'Best top-1 (%) among configurations with MACs ≤ the budget, chosen per seed, then mean ± half-range over '
      'seeds (no ± for a single seed); the configuration(s) picked as width@resolution. Budgets: the MACs of each '
      'width at 28 px (= US-Net\'s own configurations and the independent networks at 28 px), of any other '
      'independent network, plus fixed ones in between. "—": no configuration fits.',
      '',
      '| MFLOPs | budget from | ' + ' | '.join(present) + ' |',
      '|---:|---|' + '---|' * len(present),
  ]
  for row in budget_rows:
    cells = []
    for m in present:
      p = row[m]
      cells.append('—' if p['mean'] is None else
                   f'{_pct(p["mean"], p["half_range"], p["n"])} ({", ".join(p["configs"])})')
    md.append(f'| {row["mflops"]:.2f} | {row["source"]} | ' + ' | '.join(cells) + ' |')
  md += ['', '## Same configuration, different training', '',
         'Top-1 (%) of one (width, resolution) taken from each model (seed mean ± half-range).', '',
         '| config | MFLOPs | Independent (seeds) | MutualNet | US-Net / US-Net+ |', '|---|---:|---:|---:|---:|']
  for x in verdict_data.get('same_config_vs_independent', []):
    md.append(f'| {x["config"]} | {x["mflops"]:.2f} | '
              f'{_pct(x["independent"], x["independent_half_range"], x["independent_seeds"])} ({x["independent_seeds"]}) | '
              f'{_pct(x["mutualnet"], x["mutualnet_half_range"], x["mutualnet_seeds"])} | '
              f'{_pct(x["usnet"], x["usnet_half_range"], x["usnet_seeds"])} |')
  accs = [r.top1 for t in tables.values() for rs in t.values() for r in rs]
  acc_lo, acc_hi, n_test = min(accs), max(accs), 10_000
  se = lambda p: (p * (1 - p) / n_test) ** 0.5  # noqa: E731
  se_lo, se_hi = sorted((se(acc_lo), se(acc_hi)))
  se_hi = max(se_hi, se(0.5) if acc_lo <= 0.5 <= acc_hi else se_hi)
  macs_full = {r.resolution: r.macs for t in tables.values() for rs in t.values() for r in rs if r.width == 1.0}
  every_macs = [r.macs for t in tables.values() for rs in t.values() for r in rs]
  macs_span = max(every_macs) / min(every_macs)
  paper = {(p.width, p.resolution): p.macs for p in profile.profile_grid(
      dict(name='mobilenet_v1', num_classes=1000, num_downsample=5), [0.25, 1.0], [128, 224])}
  paper_span = paper[1.0, 224] / paper[0.25, 128]
  fit = [f for f in training_fit(out) if f['run'] in status['present']]  # finished and swept runs only
  if fit:
    md += ['', '## Training-set fit of the labelled network', '',
           'From the training logs: top-1 and cross-entropy of the network trained with labels (1.0@28 for MutualNet '
           'and US-Net; the one network of an independent run) on the augmented training batches of the last logged '
           'interval (the last `log_every_steps` steps or fewer), and the norm of the (summed) gradient. A lower '
           'training accuracy means the network is further from fitting the data at the end of the budget.', '',
           '| run | step | train top-1 (%) | train CE | gradient norm |', '|---|---:|---:|---:|---:|']
    md += [f'| {f["run"]} | {f["step"]} | {100 * f["train_accuracy"]:.2f} | {f["train_ce"]:.3f} | '
           f'{f["grad_norm"]:.2f} |' for f in fit]
  by_name = {r.name: r for r in runs_lib.RUNS}
  full_fit = {k: [f['train_accuracy'] for f in fit if f['run'].startswith(k) and not by_name[f['run']].tag]
              for k in ('mutualnet', 'usnet', f'independent_w{FULL[0]:g}_r{FULL[1]}')}
  if runs_lib.ABLATION in tables and 'MutualNet' in tables:
    abl, _ = mean_rows(tables[runs_lib.ABLATION])
    _, mspread = mean_rows(tables['MutualNet'])
    _, ispread = mean_rows(tables['Independent']) if 'Independent' in tables else (None, {})
    top = max(runs_lib.SWEEP_RESOLUTIONS)
    cells, gains = [], []
    for r in sorted((r for r in abl if r.resolution == top), key=lambda r: -r.width):
      key = (r.width, r.resolution)
      ind = ispread.get(key)
      gains.append((100 * (r.top1 - mspread[key][0]), 100 * mspread[key][1]))
      cells.append(f'{r.width:g}@{top}: {100 * r.top1:.2f} vs MutualNet {100 * mspread[key][0]:.2f}'
                   + (f' vs independent {100 * ind[0]:.2f}' if ind else ''))
    above = [g for g, _ in gains if g > 0]
    beyond_spread = min(g for g, _ in gains) > max(h for _, h in gains)  # every width, by more than the seed noise
    verdict_lines.append(
        f'Diagnostic ({runs_lib.ABLATION}, {len(tables[runs_lib.ABLATION])} seed(s); sub-networks trained on the '
        'labels instead of the full network\'s prediction, everything else as MutualNet; not one of the paper\'s '
        'methods): ' + '; '.join(cells) + f'. Without in-place distillation the model is above MutualNet\'s seed '
        f'mean at {len(above)}/{len(gains)} of these widths (differences {min(g for g, _ in gains):+.2f} to '
        f'{max(g for g, _ in gains):+.2f} pts, against a MutualNet seed half-range of up to '
        f'±{max(h for _, h in gains):.2f})' + (': at this budget, distilling from the not yet converged full '
                                                'network costs accuracy rather than adding it' if beyond_spread
                                                else '') + '.')
  m, u, i = (100 * float(np.mean(v)) if v else float('nan') for v in full_fit.values())
  abl_fit = [100 * f['train_accuracy'] for f in fit if by_name[f['run']].tag == runs_lib.ABLATION]
  if i > m:  # (False when a value is missing: NaN compares False)
    if abl_fit and abl_fit[0] >= i - (i - m) / 2:
      # The diagnostic shares the weights the same way but without distillation: if its full network fits about as
      # well as the independent one, weight sharing itself is not what slows MutualNet's full network.
      reading = (f' and {abl_fit[0]:.1f}% ({runs_lib.ABLATION}), means over seeds (training-fit table below). The '
                 'diagnostic shares the weights across the same widths and resolutions and still fits about as well '
                 'as the independent network (one seed), so weight sharing alone does not explain the gap; it points '
                 'at distilling from a not yet converged full network instead')
    else:
      reading = (', means over seeds (training-fit table below). That is consistent with the shared weights being '
                 'pulled towards narrower, lower-resolution sub-networks slowing the full network\'s fitting in this '
                 'short schedule')
    verdict_lines.append(
        f'Context for claim 4: at the end of the budget the labelled full network fits the augmented training '
        f'batches to {m:.1f}% (MutualNet), {u:.1f}% (US-Net), {i:.1f}% (independent 1.0@28)' + reading +
        '. The paper\'s claim is about converged training, where it argues that sharing acts as a regulariser. '
        'What was tried: '
        f'the same schedule and seeds for all methods, {len(full_fit["mutualnet"])} MutualNet seed(s) and '
        f'{len(full_fit[f"independent_w{FULL[0]:g}_r{FULL[1]}"])} independent seed(s); no per-method tuning'
        + ('; and the in-place-distillation diagnostic above' if runs_lib.ABLATION in tables else '')
        + (f'; and a {runs_lib.LONG_EPOCHS}-epoch schedule for both (the claim-4 line above)'
           if all(m in tables for m in runs_lib.LONGER) else '')
        + '. Not tried (time): a schedule near convergence, e.g. `--config.num_epochs=20` for MutualNet and the '
        f'independent 1.0@28 network (about '
        f'{_hours_for(timings, 20, "mutualnet_s0", f"independent_w{FULL[0]:g}_r{FULL[1]}_s0")} on these 2 cores, '
        'from this run\'s training times).')
  for method in ('MutualNet', 'US-Net+'):
    if len(tables.get(method, {})) > 1:
      _, sp = mean_rows(tables[method])
      key = max(sp, key=lambda k: sp[k][1])
      values = [f'seed {seed}: {100 * r.top1:.2f}' for seed, rows in sorted(tables[method].items()) for r in rows
                if (r.width, r.resolution) == key]
      verdict_lines.append(f'Largest seed disagreement of {method.rstrip("+")}: {key[0]:g}@{key[1]} '
                           f'({", ".join(values)})'
                           + ('; the narrowest width is the least stable across seeds at this budget.'
                              if key[0] == min(runs_lib.SWEEP_WIDTHS) else '.'))
  verdict_block = ['## Verdicts, claim by claim', '', *[f'- {l}' for l in verdict_lines], '',
         f'Noise scale: with {n_test} test images the binomial standard error of one accuracy is '
         f'{100 * se_lo:.2f}–{100 * se_hi:.2f} points over the accuracies measured here ({100 * acc_lo:.1f}–'
         f'{100 * acc_hi:.1f}%); the seed half-ranges above show the training noise. Differences '
         'smaller than these are not evidence either way.', '']
  md[4:4] = verdict_block  # right after the title: the answer first, the evidence below
  fit_acc = [f['train_accuracy'] for f in fit] or [float('nan')]
  md += ['', '## Limitations', '',
         f'- {c["num_epochs"]:g} epoch{"s" * (c["num_epochs"] != 1)} of training ({int(c["num_epochs"] * (60000 // c["batch_size"]))} steps) on '
         '2 CPU cores: far from convergence (the paper trains 250 epochs on ImageNet); only claim 4 was re-checked '
         f'with {runs_lib.LONG_EPOCHS} epochs, one seed. Rankings at this budget need not hold at convergence and '
         'vice versa.',
         f'- At this budget every network is far from converged: the best configuration of any run reaches '
         f'{100 * acc_hi:.1f}% top-1, and the labelled networks fit their augmented training batches to only '
         f'{100 * min(fit_acc):.1f}–{100 * max(fit_acc):.1f}% (training-fit table): under-fitted, not '
         'converged. MutualNet and US-Net update '
         'the shared weights through 4 sub-networks per step (summed gradients) and the independent networks '
         'through 1: equal steps and images, as in the paper, but not equal compute, and a comparison in the early, '
         'under-fitted phase of training says little about the converged one the paper reports.',
         '- Fashion-MNIST at 28 px and below, not ImageNet at 224 px; the resolution range (28→16) and width range '
         f'(0.25–1.0) span {macs_span:.0f}x in MACs here (the paper\'s MobileNet v1 grid, 0.25@128 to 1.0@224, '
         f'spans {paper_span:.0f}x).',
         '- MACs of width 1.0 at ' + '/'.join(str(r) for r in runs_lib.SWEEP_RESOLUTIONS) + ' px: ' + '/'.join(
             f'{macs_full.get(r, float("nan")) / 1e6:.2f}' for r in runs_lib.SWEEP_RESOLUTIONS) + ' M. With 4 '
         'stride-2 layers and SAME padding the feature maps are rounded up at each stride, so neighbouring '
         'resolutions can differ little in cost (e.g. 24 and 20 px both end at 2x2); the resolution axis gives '
         'coarser cost steps than (r/28)^2 suggests.',
         '- Widths on a 0.25 grid (4 widths) instead of the paper\'s 0.05; so US-Net has only 4 configurations and '
         'between them its frontier is a step function; budgets equal to an independent network\'s MACs are the '
         'like-for-like comparison.',
         f'- {len(tables.get("MutualNet", {}))} seed(s) for MutualNet, {len(tables.get("US-Net", {}))} for US-Net, '
         f'{_seed_counts(tables)} for the independent networks: a half-range over 2 seeds is a crude spread, not '
         'a confidence interval.',
         '- No per-method tuning: every method uses the same settings (the 0.1-epoch warm-up default was chosen '
         'on the MutualNet quickstart, see configs/default.py).', '']
  (docs / 'RESULTS.md').write_text('\n'.join(md))
  written.append(docs / 'RESULTS.md')
  return written
