"""The MutualNet step: summed CE+KD gradients, one compile per bucket, weight-decay mask, multi-device/-host."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mutualnet_jax import parallel, train, train_state, train_step
from mutualnet_jax.compilation import CompileCounter
from mutualnet_jax.errors import UserError
from mutualnet_jax.resizing import Resize, resize
from mutualnet_jax.programs import Bucket
from mutualnet_jax.sampling import StepPlan, Subnet
from tests.util import tiny_config

HERE = os.path.dirname(os.path.abspath(__file__))
TEACHER, STUDENT = Subnet('max', 1.0, 16, 'ce'), Subnet('min', 0.25, 8, 'kd')
PLAN = StepPlan(TEACHER, (STUDENT,))


def make_trainer(config=None, mesh=None):
  config = config or tiny_config()
  return train.Trainer(config, mesh or parallel.make_mesh(), channels=1, image_size=16, total_steps=20,
                       steps_per_epoch=10)


def make_batch(mesh, n=8, seed=0):
  rng = np.random.RandomState(seed)
  local = {'image': rng.randn(n, 16, 16, 1).astype(np.float32), 'label': (np.arange(n) % 10).astype(np.int32)}
  return parallel.global_batch(local, mesh)


@pytest.fixture(scope='module')
def trainer():
  return make_trainer()


def test_weight_decay_skips_depthwise_bn_and_biases(trainer):
  params = trainer.abstract_state().params
  mask = train_state.weight_decay_mask(params)
  assert mask['stem']['conv']['kernel'] and mask['block0_pw']['conv']['kernel'] and mask['classifier']['kernel']
  assert len(jax.tree.leaves(mask)) == 17
  assert not mask['block0_dw']['conv']['kernel']
  assert not mask['stem']['bn']['scale'] and not mask['stem']['bn']['bias'] and not mask['classifier']['bias']
  # With zero gradients, only decayed parameters move: by -lr * wd * w (plain SGD, first step).
  config = tiny_config(momentum=0.0, nesterov=False, weight_decay=0.1)
  tx = train_state.create_optimizer(config, optax.constant_schedule(1.0))
  p = jax.tree.map(lambda s: jnp.ones(s.shape), params)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
  np.testing.assert_allclose(updates['block0_pw']['conv']['kernel'], -0.1, rtol=1e-5)
  assert float(jnp.abs(updates['block0_dw']['conv']['kernel']).max()) == 0.0
  assert float(jnp.abs(updates['stem']['bn']['scale']).max()) == 0.0


def test_weight_decay_params_all_decays_every_parameter(trainer):
  """The official rule for non-ImageNet datasets: depthwise kernels, BN parameters and biases decay too."""
  params = trainer.abstract_state().params
  assert all(jax.tree.leaves(train_state.weight_decay_mask(params, 'all')))
  config = tiny_config(momentum=0.0, nesterov=False, weight_decay=0.1, weight_decay_params='all')
  tx = train_state.create_optimizer(config, optax.constant_schedule(1.0))
  p = jax.tree.map(lambda s: jnp.ones(s.shape), params)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
  for leaf in jax.tree.leaves(updates):
    np.testing.assert_allclose(leaf, -0.1, rtol=1e-5)


def test_step_sums_the_subnetwork_gradients_into_one_update(trainer):
  mesh = trainer.mesh
  batch = make_batch(mesh)
  state = trainer.init_state(0)
  params = jax.device_get(state.params)
  bucket = trainer.sampler.bucket
  m_t, g_t, teacher = trainer.steps(TEACHER, bucket(TEACHER), state.params, batch['image'], batch['label'])
  m_s, g_s, _ = trainer.steps(STUDENT, bucket(STUDENT), state.params, batch['image'], teacher)
  new_state, metrics = trainer.step(state, batch, PLAN)

  @jax.jit
  def reference_update(params, g_t, g_s):
    total = jax.tree.map(lambda a, b: a + b, g_t, g_s)
    updates, _ = trainer.tx.update(total, trainer.tx.init(params), params)
    return optax.apply_updates(params, updates)

  expected = reference_update(params, g_t, g_s)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(new_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert int(new_state.step) == 1
  assert float(metrics['loss/max']) == pytest.approx(float(m_t['loss']))
  assert float(metrics['loss/min']) == pytest.approx(float(m_s['loss']))
  # The student's loss is the KL to the teacher: its gradient reaches only the slice it uses.
  assert float(jnp.abs(g_s['stem']['conv']['kernel'][..., 8:]).max()) == 0.0


def test_the_step_resizes_as_the_config_says(trainer):
  """resize_align_corners=True: each sub-network sees its input resized corners-onto-corners (the official code's
  F.interpolate), i.e. the same loss and gradients as the default step fed images resized that way beforehand."""
  model, batch = trainer.model, make_batch(trainer.mesh)
  params = trainer.init_state(0).params
  bucket = Bucket(STUDENT.width, STUDENT.resolution, 'ce')
  official = train_step.subnet_loss_and_grad(model, bucket, resize=Resize(align_corners=True))
  default = train_step.subnet_loss_and_grad(model, bucket)
  m_a, g_a, _ = jax.jit(official)(params, batch['image'], batch['label'], None, None, None)
  resized = resize(batch['image'], STUDENT.resolution, align_corners=True)
  m_b, g_b, _ = jax.jit(default)(params, resized, batch['label'], None, None, None)
  m_c, _, _ = jax.jit(default)(params, batch['image'], batch['label'], None, None, None)
  assert float(m_a['loss']) == pytest.approx(float(m_b['loss']), rel=1e-6)
  assert float(m_a['loss']) != pytest.approx(float(m_c['loss']), rel=1e-4)
  for a, b in zip(jax.tree.leaves(g_a), jax.tree.leaves(g_b)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # the same values, differently fused
  assert Resize.of(tiny_config(resize_align_corners=True)) == Resize(align_corners=True)


def test_a_bucket_seen_again_never_recompiles(trainer):
  batch = make_batch(trainer.mesh, seed=1)
  state = trainer.init_state(1)
  state, _ = trainer.step(state, batch, PLAN)
  compiled = trainer.steps.num_compiled
  with CompileCounter().counting() as counter:
    for _ in range(3):
      state, metrics = trainer.step(state, batch, PLAN)
    jax.block_until_ready(state)
  assert counter.executables == 0
  assert trainer.steps.num_compiled == compiled
  with CompileCounter().counting() as control:  # the counter does see a new bucket compile
    trainer.step(state, batch, StepPlan(TEACHER, (Subnet('min', 0.25, 16, 'kd'),)))
  assert control.executables >= 1 and trainer.steps.num_compiled == compiled + 1


def test_any_width_inside_a_capacity_reuses_its_program(trainer):
  """Off-grid widths at one resolution share the capacity program: no compilation when the width changes."""
  batch = make_batch(trainer.mesh, seed=3)
  state = trainer.init_state(3)
  plan = lambda w: StepPlan(TEACHER, (STUDENT, Subnet('rand1', w, 8, 'kd')))  # noqa: E731
  state, _ = trainer.step(state, batch, plan(0.37))
  compiled = trainer.steps.num_compiled
  with CompileCounter().counting() as counter:
    for w in (0.613, 0.5, 0.999, 0.26):
      state, metrics = trainer.step(state, batch, plan(w))
    jax.block_until_ready(state)
  assert counter.executables == 0 and trainer.steps.num_compiled == compiled
  assert np.isfinite(float(metrics['loss/rand1']))
  with CompileCounter().counting() as control:  # another resolution is another program
    trainer.step(state, batch, StepPlan(TEACHER, (Subnet('rand1', 0.37, 16, 'kd'),)))
  assert control.executables >= 1 and trainer.steps.num_compiled == compiled + 1


def test_a_capacity_step_equals_the_exact_step(trainer):
  """The same plan through a capacity program and through exact programs: the same update (float32 tolerance)."""
  exact = make_trainer(tiny_config(capacities=(), width_sampling='grid'))
  batch = make_batch(trainer.mesh, seed=4)
  plan = StepPlan(TEACHER, (STUDENT, Subnet('rand1', 0.613, 16, 'kd')))
  assert trainer.sampler.bucket(plan.students[1]).masked and not exact.sampler.bucket(plan.students[1]).masked
  a, ma = trainer.step(trainer.init_state(4), batch, plan)
  b, mb = exact.step(exact.init_state(4), batch, plan)
  # The KL of two close distributions is ~3e-4 made of O(1) terms: compared at float32 rounding of those terms.
  assert float(ma['loss/rand1']) == pytest.approx(float(mb['loss/rand1']), abs=1e-6)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_training_reduces_the_loss_on_a_fixed_batch(trainer):
  batch = make_batch(trainer.mesh, seed=2)
  state = trainer.init_state(2)
  first = None
  for _ in range(6):
    state, metrics = trainer.step(state, batch, PLAN)
    first = first if first is not None else float(metrics['loss/max'])
  assert float(metrics['loss/max']) < first


def _update_vector(new, old):
  return jnp.concatenate([jnp.ravel(a - b) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old))])


@pytest.mark.parametrize('dtype,loss_rtol,update_rtol', [('bfloat16', 1e-3, 0.1), ('float16', 1e-4, 0.05)])
def test_half_precision_step_agrees_with_float32(dtype, loss_rtol, update_rtol):
  """The same plan, batch and initial parameters with half-precision activations: each sub-network's loss within
  `loss_rtol` of float32's and the whole parameter update (new - old, one vector) within `update_rtol` (relative L2
  error; bfloat16 keeps 8 mantissa bits, float16 11). Single leaves are not compared: the first step's BN-bias
  gradients are sums that nearly cancel, so their relative error says nothing about the step."""
  full_precision = make_trainer(tiny_config(warmup_epochs=0.0))  # no warm-up: the first step's update is not 0
  half = make_trainer(tiny_config(warmup_epochs=0.0, **{'model.dtype': dtype}))
  batch = make_batch(full_precision.mesh, seed=5)
  plan = StepPlan(TEACHER, (STUDENT, Subnet('rand1', 0.613, 16, 'kd')))
  start = full_precision.init_state(5)
  old = jax.device_get(start.params)  # the step donates the state's buffers
  full, m32 = full_precision.step(start, batch, plan)
  reduced, m16 = half.step(half.init_state(5), batch, plan)
  assert (reduced.dynamic_scale is not None) == (dtype == 'float16')
  for name in ('loss/max', 'loss/min', 'loss/rand1'):
    assert float(m16[name]) == pytest.approx(float(m32[name]), rel=loss_rtol, abs=2e-5)
  reference, update = _update_vector(full.params, old), _update_vector(reduced.params, old)
  assert float(jnp.linalg.norm(reference)) > 0
  assert float(jnp.linalg.norm(update - reference) / jnp.linalg.norm(reference)) < update_rtol


def test_float16_overflow_skips_the_update_and_halves_the_loss_scale():
  """A loss scale so large that the scaled gradients overflow float16: parameters and optimizer state stay as they
  were, the step counts, the scale halves; the next finite step updates and counts towards growth."""
  half = make_trainer(tiny_config(warmup_epochs=0.0, **{'model.dtype': 'float16'}))
  batch = make_batch(half.mesh, seed=6)
  huge = half.init_state(6)
  huge = huge.replace(dynamic_scale=huge.dynamic_scale.replace(scale=jnp.asarray(2.0 ** 100, jnp.float32)))
  before = jax.device_get((huge.params, huge.opt_state))  # the step donates the state's buffers
  skipped, metrics = half.step(huge, batch, PLAN)
  assert float(metrics['skipped']) == 1.0 and float(metrics['grad_norm']) == 0.0
  assert int(skipped.step) == 1 and float(skipped.dynamic_scale.scale) == 2.0 ** 99
  for a, b in zip(jax.tree.leaves((skipped.params, skipped.opt_state)), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)
  state = half.init_state(6)
  updated, metrics = half.step(state, batch, PLAN)
  assert float(metrics['skipped']) == 0.0 and float(metrics['grad_norm']) > 0.0
  assert float(updated.dynamic_scale.scale) == 2.0 ** 15 and int(updated.dynamic_scale.fin_steps) == 1
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(updated.params), jax.tree.leaves(before[0])))


def test_loss_scale_grows_after_its_interval_of_finite_steps():
  scale = train_state.DynamicScale(growth_interval=2, fin_steps=jnp.asarray(2), scale=jnp.asarray(8.0))
  grown = train_state.adjust_loss_scale(scale, jnp.asarray(True))
  assert float(grown.scale) == 16.0 and int(grown.fin_steps) == 0
  backed_off = train_state.adjust_loss_scale(scale, jnp.asarray(False))
  assert float(backed_off.scale) == 4.0 and int(backed_off.fin_steps) == 0


def test_precompile_covers_every_bucket_in_parallel_threads():
  trainer = make_trainer()
  buckets = trainer.sampler.buckets()
  # One capacity (1.0): the teacher, and the exact min width and the capacity program at each of 2 resolutions.
  assert len(buckets) == 5
  trainer.steps.precompile(buckets, threads=2)
  assert trainer.steps.num_compiled == 5
  state = trainer.init_state(0)
  batch = make_batch(trainer.mesh)
  with CompileCounter().counting() as counter:
    for step in range(4):
      state, _ = trainer.step(state, batch, step)
    jax.block_until_ready(state)
  assert trainer.steps.num_compiled == 5
  assert counter.executables == 1  # the optimizer update only: no sub-network step compiles again


@pytest.mark.parametrize('overrides,match', [
    (dict(batch_size=0), 'does not divide'),
    (dict(method='once-for-all'), 'unknown method'),
])
def test_bad_training_settings_are_one_clear_error(overrides, match):
  with pytest.raises(UserError, match=match):
    make_trainer(tiny_config(**overrides))


def _run(args, env_extra, timeout=600):
  env = dict(os.environ, **env_extra)
  return subprocess.run([sys.executable, os.path.join(HERE, 'distributed_step.py')] + args, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_eight_devices_equal_one_device_with_synchronised_bn(tmp_path):
  """Same global batch, same sub-networks: params after a step on 8 devices match 1 device."""
  flags = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
  out = _run(['--mode=devices', f'--out={tmp_path}'], {'XLA_FLAGS': flags})
  assert out.returncode == 0, out.stderr[-3000:]
  one, eight = np.load(tmp_path / 'devices_1.npz'), np.load(tmp_path / 'devices_8.npz')
  assert one.files == eight.files and len(one.files) == 17
  for k in one.files:
    np.testing.assert_allclose(eight[k], one[k], rtol=1e-4, atol=5e-6, err_msg=k)
  per_device = np.load(tmp_path / 'per_device_bn.npz')  # initialised and stepped with 8 BN groups
  assert per_device.files == one.files and all(np.isfinite(per_device[k]).all() for k in per_device.files)


@pytest.mark.slow
def test_batch_not_divisible_by_device_count_is_one_clear_error(tmp_path):
  flags = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
  out = _run(['--mode=bad_batch', f'--out={tmp_path}'], {'XLA_FLAGS': flags})
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'does not divide over 8 devices' in (tmp_path / 'bad_batch.txt').read_text()


@pytest.mark.slow
def test_two_processes_on_localhost_train_like_one(tmp_path):
  """A real multi-host job: 2 processes (gloo collectives), each feeding its half of the global batch."""
  port = str(20000 + os.getpid() % 20000)
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, 'distributed_step.py'), '--mode=multiprocess',
                             f'--out={tmp_path}', f'--process_id={i}', f'--port={port}'],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  single = _run(['--mode=single', f'--out={tmp_path}'], {})
  assert single.returncode == 0, single.stderr[-3000:]
  ref = np.load(tmp_path / 'single.npz')
  for i in range(2):
    got = np.load(tmp_path / f'process_{i}.npz')
    for k in ref.files:
      np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=5e-6, err_msg=f'process {i}: {k}')
