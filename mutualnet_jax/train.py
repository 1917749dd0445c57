"""MutualNet training: per-bucket compiled sub-network steps, one optax update per step, and the training loop.

A step trains the sub-networks the sampler draws (max width at the highest resolution with cross-entropy, the others
with inplace distillation towards its prediction). Each (width, resolution, loss) bucket is its own compiled
forward+backward (compiled once, cached, optionally ahead of time in parallel threads); the gradients of all
sub-networks are summed in one jitted optimizer update, as the official code does by calling `backward()` once per
sub-network before a single `optimizer.step()`.
"""
from __future__ import annotations

import contextlib
import functools
import signal
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions
from jax.sharding import Mesh

from mutualnet_jax import (bn_calibration, checkpointing, compilation, evaluation, init_from, input_pipeline, losses,
                           parallel, workdir as workdir_lib)
from mutualnet_jax.errors import UserError
from mutualnet_jax.models import get_model
from mutualnet_jax.models.base import SlimmableModel
from mutualnet_jax.preprocess import input_size, resize
from mutualnet_jax.programs import Programs
from mutualnet_jax.sampling import Bucket, Sampler, StepPlan, Subnet
from mutualnet_jax.train_state import (TrainState, abstract_state, adjust_loss_scale, create_optimizer, init_state,
                                       learning_rate_schedule, needs_loss_scaling)


