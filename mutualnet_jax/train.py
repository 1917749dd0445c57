"""MutualNet training: per-bucket compiled sub-network steps, one optax update per step, and the training loop.

A step trains the sub-networks the sampler draws (max width at the highest resolution with cross-entropy, the others
with inplace distillation towards its prediction). Each (width, resolution, loss) bucket is its own compiled
forward+backward (compiled once, cached, optionally ahead of time in parallel threads); the gradients of all
sub-networks are summed in one jitted optimizer update, as the official code does by calling `backward()` once per
sub-network before a single `optimizer.step()`.
"""
from __future__ import annotations

import concurrent.futures
import functools
import os
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

from mutualnet_jax import (bn_calibration, checkpointing, compilation, evaluation, input_pipeline, losses, parallel,
                           workdir as workdir_lib)
from mutualnet_jax.errors import UserError
from mutualnet_jax.models import get_model
from mutualnet_jax.models.base import SlimmableModel
from mutualnet_jax.preprocess import input_size, resize
from mutualnet_jax.sampling import Bucket, Sampler, StepPlan, Subnet
from mutualnet_jax.train_state import (TrainState, abstract_state, create_optimizer, init_state,
                                       learning_rate_schedule)


def subnet_loss_and_grad(model: SlimmableModel, subnet: Bucket, *, label_smoothing: float = 0.0,
                         temperature: float = 1.0, antialias: bool = False) -> Callable[..., Any]:
  """(params, images, target, active) -> (metrics, grads, logits) for one sub-network bucket.

  `images` is the global batch at the pipeline's resolution; it is resized on the device. `target` is the labels for
  'ce' sub-networks and the teacher's logits for 'kd' ones (no gradient flows into them). `active`: the real width's
  channel counts for a masked bucket (`model.channel_counts`), None for an exact one.
  """
  def fn(params: Any, images: jax.Array, target: jax.Array, active: jax.Array | None):
    x = resize(images, subnet.resolution, antialias)

    def loss_fn(p):
      logits = model.apply({'params': p}, x, width=subnet.width, train=True, active=active)
      if subnet.loss == 'ce':
        return losses.cross_entropy(logits, target, label_smoothing), logits
      return losses.distillation(logits, target, temperature), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    metrics = {'loss': loss}
    if subnet.loss == 'ce':
      metrics['accuracy'] = (logits.argmax(-1) == target).mean()
    return metrics, grads, logits
  return fn


class SubnetSteps:
  """Compiled forward+backward functions, one per bucket, compiled at most once each (lazily or ahead of time)."""

  def __init__(self, model: SlimmableModel, config: ml_collections.ConfigDict, mesh: Mesh, abstract_params: Any,
               image_shape: Sequence[int], num_classes: int):
    self.model, self.config, self.mesh = model, config, mesh
    self.abstract_params = parallel.abstract(abstract_params, parallel.replicated_sharding(mesh))
    batch = parallel.batch_sharding(mesh)
    self.images = jax.ShapeDtypeStruct(tuple(image_shape), jnp.float32, sharding=batch)
    self.targets = {'ce': jax.ShapeDtypeStruct(image_shape[:1], jnp.int32, sharding=batch),
                    'kd': jax.ShapeDtypeStruct((image_shape[0], num_classes), jnp.float32, sharding=batch)}
    self.active = jax.ShapeDtypeStruct((len(model.channel_bases()),), jnp.int32,
                                       sharding=parallel.replicated_sharding(mesh))
    self._compiled: dict[Bucket, Any] = {}
    self._lock = threading.Lock()
    self.compile_seconds: dict[Bucket, float] = {}

  def compile(self, subnet: Bucket) -> Any:
    """Lowers and compiles one bucket (a cache hit if already compiled)."""
    if subnet in self._compiled:
      return self._compiled[subnet]
    start = time.perf_counter()
    fn = subnet_loss_and_grad(self.model, subnet, label_smoothing=self.config.label_smoothing,
                              temperature=self.config.kd_temperature, antialias=self.config.resize_antialias)
    active = self.active if subnet.masked else None
    compiled = jax.jit(fn).lower(self.abstract_params, self.images, self.targets[subnet.loss], active).compile()
    with self._lock:
      if subnet not in self._compiled:
        self._compiled[subnet] = compiled
        self.compile_seconds[subnet] = time.perf_counter() - start
    return self._compiled[subnet]

  def precompile(self, subnets: Sequence[Bucket], threads: int | None = None) -> float:
    """Compiles every bucket in parallel threads (XLA compiles outside the GIL); returns the wall time."""
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
      list(pool.map(self.compile, subnets))
    return time.perf_counter() - start

  @property
  def num_compiled(self) -> int:
    return len(self._compiled)

  def __call__(self, subnet: Bucket, params: Any, images: jax.Array, target: jax.Array,
               active: jax.Array | None = None):
    return self.compile(subnet)(params, images, target, active)


