"""What each `main.py --mode` does, as functions that return the text to print (so tests reach them without a
subprocess). main.py only parses flags, picks the allocator and dispatches here.

Modes import what they need when they run: `--mode=query` reads a table and must start in well under a second, so
importing this module loads neither JAX, TensorFlow nor matplotlib; `--mode=plot` loads only matplotlib.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from typing import Any, Callable, Sequence

import ml_collections

from mutualnet_jax import query as query_lib, workdir as workdir_lib
from mutualnet_jax.errors import UserError

MODES = ('train', 'calibrate', 'sweep', 'query', 'export', 'predict', 'plot')
_NEEDS_CONFIG = ('calibrate', 'sweep', 'export', 'predict')  # default: the config.json that training saved


@dataclasses.dataclass(frozen=True)
class Options:
  """The mode-specific command-line settings (see main.py's flags for their meaning)."""
  width: float | None = None
  resolution: int | None = None
  widths: Sequence[float] | None = None
  resolutions: Sequence[int] | None = None
  latency_repeats: int = 10
  budget_mflops: float | None = None
  budget_ms: float | None = None
  format: str = 'text'
  workdirs: Sequence[str] | None = None
  labels: Sequence[str] | None = None
  out: str | None = None
  resume_with_changes: bool = False
  overwrite: bool = False
  tflite_latency: bool = False
  batch_latency: bool = False
  latency: str = 'jax'
  images: str | None = None
  split: str | None = None
  count: int | None = None


def _render(options: Options, result: Any, text: str) -> str:
  return json.dumps(result) if options.format == 'json' else text


def _optional(value: Any) -> list[Any] | None:
  return None if value is None else [value]


def train(config: ml_collections.ConfigDict, workdir: str, options: Options) -> str:
  from mutualnet_jax import train as training  # noqa: PLC0415  heavy: JAX + TensorFlow
  summary = training.train_and_evaluate(config, workdir, accept_changes=options.resume_with_changes)
  text = f"Trained to step {summary['step']} of {summary['total_steps']} in {summary['wall_seconds']:.0f} s"
  if summary.get('stopped_by'):
    return f"{text} (stopped by {summary['stopped_by']}; the same command resumes)."
  if summary['step'] < summary['total_steps']:
    return f'{text}; the same command continues.'
  return (f'{text}.\nNext: python main.py --mode=sweep --workdir={workdir}   '
          '(BN calibration, accuracy, MACs and latency of every width x resolution)')


def calibrate(config: ml_collections.ConfigDict, workdir: str, options: Options) -> str:
  from mutualnet_jax import sweep  # noqa: PLC0415  heavy: JAX + TensorFlow
  r = sweep.calibrate(config, workdir, _optional(options.width), _optional(options.resolution), out=options.out,
                      images=options.images, split=options.split)
  return _render(options, r, f"{r['calibrated']} configurations calibrated on {r['images']}, {r['reused']} reused "
                             f"from {r['store']} in {r['seconds']:.1f} s ({r['compiles']} compilations).")


def sweep(config: ml_collections.ConfigDict, workdir: str, options: Options) -> str:
  from mutualnet_jax import sweep as sweeping  # noqa: PLC0415  heavy: JAX + TensorFlow
  if options.latency_repeats < 1:
    raise UserError(f'--latency_repeats must be at least 1, got {options.latency_repeats}.')
  s = sweeping.run_sweep(config, workdir, options.widths, options.resolutions,
                         latency_repeats=options.latency_repeats, batch_latency=options.batch_latency,
                         tflite_latency=options.tflite_latency, out=options.out, images=options.images,
                         split=options.split)
  accuracy = '' if s['accuracy'] == 'the eval split' else f"\naccuracy {s['accuracy']}"
  return _render(options, s, f"{s['configurations']} configurations in {s['wall_seconds']:.0f} s "
                             f"({s['compiles']} compilations): {', '.join(s.get('table', []))}; plot {s.get('plot')}"
                             f"{accuracy}")


def query(config: ml_collections.ConfigDict | None, workdir: str, options: Options) -> str:
  del config
  rows, _ = query_lib.read_table(workdir)
  if options.budget_mflops is None and options.budget_ms is None:
    frontier = query_lib.pareto_frontier(rows)
    return _render(options, [query_lib.as_dict(r) for r in frontier],
                   'Pareto frontier (MACs):\n' + query_lib.format_rows(frontier))
  best = query_lib.query(rows, options.budget_mflops, options.budget_ms, options.latency)
  return _render(options, query_lib.as_dict(best), query_lib.describe(best))


def export(config: ml_collections.ConfigDict, workdir: str, options: Options) -> str:
  from mutualnet_jax import api  # noqa: PLC0415  heavy: JAX + TensorFlow
  if options.width is None or options.resolution is None:
    raise UserError('--mode=export needs --width and --resolution.')
  return str(api.open(workdir, config).export(options.width, options.resolution, options.out,
                                              overwrite=options.overwrite))


PREDICT_COUNT = 10  # images of the split that --mode=predict runs by default
def predict(config: ml_collections.ConfigDict, workdir: str, options: Options) -> str:
  """Runs the run's budget-adaptive network (batch 1) on images of its eval split or of --images: per image the
  configuration that ran and the predicted class, then top-1 where the split gives labels."""
  import numpy as np  # noqa: PLC0415  query and plot start without it
  from mutualnet_jax import api  # noqa: PLC0415  heavy: JAX + TensorFlow
  if options.budget_mflops is None and options.budget_ms is None:
    raise UserError('--mode=predict needs a budget: --budget_ms and/or --budget_mflops.')
  if options.count is not None and options.count < 1:
    raise UserError(f'--count must be at least 1, got {options.count}.')
  run = api.open(workdir, config)
  run.best(options.budget_mflops, options.budget_ms)  # a budget nothing fits fails before anything compiles
  if options.images:
    from mutualnet_jax import input_pipeline  # noqa: PLC0415  heavy: TensorFlow
    images, labels = input_pipeline.read_images(options.images, run.trained.channels)[:options.count], None
    if isinstance(images, list):
      raise UserError(f'the images in {options.images} differ in size: resize them to one size (the adaptive '
                      'network is compiled for one).')
  else:
    images, labels = run.examples(options.count or PREDICT_COUNT, options.split)
    if isinstance(images, list):
      raise UserError(f'the images of split {options.split or config.eval_split!r} differ in size: the adaptive '
                      'network is compiled for one; pass --images of one size.')
  start = time.perf_counter()
  net = run.adaptive(options.budget_mflops, options.budget_ms, image_size=images.shape[1:3])
  build_seconds = time.perf_counter() - start
  records, seconds = [], []
  for i in range(len(images)):
    start = time.perf_counter()
    logits = np.asarray(net(images[i:i + 1]))
    seconds.append(time.perf_counter() - start)
    records.append({'image': i, 'width': net.last.width, 'resolution': net.last.resolution,
                    'predicted': int(logits[0].argmax())})
    if labels is not None:
      records[-1]['label'] = int(labels[i])
  lines = [f"image {r['image']}: width {r['width']:g} at {r['resolution']} px -> class {r['predicted']}"
           + (f" (label {r['label']})" if 'label' in r else '') for r in records]
  summary = {'budget_mflops': options.budget_mflops, 'budget_ms': options.budget_ms, 'images': len(records),
             'configurations_held': len(net.configurations), 'build_seconds': build_seconds,
             'median_call_ms': 1e3 * statistics.median(seconds), 'predictions': records}
  lines.append(f'{len(records)} images, the most accurate of {len(net.configurations)} configurations within the '
               f'budget: {query_lib.describe(net.last)} (all {len(net.configurations)} built and compiled in '
               f"{build_seconds:.1f} s; median call {summary['median_call_ms']:.3g} ms here)")
  if labels is not None:
    correct = sum(r['predicted'] == r['label'] for r in records)
    summary['top1'] = correct / len(records)
    lines.append(f'top-1 on these images: {summary["top1"]:.2%} ({correct}/{len(records)})')
  return _render(options, summary, '\n'.join(lines))


def plot(config: ml_collections.ConfigDict | None, workdir: str, options: Options) -> str:
  del config
  from mutualnet_jax import plots  # noqa: PLC0415  matplotlib: only the modes that draw load it
  out = options.out or f'{workdir}/{plots.OVERLAY_NAME if options.workdirs else plots.PLOT_NAME}'
  return str(plots.from_workdirs(options.workdirs or [workdir], options.labels, out))


_FUNCTIONS: dict[str, Callable[[Any, str, Options], str]] = {
    'train': train, 'calibrate': calibrate, 'sweep': sweep, 'query': query, 'export': export,
    'predict': predict, 'plot': plot}


def run(mode: str, config: ml_collections.ConfigDict | None, workdir: str, options: Options = Options()) -> str:
  """Runs one mode; post-training modes without a config use the config.json that training saved in `workdir`."""
  if mode not in _FUNCTIONS:
    raise UserError(f'unknown mode {mode!r}: choose one of {MODES}.')
  if config is None and mode == 'train':
    raise UserError('--mode=train needs --config, e.g. --config=configs/default.py.')
  from_workdir = config is None and mode in _NEEDS_CONFIG
  if from_workdir:
    workdir_lib.require_checkpoint(workdir)  # the first thing missing from an untrained workdir
    from mutualnet_jax import checkpointing  # noqa: PLC0415  heavy (orbax): query and plot must not load it
    config = checkpointing.training_config(workdir)
  if config is not None and mode in ('train',) + _NEEDS_CONFIG:
    from mutualnet_jax import config_check  # noqa: PLC0415  heavy (JAX): query and plot must not load it
    try:
      config_check.check(config)
    except UserError as e:
      if from_workdir:
        raise UserError(f'{workdir}/{workdir_lib.CONFIG_FILE}: {e} (fix the file, or pass --config: the config '
                        'the run was trained with)') from None
      raise
  return _FUNCTIONS[mode](config, workdir, options)