def subnet_loss_and_grad(model: SlimmableModel, subnet: Bucket, *, label_smoothing: float = 0.0,
                         temperature: float = 1.0, antialias: bool = False) -> Callable[..., Any]:
  """(params, images, target, active, scale, grads) -> (metrics, grads + this sub-network's gradients, logits) for
  one sub-network bucket.

  `images` is the global batch at the pipeline's resolution; it is resized on the device. `target` is the labels for
  'ce' sub-networks and the teacher's logits for 'kd' ones (no gradient flows into them). `active`: the real width's
  channel counts for a masked bucket (`model.channel_counts`), None for an exact one. `scale`: the loss scale of a
  float16 run (the gradients come back unscaled), None otherwise. `grads`: the step's gradients so far (None for its
  first sub-network); the sum is written into its (donated) buffers, so a step keeps one gradient tree however many
  sub-networks it trains.
  """
  def fn(params: Any, images: jax.Array, target: jax.Array, active: jax.Array | None, scale: jax.Array | None,
         summed: Any):
    x = resize(images, subnet.resolution, antialias)

    def loss_fn(p):
      logits = model.apply({'params': p}, x, width=subnet.width, train=True, active=active)
      if subnet.loss == 'ce':
        loss = losses.cross_entropy(logits, target, label_smoothing)
      else:
        loss = losses.distillation(logits, target, temperature)
      return (loss if scale is None else loss * scale), (loss, logits)

    (_, (loss, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    if scale is not None:
      grads = jax.tree.map(lambda g: g / scale, grads)
    if summed is not None:
      grads = jax.tree.map(jnp.add, summed, grads)
    metrics = {'loss': loss}
    if subnet.loss == 'ce':
      metrics['accuracy'] = (logits.argmax(-1) == target).mean()
    return metrics, grads, logits
  return fn


class SubnetSteps:
  """The training step's sub-network programs (forward + backward), compiled ahead of time with abstract arguments.

  A step's first sub-network (the teacher) starts the gradient sum, so its bucket also has a program that takes no
  gradients: the programs' variant is `first`."""

  def __init__(self, model: SlimmableModel, config: ml_collections.ConfigDict, mesh: Mesh, abstract_params: Any,
               image_shape: Sequence[int], num_classes: int):
    self.model, self.config = model, config
    self.abstract_params = parallel.abstract(abstract_params, parallel.replicated_sharding(mesh))
    batch = parallel.batch_sharding(mesh)
    self.images = jax.ShapeDtypeStruct(tuple(image_shape), jnp.float32, sharding=batch)
    self.targets = {'ce': jax.ShapeDtypeStruct(image_shape[:1], jnp.int32, sharding=batch),
                    'kd': jax.ShapeDtypeStruct((image_shape[0], num_classes), jnp.float32, sharding=batch)}
    self.active = jax.ShapeDtypeStruct((len(model.channel_bases()),), jnp.int32,
                                       sharding=parallel.replicated_sharding(mesh))
    self.scale = (jax.ShapeDtypeStruct((), jnp.float32, sharding=parallel.replicated_sharding(mesh))
                  if needs_loss_scaling(model) else None)
    self.programs = Programs(model, mesh, self._compile)

  def _compile(self, bucket: Bucket, first: bool) -> Any:
    fn = subnet_loss_and_grad(self.model, bucket, label_smoothing=self.config.label_smoothing,
                              temperature=self.config.kd_temperature, antialias=self.config.resize_antialias)
    active = self.active if bucket.masked else None
    summed = None if first else self.abstract_params
    return jax.jit(fn, donate_argnums=5).lower(self.abstract_params, self.images, self.targets[bucket.loss], active,
                                               self.scale, summed).compile()

  def precompile(self, buckets: Sequence[Bucket], threads: int | None = None) -> float:
    """Compiles every bucket in parallel threads, the first (the teacher's) without a gradient sum; the wall time."""
    return self.programs.precompile([(b, i == 0) for i, b in enumerate(buckets)], threads)

  @property
  def num_compiled(self) -> int:
    return self.programs.num_compiled

  @property
  def compile_seconds(self) -> dict[Any, float]:
    return self.programs.compile_seconds

  def __call__(self, subnet: Subnet, bucket: Bucket, params: Any, images: jax.Array, target: jax.Array,
               scale: jax.Array | None = None, summed: Any = None):
    """One sub-network's (metrics, gradients added to `summed`, logits), in `bucket`'s program."""
    return self.programs(bucket, summed is None)(params, images, target, self.programs.active(bucket, subnet.width),
                                                 scale, summed)


def _apply(tx: optax.GradientTransformation, state: TrainState,
           total: Any) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optax update from the summed gradients of a step's sub-networks. A float16 run skips the update of a step
  whose gradients overflowed (parameters and optimizer state unchanged, the step still counts) and adjusts its
  loss scale; its gradient norm is then logged as 0 with `skipped` = 1."""
  updates, opt_state = tx.update(total, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(total)
  if state.dynamic_scale is None:
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), {'grad_norm': grad_norm}
  finite = jnp.isfinite(grad_norm)
  keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
  state = state.replace(step=state.step + 1, params=keep(params, state.params),
                        opt_state=keep(opt_state, state.opt_state),
                        dynamic_scale=adjust_loss_scale(state.dynamic_scale, finite))
  return state, {'grad_norm': jnp.where(finite, grad_norm, 0.0), 'skipped': (~finite).astype(jnp.float32),
                 'loss_scale': state.dynamic_scale.scale}


class Trainer:
  """The model, sampler, optimizer and compiled functions of one run; `step` is one MutualNet update."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, *, channels: int, image_size: int,
               total_steps: int, steps_per_epoch: int):
    self.config, self.mesh = config, mesh
    self.sampler = Sampler(config)
    parallel.check_batch_size(config.batch_size, mesh)
    # Per-device BN statistics are groups of the global batch aligned with its sharding: no cross-device traffic.
    self.model = get_model(config.model, bn_groups=1 if config.bn_sync else mesh.size)
    if image_size < max(self.sampler.resolutions):
      raise UserError(f'config.image_size={image_size} is below the highest resolution '
                      f'{max(self.sampler.resolutions)}: the pipeline must deliver the highest resolution.')
    self.channels, self.image_size = channels, image_size
    self.schedule = learning_rate_schedule(config, total_steps, steps_per_epoch)
    self.tx = create_optimizer(config, self.schedule)
    self.steps = SubnetSteps(self.model, config, mesh, self.abstract_state().params,
                             (config.batch_size, image_size, image_size, channels), config.model.num_classes)
    self._update = jax.jit(functools.partial(_apply, self.tx), donate_argnums=0)

  def init_state(self, seed: int) -> TrainState:
    return init_state(self.model, self.tx, seed, self.channels, self.mesh)

  def abstract_state(self) -> TrainState:
    return abstract_state(self.model, self.tx, self.channels, self.mesh)

  def step(self, state: TrainState, batch: Mapping[str, jax.Array],
           plan: StepPlan | int) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update from a global batch: the plan's sub-networks (or those the sampler draws for step `plan`); returns
    the new state and per-sub-network metrics."""
    plan = self.sampler.plan(plan) if isinstance(plan, int) else plan
    images, labels = batch['image'], batch['label']
    scale = None if state.dynamic_scale is None else state.dynamic_scale.scale
    metrics, grads, teacher_logits = self._run(plan.teacher, state.params, images, labels, scale, None)
    for student in plan.students:
      target = labels if student.loss == 'ce' else teacher_logits
      m, grads, _ = self._run(student, state.params, images, target, scale, grads)
      metrics.update(m)
    state, update_metrics = self._update(state, grads)
    return state, {**metrics, **update_metrics}

  def _run(self, subnet: Subnet, params: Any, images: jax.Array, target: jax.Array, scale: jax.Array | None,
           summed: Any):
    m, grads, logits = self.steps(subnet, self.sampler.bucket(subnet), params, images, target, scale, summed)
    return {f'{k}/{subnet.name}': v for k, v in m.items()}, grads, logits


class PreemptionGuard:
  """Turns SIGTERM (TPU/GCE preemption, `kill`) and SIGINT (Ctrl-C) into 'save and stop at the next step boundary'.

  A context manager held for the whole run, from before the checkpoint manager opens until after its last save has
  finished: a second signal at any moment (while the final save is written, say) is logged and cannot cut that save
  short. Multi-process jobs ask JAX's preemption sync service instead, so every process stops at the same step.
  """
  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested: str | None = None  # the signal's name once one arrived
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> 'PreemptionGuard':
    if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
      self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
    return self

  def __exit__(self, *exc: Any) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.requested:
      logging.warning('%s received again: still saving the checkpoint; the run stops once it is complete.', name)
      return
    logging.warning('%s received: saving a checkpoint and stopping at the end of this step.', name)
    self.requested = name

  def should_stop(self, step: int, manager: Any) -> bool:
    if jax.process_count() > 1:
      return manager.reached_preemption(step)
    return bool(self.requested)


def mean_metrics(history: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """Averages per-step scalars of a log interval."""
  keys = sorted({k for h in history for k in h})
  return {k: float(np.mean([h[k] for h in history if k in h])) for k in keys}


def finite_history(history: Sequence[Mapping[str, jax.Array]], first_step: int, last_saved: int,
                   workdir: str, retrying: bool = False) -> list[dict[str, float]]:
  """The metrics of steps first_step+1, ... on the host (one transfer); a UserError at the first step whose loss or
  gradient norm is not finite, after recording the divergence in config.json so that the fix (an optimiser setting)
  may be resumed without --resume_with_changes. Nothing after `last_saved` was saved, so no non-finite state ever
  reaches a checkpoint. `retrying`: this run resumed `last_saved` after an earlier divergence and saved nothing since,
  so that checkpoint itself is suspect."""
  host = jax.device_get(list(history))
  for i, metrics in enumerate(host):
    bad = {k: float(v) for k, v in metrics.items() if not np.isfinite(v)}
    if bad:
      step = first_step + i + 1
      if jax.process_index() == 0:
        workdir_lib.save_config(workdir_lib.saved_config(workdir), workdir,
                                **{workdir_lib.DIVERGED_KEY: {'step': step, 'last_checkpoint': last_saved}})
      name, value = sorted(bad.items())[0]
      if retrying:
        raise UserError(f'training diverged again: {name} is {value} at step {step}, after resuming the checkpoint of '
                        f'step {last_saved} with new settings: its weights may already be damaged; start a fresh '
                        '--workdir (with the lower learning rate).')
      where = (f'the last finite checkpoint is step {last_saved}, which the same command resumes from' if last_saved
               else 'no checkpoint was saved before it, so the same command starts afresh')
      raise UserError(f'training diverged: {name} is {value} at step {step}; {where}. Lower --config.learning_rate '
                      '(or raise --config.warmup_epochs) and run it again.')
  return host


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
    self.calibrator = bn_calibration.Calibrator(trainer.model, trainer.mesh, config.resize_antialias)
    self.evaluator = evaluation.Evaluator(trainer.model, trainer.mesh, config.resize_antialias)
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
    try:
      return _loop(config, workdir, trainer, ckpt, writer, state, start, total_steps, steps_per_epoch,
                   after_divergence, guard)
    finally:
      writer.flush()


def _loop(config: ml_collections.ConfigDict, workdir: str, trainer: Trainer, ckpt: checkpointing.Checkpoints,
          writer: metric_writers.MetricWriter, state: TrainState, start: int, total_steps: int,
          steps_per_epoch: int, after_divergence: bool, guard: PreemptionGuard) -> dict[str, Any]:
  if start == 0:
    writer.write_hparams({k: v for k, v in config.to_dict().items() if not isinstance(v, dict)})
  buckets = trainer.sampler.buckets()
  logging.info('%s: %d buckets (width, resolution, loss) can be sampled.', config.method, len(buckets))
  if config.precompile:
    seconds = trainer.steps.precompile(buckets)
    writer.write_scalars(start, {'compile/precompile_seconds': seconds, 'compile/buckets': len(buckets)})

  evaluate = InTrainingEval(config, trainer) if config.eval_every_steps else None
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
  hooks = [periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)]
  if config.profile_steps and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=config.profile_steps,
                                          first_profile=start + 10, every_secs=None))
  batches = input_pipeline.train_iterator(config, global_batch_size=config.batch_size, start_step=start)
  history, compiled_before, interval_start, summary = [], trainer.steps.num_compiled, time.perf_counter(), {}
  run_start, images_seen = time.perf_counter(), 0
  step = last_saved = start
  record = workdir_lib.config_record(config)  # every checkpoint keeps its run's settings (config.json may be lost)
  end = total_steps if config.steps_per_run <= 0 else min(total_steps, start + config.steps_per_run)
  while step < end:
    if guard.requested and step == start:  # a signal while starting up: nothing new to save
      logging.warning('Stopped at step %d after %s, before training; the same command resumes.', step,
                      guard.requested)
      break
    batch = parallel.global_batch(next(batches), trainer.mesh)
    state, metrics = trainer.step(state, batch, step)
    history.append(metrics)
    step += 1
    images_seen += config.batch_size
    for hook in hooks:
      hook(step)
    stop = guard.should_stop(step, ckpt.manager)
    log = step % config.log_every_steps == 0 or step == end or stop  # a run's last steps are logged too
    save = step % config.checkpoint_every_steps == 0 or step == end or stop
    if log or save:  # the divergence guard: nothing non-finite is logged as progress or saved
      host = finite_history(history, step - len(history), last_saved, workdir,
                            retrying=after_divergence and last_saved == start)
    if log:
      scalars = mean_metrics(host)
      elapsed = time.perf_counter() - interval_start
      scalars['learning_rate'] = float(trainer.schedule(step - 1))
      scalars['images_per_sec'] = len(history) * config.batch_size / elapsed
      if trainer.steps.num_compiled > compiled_before:
        scalars['compile/buckets'] = trainer.steps.num_compiled
        scalars['compile/seconds_total'] = sum(trainer.steps.compile_seconds.values())
        compiled_before = trainer.steps.num_compiled
      writer.write_scalars(step, scalars)
      history, interval_start = [], time.perf_counter()
    if save:
      ckpt.save(step, state, {'step': step, 'config': record})
      last_saved = step
    if evaluate and not stop and (step % eval_every == 0 or step == total_steps):
      summary = evaluate(state.params)
      writer.write_scalars(step, summary)
    if stop:
      logging.warning('Stopped at step %d after %s; the same command resumes.', step,
                      guard.requested or 'a preemption notice')
      break
  summary = {**summary, 'step': step, 'total_steps': total_steps, 'wall_seconds': time.perf_counter() - run_start,
             'images_seen': images_seen, 'buckets_compiled': trainer.steps.num_compiled,
             'compile_seconds': sum(trainer.steps.compile_seconds.values()), 'stopped_by': guard.requested}
  logging.info('Summary: %s', summary)
  return summary