def _sum_and_apply(tx: optax.GradientTransformation, state: TrainState,
                   grads: Sequence[Any]) -> tuple[TrainState, jax.Array]:
  total = jax.tree.map(lambda *g: functools.reduce(jnp.add, g), *grads)
  updates, opt_state = tx.update(total, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return TrainState(state.step + 1, params, opt_state), optax.tree.norm(total)


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
    self._update = jax.jit(functools.partial(_sum_and_apply, self.tx), donate_argnums=0)

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
    metrics, teacher_grads, teacher_logits = self._run(plan.teacher, state.params, images, labels)
    grads = [teacher_grads]
    for student in plan.students:
      target = labels if student.loss == 'ce' else teacher_logits
      m, g, _ = self._run(student, state.params, images, target)
      metrics.update(m)
      grads.append(g)
    state, metrics['grad_norm'] = self._update(state, grads)
    return state, metrics

  def _run(self, subnet: Subnet, params: Any, images: jax.Array, target: jax.Array):
    bucket = self.sampler.bucket(subnet)
    active = parallel.replicate(self.model.channel_counts(subnet.width), self.mesh) if bucket.masked else None
    m, g, logits = self.steps(bucket, params, images, target, active)
    return {f'{k}/{subnet.name}': v for k, v in m.items()}, g, logits


class PreemptionGuard:
  """Turns SIGTERM (TPU/GCE preemption, `kill`) into 'save and stop at the next step boundary'.

  Multi-process jobs ask JAX's preemption sync service instead, so every process stops at the same step.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum: int, frame: Any) -> None:
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint and stopping at the end of this step.')
    self.requested = True

  def should_stop(self, step: int, manager: Any) -> bool:
    if jax.process_count() > 1:
      return manager.reached_preemption(step)
    return self.requested

  def restore(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def mean_metrics(history: Sequence[Mapping[str, jax.Array]]) -> dict[str, float]:
  """Averages per-step device scalars once per log interval (one host transfer)."""
  history = jax.device_get(list(history))
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from the latest checkpoint in `workdir`), evaluates periodically, returns a summary."""
  workdir_lib.check_writable(workdir)
  compilation.enable_cache(config.compilation_cache_dir)
  mesh = parallel.make_mesh()
  info = input_pipeline.get_dataset_info(config)
  steps_per_epoch = info.num_train_examples // config.batch_size
  if steps_per_epoch == 0:
    raise UserError(f'config.batch_size={config.batch_size} exceeds the {info.num_train_examples} training images.')
  total_steps = _num_train_steps(config, steps_per_epoch)
  trainer = Trainer(config, mesh, channels=info.channels, image_size=input_size(config), total_steps=total_steps,
                    steps_per_epoch=steps_per_epoch)
  ckpt = checkpointing.Checkpoints(workdir, keep=config.keep_checkpoints,
                                   expected=checkpointing.fingerprint(config, info.channels))
  start = ckpt.latest_step() or 0
  if start:
    state, meta = ckpt.restore(start, trainer.abstract_state())
    if 'sampler' in meta:
      logging.warning('The checkpoint at step %d kept the old stateful sampler; sub-networks are drawn from '
                      '(seed, step) from now on (the data order is unchanged).', start)
    logging.info('Resumed from step %d.', start)
  else:
    state = trainer.init_state(config.seed)

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if jax.process_index() == 0:
    workdir_lib.save_config(config, workdir)
  if start == 0:
    writer.write_hparams({k: v for k, v in config.to_dict().items() if not isinstance(v, dict)})
  buckets = trainer.sampler.buckets()
  logging.info('%s: %d buckets (width, resolution, loss) can be sampled.', config.method, len(buckets))
  if config.precompile:
    seconds = trainer.steps.precompile(buckets)
    writer.write_scalars(start, {'compile/precompile_seconds': seconds, 'compile/buckets': len(buckets)})

  evaluate = InTrainingEval(config, trainer) if config.eval_every_steps else None
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
  guard = PreemptionGuard()
  batches = input_pipeline.train_iterator(config, global_batch_size=config.batch_size, start_step=start)
  history, compiled_before, interval_start, summary = [], trainer.steps.num_compiled, time.perf_counter(), {}
  run_start, images_seen = time.perf_counter(), 0
  step = start
  end = total_steps if config.steps_per_run <= 0 else min(total_steps, start + config.steps_per_run)
  try:
    while step < end:
      batch = parallel.global_batch(next(batches), mesh)
      state, metrics = trainer.step(state, batch, step)
      history.append(metrics)
      step += 1
      images_seen += config.batch_size
      report(step)
      stop = guard.should_stop(step, ckpt.manager)
      if step % config.log_every_steps == 0 or step == end or stop:  # a run's last steps are logged too
        scalars = mean_metrics(history)
        elapsed = time.perf_counter() - interval_start
        scalars['learning_rate'] = float(trainer.schedule(step - 1))
        scalars['images_per_sec'] = len(history) * config.batch_size / elapsed
        if trainer.steps.num_compiled > compiled_before:
          scalars['compile/buckets'] = trainer.steps.num_compiled
          scalars['compile/seconds_total'] = sum(trainer.steps.compile_seconds.values())
          compiled_before = trainer.steps.num_compiled
        writer.write_scalars(step, scalars)
        history, interval_start = [], time.perf_counter()
      if step % config.checkpoint_every_steps == 0 or step == end or stop:
        ckpt.save(step, state, {'step': step})
      if evaluate and (step % eval_every == 0 or step == total_steps):
        summary = evaluate(state.params)
        writer.write_scalars(step, summary)
      if stop:
        logging.warning('Stopped at step %d after SIGTERM; the same command resumes.', step)
        break
  finally:
    guard.restore()
    ckpt.close()
    writer.flush()
  summary = {**summary, 'step': step, 'total_steps': total_steps, 'wall_seconds': time.perf_counter() - run_start,
             'images_seen': images_seen, 'buckets_compiled': trainer.steps.num_compiled,
             'compile_seconds': sum(trainer.steps.compile_seconds.values())}
  logging.info('Summary: %s', summary)
  return summary
