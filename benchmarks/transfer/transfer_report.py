"""The transfer experiment's report: fine-tuned runs' query tables -> verdict records (the reproduction's rule,
benchmarks/reproduce/verdicts.py) -> docs/TRANSFER.md, docs/transfer/{verdicts.json, query_tables.csv,
accuracy_macs.png}. Numbers come from the data: accuracies, MACs and eval-image counts from the query tables,
settings, steps and image counts from the runs' config.json and logs as run.py recorded them in timings.json.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
for p in (str(HERE), str(HERE.parent / 'reproduce'), str(HERE.parent.parent)):
  if p not in sys.path:
    sys.path.append(p)

import experiment  # noqa: E402
import report as reproduce_report  # noqa: E402  benchmarks/reproduce/report.py
import training_log  # noqa: E402  benchmarks/reproduce/training_log.py
import verdicts as vd  # noqa: E402  benchmarks/reproduce/verdicts.py: the house rule

from mutualnet_jax import plots, query  # noqa: E402
from mutualnet_jax.errors import UserError  # noqa: E402
from mutualnet_jax.query import Row  # noqa: E402

SERIES = tuple(experiment.SOURCES)
MUTUALNET, USNET, INDEPENDENT, SCRATCH = SERIES
# (claim, statement, a, b, kind): every one is a - b at the MACs of each of b's configurations.
CLAIMS = (
    ('T1', 'a MutualNet-pre-trained backbone fine-tunes better than a US-Net-pre-trained one at every budget',
     MUTUALNET, USNET, 'claim'),
    ('T2', 'a MutualNet-pre-trained backbone fine-tunes better than an independently pre-trained one at every budget',
     MUTUALNET, INDEPENDENT, 'claim'),
    ('T3', 'pre-training on classes 0-4 helps at every budget (against the same recipe from scratch)',
     MUTUALNET, SCRATCH, 'context'),
    ('T3', 'pre-training on classes 0-4 helps at every budget (against the same recipe from scratch)',
     USNET, SCRATCH, 'context'),
    ('T3', 'pre-training on classes 0-4 helps at every budget (against the same recipe from scratch)',
     INDEPENDENT, SCRATCH, 'context'),
)
FACTS = (('dataset', 'dataset'), ('train_split', 'training split'), ('train_images', 'training images'),
         ('eval_split', 'eval split'), ('eval_split_images', 'eval images'), ('augmentation', 'augmentation'),
         ('width_range', 'width range'), ('resolutions', 'resolutions'), ('num_epochs', 'epochs'),
         ('total_steps', 'steps'), ('batch_size', 'batch'), ('learning_rate', 'learning rate (cosine)'),
         ('warmup_epochs', 'warm-up epochs'), ('model', 'model'), ('num_downsample', 'stride-2 layers'),
         ('calibration_images', 'BN calibration images'))


@dataclasses.dataclass(frozen=True)
class Verdict:
  claim: str
  statement: str
  a: str
  b: str
  kind: str
  comparisons: tuple[vd.Comparison, ...]

  @property
  def status(self) -> str:
    return vd.overall([c.status for c in self.comparisons])

  def count(self, status: str) -> int:
    return sum(c.status == status for c in self.comparisons)

  def as_dict(self) -> dict[str, Any]:
    return {'claim': self.claim, 'statement': self.statement, 'a': self.a, 'b': self.b, 'kind': self.kind,
            'status': self.status, **{s.replace(' ', '_'): self.count(s) for s in (vd.HELD, vd.NOT_HELD,
                                                                                   vd.INCONCLUSIVE)},
            'comparisons': [{**dataclasses.asdict(c), 'diff': c.diff, 'noise': c.noise, 'status': c.status}
                            for c in self.comparisons]}


@dataclasses.dataclass
class Data:
  tables: vd.Tables                       # {series: {seed: rows}}
  run_rows: dict[str, list[Row]]          # per swept fine-tuning run
  missing: list[str]                      # fine-tuning runs without a table
  eval_images: int | None
  facts: dict[str, dict[str, list[Any]]]  # phase -> fact -> distinct values
  fit: list[dict[str, Any]]               # pre-training runs' last logged training fit
  seconds: dict[str, float]               # phase -> wall seconds of every recorded attempt
  not_applied: list[str]                  # fine-tuning runs whose log shows no init_from load
  sources: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # pre-training runs: flatness, norms


FLAT = 0.10  # a source's training loss has flattened when its last quarter is less than this much below the one before


def loss_flattening(losses: Sequence[float]) -> dict[str, Any] | None:
  """The mean of the last quarter of a training cross-entropy curve against the quarter before, and whether the
  relative drop is below FLAT; None with fewer than 8 logged points."""
  if len(losses) < 8:
    return None
  q = len(losses) // 4
  before, last = sum(losses[-2 * q:-q]) / q, sum(losses[-q:]) / q
  drop = (before - last) / before
  return {'before': before, 'last': last, 'drop': drop, 'flattened': drop < FLAT}


def source_facts(out: Path, timings: dict, runs: Sequence[experiment.TransferRunSpec]) -> list[dict[str, Any]]:
  """Per pre-training run: its loss flattening, its held-out top-1 at experiment.SOURCE_CONFIGS and its recorded
  kernel-norm growth (run.py, kernel_norms.py)."""
  facts = []
  for r in (r for r in runs if r.phase == 'pretrain'):
    found = table_of(out, r)
    top1 = {(row.width, row.resolution): row.top1 for row in found[0]} if found else {}
    facts.append({'run': r.name, 'method': r.method, 'seed': r.seed,
                  'loss': loss_flattening(training_log.losses(training_log.path(out, r.name))
                                          or (experiment.RECORDS.load(r.name) or {}).get('losses', [])),
                  'held_out_top1': [top1.get((float(w), int(res))) for w, res in experiment.SOURCE_CONFIGS],
                  'kernel_norms': timings.get('runs', {}).get(r.name, {}).get('kernel_norms')})
  return facts


def table_of(out: Path, run: experiment.TransferRunSpec) -> tuple[list[Row], dict[str, Any]] | None:
  """A run's query table from its workdir, else from its record; None when it has neither."""
  try:
    return query.read_table(str(out / run.name))
  except UserError:
    record = experiment.RECORDS.load(run.name)
    return ([query._row(r) for r in record['table']['rows']], record['table'].get('meta', {})) if record else None  # pylint: disable=protected-access


