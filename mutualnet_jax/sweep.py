"""Every (width, resolution) of a trained run, measured: accuracy, cost and latency, written as the query table.

For each configuration the sweep takes BN statistics from the store (calibrating the missing ones), evaluates
top-1/top-5 on the eval split (one compiled function per bucket, sharded over all devices), reads MACs and parameters
off the model, and times the exported fixed-width network on one device at batch 1 (the eval batch too with
--batch_latency, the TFLite interpreter with --tflite_latency). The table goes to `workdir/query_table.{csv,json}`,
or to --out for a read-only workdir (`mutualnet_jax.query` reads and queries it). The sweep takes the post-training
lock only: it may run while the workdir's training goes on.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import time
from typing import Any, Iterator, Sequence

import jax
import matplotlib.image
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath

from mutualnet_jax import export, input_pipeline, latency, plots, profile, query, workdir as workdir_lib
from mutualnet_jax.compilation import CompileCounter
from mutualnet_jax.errors import UserError
from mutualnet_jax.resizing import Resize
from mutualnet_jax.query import Row
from mutualnet_jax.trained_run import TrainedRun, open_run, selection

SUMMARY = 'sweep_summary.json'


def calibrate(config: ml_collections.ConfigDict, workdir: str, widths: Sequence[float] | None = None,
              resolutions: Sequence[int] | None = None, out: str | None = None, images: Any = None,
              split: str | None = None) -> dict[str, Any]:
  """Fills the statistics store (in `out`, default the workdir) for the selection (default: the whole grid) from
  the training split, or from `images` (see `input_pipeline.image_source`; `split` of a TFDS one); reuses valid
  entries."""
  pairs = selection(config, widths, resolutions)
  outputs = workdir_lib.outputs_dir(workdir, out, 'BN statistics')
  with _writer(outputs, 'calibrate'):
    run = open_run(config, workdir, store_dir=outputs)
    return run.calibrate(pairs, _source(run, images, split))


def _writer(outputs: str, what: str) -> contextlib.AbstractContextManager:
  """The post-training lock of where the outputs go, held by process 0 (the one that writes the store and the
  table); a training of the same workdir goes on beside it."""
  if jax.process_index():
    return contextlib.nullcontext()
  return workdir_lib.lock(outputs, what, post_training=True)


def _source(run: TrainedRun, images: Any, split: str | None) -> input_pipeline.ImageSource | None:
  return None if images is None else input_pipeline.image_source(run.config, images, run.channels, split)


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


@dataclasses.dataclass(frozen=True)
class Timing:
  """What the sweep times per configuration: batch 1 in JAX always (what `--budget_ms` bounds); one eval batch and
  the TFLite interpreter only when asked, each being one more exact program per configuration to compile."""
  repeats: int = 10
  batch: bool = False
  tflite: bool = False


def _latencies(run: TrainedRun, stats: Any, width: float, resolution: int,
               timing: Timing) -> tuple[float, float | None, float | None]:
  """Median ms of the exported network at batch 1 on the first local device, and what `timing` adds (None when
  not asked)."""
  model = export.build(run.model, run.params, stats, width, resolution, run.channels, Resize.of(run.config))
  device = jax.local_devices()[0]
  variables = jax.device_put(export.fold_batch_norm(model.variables), device)
  predict = jax.jit(lambda v, x: export.apply_narrow(model.model, v, x, width))
  out = []
  for size in (1, run.config.eval_batch_size) if timing.batch else (1,):
    images = jax.device_put(np.zeros((size, resolution, resolution, run.channels), np.float32), device)
    program = predict.lower(variables, images).compile()
    # A whole eval batch is ~eval_batch_size times the work of one image: its median is steady after 3 timed calls.
    out.append(latency.median_ms(functools.partial(program, variables, images), repeats=timing.repeats,
                                 max_seconds=2.0 if size == 1 else 0.25))
  tflite_ms = None
  if timing.tflite:
    from mutualnet_jax import tf_export  # noqa: PLC0415  optional: the TF converter and interpreter load on demand
    tflite_ms = tf_export.network_tflite_latency_ms(model, batch=1, repeats=timing.repeats)
  return out[0], (out[1] if timing.batch else None), tflite_ms


def _no_labels(config: ml_collections.ConfigDict, images: input_pipeline.ImageSource | None) -> str | None:
  """Why accuracy is not measured, or None when it is. It is measured on the run's eval split; with `images` given
  that split may be absent (a converted checkpoint without ImageNet) or of other classes, and then the accuracy
  columns stay empty instead of failing the sweep."""
  if images is None:
    return None
  try:
    input_pipeline.get_dataset_info(config)
  except UserError as e:
    return str(e)
  return None


def _measure(run: TrainedRun, pairs: Sequence[tuple[float, int]], timing: Timing,
             images: input_pipeline.ImageSource | None = None) -> tuple[list[Row], dict[str, Any]]:
  """One row per (width, resolution), reporting progress with an ETA; plus counts and seconds per phase."""
  config = run.config
  eval_batches = input_pipeline.Replay(
      lambda: input_pipeline.eval_iterator(config, global_batch_size=config.eval_batch_size))
  no_labels = _no_labels(config, images)
  if no_labels:
    logging.warning('accuracy is not measured (its columns stay empty): %s', no_labels)
  counter = CompileCounter()
  timer, rows, calibrated, count = _Timer(counter), [], 0, 0
  with timer.phase('profile'):
    costs = {(p.width, p.resolution): p for p in profile.profile_grid(
        config.model, sorted({w for w, _ in pairs}), sorted({r for _, r in pairs}), run.channels)}
  progress = periodic_actions.ReportProgress(num_train_steps=len(pairs), every_secs=30.0)
  with counter.counting():
    for i, (w, r) in enumerate(pairs, 1):
      with timer.phase('calibrate'):
        stats, new = run.stats(w, r, images)
      with timer.phase('evaluate'):
        acc = {'top1': None, 'top5': None, 'count': 0} if no_labels else run.evaluate(stats, w, r, eval_batches)
      with timer.phase('latency'):
        ms, ms_batch, ms_tflite = _latencies(run, stats, w, r, timing)
      calibrated += new
      count = int(acc['count'])
      rows.append(Row(w, r, costs[w, r].macs, costs[w, r].params, acc['top1'], acc['top5'], ms, ms_batch, ms_tflite))
      logging.info('[%d/%d] %s', i, len(pairs), query.describe(rows[-1]))
      progress(i)
  return rows, {'configurations': len(pairs), 'calibrated': calibrated, 'reused': len(pairs) - calibrated,
                'compiles': counter.compiles, 'cache_hits': counter.cache_hits, 'phase_seconds': timer.seconds,
                'phase_compile_seconds': timer.compile_seconds, 'eval_images': count,
                'calibration_images': config.calibration_images if images is None else images.num_images,
                'calibrated_on': 'the training split' if images is None else images.description,
                'accuracy': 'the eval split' if no_labels is None else f'not measured: {no_labels}'}


TENSORBOARD_DIR = 'sweep'  # beside training's event files: TensorBoard shows the sweep as its own runs
WIDTH_AXIS = 'by_width_percent'  # the tag group names the step axis, so no chart reads as training progress


def write_tensorboard(rows: Sequence[Row], outputs: str, plot: epath.Path, checkpoint_step: int) -> epath.Path:
  """The table in TensorBoard (clu writers). Scalar charts need a step, so each resolution is its own run
  (`sweep/<res>px`) whose `by_width_percent/{top1,top5,mflops,latency_ms}` use the width in percent as the step: one
  chart per metric, one line per resolution, the axis named by the group. The sweep's own run (`sweep`) holds what
  has no axis, at the checkpoint's training step: every row and the Pareto frontier as Markdown tables and the
  Accuracy-MACs figure. Earlier sweep event files are removed first: `rows` is the whole (merged) table, and a
  second file with the same steps would draw both."""
  logdir = epath.Path(outputs) / TENSORBOARD_DIR
  for stale in [*logdir.glob('events.out.tfevents.*'), *logdir.glob('*px/events.out.tfevents.*')]:
    stale.unlink()
  for res in sorted({r.resolution for r in rows}):
    writer = metric_writers.create_default_writer(os.fspath(logdir / f'{res}px'), asynchronous=False)
    for r in sorted((r for r in rows if r.resolution == res), key=lambda r: r.width):
      scalars = {f'{WIDTH_AXIS}/top1': r.top1, f'{WIDTH_AXIS}/top5': r.top5, f'{WIDTH_AXIS}/mflops': r.macs / 1e6,
                 f'{WIDTH_AXIS}/latency_ms': r.latency_ms}
      writer.write_scalars(int(round(100 * r.width)), {k: v for k, v in scalars.items() if v is not None})
    writer.close()
  writer = metric_writers.create_default_writer(os.fspath(logdir), asynchronous=False)
  writer.write_texts(checkpoint_step, {'all_configurations': query.format_markdown(rows),
                                       'pareto_frontier': query.format_markdown(query.pareto_frontier(rows))})
  writer.write_images(checkpoint_step, {'accuracy_macs': matplotlib.image.imread(os.fspath(plot))[None]})
  writer.close()
  return logdir


def _merge_with_table(outputs: str, rows: list[Row], meta: dict[str, Any]) -> list[Row]:
  """A partial sweep updates its own rows: earlier rows of the same weights, device and eval split are kept."""
  try:
    old, old_meta = query.read_table(outputs)
  except UserError:
    return rows
  if any(old_meta.get(k) != meta[k] for k in ('params_digest', 'device', 'eval_images')):
    return rows
  new = {(r.width, r.resolution) for r in rows}
  return sorted([r for r in old if (r.width, r.resolution) not in new] + rows, key=lambda r: (r.width, -r.resolution))


def run_sweep(config: ml_collections.ConfigDict, workdir: str, widths: Sequence[float] | None = None,
              resolutions: Sequence[int] | None = None, *, latency_repeats: int = 10,
              batch_latency: bool = False, tflite_latency: bool = False, out: str | None = None,
              images: Any = None, split: str | None = None) -> dict[str, Any]:
  """Measures the selected configurations (default: the sweep grid), writes the query table (merged with an
  earlier one of the same checkpoint), its plot and the BN statistics to `out` (default: the workdir); returns a
  summary, also written to `sweep_summary.json`. With `images` (see `input_pipeline.image_source`) BN is
  calibrated on them, and the accuracy columns stay empty when the run's eval split cannot be read."""
  start = time.perf_counter()
  pairs = selection(config, widths, resolutions)
  outputs = workdir_lib.outputs_dir(workdir, out, 'sweep table and BN statistics')
  with _writer(outputs, 'sweep'):
    run = open_run(config, workdir, store_dir=outputs)
    timing = Timing(latency_repeats, batch_latency, tflite_latency)
    return _sweep(run, pairs, timing, start, outputs, _source(run, images, split))


