"""Reproduces the MutualNet paper's comparisons at CPU scale: trains, sweeps, plots and writes docs/RESULTS.md.

  python benchmarks/reproduce/run.py --out=benchmarks/results/reproduce            # everything (resumes)
  nohup python benchmarks/reproduce/run.py --out=benchmarks/results/reproduce > reproduce.log 2>&1 &
  python benchmarks/reproduce/run.py --out=benchmarks/results/reproduce --report_only   # figures + RESULTS.md

The run list lives in runs.py. Each run is trained with `main.py` (which resumes from its latest checkpoint and
does nothing when finished), then swept with `main.py --mode=sweep` (skipped when its query table belongs to the
latest checkpoint and holds every requested configuration). Every subprocess uses this interpreter
(sys.executable); per-run wall times go to OUT/timings.json; logs to OUT/logs/. The report (report.py) reads only
the workdirs' query tables and timings, so `--report_only` regenerates it without training.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))

import runs as runs_lib  # noqa: E402  pylint: disable=g-import-not-at-top

DEFAULT_DATA_DIR = '/usr/share/datasets/fashion-mnist'


def now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')


def git(*args: str) -> str:
  try:
    return subprocess.run(['git', *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


class Timings:
  """OUT/timings.json: per run and phase, every attempt (start, seconds, exit status); rewritten atomically."""

  def __init__(self, path: Path):
    self.path = path
    self.data = json.loads(path.read_text()) if path.exists() else {'runs': {}, 'invocations': []}

  def save(self) -> None:
    tmp = self.path.with_suffix('.tmp')
    tmp.write_text(json.dumps(self.data, indent=1))
    tmp.replace(self.path)

  def record(self, run: str, phase: str, entry: dict) -> None:
    self.data['runs'].setdefault(run, {}).setdefault(phase, []).append(entry)
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


def run_logged(cmd: list[str], log: Path, env: dict) -> tuple[int, float]:
  log.parent.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  with open(log, 'a') as f:
    f.write(f'\n===== {now()}: {" ".join(cmd)}\n')
    f.flush()
    rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
  return rc, time.perf_counter() - start


def train(run: runs_lib.Run, out: Path, timings: Timings, env: dict) -> bool:
  workdir = out / run.name
  if latest_checkpoint(workdir) == run.steps:
    print(f'[{now()}] {run.name}: trained ({run.steps} steps), skipping', flush=True)
    return True
  cmd = [sys.executable, 'main.py', run.config_arg(), f'--workdir={workdir}', *run.overrides()]
  print(f'[{now()}] {run.name}: training (from step {latest_checkpoint(workdir) or 0})', flush=True)
  started, from_step = now(), latest_checkpoint(workdir) or 0
  rc, seconds = run_logged(cmd, out / 'logs' / f'{run.name}.train.log', env)
  timings.record(run.name, 'train', {'start': started, 'seconds': round(seconds, 1), 'rc': rc,
                                     'from_step': from_step, 'to_step': latest_checkpoint(workdir),
                                     'command': ' '.join(['python'] + cmd[1:])})
  print(f'[{now()}] {run.name}: training exit {rc} after {seconds:.0f} s', flush=True)
  return rc == 0 and latest_checkpoint(workdir) == run.steps


def sweep_is_current(run: runs_lib.Run, workdir: Path) -> bool:
  table = workdir / 'query_table.json'
  if not table.exists():
    return False
  try:
    data = json.loads(table.read_text())
  except ValueError:
    return False
  step = latest_checkpoint(workdir)
  if data.get('meta', {}).get('checkpoint_step') != step:
    return False
  if table.stat().st_mtime < (workdir / 'checkpoints' / str(step)).stat().st_mtime:
    return False
  have = {(float(r['width']), int(r['resolution'])) for r in data['rows']}
  if run.method == 'independent':
    want = {(float(run.width), int(run.resolution))}
  else:
    want = {(float(w), int(r)) for w in runs_lib.SWEEP_WIDTHS for r in runs_lib.SWEEP_RESOLUTIONS}
  return want <= have


def sweep(run: runs_lib.Run, out: Path, timings: Timings, env: dict) -> bool:
  workdir = out / run.name
  if sweep_is_current(run, workdir):
    print(f'[{now()}] {run.name}: swept, skipping', flush=True)
    return True
  cmd = [sys.executable, 'main.py', '--mode=sweep', run.config_arg(), f'--workdir={workdir}', *run.overrides(),
         *run.sweep_args(), f'--latency_repeats={runs_lib.LATENCY_REPEATS}']
  print(f'[{now()}] {run.name}: sweeping', flush=True)
  started = now()
  rc, seconds = run_logged(cmd, out / 'logs' / f'{run.name}.sweep.log', env)
  timings.record(run.name, 'sweep', {'start': started, 'seconds': round(seconds, 1), 'rc': rc,
                                     'checkpoint_step': latest_checkpoint(workdir),
                                     'command': ' '.join(['python'] + cmd[1:])})
  print(f'[{now()}] {run.name}: sweep exit {rc} after {seconds:.0f} s', flush=True)
  return rc == 0


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', default='benchmarks/results/reproduce', help='Where the run workdirs go.')
  parser.add_argument('--docs', default=str(REPO / 'docs'), help='Where RESULTS.md and reproduce/ go.')
  parser.add_argument('--report_only', action='store_true', help='Only regenerate figures, data files, RESULTS.md.')
  parser.add_argument('--max_priority', type=int, default=4, help='Run only runs with priority <= this.')
  parser.add_argument('--only', default='', help='Comma-separated run names (default: every run).')
  parser.add_argument('--stop_after', default='',
                      help='HH:MM (UTC): start no new training or sweep after this time; the report is still written.')
  args = parser.parse_args()

  out = (REPO / args.out).resolve() if not os.path.isabs(args.out) else Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  timings = Timings(out / 'timings.json')
  env = dict(os.environ)
  if 'MUTUALNET_FASHION_MNIST_DIR' not in env and os.path.isdir(DEFAULT_DATA_DIR):
    env['MUTUALNET_FASHION_MNIST_DIR'] = DEFAULT_DATA_DIR

  deadline = next_time(args.stop_after) if args.stop_after else None

  def too_late() -> bool:
    return deadline is not None and datetime.datetime.now(datetime.timezone.utc) >= deadline

  if not args.report_only:
    only = set(filter(None, args.only.split(',')))
    selected = [r for r in runs_lib.RUNS if r.priority <= args.max_priority and (not only or r.name in only)]
    invocation = {'start': now(), 'commit': git('rev-parse', 'HEAD'), 'argv': sys.argv,
                  'dirty_library_files': [l for l in git('status', '--porcelain').splitlines()
                                          if any(p in l for p in ('mutualnet_jax/', 'main.py', 'configs/'))]}
    timings.data['invocations'].append(invocation)
    timings.save()
    wall = time.perf_counter()
    for priority in sorted({r.priority for r in selected}):
      for run in (r for r in selected if r.priority == priority):
        if too_late():
          print(f'[{now()}] past --stop_after={args.stop_after}: not starting {run.name}', flush=True)
          continue
        if train(run, out, timings, env) and not too_late():
          sweep(run, out, timings, env)
    invocation['end'] = now()
    invocation['seconds'] = round(time.perf_counter() - wall, 1)
    timings.save()

  import report  # pylint: disable=g-import-not-at-top
  written = report.write_report(out, Path(args.docs), timings.data)
  print(f'[{now()}] report: {", ".join(str(p) for p in written)}', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
