"""Reproduces the MutualNet paper's comparisons at CPU scale: trains, sweeps, then writes the report.

  python benchmarks/reproduce/run.py --list                                          # what would run, in order
  nohup python benchmarks/reproduce/run.py --out=benchmarks/results/reproduce > reproduce.log 2>&1 &
  python benchmarks/reproduce/run.py --out=benchmarks/results/reproduce --max_priority=1 --stop_after=18:00
  python benchmarks/reproduce/run.py --out=benchmarks/results/reproduce --report_only   # figures, RESULTS.md, README

The run list lives in runs.py (rounds -> budgets -> runs; by default only the rounds marked run_by_default). Each
run is trained with `main.py` (which resumes from its latest checkpoint), then swept with `main.py --mode=sweep`
(skipped when its query table belongs to the latest checkpoint and holds every configuration the budget sweeps).
Every subprocess uses this interpreter. OUT/timings.json records per run every attempt (start, seconds, exit
status, steps, commit, command) and the facts the report quotes (settings from the workdir's config.json, the
step count from the training log, image counts from the sweep summary and the dataset's split sizes); logs go
to OUT/logs/. Once a run is trained and swept, its results are recorded in a small committed file beside runs.py
(archive.py: benchmarks/reproduce/round<N>/<budget>/<run>.json); a run with a record and no workdir under OUT finished
on another machine and is skipped. The report (report.py) reads only query tables, timings.json, those records and
round 1's archive, so `--report_only` regenerates it without training, on any machine.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))

import archive  # noqa: E402  pylint: disable=g-import-not-at-top
import runs as runs_lib  # noqa: E402  pylint: disable=g-import-not-at-top
import training_log  # noqa: E402  pylint: disable=g-import-not-at-top

DEFAULT_DATA_DIR = '/usr/share/datasets/fashion-mnist'
TRAINED = re.compile(r'Trained to step (\d+) of (\d+)')
# What the report quotes from a workdir's config.json: {name: path in the config}.
CONFIG_FACTS = {**{k: k for k in ('dataset', 'train_split', 'eval_split', 'augmentation', 'crop_scale',
                                  'width_sampling', 'width_step', 'width_range', 'resolutions', 'num_subnets',
                                  'num_epochs', 'batch_size', 'learning_rate', 'warmup_epochs', 'weight_decay',
                                  'inplace_distillation', 'calibration_images')},
                'model': 'model.name', 'num_downsample': 'model.num_downsample'}
SWEEP_FACTS = ('eval_images', 'calibration_images', 'device')
SPLIT_SIZES = """
import json, sys
from mutualnet_jax import input_pipeline, workdir
info = input_pipeline.get_dataset_info(workdir.saved_config(sys.argv[1]))
print(json.dumps({'train_images': info.num_train_examples, 'eval_split_images': info.num_eval_examples}))
"""


def now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')


def git(*args: str) -> str:
  try:
    return subprocess.run(['git', *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


class Timings:
  """OUT/timings.json: per run, every attempt of each phase and the run's facts; rewritten atomically."""

  def __init__(self, path: Path):
    self.path = path
    self.data = json.loads(path.read_text()) if path.exists() else {'runs': {}, 'invocations': []}

  def save(self) -> None:
    tmp = self.path.with_suffix('.tmp')
    tmp.write_text(json.dumps(self.data, indent=1))
    tmp.replace(self.path)

  def run(self, name: str) -> dict[str, Any]:
    return self.data['runs'].setdefault(name, {})

  def record(self, name: str, phase: str, entry: dict) -> None:
    self.run(name).setdefault(phase, []).append(entry)
    self.save()


def next_time(hh_mm: str) -> datetime.datetime:
  """The next moment (UTC) the clock shows HH:MM: today if it is still ahead, else tomorrow."""
  try:
    hh, mm = (int(x) for x in hh_mm.split(':'))
    now_utc = datetime.datetime.now(datetime.timezone.utc)
    at = now_utc.replace(hour=hh, minute=mm, second=0, microsecond=0)
  except ValueError:
    raise SystemExit(f'error: --stop_after must be HH:MM (UTC), got {hh_mm!r}.') from None
  return at if at > now_utc else at + datetime.timedelta(days=1)


def latest_checkpoint(workdir: Path) -> int | None:
  steps = [int(p.name) for p in (workdir / 'checkpoints').glob('*') if p.is_dir() and p.name.isdigit()]
  return max(steps) if steps else None