def _sweep(run: TrainedRun, pairs: Sequence[tuple[float, int]], timing: Timing, start: float, outputs: str,
           images: input_pipeline.ImageSource | None) -> dict[str, Any]:
  config, workdir = run.config, run.workdir
  rows, summary = _measure(run, pairs, timing, images)
  summary.update(device=str(jax.local_devices()[0]), backend=jax.default_backend())
  meta = {'workdir': os.fspath(workdir), 'checkpoint_step': run.step, 'params_digest': run.params_digest,
          'method': config.method, 'model': config.model.name, 'dataset': config.dataset,
          'device': summary['device'], 'backend': summary['backend'], 'eval_images': summary['eval_images'],
          'calibrated_on': summary['calibrated_on']}
  if jax.process_index() == 0:
    rows = _merge_with_table(outputs, rows, meta)
    summary['table'] = [os.fspath(p) for p in query.write_table(rows, outputs, meta)]
    plot = plots.accuracy_macs(rows, epath.Path(outputs) / plots.PLOT_NAME,
                               title=f'{config.method} {config.model.name}')
    summary['plot'] = os.fspath(plot)
    summary['tensorboard'] = os.fspath(write_tensorboard(rows, outputs, plot, run.step))
  summary['wall_seconds'] = time.perf_counter() - start
  if jax.process_index() == 0:
    (epath.Path(outputs) / SUMMARY).write_text(json.dumps(summary, indent=1))
  return summary
