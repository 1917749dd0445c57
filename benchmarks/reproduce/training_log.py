"""What a run's training log says: its logged scalar curve and the labelled network's last training interval.

Read by run.py (to archive a finished run) and report.py (to report it); plain text parsing, no JAX.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_FIT = re.compile(r'\[(\d+)\] accuracy/(?:max|fixed)=([0-9.eE+-]+).*?grad_norm=([0-9.eE+-]+).*?'
                  r'loss/(?:max|fixed)=([0-9.eE+-]+)')
_SCALARS = re.compile(r'\] \[(\d+)\] (.*)$')
CURVE_KEYS = ('accuracy/', 'eval_top1/')  # the curves a pilot's report shows and the archive keeps


def path(out: Path, name: str, phase: str = 'train') -> Path:
  """OUT/logs/<run>.<phase>.log, where run.py appends every attempt of a phase."""
  return out / 'logs' / f'{name}.{phase}.log'


def last_interval(log: Path, name: str) -> dict[str, Any] | None:
  """The labelled network's training top-1 and cross-entropy over the last logged interval (the last occurrence:
  logs are appended across attempts); None when the log has none."""
  found = _FIT.findall(log.read_text()) if log.exists() else []
  if not found:
    return None
  step, acc, gnorm, loss = found[-1]
  return {'run': name, 'step': int(step), 'train_accuracy': float(acc), 'train_ce': float(loss),
          'grad_norm': float(gnorm)}


def curve(log: Path) -> list[dict[str, float]]:
  """Per logged step: the scalars main.py wrote ('[step] k=v, ...' lines); a resumed attempt continues the curve,
  so every attempt's lines are kept and later ones win."""
  points: dict[int, dict[str, float]] = {}
  for line in (log.read_text().splitlines() if log.exists() else []):
    found = _SCALARS.search(line)
    if not found:
      continue
    for item in found.group(2).split(', '):
      key, _, value = item.partition('=')
      try:
        points.setdefault(int(found.group(1)), {})[key.strip()] = float(value)
      except ValueError:
        continue
  return [{'step': step, **points[step]} for step in sorted(points)]


def accuracy_curve(log: Path) -> list[dict[str, float]]:
  """curve() restricted to the accuracy scalars (CURVE_KEYS)."""
  return [{'step': p['step'], **{k: v for k, v in p.items() if k.startswith(CURVE_KEYS)}} for p in curve(log)]


def losses(log: Path) -> list[float]:
  """The labelled network's logged training cross-entropy, in step order (loss/max for a slimmable run, else
  loss/fixed)."""
  values = (p.get('loss/max', p.get('loss/fixed')) for p in curve(log))
  return [v for v in values if v is not None]
