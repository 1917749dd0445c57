"""The query table of a swept run, without JAX: rows, the table on disk, Pareto frontiers, budget queries, formatting.

`mutualnet_jax.sweep` measures a trained run and writes `workdir/query_table.{csv,json}`; everything here reads and
reasons over that table, so answering "the best configuration under 10 MFLOPs" needs no accelerator, no checkpoint
and no TensorFlow (`--mode=query` and the plots import only this).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from typing import Any, Sequence

from absl import logging
from etils import epath

from mutualnet_jax.errors import UserError

TABLE = 'query_table'
COSTS = {'macs': 'MACs', 'latency_ms': 'latency', 'tflite_latency_ms': 'TFLite latency'}
LATENCY_COLUMNS = {'jax': 'latency_ms', 'tflite': 'tflite_latency_ms'}  # what --budget_ms bounds, by --latency


@dataclasses.dataclass(frozen=True)
class Row:
  """One configuration: cost (MACs and parameters per image, milliseconds on the sweep's device) and accuracy."""
  width: float
  resolution: int
  macs: int
  params: int
  top1: float | None       # None: not measured (the sweep had no labels of the model's classes)
  top5: float | None
  latency_ms: float        # batch 1, median, JAX on the sweep's device
  latency_batch_ms: float | None = None  # one eval batch, median (optional: --mode=sweep --batch_latency)
  tflite_latency_ms: float | None = None  # batch 1, median, the TFLite interpreter on the sweep's CPU (optional)


COLUMNS = tuple(f.name for f in dataclasses.fields(Row))
_OPTIONAL = {f.name for f in dataclasses.fields(Row) if 'None' in f.type}


def _row(values: dict[str, Any]) -> Row:
  """A Row from JSON/CSV values; optional columns may be missing (older tables) or empty."""
  if not isinstance(values, dict):
    raise TypeError(f'a row is {type(values).__name__}, not an object')
  types = {f.name: f.type for f in dataclasses.fields(Row)}
  convert = {'float': float, 'int': int, 'float | None': float}
  return Row(**{k: None if k in _OPTIONAL and values.get(k) in (None, '', 'None') else convert[types[k]](values[k])
                for k in COLUMNS})


# ----------------------------------------------------------------------------------------------------------------------
# The table on disk.

def write_table(rows: Sequence[Row], workdir: str, meta: dict[str, Any]) -> tuple[epath.Path, epath.Path]:
  """`query_table.csv` (one row per configuration) and `.json` (rows plus where they came from), each replaced
  atomically so a reader never sees half a table."""
  directory = epath.Path(workdir)
  directory.mkdir(parents=True, exist_ok=True)
  csv_path, json_path = directory / f'{TABLE}.csv', directory / f'{TABLE}.json'
  cell = lambda v: '' if v is None else repr(v)  # noqa: E731
  lines = [','.join(COLUMNS)] + [','.join(cell(getattr(r, c)) for c in COLUMNS) for r in rows]
  _write_atomically(csv_path, '\n'.join(lines) + '\n')
  _write_atomically(json_path, json.dumps({'meta': meta, 'rows': [dataclasses.asdict(r) for r in rows]}, indent=1))
  return csv_path, json_path


def _write_atomically(path: epath.Path, text: str) -> None:
  tmp = path.parent / f'.{path.name}.tmp{os.getpid()}'
  tmp.write_text(text)
  tmp.replace(path)


_DAMAGED = (OSError, ValueError, KeyError, TypeError, csv.Error)  # what a damaged or hand-broken table raises


def _damaged(path: str | os.PathLike, error: Exception) -> UserError:
  detail = ' '.join(f'{type(error).__name__}: {error}'.split())
  return UserError(f'{path} is not a readable query table (damaged: {detail}): run --mode=sweep again.')


def read_table(workdir: str) -> tuple[list[Row], dict[str, Any]]:
  """Rows and metadata of a workdir's table; a UserError when it was never swept or the file is damaged."""
  path = epath.Path(workdir) / f'{TABLE}.json'
  if not path.exists():
    raise UserError(f'no {path.name} in {workdir}: run --mode=sweep on this workdir first.')
  try:
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data['rows'], list) or not isinstance(data.get('meta', {}), dict):
      raise TypeError('expected {"meta": {...}, "rows": [...]}')
    rows = [_row(r) for r in data['rows']]
  except _DAMAGED as e:
    raise _damaged(path, e) from None
  return _report_unscored(path, rows), data.get('meta', {})