def logged_steps(log: Path) -> tuple[int, int] | None:
  """(step reached, total steps) from the last 'Trained to step X of Y' main.py printed into the log."""
  found = TRAINED.findall(log.read_text()) if log.exists() else []
  return (int(found[-1][0]), int(found[-1][1])) if found else None


def log_path(out: Path, run: runs_lib.RunSpec, phase: str) -> Path:
  return training_log.path(out, run.name, phase)


def run_logged(cmd: list[str], log: Path, env: dict) -> tuple[int, float]:
  log.parent.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  with open(log, 'a') as f:
    f.write(f'\n===== {now()}: {" ".join(cmd)}\n')
    f.flush()
    rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
  return rc, time.perf_counter() - start


def is_trained(run: runs_lib.RunSpec, out: Path) -> bool:
  """Finished: the training log says the last attempt reached its total, and that step is checkpointed."""
  steps = logged_steps(log_path(out, run, 'train'))
  return steps is not None and steps[0] == steps[1] == latest_checkpoint(out / run.name)


def train(run: runs_lib.RunSpec, out: Path, timings: Timings, env: dict, commit: str) -> bool:
  workdir = out / run.name
  if is_trained(run, out):
    print(f'[{now()}] {run.name}: trained, skipping', flush=True)
    return True
  cmd = [sys.executable, 'main.py', run.config_arg(), f'--workdir={workdir}', *run.overrides()]
  from_step = latest_checkpoint(workdir) or 0
  print(f'[{now()}] {run.name}: training (from step {from_step})', flush=True)
  started = now()
  rc, seconds = run_logged(cmd, log_path(out, run, 'train'), env)
  steps = logged_steps(log_path(out, run, 'train')) if rc == 0 else None
  timings.record(run.name, 'train', {'start': started, 'seconds': round(seconds, 1), 'rc': rc, 'commit': commit,
                                     'from_step': from_step, 'to_step': latest_checkpoint(workdir),
                                     'total_steps': steps[1] if steps else None,
                                     'command': ' '.join(['python'] + cmd[1:])})
  print(f'[{now()}] {run.name}: training exit {rc} after {seconds:.0f} s', flush=True)
  return rc == 0 and is_trained(run, out)


def table_is_current(tables: Path, workdir: Path, configs: set[tuple[float, int]]) -> bool:
  """Whether the query table in `tables` belongs to the workdir's latest checkpoint and holds `configs`."""
  table = tables / 'query_table.json'
  try:
    data = json.loads(table.read_text())
  except (OSError, ValueError):
    return False
  step = latest_checkpoint(workdir)
  if step is None or data.get('meta', {}).get('checkpoint_step') != step:
    return False
  if table.stat().st_mtime < (workdir / 'checkpoints' / str(step)).stat().st_mtime:
    return False
  have = {(float(r['width']), int(r['resolution'])) for r in data['rows']}
  return configs <= have


def sweep(run: runs_lib.RunSpec, out: Path, timings: Timings, env: dict, commit: str, phase: str = 'sweep') -> bool:
  """The run's sweep (phase 'sweep': its budget's configurations on the test split, into the workdir) or, for a
  pilot, its fit (phase 'fit': the full configuration on its training images, into FIT_DIR)."""
  workdir = out / run.name
  fit = phase == 'fit'
  tables = workdir / runs_lib.FIT_DIR if fit else workdir
  configs = {runs_lib.FULL} if fit and run.method != 'independent' else run.sweep_configs()
  if table_is_current(tables, workdir, configs):
    print(f'[{now()}] {run.name}: {phase} measured, skipping', flush=True)
    return True
  extra = [*run.fit_args(), f'--out={tables}', '--latency_repeats=1'] if fit else [
      *run.sweep_args(), f'--latency_repeats={runs_lib.LATENCY_REPEATS}']
  cmd = [sys.executable, 'main.py', '--mode=sweep', run.config_arg(), f'--workdir={workdir}', *run.overrides(),
         *extra]
  print(f'[{now()}] {run.name}: {phase}', flush=True)
  started = now()
  rc, seconds = run_logged(cmd, log_path(out, run, phase), env)
  timings.record(run.name, phase, {'start': started, 'seconds': round(seconds, 1), 'rc': rc, 'commit': commit,
                                   'checkpoint_step': latest_checkpoint(workdir),
                                   'command': ' '.join(['python'] + cmd[1:])})
  print(f'[{now()}] {run.name}: {phase} exit {rc} after {seconds:.0f} s', flush=True)
  return rc == 0


