"""The committed record of each finished round-2 run: benchmarks/reproduce/<run name>.json.

Workdirs, checkpoints and logs live under OUT, which is not committed and does not survive a fresh machine. A run's
results must: once a run is trained and swept, run.py writes everything the report reads about it (its query table,
its full network's fit on its training images for a pilot, its logged training curve and last training interval,
and its timings.json entry) into one small JSON file beside runs.py. run.py skips a run whose record exists, and
report.py falls back to the record wherever OUT lacks the run, so a fresh machine continues the plan instead of
re-training it, and `--report_only` there keeps every finished run in the report.
"""
from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE  # where records live (tests point it elsewhere)
FORMAT = 1


def path_of(name: str) -> Path:
  """Where a run's record lives: a run is named 'round2/<budget dir>/<run>', its record round2/<budget>/<run>.json."""
  return ROOT / f'{name}.json'


def load(name: str) -> dict[str, Any] | None:
  """A run's record, or None when it has none (or an unreadable one: the run is then simply not archived)."""
  try:
    record = json.loads(path_of(name).read_text())
  except (OSError, ValueError):
    return None
  return record if isinstance(record, dict) and record.get('format') == FORMAT else None


def save(name: str, *, table: dict[str, Any], fit_top1: float | None, curve: list[dict[str, float]],
         last_interval: dict[str, Any] | None, timings: dict[str, Any]) -> Path:
  """Writes a run's record atomically (a crash leaves the old record or none, never half a file)."""
  path = path_of(name)
  path.parent.mkdir(parents=True, exist_ok=True)
  record = {'format': FORMAT, 'run': name,
            'archived': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC'),
            'table': table, 'fit_top1': fit_top1, 'curve': curve, 'last_interval': last_interval, 'timings': timings}
  tmp = path.with_suffix('.tmp')
  tmp.write_text(json.dumps(record, indent=1) + '\n')
  tmp.replace(path)
  return path


def fit_top1(workdir: Path, fit_dir: str) -> float | None:
  """A pilot's full network's top-1 on its training images (the query table of its fit sweep in workdir/fit_dir),
  None before it is measured."""
  try:
    return max(float(r['top1']) for r in json.loads((workdir / fit_dir / 'query_table.json').read_text())['rows'])
  except (OSError, ValueError, KeyError, TypeError):
    return None


def merged_timings(timings: dict[str, Any], names: list[str]) -> dict[str, Any]:
  """timings.json's data with each archived run's entry filled in where OUT has none (a fresh machine)."""
  runs = dict(timings.get('runs', {}))
  for name in names:
    record = load(name)
    if record and not runs.get(name, {}).get('train'):
      runs[name] = record['timings']
  return {**timings, 'runs': runs}