def load(out: Path, timings: dict, runs: Sequence[experiment.TransferRunSpec]) -> Data:
  """Everything the report shows, from OUT and, for runs OUT lacks, their records."""
  timings = experiment.RECORDS.merged_timings(timings, [r.name for r in runs])
  tables: vd.Tables = {}
  run_rows, missing, counts = {}, [], set()
  for run in (r for r in runs if r.phase == 'finetune'):
    found = table_of(out, run)
    if found is None:
      missing.append(run.name)
      continue
    rows, meta = found
    run_rows[run.name] = rows
    counts.add(meta.get('eval_images'))
    tables.setdefault(run.series, {})[run.seed] = rows
  counts.discard(None)
  facts: dict[str, dict[str, list[Any]]] = {}
  seconds: dict[str, float] = {}
  for run in runs:
    record = timings.get('runs', {}).get(run.name, {})
    for key, value in record.get('facts', {}).items():
      values = facts.setdefault(run.phase, {}).setdefault(key, [])
      if value not in values:
        values.append(value)
    for phase in ('train', 'sweep'):
      key = f'{run.phase} {phase}' if phase == 'train' else phase
      seconds[key] = seconds.get(key, 0.0) + sum(a.get('seconds', 0.0) for a in record.get(phase, []))
  not_applied = [r.name for r in runs if timings.get('runs', {}).get(r.name, {}).get('init_from_applied') is False]
  fit = reproduce_report.training_fit(out, [r.name for r in runs if r.phase == 'pretrain'], experiment.RECORDS)
  return Data(tables, run_rows, missing, min(counts) if counts else None, facts, fit, seconds, not_applied,
              source_facts(out, timings, runs))


