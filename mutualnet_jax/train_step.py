"""One MutualNet training step: the sub-networks a step trains, each in its compiled program, and one optax update.

`Trainer.step` reads top to bottom: the teacher (max width, highest resolution, cross-entropy) runs first and starts
the gradient sum; each student (min width and random widths at random resolutions) learns from the teacher's
stopped-gradient prediction (KL) and adds its gradients into the same buffers; one jitted update applies the sum, as
the official code calls `backward()` once per sub-network before a single `optimizer.step()`. Each sub-network runs in
the program of its bucket (`mutualnet_jax.programs`), compiled once, ahead of time.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from mutualnet_jax import losses, parallel
from mutualnet_jax.models import get_model
from mutualnet_jax.models.base import SlimmableModel
from mutualnet_jax.resizing import Resize
from mutualnet_jax.programs import Bucket, Programs
from mutualnet_jax.sampling import Sampler, StepPlan, Subnet
from mutualnet_jax.train_state import (TrainState, abstract_state, adjust_loss_scale, create_optimizer, init_state,
                                       learning_rate_schedule, needs_loss_scaling)


def subnet_loss_and_grad(model: SlimmableModel, subnet: Bucket, *, label_smoothing: float = 0.0,
                         temperature: float = 1.0, resize: Resize = Resize()) -> Callable[..., Any]:
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
    x = resize(images, subnet.resolution)

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

  def lower(self, bucket: Bucket, first: bool) -> Any:
    """The bucket's program traced and lowered to XLA, not yet compiled (benchmarks/compile_time.py times each)."""
    fn = subnet_loss_and_grad(self.model, bucket, label_smoothing=self.config.label_smoothing,
                              temperature=self.config.kd_temperature, resize=Resize.of(self.config))
    active = self.active if bucket.masked else None
    summed = None if first else self.abstract_params
    return jax.jit(fn, donate_argnums=5).lower(self.abstract_params, self.images, self.targets[bucket.loss], active,
                                               self.scale, summed)

  def _compile(self, bucket: Bucket, first: bool) -> Any:
    return self.lower(bucket, first).compile()

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


def apply_update(tx: optax.GradientTransformation, state: TrainState,
           total: Any) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optax update from the summed gradients of a step's sub-networks. A float16 run skips the update of a step
  whose gradients overflowed (parameters and optimizer state unchanged, the step still counts) and adjusts its
  loss scale; its gradient norm is then logged as 0 with `skipped` = 1."""
  updates, opt_state = tx.update(total, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(total)
  if state.dynamic_scale is None:
    # param_norm: the divergence guard reads every metric, and finite gradients can still step to non-finite
    # parameters (which must not be saved); it is also a useful curve.
    return (state.replace(step=state.step + 1, params=params, opt_state=opt_state),
            {'grad_norm': grad_norm, 'param_norm': optax.tree.norm(params)})
  finite = jnp.isfinite(grad_norm)
  keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
  state = state.replace(step=state.step + 1, params=keep(params, state.params),
                        opt_state=keep(opt_state, state.opt_state),
                        dynamic_scale=adjust_loss_scale(state.dynamic_scale, finite))
  return state, {'grad_norm': jnp.where(finite, grad_norm, 0.0), 'param_norm': optax.tree.norm(state.params),
                 'skipped': (~finite).astype(jnp.float32), 'loss_scale': state.dynamic_scale.scale}


class Trainer:
  """The model, sampler, optimizer and compiled functions of one run; `step` is one MutualNet update."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, *, channels: int, image_size: int,
               total_steps: int, steps_per_epoch: int):
    self.config, self.mesh = config, mesh
    self.sampler = Sampler(config)
    parallel.check_batch_size(config.batch_size, mesh)
    # Per-device BN statistics are groups of the global batch aligned with its sharding: no cross-device traffic.
    self.model = get_model(config.model, bn_groups=1 if config.bn_sync else mesh.size)
    self.channels, self.image_size = channels, image_size
    self.schedule = learning_rate_schedule(config, total_steps, steps_per_epoch)
    self.tx = create_optimizer(config, self.schedule)
    self.steps = SubnetSteps(self.model, config, mesh, self.abstract_state().params,
                             (config.batch_size, image_size, image_size, channels), config.model.num_classes)
    self._update = jax.jit(functools.partial(apply_update, self.tx), donate_argnums=0)

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