def finished_elsewhere(run: runs_lib.RunSpec, out: Path) -> bool:
  """A run with a committed record but no workdir under OUT: it finished on another machine (or OUT was
  cleaned), so it is not trained again."""
  return archive.REPRODUCTION.load(run.name) is not None and not (out / run.name).exists()


def archive_run(run: runs_lib.RunSpec, out: Path, timings: Timings) -> Path | None:
  """Writes the committed record of a finished run (trained, swept and, for a pilot, its fit measured) when it
  has none or an outdated one; returns its path when written."""
  workdir = out / run.name
  fit_top1 = archive.fit_top1(workdir, runs_lib.FIT_DIR) if run.pilot else None
  if (not is_trained(run, out) or not table_is_current(workdir, workdir, run.sweep_configs())
      or (run.pilot and fit_top1 is None)):
    return None
  table = _read_json(workdir / 'query_table.json')
  record = archive.REPRODUCTION.load(run.name)
  if record and record['table'] == table and record['timings'] == timings.run(run.name):
    return None
  log = log_path(out, run, 'train')
  return archive.REPRODUCTION.save(run.name, table=table, fit_top1=fit_top1, curve=training_log.accuracy_curve(log),
                      last_interval=training_log.last_interval(log, run.name), timings=timings.run(run.name))


# ----------------------------------------------------------------------------------------------------------------------
# Facts for the report.

def _read_json(path: Path) -> dict[str, Any]:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return {}


class SplitSizes:
  """Image counts of a run's training and eval splits, asked of the dataset builder (in a subprocess: JAX and
  TensorFlow stay out of this driver), once per (dataset, data_dir, splits) in an invocation."""

  def __init__(self, env: dict):
    self.env, self.cache = env, {}

  def __call__(self, workdir: Path, config: dict[str, Any]) -> dict[str, int]:
    key = tuple(config.get(k) for k in ('dataset', 'data_dir', 'train_split', 'eval_split'))
    if key not in self.cache:
      done = subprocess.run([sys.executable, '-c', SPLIT_SIZES, str(workdir)], cwd=REPO, env=self.env,
                            capture_output=True, text=True)
      lines = done.stdout.strip().splitlines()
      self.cache[key] = json.loads(lines[-1]) if done.returncode == 0 and lines else {}
    return self.cache[key]


def refresh_facts(run: runs_lib.RunSpec, out: Path, timings: Timings, split_sizes: SplitSizes) -> None:
  """Records what the report quotes about a run from its workdir (config.json, sweep_summary.json) and training
  log; keeps what was recorded before (the workdir may have been cleaned since)."""
  workdir = out / run.name
  config = _read_json(workdir / 'config.json')
  if not config:
    return
  facts = dict(timings.run(run.name).get('facts', {}))
  for name, path in CONFIG_FACTS.items():
    value = config
    for part in path.split('.'):
      value = value.get(part) if isinstance(value, dict) else None
    if value is not None:
      facts[name] = value
  summary = _read_json(workdir / 'sweep_summary.json')
  facts.update({k: summary[k] for k in SWEEP_FACTS if k in summary})
  steps = logged_steps(log_path(out, run, 'train'))
  if steps:
    facts['total_steps'] = steps[1]
  if 'train_images' not in facts:
    facts.update(split_sizes(workdir, config))
  if facts != timings.run(run.name).get('facts'):
    timings.run(run.name)['facts'] = facts
    timings.save()


# ----------------------------------------------------------------------------------------------------------------------