def compute(data: Data) -> list[Verdict]:
  """Every claim whose two series have tables."""
  if not data.eval_images:
    return []
  return [Verdict(claim, statement, a, b, kind, tuple(vd.above_at_budgets(data.tables, a, b, data.eval_images)))
          for claim, statement, a, b, kind in CLAIMS if data.tables.get(a) and data.tables.get(b)]


# ----------------------------------------------------------------------------------------------------------------------
# Files.

def figure(data: Data, path: Path) -> Path:
  """Each series' Pareto frontier of seed means over its swept configurations (faint: every configuration)."""
  seeds = sorted({len(data.tables[s]) for s in SERIES if data.tables.get(s)})
  series = {s: reproduce_report.seed_mean_rows(data.tables[s]) for s in SERIES if data.tables.get(s)}
  return Path(plots.overlay(series, path, title=(
      f'Fine-tuned on Fashion-MNIST classes 5-9 from {labelled_images():,} images\n'
      f'Pareto frontiers of seed means ({"/".join(map(str, seeds))} seeds per series)')))


def write_data(data: Data, verdicts: Sequence[Verdict], folder: Path) -> list[Path]:
  folder.mkdir(parents=True, exist_ok=True)
  by_name = {r.name: r for r in experiment.runs()}
  with open(folder / 'query_tables.csv', 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['series', 'seed', 'run'] + list(query.COLUMNS))
    for name, rows in data.run_rows.items():
      w.writerows([by_name[name].series, by_name[name].seed, name] + [getattr(r, c) for c in query.COLUMNS]
                  for r in rows)
  (folder / 'verdicts.json').write_text(json.dumps({
      'rule': vd.RULE, 'k': vd.K, 'eval_images': data.eval_images, 'facts': data.facts, 'missing': data.missing,
      'init_from_not_applied': data.not_applied, 'pretraining_fit': data.fit, 'sources': data.sources,
      'verdicts': [v.as_dict() for v in verdicts]}, indent=1))
  written = [folder / 'query_tables.csv', folder / 'verdicts.json']
  if data.run_rows:
    written.append(figure(data, folder / 'accuracy_macs.png'))
  return written


# ----------------------------------------------------------------------------------------------------------------------
# Markdown.

def _pct(x: float) -> str:
  return f'{100 * x:.2f}'


def labelled_images() -> int:
  """The fine-tuning's labelled images (its train split, train[:N])."""
  return int(experiment.FINETUNE_SETTINGS['train_split'].split(':')[1].rstrip(']'))


def render_sources(sources: Sequence[dict[str, Any]]) -> list[str]:
  """The pre-trained sources beside the verdicts: has each one's training loss flattened, and how far its conv
  kernels grew (the effective learning rate of a kernel followed by BN is about lr / ‖w‖²)."""
  held_out = ' / '.join(f'{w:g}@{r}' for w, r in experiment.SOURCE_CONFIGS)
  lines = ['| source | training CE, last quarter (before) | flattened | held-out top-1 % ' + held_out
           + ' | ‖W‖ / ‖W_init‖, whole | width-0.25 slice |', '|---|---|---|---|---:|---:|']
  for src in sources:
    loss, norms = src['loss'], src['kernel_norms']
    top1 = src.get('held_out_top1') or [None] * len(experiment.SOURCE_CONFIGS)
    lines.append(f'| {src["run"]} | ' + (f'{loss["last"]:.3f} ({loss["before"]:.3f}, {-100 * loss["drop"]:+.1f} %) | '
                                          f'{"yes" if loss["flattened"] else "no"}' if loss else '— | —') + ' | '
                 + ' / '.join('—' if t is None else _pct(t) for t in top1) + ' | '
                 + (f'{norms["whole"]:.2f} | {norms["narrow"]:.2f}' if norms else '— | —') + ' |')
  return lines + ['', f'Flattened: the last quarter of the logged training cross-entropy is less than '
                  f'{100 * FLAT:.0f} % below the quarter before (under a cosine schedule the loss keeps falling as the '
                  'learning rate anneals, so "no" can also mean a model still improving at the end; the held-out '
                  'top-1, on the test images of the pre-training classes, says how well trained the source is). '
                  'Kernel norms: every conv kernel of the tree (the classifier excluded), and the slice the '
                  'width-0.25 sub-network reads, against the same seed\'s initialisation '
                  '(`benchmarks/transfer/kernel_norms.py`).']


