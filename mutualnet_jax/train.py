"""The training loop: start or resume a run, train it one step at a time (`mutualnet_jax.train_step`), log,
evaluate, checkpoint, and stop cleanly on a signal or a divergence (`mutualnet_jax.guards`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions

from mutualnet_jax import (bn_calibration, checkpointing, compilation, config_check, evaluation, init_from,
                           input_pipeline, parallel, workdir as workdir_lib)
from mutualnet_jax.errors import UserError
from mutualnet_jax.guards import PreemptionGuard, check_finite
from mutualnet_jax.resizing import Resize, input_size
from mutualnet_jax.train_state import TrainState
from mutualnet_jax.train_step import Trainer


def mean_metrics(history: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """Averages per-step scalars of a log interval."""
  keys = sorted({k for h in history for k in h})
  return {k: float(np.mean([h[k] for h in history if k in h])) for k in keys}


def _num_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  steps = int(round(config.num_epochs * steps_per_epoch))
  if steps <= 0:
    raise UserError(f'config.num_epochs={config.num_epochs} gives no training steps: set a positive value.')
  return steps


class InTrainingEval:
  """Max and min width at the highest resolution, each with a quick BN recalibration on training images
  (`config.eval_calibration_images`): batch statistics of the eval batch would leak test statistics, and running
  averages are not kept during training (statistics are per configuration, computed after training)."""

  def __init__(self, config: ml_collections.ConfigDict, trainer: Trainer):
    self.config = config
    self.calibrator = bn_calibration.Calibrator(trainer.model, trainer.mesh, Resize.of(config),
                                                official=bn_calibration.is_official(config))
    self.evaluator = evaluation.Evaluator(trainer.model, trainer.mesh, Resize.of(config))
    sampler = trainer.sampler
    self.configs = {sampler.teacher.name: (sampler.teacher.width, sampler.teacher.resolution)}
    if sampler.method != 'independent':
      self.configs['min'] = (sampler.min_width, sampler.max_resolution)

  def __call__(self, params: Any) -> dict[str, float]:
    out = {}
    for name, (width, resolution) in self.configs.items():
      batches = input_pipeline.calibration_iterator(self.config, num_images=self.config.eval_calibration_images,
                                                   global_batch_size=self.config.calibration_batch_size)
      stats = self.calibrator.calibrate(params, width, resolution, batches)
      result = self.evaluator.evaluate(params, stats, width, resolution, input_pipeline.eval_iterator(
          self.config, global_batch_size=self.config.eval_batch_size))
      out[f'eval_top1/{name}'] = result['top1']
      out[f'eval_top5/{name}'] = result['top5']
    return out


def _check_resume(config: ml_collections.ConfigDict, workdir: str, step: int, accept_changes: bool,
                  recorded: dict[str, Any] | None = None) -> bool:
  """Resuming must continue the same run: a changed setting that would alter the data order, the schedule or the
  sampled sub-networks is refused unless `accept_changes` (then recorded in config.json's history). After a
  divergence, the optimiser settings may change without it (that is the fix); returns whether it did."""
  damaged = workdir_lib.set_aside_damaged_config(workdir) if jax.process_index() == 0 else None
  if damaged:
    logging.warning('config.json was damaged: moved to %s; the checkpoint\'s record of its settings decides.', damaged)
  try:
    saved = workdir_lib.saved_config(workdir)
  except UserError:  # config.json gone or damaged: the checkpoint's own record (absent in old checkpoints)
    saved = workdir_lib.config_from_record(recorded) if isinstance(recorded, dict) else None
  changes = workdir_lib.config_changes(saved, config) if saved is not None else {}
  diverged = workdir_lib.bookkeeping(workdir).get(workdir_lib.DIVERGED_KEY)
  blocking = {k: v for k, v in changes.items() if not (diverged and k in workdir_lib.OPTIMISER_FIELDS)}
  if blocking and not accept_changes:
    changed = workdir_lib.describe_changes(blocking)
    raise UserError(f'resuming {workdir} from step {step} with changed settings ({changed}) would make it another run '
                    '(data order, schedule or sub-networks): use a fresh --workdir, the settings of its config.json, '
                    'or --resume_with_changes to continue with them (recorded).')
  if jax.process_index() == 0:
    if changes:
      logging.warning('Resuming with changed settings: %s (recorded in config.json).',
                      workdir_lib.describe_changes(changes))
      workdir_lib.record_changes(config, workdir, step, changes)
      workdir_lib.save_config(config, workdir, **{workdir_lib.DIVERGED_KEY: None})
    else:
      workdir_lib.save_config(config, workdir)
  return bool(diverged)


def _initial_state(config: ml_collections.ConfigDict, workdir: str, trainer: Trainer,
                   ckpt: checkpointing.Checkpoints, accept_changes: bool) -> tuple[TrainState, int, bool]:
  """The newest checkpoint that restores (damaged newer ones set aside), or fresh parameters; and whether the run
  resumes after a divergence."""
  restored = ckpt.restore_latest(trainer.abstract_state())
  if restored is None:
    if jax.process_index() == 0:
      workdir_lib.save_config(config, workdir, **{workdir_lib.HISTORY_KEY: None, workdir_lib.DIVERGED_KEY: None})
    return init_from.initial_state(config, trainer.init_state(config.seed), trainer.tx, trainer.mesh), 0, False
  step, state, meta = restored
  after_divergence = _check_resume(config, workdir, step, accept_changes, meta.get('config'))
  if 'sampler' in meta:
    logging.warning('The checkpoint at step %d kept the old stateful sampler; sub-networks are drawn from '
                    '(seed, step) from now on (the data order is unchanged).', step)
  logging.info('Resumed from step %d.', step)
  return state, step, after_divergence


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       accept_changes: bool = False) -> dict[str, Any]:
  """Trains (resuming from the newest checkpoint in `workdir`), evaluates periodically, returns a summary.

  The process holds the workdir's lock throughout (one writer per workdir) and turns SIGTERM/SIGINT into a save
  and a stop (PreemptionGuard); `accept_changes` resumes with changed settings (see `_check_resume`)."""
  config_check.check(config)  # a run started from Python gets the command line's one-line checks too
  workdir_lib.check_writable(workdir)
  holder = workdir_lib.lock(workdir, 'training') if jax.process_index() == 0 else contextlib.nullcontext()
  with holder, PreemptionGuard() as guard:
    return _train(config, workdir, accept_changes, guard)


def _train(config: ml_collections.ConfigDict, workdir: str, accept_changes: bool,
           guard: PreemptionGuard) -> dict[str, Any]:
  compilation.enable_cache(config.compilation_cache_dir)
  mesh = parallel.make_mesh()
  info = input_pipeline.get_dataset_info(config)
  steps_per_epoch = info.num_train_examples // config.batch_size
  if steps_per_epoch == 0:
    raise UserError(f'config.batch_size={config.batch_size} exceeds the {info.num_train_examples} training images.')
  total_steps = _num_train_steps(config, steps_per_epoch)
  trainer = Trainer(config, mesh, channels=info.channels, image_size=input_size(config), total_steps=total_steps,
                    steps_per_epoch=steps_per_epoch)
  with checkpointing.Checkpoints(workdir, keep=config.keep_checkpoints,
                                 expected=checkpointing.fingerprint(config, info.channels)) as ckpt:
    state, start, after_divergence = _initial_state(config, workdir, trainer, ckpt, accept_changes)
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    end = total_steps if config.steps_per_run <= 0 else min(total_steps, start + config.steps_per_run)
    loop = Loop(config, workdir, trainer, ckpt, writer, guard, start, end, total_steps, after_divergence,
                workdir_lib.config_record(config), state, start, start)
    try:
      return _loop(loop, steps_per_epoch)
    finally:
      writer.flush()


@dataclasses.dataclass
class Loop:
  """One training run in progress: what it was started with, then what moves from step to step."""
  config: ml_collections.ConfigDict
  workdir: str
  trainer: Trainer
  ckpt: checkpointing.Checkpoints
  writer: metric_writers.MetricWriter
  guard: PreemptionGuard
  start: int
  end: int                         # this invocation stops here (config.steps_per_run)
  total_steps: int
  after_divergence: bool           # resumed after a divergence: the checkpoint it started from is suspect
  record: dict[str, Any]           # the run's settings, kept in every checkpoint
  state: TrainState
  step: int
  last_saved: int
  history: list[dict[str, jax.Array]] = dataclasses.field(default_factory=list)  # metrics since the last log
  interval_start: float = dataclasses.field(default_factory=time.perf_counter)
  compiled_before: int = 0
  summary: dict[str, float] = dataclasses.field(default_factory=dict)


def _loop(loop: Loop, steps_per_epoch: int) -> dict[str, Any]:
  config, trainer = loop.config, loop.trainer
  _before_the_first_step(loop)
  evaluate = InTrainingEval(config, trainer) if config.eval_every_steps else None
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
  hooks = _hooks(loop)
  batches = input_pipeline.train_iterator(config, global_batch_size=config.batch_size, start_step=loop.start)
  run_start = time.perf_counter()
  while loop.step < loop.end and not _stopped_while_starting(loop):
    loop.state, metrics = trainer.step(loop.state, parallel.global_batch(next(batches), trainer.mesh), loop.step)
    loop.history.append(metrics)
    loop.step += 1
    for hook in hooks:
      hook(loop.step)
    stop = loop.guard.should_stop(loop.step, loop.ckpt.manager)
    _log_and_save(loop, stop)
    if evaluate and not stop and (loop.step % eval_every == 0 or loop.step == loop.total_steps):
      loop.summary = evaluate(loop.state.params)
      loop.writer.write_scalars(loop.step, loop.summary)
    if stop:
      logging.warning('Stopped at step %d after %s; the same command resumes.', loop.step,
                      loop.guard.requested or 'a preemption notice')
      break
  summary = {**loop.summary, 'step': loop.step, 'total_steps': loop.total_steps,
             'wall_seconds': time.perf_counter() - run_start,
             'images_seen': (loop.step - loop.start) * config.batch_size,
             'buckets_compiled': trainer.steps.num_compiled,
             'compile_seconds': sum(trainer.steps.compile_seconds.values()), 'stopped_by': loop.guard.requested}
  logging.info('Summary: %s', summary)
  return summary


def _before_the_first_step(loop: Loop) -> None:
  """Hyperparameters (a fresh run), and every program the sampler can draw compiled ahead of time."""
  if loop.start == 0:
    loop.writer.write_hparams({k: v for k, v in loop.config.to_dict().items() if not isinstance(v, dict)})
  buckets = loop.trainer.sampler.buckets()
  if loop.config.precompile:
    logging.info('Compiling %d training programs (%s: every bucket the sampler can draw) before the first step...',
                 len(buckets), loop.config.method)
    seconds = loop.trainer.steps.precompile(buckets)
    logging.info('Compiled %d programs in %.1f s.', len(buckets), seconds)
    loop.writer.write_scalars(loop.start, {'compile/precompile_seconds': seconds, 'compile/buckets': len(buckets)})
  loop.compiled_before = loop.trainer.steps.num_compiled


def _hooks(loop: Loop) -> list[Any]:
  hooks = [periodic_actions.ReportProgress(num_train_steps=loop.total_steps, writer=loop.writer)]
  if loop.config.profile_steps and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(logdir=loop.workdir, num_profile_steps=loop.config.profile_steps,
                                          first_profile=loop.start + 10, every_secs=None))
  return hooks


def _stopped_while_starting(loop: Loop) -> bool:
  """A signal while starting up (compiling, say) stops the run before its first step: nothing new to save."""
  if loop.guard.requested and loop.step == loop.start:
    logging.warning('Stopped at step %d after %s, before training; the same command resumes.', loop.step,
                    loop.guard.requested)
    return True
  return False


def _log_and_save(loop: Loop, stop: bool) -> None:
  """Logs and checkpoints at their intervals, at the end and when stopping, after the divergence guard: nothing
  non-finite is logged as progress or saved."""
  config, step = loop.config, loop.step
  log = step % config.log_every_steps == 0 or step == loop.end or stop  # a run's last steps are logged too
  save = step % config.checkpoint_every_steps == 0 or step == loop.end or stop
  if not (log or save):
    return
  host = check_finite(loop.history, step - len(loop.history), loop.last_saved, loop.workdir,
                      retrying=loop.after_divergence and loop.last_saved == loop.start)
  if log:
    _write_scalars(loop, host)
  if save:
    loop.ckpt.save(step, loop.state, {'step': step, 'config': loop.record})
    loop.last_saved = step


def _write_scalars(loop: Loop, host: Sequence[Mapping[str, float]]) -> None:
  trainer = loop.trainer
  scalars = mean_metrics(host)
  scalars['learning_rate'] = float(trainer.schedule(loop.step - 1))
  scalars['images_per_sec'] = len(loop.history) * loop.config.batch_size / (time.perf_counter() - loop.interval_start)
  if trainer.steps.num_compiled > loop.compiled_before:
    scalars['compile/buckets'] = trainer.steps.num_compiled
    scalars['compile/seconds_total'] = sum(trainer.steps.compile_seconds.values())
    loop.compiled_before = trainer.steps.num_compiled
  loop.writer.write_scalars(loop.step, scalars)
  loop.history, loop.interval_start = [], time.perf_counter()
