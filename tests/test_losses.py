"""Cross-entropy and inplace distillation: values, and no gradient into the teacher."""
import jax
import jax.numpy as jnp
import numpy as np

from mutualnet_jax import losses


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_cross_entropy_matches_numpy():
  logits = np.random.RandomState(0).randn(6, 5).astype(np.float32)
  labels = np.array([0, 1, 2, 3, 4, 0])
  expected = -_log_softmax(logits)[np.arange(6), labels].mean()
  np.testing.assert_allclose(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels)), expected, rtol=1e-5)


def test_label_smoothing_spreads_the_target():
  logits = jnp.zeros((2, 4))
  labels = jnp.array([0, 1])
  np.testing.assert_allclose(losses.cross_entropy(logits, labels, 0.1), np.log(4), rtol=1e-6)


def test_distillation_is_kl_and_zero_for_identical_predictions():
  rng = np.random.RandomState(1)
  s, t = rng.randn(4, 7).astype(np.float32), rng.randn(4, 7).astype(np.float32)
  pt = np.exp(_log_softmax(t))
  expected = (pt * (_log_softmax(t) - _log_softmax(s))).sum(-1).mean()
  np.testing.assert_allclose(losses.distillation(jnp.asarray(s), jnp.asarray(t)), expected, rtol=1e-5)
  assert abs(float(losses.distillation(jnp.asarray(t), jnp.asarray(t)))) < 1e-6
  # Temperature T scales the logits by 1/T and the loss by T^2.
  pt2 = np.exp(_log_softmax(t / 2))
  expected_t2 = 4 * (pt2 * (_log_softmax(t / 2) - _log_softmax(s / 2))).sum(-1).mean()
  np.testing.assert_allclose(losses.distillation(jnp.asarray(s), jnp.asarray(t), 2.0), expected_t2, rtol=1e-5)


def test_distillation_target_carries_no_gradient():
  rng = np.random.RandomState(2)
  s, t = jnp.asarray(rng.randn(3, 5)), jnp.asarray(rng.randn(3, 5))
  g_student, g_teacher = jax.grad(losses.distillation, argnums=(0, 1))(s, t)
  assert np.all(np.asarray(g_teacher) == 0)
  assert np.any(np.asarray(g_student) != 0)
  # The student's gradient is (softmax(s) - softmax(t)) / batch.
  expected = (jax.nn.softmax(s) - jax.nn.softmax(t)) / 3
  np.testing.assert_allclose(g_student, expected, rtol=1e-5, atol=1e-7)
