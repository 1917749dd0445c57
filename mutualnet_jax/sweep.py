"""Every (width, resolution) of a trained run, measured: the query table, its Pareto frontier and budget queries.

For each configuration the sweep takes BN statistics from the store (calibrating the missing ones), evaluates
top-1/top-5 on the eval split (one compiled function per bucket, sharded over all devices), reads MACs and parameters
off the model, and times the exported fixed-width network on one device (batch 1 and the eval batch). The table goes
to `workdir/query_table.{csv,json}`; queries read it back, so they need no accelerator and no checkpoint.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import time
from typing import Any, Iterator, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from mutualnet_jax import export, latency, profile, trained
from mutualnet_jax.errors import UserError

TABLE = 'query_table'
SUMMARY = 'sweep_summary.json'
COSTS = {'macs': 'MACs', 'latency_ms': 'latency'}


@dataclasses.dataclass(frozen=True)
class Row:
  """One configuration: cost (MACs and parameters per image, milliseconds on the sweep's device) and accuracy."""
  width: float
  resolution: int
  macs: int
  params: int
  top1: float
  top5: float
  latency_ms: float        # batch 1, median
  latency_batch_ms: float  # one eval batch, median


COLUMNS = tuple(f.name for f in dataclasses.fields(Row))


def _row(values: dict[str, Any]) -> Row:
  types = {f.name: f.type for f in dataclasses.fields(Row)}
  return Row(**{k: {'float': float, 'int': int}[types[k]](values[k]) for k in COLUMNS})


# ----------------------------------------------------------------------------------------------------------------------
# The table on disk.

def write_table(rows: Sequence[Row], workdir: str, meta: dict[str, Any]) -> tuple[epath.Path, epath.Path]:
  """`query_table.csv` (one row per configuration) and `.json` (rows plus where they came from), each replaced
  atomically so a reader never sees half a table."""
  directory = epath.Path(workdir)
  directory.mkdir(parents=True, exist_ok=True)
  csv_path, json_path = directory / f'{TABLE}.csv', directory / f'{TABLE}.json'
  lines = [','.join(COLUMNS)] + [','.join(repr(getattr(r, c)) for c in COLUMNS) for r in rows]
  _write_atomically(csv_path, '\n'.join(lines) + '\n')
  _write_atomically(json_path, json.dumps({'meta': meta, 'rows': [dataclasses.asdict(r) for r in rows]}, indent=1))
  return csv_path, json_path


def _write_atomically(path: epath.Path, text: str) -> None:
  tmp = path.parent / f'.{path.name}.tmp{os.getpid()}'
  tmp.write_text(text)
  tmp.replace(path)


def read_table(workdir: str) -> tuple[list[Row], dict[str, Any]]:
  """Rows and metadata of a workdir's table; a UserError when it was never swept or the file is damaged."""
  path = epath.Path(workdir) / f'{TABLE}.json'
  if not path.exists():
    raise UserError(f'no {path.name} in {workdir}: run --mode=sweep on this workdir first.')
  try:
    data = json.loads(path.read_text())
    rows = [_row(r) for r in data['rows']]
  except (ValueError, KeyError, TypeError) as e:
    raise UserError(f'{path} is damaged ({type(e).__name__}: {e}): run --mode=sweep again.') from e
  return rows, data.get('meta', {})


def read_csv(path: str) -> list[Row]:
  """Rows of a `query_table.csv` (for tables edited or made by hand)."""
  with open(path, newline='') as f:
    return [_row(r) for r in csv.DictReader(f)]


# ----------------------------------------------------------------------------------------------------------------------
# Queries.

def _check_cost(cost: str) -> str:
  if cost not in COSTS:
    raise ValueError(f'cost must be one of {sorted(COSTS)}, got {cost!r}.')
  return cost


def pareto_frontier(rows: Sequence[Row], cost: str = 'macs') -> list[Row]:
  """Rows no other row beats (cost <= and top-1 >=, one of them strictly), cheapest first."""
  _check_cost(cost)
  frontier: list[Row] = []
  for row in sorted(rows, key=lambda r: (getattr(r, cost), -r.top1)):
    if not frontier or row.top1 > frontier[-1].top1:
      frontier.append(row)
  return frontier


def query(rows: Sequence[Row], budget_mflops: float | None = None, budget_ms: float | None = None) -> Row:
  """The most accurate row within the budgets (MACs in millions, batch-1 latency in ms; either or both).

  Ties in top-1 go to the cheaper row (by the budgeted cost, MACs first when both are given), then the higher top-5,
  then the smaller width. Nothing within budget is a UserError naming the cheapest configuration.
  """
  if budget_mflops is None and budget_ms is None:
    raise UserError('give a budget: --budget_mflops (millions of multiply-adds) and/or --budget_ms (latency).')
  if not rows:
    raise UserError('the query table is empty: run --mode=sweep again.')
  fits = [r for r in rows if (budget_mflops is None or r.macs <= budget_mflops * 1e6)
          and (budget_ms is None or r.latency_ms <= budget_ms)]
  if not fits:
    raise UserError(_nothing_fits(rows, budget_mflops, budget_ms))
  primary = 'macs' if budget_mflops is not None else 'latency_ms'
  secondary = 'latency_ms' if primary == 'macs' else 'macs'
  return min(fits, key=lambda r: (-r.top1, getattr(r, primary), getattr(r, secondary), -r.top5, r.width,
                                  -r.resolution))


def _nothing_fits(rows: Sequence[Row], budget_mflops: float | None, budget_ms: float | None) -> str:
  asked = ' and '.join(b for b in (budget_mflops is not None and f'{budget_mflops:g} MFLOPs',
                                   budget_ms is not None and f'{budget_ms:g} ms') if b)
  cheapest = min(rows, key=lambda r: r.macs)
  fastest = min(rows, key=lambda r: r.latency_ms)
  return (f'no configuration fits {asked}: the smallest is width {cheapest.width:g} at {cheapest.resolution} px '
          f'({cheapest.macs / 1e6:.4g} MFLOPs, {cheapest.latency_ms:.3g} ms), the fastest runs in '
          f'{fastest.latency_ms:.3g} ms; raise the budget.')


def query_json(row: Row) -> str:
  return json.dumps({'width': row.width, 'resolution': row.resolution, 'macs': row.macs, 'top1': row.top1,
                     'latency_ms': row.latency_ms})


def describe(row: Row) -> str:
  """One line for people."""
  return (f'width {row.width:g} at {row.resolution} px: top-1 {100 * row.top1:.2f}% (top-5 {100 * row.top5:.2f}%), '
          f'{row.macs / 1e6:.4g} MFLOPs, {row.params / 1e6:.4g} M params, {row.latency_ms:.3g} ms at batch 1')


def format_rows(rows: Sequence[Row]) -> str:
  """A fixed-width text table (the README's format)."""
  lines = [f"{'width':>6} {'res':>4} {'MFLOPs':>9} {'Mparams':>8} {'top1 %':>7} {'top5 %':>7} {'ms@1':>7} "
           f"{'ms@batch':>9}"]
  lines += [f'{r.width:>6g} {r.resolution:>4d} {r.macs / 1e6:>9.2f} {r.params / 1e6:>8.3f} {100 * r.top1:>7.2f} '
            f'{100 * r.top5:>7.2f} {r.latency_ms:>7.3g} {r.latency_batch_ms:>9.4g}' for r in rows]
  return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Calibration and the sweep.

class CompileCounter:
  """Executables built while the context is open, from JAX's monitoring events: XLA compilations plus loads from
  the persistent compilation cache (which JAX reports under the same compile event)."""

  def __init__(self):
    self.executables, self.cache_hits, self.seconds = 0, 0, 0.0

  @property
  def compiles(self) -> int:
    return self.executables - self.cache_hits

  def _duration(self, event: str, duration: float, **kwargs: Any) -> None:
    del kwargs
    if event == '/jax/core/compile/backend_compile_duration':
      self.executables += 1
      self.seconds += duration

  def _event(self, event: str, **kwargs: Any) -> None:
    del kwargs
    self.cache_hits += event == '/jax/compilation_cache/cache_hits'

  @contextlib.contextmanager
  def counting(self) -> Iterator['CompileCounter']:
    jax.monitoring.register_event_duration_secs_listener(self._duration)
    jax.monitoring.register_event_listener(self._event)
    try:
      yield self
    finally:
      jax.monitoring.unregister_event_duration_listener(self._duration)
      jax.monitoring.unregister_event_listener(self._event)


def _selection(config: ml_collections.ConfigDict, widths: Sequence[float] | None,
               resolutions: Sequence[int] | None) -> list[tuple[float, int]]:
  """Checked (width, resolution) pairs, widths outer; None means the whole sweep grid / resolution set."""
  ws = widths or trained.sweep_widths(config)
  rs = resolutions or trained.trained_resolutions(config)
  return [trained.check_request(config, w, r) for w in ws for r in rs]


def _eta(done: int, total: int, elapsed: float) -> str:
  seconds = elapsed / done * (total - done)
  return f'{int(seconds // 60)}m{int(seconds % 60):02d}s'


def calibrate(config: ml_collections.ConfigDict, workdir: str, widths: Sequence[float] | None = None,
              resolutions: Sequence[int] | None = None) -> dict[str, Any]:
  """Fills the statistics store for the selection (default: the whole grid); reuses valid entries."""
  pairs = _selection(config, widths, resolutions)
  run = trained.open_run(config, workdir)
  start, computed = time.perf_counter(), 0
  with CompileCounter().counting() as counter:
    for i, (w, r) in enumerate(pairs, 1):
      t = time.perf_counter()
      _, new = run.stats(w, r)
      computed += new
      logging.info('[%d/%d] width %g @ %d px: %s in %.2f s; ETA %s', i, len(pairs), w, r,
                   'calibrated' if new else 'reused', time.perf_counter() - t,
                   _eta(i, len(pairs), time.perf_counter() - start))
  return {'configurations': len(pairs), 'calibrated': computed, 'reused': len(pairs) - computed,
          'seconds': time.perf_counter() - start, 'compiles': counter.compiles, 'store': os.fspath(run.store.directory)}


@dataclasses.dataclass
class _Timer:
  """Seconds spent per phase of the sweep, and how many of them went into XLA compilation."""
  counter: CompileCounter
  seconds: dict[str, float] = dataclasses.field(default_factory=dict)
  compile_seconds: dict[str, float] = dataclasses.field(default_factory=dict)

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    start, compiling = time.perf_counter(), self.counter.seconds
    try:
      yield
    finally:
      self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
      self.compile_seconds[name] = self.compile_seconds.get(name, 0.0) + self.counter.seconds - compiling


def _latencies(run: trained.TrainedRun, stats: Any, width: float, resolution: int, repeats: int) -> tuple[float, float]:
  """Median ms of the exported network at batch 1 and at the eval batch size, on the first local device."""
  model = export.build(run.model, run.params, stats, width, resolution, run.channels, run.config.resize_antialias)
  device = jax.local_devices()[0]
  variables = jax.device_put(model.variables, device)
  predict = jax.jit(lambda v, x: export.apply_narrow(model.model, v, x, width))
  out = []
  for batch in (1, run.config.eval_batch_size):
    images = jax.device_put(np.zeros((batch, resolution, resolution, run.channels), np.float32), device)
    compiled = predict.lower(variables, images).compile()
    out.append(latency.median_ms(lambda: compiled(variables, images), repeats=repeats))
  return out[0], out[1]


def _measure(run: trained.TrainedRun, pairs: Sequence[tuple[float, int]],
             latency_repeats: int) -> tuple[list[Row], dict[str, Any]]:
  """One row per (width, resolution), logging progress with an ETA; plus counts and seconds per phase."""
  from mutualnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  config = run.config
  eval_batches = trained.Replay(lambda: input_pipeline.eval_iterator(config, global_batch_size=config.eval_batch_size))
  counter = CompileCounter()
  timer, rows, calibrated = _Timer(counter), [], 0
  with timer.phase('profile'):
    costs = {(p.width, p.resolution): p for p in profile.profile_grid(
        config.model, sorted({w for w, _ in pairs}), sorted({r for _, r in pairs}), run.channels)}
  with counter.counting():
    start = time.perf_counter()
    for i, (w, r) in enumerate(pairs, 1):
      with timer.phase('calibrate'):
        stats, new = run.stats(w, r)
      with timer.phase('evaluate'):
        acc = run.evaluator.evaluate(run.params, stats, w, r, eval_batches)
      with timer.phase('latency'):
        ms, ms_batch = _latencies(run, stats, w, r, latency_repeats)
      calibrated += new
      rows.append(Row(w, r, costs[w, r].macs, costs[w, r].params, acc['top1'], acc['top5'], ms, ms_batch))
      logging.info('[%d/%d] %s; ETA %s', i, len(pairs), describe(rows[-1]),
                   _eta(i, len(pairs), time.perf_counter() - start))
  return rows, {'configurations': len(pairs), 'calibrated': calibrated, 'reused': len(pairs) - calibrated,
                'compiles': counter.compiles, 'cache_hits': counter.cache_hits, 'phase_seconds': timer.seconds,
                'phase_compile_seconds': timer.compile_seconds, 'eval_images': int(acc['count']), 'calibration_images': config.calibration_images}


def _merge_with_table(workdir: str, rows: list[Row], meta: dict[str, Any]) -> list[Row]:
  """A partial sweep updates its own rows: earlier rows of the same weights, device and eval split are kept."""
  try:
    old, old_meta = read_table(workdir)
  except UserError:
    return rows
  if any(old_meta.get(k) != meta[k] for k in ('params_digest', 'device', 'eval_images')):
    return rows
  new = {(r.width, r.resolution) for r in rows}
  return sorted([r for r in old if (r.width, r.resolution) not in new] + rows, key=lambda r: (r.width, -r.resolution))


def run_sweep(config: ml_collections.ConfigDict, workdir: str, widths: Sequence[float] | None = None,
              resolutions: Sequence[int] | None = None, *, latency_repeats: int = 10) -> dict[str, Any]:
  """Measures the selected configurations (default: the sweep grid), writes the query table (merged with an
  earlier one of the same checkpoint) and its plot; returns a summary, also written to `sweep_summary.json`."""
  from mutualnet_jax import plots  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  pairs = _selection(config, widths, resolutions)
  run = trained.open_run(config, workdir)
  rows, summary = _measure(run, pairs, latency_repeats)
  summary.update(device=str(jax.local_devices()[0]), backend=jax.default_backend())
  meta = {'workdir': os.fspath(workdir), 'checkpoint_step': run.step, 'params_digest': run.params_digest,
          'method': config.method, 'model': config.model.name, 'dataset': config.dataset,
          'device': summary['device'], 'backend': summary['backend'], 'eval_images': summary['eval_images']}
  if jax.process_index() == 0:
    rows = _merge_with_table(workdir, rows, meta)
    summary['table'] = [os.fspath(p) for p in write_table(rows, workdir, meta)]
    summary['plot'] = os.fspath(plots.accuracy_macs(rows, epath.Path(workdir) / plots.PLOT_NAME,
                                                    title=f'{config.method} {config.model.name}'))
  summary['wall_seconds'] = time.perf_counter() - start
  if jax.process_index() == 0:
    (epath.Path(workdir) / SUMMARY).write_text(json.dumps(summary, indent=1))
  return summary
