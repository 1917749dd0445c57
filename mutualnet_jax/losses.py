"""The two losses of MutualNet: cross-entropy for the full network, inplace distillation for the others."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Mean cross-entropy against integer labels, optionally label-smoothed (the official code uses none)."""
  targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()


def distillation(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
  """Mean KL(softmax(teacher / T) || softmax(student / T)) * T^2, with no gradient into the teacher.

  The stop-gradient is here rather than at the call site so that a sub-network can never pull the full network
  towards itself; T^2 keeps the gradient scale independent of T (Hinton et al.).
  """
  teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
  student = student_logits.astype(jnp.float32) / temperature
  kl = optax.losses.kl_divergence_with_log_targets(jax.nn.log_softmax(student), jax.nn.log_softmax(teacher))
  return kl.mean() * temperature ** 2