def _est(est: vd.Estimate | None) -> str:
  return '—' if est is None else f'{_pct(est.mean)} ± {_pct(est.noise)} ({", ".join(est.picks)})'


def render_verdicts(verdicts: Sequence[Verdict]) -> list[str]:
  """One line per record, then every budget's difference of every record (a - b, percentage points)."""
  lines = []
  for v in verdicts:
    counts = (f'{v.count(vd.HELD)} held, {v.count(vd.NOT_HELD)} not held, {v.count(vd.INCONCLUSIVE)} inconclusive '
              f'of {len(v.comparisons)} budgets')
    lines.append(f'- **{v.claim} — {v.statement}: {v.status}** ({counts}).' if v.kind == 'claim' else
                 f'- {v.claim} (context) — {v.a} against {v.b}: {v.status} ({counts}).')
  budgets = sorted({c.mflops for v in verdicts for c in v.comparisons})
  lines += ['', 'Per budget, Δ = a - b in points (threshold ±2 sigma_d) and its status:', '',
            '| MFLOPs | ' + ' | '.join(f'{v.claim}: {v.a} - {v.b}' for v in verdicts) + ' |',
            '|---:|' + '---|' * len(verdicts)]
  for mflops in budgets:
    cells = []
    for v in verdicts:
      c = next((c for c in v.comparisons if c.mflops == mflops), None)
      cells.append('—' if c is None else f'{100 * c.diff:+.2f} (±{100 * vd.K * c.noise:.2f}) {c.status}')
    lines.append(f'| {mflops:.2f} | ' + ' | '.join(cells) + ' |')
  return lines


def render_configurations(data: Data, present: Sequence[str]) -> list[str]:
  """Top-1 of every series at every swept configuration (seed mean ± sigma)."""
  points = {s: vd.per_config(data.tables[s], data.eval_images) for s in present}
  keys = sorted(set().union(*points.values()), key=lambda k: (-k[1], -k[0]))
  lines = ['| configuration | MFLOPs | ' + ' | '.join(present) + ' |', '|---|---:|' + '---:|' * len(present)]
  for k in keys:
    macs = next(points[s][k][0] for s in present if k in points[s])
    cells = [f'{_pct(points[s][k][1].mean)} ± {_pct(points[s][k][1].noise)}' if k in points[s] else '—'
             for s in present]
    lines.append(f'| {vd.config_name(*k)} | {macs / 1e6:.2f} | ' + ' | '.join(cells) + ' |')
  return lines


def _facts(values: dict[str, list[Any]]) -> str:
  def one(v: Any) -> str:
    return ', '.join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
  return '; '.join(f'{label} ' + ' / '.join(f'`{one(v)}`' for v in values[key]) for key, label in FACTS
                   if key in values)