def read_csv(path: str) -> list[Row]:
  """Rows of a `query_table.csv` (for tables edited or made by hand); a UserError when missing or malformed."""
  try:
    with open(path, newline='') as f:
      return _report_unscored(path, [_row(r) for r in csv.DictReader(f)])
  except FileNotFoundError:
    raise UserError(f'{path} not found: pass the query_table.csv that --mode=sweep wrote.') from None
  except _DAMAGED as e:
    raise _damaged(path, e) from None


def _report_unscored(path: str | os.PathLike, rows: list[Row]) -> list[Row]:
  """`rows`, with a warning when some have no top-1 accuracy (queries and frontiers leave those out)."""
  missing = len(rows) - len(scored(rows))
  unmeasured = sum(r.top1 is None for r in rows)
  if missing > unmeasured:  # a sweep without labels leaves accuracy out on purpose; NaN is a failure
    logging.warning('%s: %d of %d rows have no top-1 accuracy (NaN or infinite); queries and Pareto frontiers leave '
                    'them out.', path, missing - unmeasured, len(rows))
  return rows


# ----------------------------------------------------------------------------------------------------------------------
# Queries.

def scored(rows: Sequence[Row]) -> list[Row]:
  """The rows with a finite top-1 accuracy. A NaN one (a diverged network, an evaluation that failed) compares
  false with everything: it would be picked at random and would end a Pareto frontier at itself; None was not
  measured."""
  return [r for r in rows if r.top1 is not None and math.isfinite(r.top1)]


def _check_cost(cost: str) -> str:
  if cost not in COSTS:
    raise ValueError(f'cost must be one of {sorted(COSTS)}, got {cost!r}.')
  return cost


def pareto_frontier(rows: Sequence[Row], cost: str = 'macs') -> list[Row]:
  """Rows no other row beats (cost <= and top-1 >=, one of them strictly), cheapest first; rows without that cost
  (an optional column not measured) or without a top-1 accuracy are left out."""
  _check_cost(cost)
  frontier: list[Row] = []
  measured = [r for r in scored(rows) if getattr(r, cost) is not None]
  for row in sorted(measured, key=lambda r: (getattr(r, cost), -r.top1)):
    if not frontier or row.top1 > frontier[-1].top1:
      frontier.append(row)
  return frontier


def query(rows: Sequence[Row], budget_mflops: float | None = None, budget_ms: float | None = None,
          latency: str = 'jax') -> Row:
  """The most accurate row within the budgets (MACs in millions, batch-1 latency in ms; either or both).

  `latency` picks the runtime `budget_ms` bounds: 'jax' (the sweep's own timing) or 'tflite' (the TFLite
  interpreter, measured by `--mode=sweep --tflite_latency`). Ties in top-1 go to the cheaper row (by the budgeted
  cost, MACs first when both are given), then the higher top-5, then the smaller width. Rows without a top-1
  accuracy are never picked. Nothing within budget is a UserError naming the cheapest configuration.
  """
  if budget_mflops is None and budget_ms is None:
    raise UserError('give a budget: --budget_mflops (millions of multiply-adds) and/or --budget_ms (latency).')
  if latency not in LATENCY_COLUMNS:
    raise UserError(f'--latency must be one of {sorted(LATENCY_COLUMNS)}, got {latency!r}.')
  if not rows:
    raise UserError('the query table is empty: run --mode=sweep again.')
  if not scored(rows) and all(r.top1 is None for r in rows):
    raise UserError("no row of the query table has a top-1 accuracy (the sweep had no labels of the model's "
                    'classes): sweep where its eval split can be read to query by accuracy.')
  rows = scored(rows)
  if not rows:
    raise UserError('no row of the query table has a top-1 accuracy (all NaN): run --mode=sweep again.')
  column = LATENCY_COLUMNS[latency]
  if budget_ms is not None and all(getattr(r, column) is None for r in rows):
    raise UserError(f'the query table has no {COSTS[column]} column: sweep with --tflite_latency first.')
  fits = [r for r in rows if (budget_mflops is None or r.macs <= budget_mflops * 1e6)
          and (budget_ms is None or (getattr(r, column) is not None and getattr(r, column) <= budget_ms))]
  if not fits:
    raise UserError(_nothing_fits(rows, budget_mflops, budget_ms, column))
  primary = 'macs' if budget_mflops is not None else column
  secondary = column if primary == 'macs' else 'macs'
  return min(fits, key=lambda r: (-r.top1, getattr(r, primary), getattr(r, secondary) or 0.0, -r.top5, r.width,
                                  -r.resolution))


