"""What a training run's state is: full-width parameters, the optimizer (SGD Nesterov, cosine, masked weight decay)
and its state, and how to build it, concretely or abstractly.

Post-training code needs only the *shape* of a run's state to restore a checkpoint, so `abstract_state` lives here
next to the model and optimizer construction, not inside the trainer.
"""
from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training.dynamic_scale import DynamicScale
from jax.sharding import Mesh

from mutualnet_jax import parallel
from mutualnet_jax.models import get_model, init_params
from mutualnet_jax.models.base import SlimmableModel


@flax.struct.dataclass
class TrainState:
  """`dynamic_scale`: the loss scale of a float16 run (None otherwise, so other runs' checkpoints are unchanged)."""
  step: jax.Array
  params: Any
  opt_state: Any
  dynamic_scale: DynamicScale | None = None


def needs_loss_scaling(model: SlimmableModel) -> bool:
  """float16 activations underflow in the backward pass without loss scaling; bfloat16 has float32's range."""
  return jnp.dtype(model.dtype) == jnp.float16


def adjust_loss_scale(scale: DynamicScale, finite: jax.Array) -> DynamicScale:
  """The next loss scale after a step whose summed gradients were (not) finite: DynamicScale's rule (halve on
  overflow, double after `growth_interval` finite steps), applied once per MutualNet step. flax's
  `DynamicScale.value_and_grad` cannot be used as is: a step's gradients come from several compiled sub-network
  programs and are checked once, summed."""
  grow = scale.fin_steps == scale.growth_interval
  grown = jnp.where(grow & finite, jnp.minimum(scale.scale * scale.growth_factor, jnp.finfo(jnp.float32).max),
                    scale.scale)
  backed_off = jnp.maximum(scale.scale * scale.backoff_factor, scale.minimum_scale or 0.0)
  return scale.replace(scale=jnp.where(finite, grown, backed_off),
                       fin_steps=jnp.where(grow | ~finite, 0, scale.fin_steps + 1))


def weight_decay_mask(params: Any, which: str = 'kernels') -> Any:
  """'kernels': True for regular conv and dense kernels, False for depthwise kernels (K, K, C), BN parameters and
  biases (the official ImageNet rule); 'all': True everywhere (the official rule for other datasets)."""
  def decays(path: tuple[Any, ...], leaf: Any) -> bool:
    return which == 'all' or (getattr(path[-1], 'key', None) == 'kernel' and leaf.ndim != 3)
  return jax.tree_util.tree_map_with_path(decays, params)


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int,
                           steps_per_epoch: int) -> optax.Schedule:
  """Cosine decay to 0 over the run, per step, after an optional linear warm-up."""
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  if warmup:
    return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, max(total_steps, warmup + 1))
  return optax.cosine_decay_schedule(config.learning_rate, max(total_steps, 1))


def create_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum; weight decay added to the gradient of decayed parameters only (PyTorch SGD)."""
  mask = functools.partial(weight_decay_mask, which=config.get('weight_decay_params', 'kernels'))
  return optax.chain(optax.add_decayed_weights(config.weight_decay, mask=mask),
                     optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov))


def _fresh_state(model: SlimmableModel, tx: optax.GradientTransformation, rng: jax.Array,
                 channels: int) -> TrainState:
  # One image traces the parameter shapes; BN grouping (per-device statistics) does not change them.
  params = init_params(model.clone(bn_groups=1), rng, model.min_resolution, channels)
  scale = (DynamicScale(fin_steps=jnp.zeros((), jnp.int32), scale=jnp.asarray(2.0 ** 15, jnp.float32))
           if needs_loss_scaling(model) else None)
  return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), scale)


def init_state(model: SlimmableModel, tx: optax.GradientTransformation, seed: int, channels: int,
               mesh: Mesh) -> TrainState:
  """Full-width parameters and optimizer state, replicated on every device."""
  state = _fresh_state(model, tx, jax.random.key(seed), channels)
  return parallel.replicate(jax.device_get(state), mesh)


def abstract_state(model: SlimmableModel, tx: optax.GradientTransformation, channels: int,
                   mesh: Mesh) -> TrainState:
  """Shapes, dtypes and shardings of the state (no FLOPs spent), for restoring a checkpoint onto the devices."""
  shapes = jax.eval_shape(lambda: _fresh_state(model, tx, jax.random.key(0), channels))
  return parallel.abstract(shapes, parallel.replicated_sharding(mesh))


def abstract_run_state(config: ml_collections.ConfigDict, channels: int, mesh: Mesh) -> TrainState:
  """The abstract state of a run trained with `config` (the schedule does not change any shape)."""
  return abstract_state(get_model(config.model), create_optimizer(config, optax.constant_schedule(0.0)), channels,
                        mesh)