def render(data: Data, verdicts: Sequence[Verdict], timings: dict) -> str:
  present = [s for s in SERIES if data.tables.get(s)]
  invocations = timings.get('invocations', [])
  commit = invocations[-1].get('commit', 'unknown')[:12] if invocations else 'unknown'
  lines = [
      '# Transfer: fine-tuning MutualNet-, US-Net- and independently pre-trained backbones',
      '',
      (f'Generated by `python benchmarks/transfer/run.py` ({datetime.date.today():%Y-%m-%d}, last run at commit '
       f'{commit}); do not edit by hand. In the spirit of the paper\'s transfer experiment (Sec. 4.2, Fig. 7), at CPU '
       'scale: the quickstart MobileNet v1 (4 stride-2 layers, 28 px) is pre-trained on Fashion-MNIST classes 0-4 '
       f'by MutualNet, US-Net, or as one independent network ({experiment.INDEPENDENT[0]:g}x at '
       f'{experiment.INDEPENDENT[1]} px), then every backbone is fine-tuned the same way '
       f'({experiment.FINETUNE_METHOD}, a fresh classifier) on classes 5-9 with {labelled_images():,} labelled '
       'images, and the same fine-tuning recipe is run from scratch. Each fine-tuned run is swept over widths '
       f'{", ".join(f"{w:g}" for w in experiment.SWEEP_WIDTHS)} x resolutions '
       f'{", ".join(map(str, experiment.SWEEP_RESOLUTIONS))} (BN recalibrated per configuration).'),
      '',
      (f'**What the independent baseline is.** The paper fine-tunes one independent network per configuration. Here '
       f'"{INDEPENDENT}" is one backbone pre-trained at {experiment.INDEPENDENT[0]:g}x and '
       f'{experiment.INDEPENDENT[1]} px, then fine-tuned slimmably like every other source: it tells whether '
       'MutualNet\'s pre-training transfers better than a single network\'s, not whether one slimmable network '
       'matches separately fine-tuned ones.'),
      '',
      '## Setup',
      '',
  ]
  for phase, title in (('pretrain', 'Pre-training'), ('finetune', 'Fine-tuning')):
    if data.facts.get(phase):
      lines.append(f'- **{title}** (from the runs\' config.json and logs): {_facts(data.facts[phase])}.')
  seeds = {s: len(data.tables[s]) for s in present}
  lines += ['- **Seeds** (fine-tuning seed s starts from pre-training seed s): '
            + ('; '.join(f'{s} {n}' for s, n in seeds.items()) or 'none yet') + '.',
            f'- **Eval images** N = {data.eval_images} (the query tables\' metadata).' if data.eval_images else
            '- **Eval images**: no swept run yet.']
  if data.fit:
    lines.append('- **Pre-training fit** (labelled network, last logged interval): ' + '; '.join(
        f'{f["run"]} top-1 {_pct(f["train_accuracy"])} % at step {f["step"]}' for f in data.fit) + '.')
  if data.missing:
    lines.append(f'- **Missing** (not trained or not swept yet): {", ".join(data.missing)}.')
  if data.not_applied:
    lines.append(f'- **Not reported: init_from was not applied** (train.py did not load the source): '
                 f'{", ".join(data.not_applied)}.')
  if any(data.seconds.values()):
    lines.append('- **Wall time** (every recorded attempt): ' + '; '.join(
        f'{k} {v / 60:.1f} min' for k, v in data.seconds.items() if v) + '.')
  lines += ['', '## Verdicts', '', (f'Rule (benchmarks/reproduce/verdicts.py): {vd.RULE}; a claim over several '
                                    'budgets is held when every budget is held, not held when any is not held, '
                                    'inconclusive otherwise. At a budget each seed takes its own best configuration '
                                    'within it.'), '']
  lines += render_verdicts(verdicts) if verdicts else ['No verdict yet: the compared series have no swept runs.']
  if data.sources:
    lines += ['', '## The sources', '', *render_sources(data.sources)]
  if data.run_rows:
    lines += ['', '## Accuracy against multiply-adds', '', '![accuracy vs MACs](transfer/accuracy_macs.png)', '',
              ('Top-1 % (seed mean ± sigma, the configuration each seed picked) within the MACs of each swept '
               'configuration:'), '',
              '| MFLOPs | configuration | ' + ' | '.join(present) + ' |', '|---:|---|' + '---|' * len(present)]
    for mflops, source in reproduce_report.budget_grid(data.tables):
      cells = [_est(vd.at_budget(data.tables, s, mflops, data.eval_images)) for s in present]
      lines.append(f'| {mflops:.2f} | {source} | ' + ' | '.join(cells) + ' |')
    lines += ['', 'Top-1 % at each configuration (seed mean ± sigma):', '', *render_configurations(data, present)]
  lines += ['', ('Data: `docs/transfer/query_tables.csv` (every row of every fine-tuned run), '
                 '`docs/transfer/verdicts.json` (the records above with their numbers).'), '']
  return '\n'.join(lines)


def write_report(out: Path, docs: Path, timings: dict, runs: Sequence[experiment.TransferRunSpec]) -> list[Path]:
  data = load(out, timings, runs)
  verdicts = compute(data)
  written = write_data(data, verdicts, docs / 'transfer')
  docs.mkdir(parents=True, exist_ok=True)
  (docs / 'TRANSFER.md').write_text(render(data, verdicts, timings))
  return written + [docs / 'TRANSFER.md']