def _nothing_fits(rows: Sequence[Row], budget_mflops: float | None, budget_ms: float | None,
                  column: str = 'latency_ms') -> str:
  asked = ' and '.join(b for b in (budget_mflops is not None and f'{budget_mflops:g} MFLOPs',
                                   budget_ms is not None and f'{budget_ms:g} ms') if b)
  ms = lambda r: 'not timed' if getattr(r, column) is None else f'{getattr(r, column):.3g} ms'  # noqa: E731
  cheapest = min(rows, key=lambda r: r.macs)
  timed = [r for r in rows if getattr(r, column) is not None]
  fastest = f', the fastest runs in {ms(min(timed, key=lambda r: getattr(r, column)))}' if timed else ''
  return (f'no configuration fits {asked}: the smallest is width {cheapest.width:g} at {cheapest.resolution} px '
          f'({cheapest.macs / 1e6:.4g} MFLOPs, {ms(cheapest)}){fastest}; raise the budget.')


def as_dict(row: Row) -> dict[str, Any]:
  """A row as JSON-ready data (what `--format=json` prints)."""
  return dataclasses.asdict(row)


def describe(row: Row) -> str:
  """One line for people."""
  accuracy = ('accuracy not measured' if row.top1 is None else
              f'top-1 {100 * row.top1:.2f}% (top-5 {100 * row.top5:.2f}%)')
  return (f'width {row.width:g} at {row.resolution} px: {accuracy}, {row.macs / 1e6:.4g} MFLOPs, '
          f'{row.params / 1e6:.4g} M params, {row.latency_ms:.3g} ms at batch 1')


def _percent(value: float | None, spec: str) -> str:
  return '-' if value is None else format(100 * value, spec)


def format_markdown(rows: Sequence[Row]) -> str:
  """A Markdown table (TensorBoard's text dashboard and the README render it)."""
  lines = ['| width | res | MFLOPs | Mparams | top-1 % | top-5 % | ms @ batch 1 |', '| ---: ' * 7 + '|']
  lines += [f'| {r.width:g} | {r.resolution} | {r.macs / 1e6:.2f} | {r.params / 1e6:.3f} | {_percent(r.top1, ".2f")} | '
            f'{_percent(r.top5, ".2f")} | {r.latency_ms:.3g} |' for r in rows]
  return '\n'.join(lines)


def format_rows(rows: Sequence[Row]) -> str:
  """A fixed-width text table (the README's format)."""
  lines = [f"{'width':>6} {'res':>4} {'MFLOPs':>9} {'Mparams':>8} {'top1 %':>7} {'top5 %':>7} {'ms@1':>7} "
           f"{'ms@batch':>9}"]
  lines += [f'{r.width:>6g} {r.resolution:>4d} {r.macs / 1e6:>9.2f} {r.params / 1e6:>8.3f} {_percent(r.top1, ">7.2f")} '
            f'{_percent(r.top5, ">7.2f")} {r.latency_ms:>7.3g} '
            f"{'-' if r.latency_batch_ms is None else format(r.latency_batch_ms, '.4g'):>9}" for r in rows]
  return '\n'.join(lines)