def select(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[runs_lib.RunSpec]:
  """The runs the flags choose; a round, budget or run name that does not exist is a one-line usage error (a typo
  must not silently select nothing)."""
  rounds = [r for r in args.rounds.split(',') if r]
  known_rounds = {rnd.number for rnd in runs_lib.ROUNDS}
  bad = [r for r in rounds if not r.isdigit() or int(r) not in known_rounds]
  if bad:
    parser.error(f'--rounds takes round numbers ({", ".join(map(str, sorted(known_rounds)))}), not {", ".join(bad)}; '
                 '--list shows what each selects.')
  budgets = [b for b in args.budgets.split(',') if b]
  known_budgets = {run.budget.name for rnd in runs_lib.ROUNDS for run in rnd.runs}
  unknown = set(budgets) - known_budgets
  if unknown:
    parser.error(f'unknown --budgets {", ".join(sorted(unknown))}; known: {", ".join(sorted(known_budgets))}.')
  only = [n for n in args.only.split(',') if n]
  unknown = set(only) - set(runs_lib.by_name())
  if unknown:
    parser.error(f'unknown --only run names {", ".join(sorted(unknown))}; --list --rounds=<n> prints the names.')
  return runs_lib.select(rounds=[int(r) for r in rounds] or None, budgets=budgets or None,
                         max_priority=args.max_priority, only=only)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', default='benchmarks/results/reproduce', help='Where the run workdirs go.')
  parser.add_argument('--docs', default=str(REPO / 'docs'), help='Where RESULTS.md and reproduce/ go.')
  parser.add_argument('--readme', default=str(REPO / 'README.md'),
                      help='README whose summary (between its reproduce-summary markers) is rewritten; "" = none.')
  parser.add_argument('--report_only', action='store_true', help='Only regenerate the report (no training).')
  parser.add_argument('--list', action='store_true', help='Print the selected runs in order and exit.')
  parser.add_argument('--rounds', default='', help='Comma-separated round numbers (default: the rounds runs.py '
                      'marks run_by_default).')
  parser.add_argument('--budgets', default='', help='Comma-separated budget names (default: every budget).')
  parser.add_argument('--max_priority', type=int, default=None, help='Run only runs with priority <= this.')
  parser.add_argument('--only', default='', help='Comma-separated run names (default: every selected run).')
  parser.add_argument('--stop_after', default='',
                      help='HH:MM (UTC): start no new training or sweep after this time; the report is still written.')
  args = parser.parse_args()

  selected = select(parser, args)
  if args.list:
    total = 0.0
    for run in selected:
      estimate = runs_lib.estimated_seconds(run) if run.budget.round >= 2 else 0.0
      total += estimate
      print(f'p{run.priority} {run.budget.key:<16} ~{estimate / 60:4.0f} min (total {total / 3600:4.1f} h) {run.name}: '
            f'python main.py {run.config_arg()} {" ".join(run.overrides())}')
    print(f'{len(selected)} runs, about {total / 3600:.1f} hours of training and sweeps at runs.RATE')
    return 0

  out = (REPO / args.out).resolve() if not os.path.isabs(args.out) else Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  timings = Timings(out / 'timings.json')
  env = dict(os.environ)
  if 'MUTUALNET_FASHION_MNIST_DIR' not in env and os.path.isdir(DEFAULT_DATA_DIR):
    env['MUTUALNET_FASHION_MNIST_DIR'] = DEFAULT_DATA_DIR
  split_sizes = SplitSizes(env)
  deadline = next_time(args.stop_after) if args.stop_after else None

  def too_late() -> bool:
    return deadline is not None and datetime.datetime.now(datetime.timezone.utc) >= deadline

  if not args.report_only:
    commit = git('rev-parse', 'HEAD')
    invocation = {'start': now(), 'commit': commit, 'argv': sys.argv,
                  'dirty_library_files': [l for l in git('status', '--porcelain').splitlines()
                                          if any(p in l for p in ('mutualnet_jax/', 'main.py', 'configs/'))]}
    timings.data['invocations'].append(invocation)
    timings.save()
    wall = time.perf_counter()
    for run in selected:  # priority order
      if finished_elsewhere(run, out):
        where = archive.REPRODUCTION.path_of(run.name).relative_to(REPO)
        print(f'[{now()}] {run.name}: finished on another machine ({where}), skipping', flush=True)
        continue
      if too_late():
        print(f'[{now()}] past --stop_after={args.stop_after}: not starting {run.name}', flush=True)
        continue
      if train(run, out, timings, env, commit) and not too_late():
        sweep(run, out, timings, env, commit)
        if run.pilot:
          sweep(run, out, timings, env, commit, phase='fit')
      refresh_facts(run, out, timings, split_sizes)
      archive_run(run, out, timings)
    invocation['end'] = now()
    invocation['seconds'] = round(time.perf_counter() - wall, 1)
    timings.save()

  for run in (r for rnd in runs_lib.RECORDED for r in rnd.runs):
    refresh_facts(run, out, timings, split_sizes)
    if archive_run(run, out, timings):
      print(f'[{now()}] {run.name}: recorded in {archive.REPRODUCTION.path_of(run.name).relative_to(REPO)}', flush=True)
  import report  # pylint: disable=g-import-not-at-top
  written = report.write_report(out, Path(args.docs), timings.data, readme=Path(args.readme) if args.readme else None)
  print(f'[{now()}] report: {len(written)} files, e.g. {", ".join(str(p) for p in written[-2:])}', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
