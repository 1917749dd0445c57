"""The transfer experiment at CPU scale (docs/TRANSFER.md): pre-train, fine-tune, sweep, then write the report.

  python benchmarks/transfer/run.py --list                              # the runs, in order, with their commands
  nohup python benchmarks/transfer/run.py > transfer.log 2>&1 &         # the whole experiment (resumable)
  python benchmarks/transfer/run.py --report_only                       # docs/TRANSFER.md from what exists
  python benchmarks/transfer/run.py --out=/tmp/smoke --docs=/tmp/smoke/docs --steps=3   # a smoke test

The runs are data (experiment.py), the report is transfer_report.py. Training, sweeping, skipping what is done,
per-attempt timings and the facts the report quotes are the reproduction's (benchmarks/reproduce/run.py): a finished
run is skipped, an interrupted one resumes from its checkpoint, a sweep is skipped when its table belongs to the
latest checkpoint. A fine-tuning run starts once its source is trained; its log must show that init_from loaded the
source (otherwise it is not swept, so a run that silently trained from scratch never enters the report).
Each trained source's kernel-norm growth (kernel_norms.py) and its held-out fit (a sweep at experiment.SOURCE_CONFIGS
on the pre-training dataset's test split) are recorded for the report. Finished runs are recorded in
small committed files (benchmarks/transfer/records/, archive.py): a run recorded but absent from OUT is not trained
again (a source only once all its fine-tunings are recorded), and the report reads the records wherever OUT lacks a
run. Logs: OUT/logs/<run>.{train,sweep}.log.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))


def _load_reproduce_runner():
  """benchmarks/reproduce/run.py under its own module name (this file is run.py too)."""
  spec = importlib.util.spec_from_file_location('reproduce_run', HERE.parent / 'reproduce' / 'run.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


runner = _load_reproduce_runner()
import experiment  # noqa: E402  pylint: disable=g-import-not-at-top

LOADED = re.compile(r'init_from .+: (\d+) arrays loaded')


def init_from_applied(out: Path, run: experiment.TransferRunSpec) -> bool:
  """Whether the fine-tuning log shows init_from loading the source (train.py must call init_from.initial_state)."""
  log = runner.log_path(out, run, 'train')
  return bool(LOADED.search(log.read_text())) if log.exists() else False


def record_kernel_norms(run: experiment.TransferRunSpec, out: Path, timings, env: dict) -> None:
  """A trained source's kernel-norm growth (kernel_norms.py, in a subprocess: JAX stays out of this driver), once
  per checkpoint step, into its timings entry for the report."""
  step = runner.latest_checkpoint(out / run.name)
  if timings.run(run.name).get('kernel_norms', {}).get('step') == step:
    return
  done = subprocess.run([sys.executable, str(HERE / 'kernel_norms.py'), str(out / run.name)], cwd=REPO, env=env,
                        capture_output=True, text=True)
  lines = done.stdout.strip().splitlines()
  if done.returncode != 0 or not lines:
    print(f'[{runner.now()}] {run.name}: kernel norms failed: {done.stderr.strip().splitlines()[-1:]}', flush=True)
    return
  norms = json.loads(lines[-1])
  timings.run(run.name)['kernel_norms'] = {k: norms[k] for k in ('step', 'whole', 'narrow', 'narrow_width')}
  timings.save()


def finished_elsewhere(run: experiment.TransferRunSpec, out: Path, runs: list[experiment.TransferRunSpec]) -> bool:
  """Recorded but absent from OUT (another machine, or OUT cleaned): not trained again. A source only when every
  fine-tuning that starts from it is recorded too (an unrecorded one needs its workdir)."""
  if experiment.RECORDS.load(run.name) is None or (out / run.name).exists():
    return False
  return all(experiment.RECORDS.load(r.name) for r in runs if r.source == run.name)


def record(run: experiment.TransferRunSpec, out: Path, timings) -> bool:
  """Commits what the report needs of a finished run (a source trained with its kernel norms, each run swept: a
  source at its held-out configurations) to its record when it has none or an outdated one; whether it wrote."""
  entry = timings.run(run.name)
  log = runner.log_path(out, run, 'train')
  if not runner.is_trained(run, out):
    return False
  fields = {'timings': entry, 'last_interval': runner.training_log.last_interval(log, run.name)}
  if run.phase == 'pretrain':
    if 'kernel_norms' not in entry:
      return False
    fields['losses'] = runner.training_log.losses(log)
  if not runner.table_is_current(out / run.name, out / run.name, run.sweep_configs()):
    return False
  fields['table'] = json.loads((out / run.name / 'query_table.json').read_text())
  old = experiment.RECORDS.load(run.name)
  if old and all(old.get(k) == v for k, v in fields.items()):
    return False
  experiment.RECORDS.save(run.name, **fields)
  return True


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', default='benchmarks/results/transfer', help='Where the run workdirs go.')
  parser.add_argument('--docs', default=str(REPO / 'docs'), help='Where TRANSFER.md and transfer/ go.')
  parser.add_argument('--report_only', action='store_true', help='Only regenerate the report (no training).')
  parser.add_argument('--list', action='store_true', help='Print the runs in order and exit.')
  parser.add_argument('--steps', type=int, default=None,
                      help='Train every run this many steps, not its epochs (a smoke test; give it its own --out).')
  parser.add_argument('--stop_after', default='', help='HH:MM (UTC): start nothing new after it; still write the '
                      'report.')
  args = parser.parse_args()

  out = (REPO / args.out).resolve() if not os.path.isabs(args.out) else Path(args.out)
  runs = experiment.runs(str(out), args.steps)
  if args.list:
    total = 0.0
    for run in runs:
      total += run.estimated_seconds()
      print(f'{run.phase:<8} ~{run.estimated_seconds() / 60:3.0f} min (total {total / 3600:4.1f} h) {run.name}: '
            f'python main.py {run.config_arg()} --workdir={out / run.name} {" ".join(run.overrides())}')
    print(f'{len(runs)} runs, about {total / 3600:.1f} hours at the reproduction\'s measured rates; fine-tuning runs '
          f'are then swept: python main.py --mode=sweep ... {" ".join(runs[-1].sweep_args())}')
    return 0

  out.mkdir(parents=True, exist_ok=True)
  timings = runner.Timings(out / 'timings.json')
  env = dict(os.environ)
  if 'MUTUALNET_FASHION_MNIST_DIR' not in env and os.path.isdir(runner.DEFAULT_DATA_DIR):
    env['MUTUALNET_FASHION_MNIST_DIR'] = runner.DEFAULT_DATA_DIR
  split_sizes = runner.SplitSizes(env)
  deadline = runner.next_time(args.stop_after) if args.stop_after else None

  def too_late() -> bool:
    return deadline is not None and datetime.datetime.now(datetime.timezone.utc) >= deadline

  if not args.report_only:
    commit = runner.git('rev-parse', 'HEAD')
    invocation = {'start': runner.now(), 'commit': commit, 'argv': sys.argv,
                  'dirty_library_files': [line for line in runner.git('status', '--porcelain').splitlines()
                                          if any(p in line for p in ('mutualnet_jax/', 'main.py', 'configs/'))]}
    timings.data['invocations'].append(invocation)
    timings.save()
    wall = time.perf_counter()
    by_name = {r.name: r for r in runs}
    for run in runs:
      if finished_elsewhere(run, out, runs):
        print(f'[{runner.now()}] {run.name}: finished on another machine '
              f'({experiment.RECORDS.path_of(run.name).relative_to(REPO)}), skipping', flush=True)
        continue
      if too_late():
        print(f'[{runner.now()}] past --stop_after={args.stop_after}: not starting {run.name}', flush=True)
        continue
      if run.source is not None and not runner.is_trained(by_name[run.source], out):  # a fresh machine retrains it
        print(f'[{runner.now()}] {run.name}: its source {run.source} is not trained, skipping', flush=True)
        continue
      trained = runner.train(run, out, timings, env, commit)
      if trained and run.phase == 'pretrain':
        record_kernel_norms(run, out, timings, env)
        runner.sweep(run, out, timings, env, commit)  # its held-out fit (experiment.SOURCE_CONFIGS)
      if trained and run.phase == 'finetune':
        applied = run.source is None or init_from_applied(out, run)
        timings.run(run.name)['init_from_applied'] = applied if run.source is not None else None
        timings.save()
        if not applied:
          print(f'[{runner.now()}] {run.name}: its log shows no init_from load (is init_from.initial_state wired '
                'into train.py?): not swept', flush=True)
        elif not too_late():
          runner.sweep(run, out, timings, env, commit)
      runner.refresh_facts(run, out, timings, split_sizes)
      record(run, out, timings)
    invocation['end'] = runner.now()
    invocation['seconds'] = round(time.perf_counter() - wall, 1)
    timings.save()

  for run in runs:
    runner.refresh_facts(run, out, timings, split_sizes)
    if record(run, out, timings):
      print(f'[{runner.now()}] {run.name}: recorded in {experiment.RECORDS.path_of(run.name).relative_to(REPO)}',
            flush=True)
  import transfer_report  # noqa: PLC0415  matplotlib: only when the report is written
  written = transfer_report.write_report(out, Path(args.docs), timings.data, runs)
  print(f'[{runner.now()}] report: {", ".join(str(p) for p in written)}', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
