"""The committed record of each finished run: benchmarks/reproduce/<run name>.json for the reproduction's round 2
(benchmarks/transfer keeps its own under benchmarks/transfer/records/).

Workdirs, checkpoints and logs live under OUT, which is not committed and does not survive a fresh machine. A run's
results must: once a run is trained and swept, run.py writes everything the report reads about it (its query table,
its full network's fit on its training images for a pilot, its logged training curve and last training interval,
and its timings.json entry) into one small JSON file. run.py skips a run whose record exists, and
report.py falls back to the record wherever OUT lacks the run, so a fresh machine continues the plan instead of
re-training it, and `--report_only` there keeps every finished run in the report.
"""
from __future__ import annotations

import datetime
import json
from pathlib import Path
from collections.abc import Iterable
from typing import Any

HERE = Path(__file__).resolve().parent
FORMAT = 1


class Records:
  """One committed JSON record per finished run under `root`: a run named 'a/b/c' is recorded in root/a/b/c.json."""

  def __init__(self, root: Path):
    self.root = root

  def path_of(self, name: str) -> Path:
    return self.root / f'{name}.json'

  def load(self, name: str) -> dict[str, Any] | None:
    """A run's record, or None when it has none (or an unreadable one: the run is then simply not recorded)."""
    try:
      record = json.loads(self.path_of(name).read_text())
    except (OSError, ValueError):
      return None
    return record if isinstance(record, dict) and record.get('format') == FORMAT else None

  def save(self, name: str, **fields: Any) -> Path:
    """Writes a run's record (`fields` plus format, name and time) atomically: a crash leaves the old record or
    none, never half a file."""
    path = self.path_of(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {'format': FORMAT, 'run': name,
              'archived': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC'), **fields}
    tmp = path.with_suffix('.tmp')
    tmp.write_text(json.dumps(record, indent=1) + '\n')
    tmp.replace(path)
    return path

  def merged_timings(self, timings: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """timings.json's data with each recorded run's entry filled in where OUT has none (a fresh machine)."""
    runs = dict(timings.get('runs', {}))
    for name in names:
      record = self.load(name)
      if record and not runs.get(name, {}).get('train'):
        runs[name] = record['timings']
    return {**timings, 'runs': runs}


# Round 2 of the reproduction: fields table (the query table), fit_top1 (a pilot's), curve (accuracy scalars of the
# training log), last_interval (the labelled network's last logged training interval), timings (timings.json entry).
REPRODUCTION = Records(HERE)


def fit_top1(workdir: Path, fit_dir: str) -> float | None:
  """A pilot's full network's top-1 on its training images (the query table of its fit sweep in workdir/fit_dir),
  None before it is measured."""
  try:
    return max(float(r['top1']) for r in json.loads((workdir / fit_dir / 'query_table.json').read_text())['rows'])
  except (OSError, ValueError, KeyError, TypeError):
    return None
