"""The two kernel paths compute the same function: 'cpu_fast' (shift-add / matmul, hand-written depthwise gradient)
against 'xla' (lax.conv), for outputs and for gradients wrt the input and the kernel, layer by layer and through
whole models (logits and every parameter gradient)."""
from __future__ import annotations

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mutualnet_jax import native, slim
from mutualnet_jax.models import MODELS

TOL = 1e-5
# Compile-time only: XLA:CPU's older loop emitters and no LLVM optimisation compile these programs in about a third of
# the time; results are compared at tolerances far above any emitter difference.
FAST_COMPILE = {'xla_cpu_use_fusion_emitters': False, 'xla_backend_optimization_level': 0}


def assert_close(actual, expected, tol=TOL, what='', floor=0.0):
  """|a - e| <= tol * (|e| + max|e|) + floor: relative per element, with an absolute floor at the tensor's scale (a
  sum of many terms can cancel to a value far below the size of its rounding error)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, what
  scale = float(np.abs(expected).max()) if expected.size else 0.0
  np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale + floor, err_msg=what)


def _value_and_vjp(fn, impl, stride, x, kernel, cotangent_seed=1):
  """fn's output and its gradients wrt (x, kernel) for a fixed random cotangent."""
  y, vjp = jax.vjp(lambda x, k: fn(x, k, stride, impl), x, kernel)
  g = jax.random.normal(jax.random.key(cotangent_seed), y.shape, y.dtype)
  return (y,) + vjp(g)


# (depthwise, kernel, stride, channels, height, width). 7 x 10: an odd and an even spatial size in every case (padding
# and stride-2 edges differ between them); 1-4 px inputs: every tap reads padding somewhere; 25 and 40 channels: the
# kernel gradient's 16-, 8- and 1-channel register blocks; K = 9: not compiled natively (the shift-add runs).
CASES = ([(dw, k, s, c, 7, 10) for dw, k, s, c in itertools.product((True, False), (1, 3), (1, 2), (1, 3, 8, 17))]
         + [(True, 3, s, 4, size, size) for size in (1, 2, 3, 4) for s in (1, 2)]
         + [(True, 5, s, 40, 7, 10) for s in (1, 2)] + [(True, 3, 1, 25, 7, 10), (True, 9, 1, 3, 7, 10)])


def _case_id(case):
  dw, k, s, c, h, w = case
  return f"{'depthwise' if dw else 'dense'}-k{k}-s{s}-c{c}-{h}x{w}"


def _inputs(case):
  dw, k, s, c, h, w = case
  rng = np.random.default_rng(CASES.index(case))
  x = jnp.asarray(rng.standard_normal((2, h, w, c)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((k, k, c) if dw else (k, k, c, 5)), jnp.float32)
  return x, kernel


def native_required() -> None:
  """The native kernels must be there in CI (MUTUALNET_REQUIRE_NATIVE=1); elsewhere their tests skip."""
  if native.available(jnp.zeros((1,), jnp.float32)):
    return
  message = f'native kernels not built ({native.library_path() or "no library"}): pip install -e . with a C++ compiler'
  if os.environ.get('MUTUALNET_REQUIRE_NATIVE') == '1':
    pytest.fail(message)
  pytest.skip(message)


@pytest.fixture(scope='module')
def results():
  """Every case through the three paths: 'xla' (lax.conv), 'native' (cpu_fast with the jax.ffi kernels where built)
  and 'pure' (cpu_fast's pure-JAX shift-add); one jitted program per path."""
  inputs = [_inputs(case) for case in CASES]

  def run_all(impl, inputs):
    return [_value_and_vjp(slim.depthwise_conv2d if dw else slim.conv2d, impl, s, x, kernel)
            for (dw, _, s, *_), (x, kernel) in zip(CASES, inputs)]

  def run(impl):
    return jax.device_get(jax.jit(run_all, static_argnums=0, compiler_options=FAST_COMPILE)(impl, inputs))

  out = {'xla': run('xla'), 'native': run('cpu_fast')}
  with native.disabled():
    out['pure'] = run('cpu_fast')
  return out


@pytest.mark.parametrize('path', ['native', 'pure'])
@pytest.mark.parametrize('case', CASES, ids=_case_id)
def test_conv_paths_agree(results, case, path):
  if path == 'native' and case[0]:
    native_required()
  i = CASES.index(case)
  ref, got = results['xla'][i], results[path][i]
  _, k, s, _, h, w = case
  assert ref[0].shape[1:3] == (slim.conv_output_size(h, k, s), slim.conv_output_size(w, k, s))
  for name, a, b in zip(('output', 'grad wrt input', 'grad wrt kernel'), got, ref):
    assert_close(a, b, what=name)


def test_the_native_kernels_are_what_cpu_fast_runs():
  """The program of a float32 depthwise convolution calls the native kernels (forward and both gradients)."""
  native_required()
  x, kernel = _inputs(CASES[0])
  text = jax.jit(lambda x, k: _value_and_vjp(slim.depthwise_conv2d, 'cpu_fast', 1, x, k)).lower(x, kernel).as_text()
  for target in ('MutualnetDepthwiseForward', 'MutualnetDepthwiseBackwardInput', 'MutualnetDepthwiseBackwardKernel'):
    assert target in text
  with native.disabled():
    pure = jax.jit(lambda x, k: _value_and_vjp(slim.depthwise_conv2d, 'cpu_fast', 1, x, k)).lower(x, kernel).as_text()
  assert 'Mutualnet' not in pure


def test_native_depthwise_only_for_the_kernel_sizes_it_is_compiled_for():
  native_required()
  x, kernel = jnp.zeros((1, 7, 7, 3)), jnp.zeros((9, 9, 3))
  text = jax.jit(lambda x, k: _value_and_vjp(slim.depthwise_conv2d, 'cpu_fast', 1, x, k)).lower(x, kernel).as_text()
  assert 9 not in native.DEPTHWISE_KERNEL_SIZES and 'Mutualnet' not in text


def test_depthwise_bfloat16_gradient_dtypes():
  x = jnp.ones((1, 6, 6, 3), jnp.bfloat16)
  kernel = jnp.ones((3, 3, 3), jnp.bfloat16)
  y, gx, gk = jax.jit(lambda x, k: _value_and_vjp(slim.depthwise_conv2d, 'cpu_fast', 2, x, k))(x, kernel)
  assert (y.dtype, gx.dtype, gk.dtype) == (jnp.bfloat16,) * 3
  assert gx.shape == x.shape and gk.shape == kernel.shape


# (shape, active channels or None, ReLU6): 1-channel and odd channel counts, a batch of 1 pixel per channel group,
# every channel, some and none active.
BN_CASES = [((2, 5, 6, 16), None, True), ((3, 7, 7, 24), 10, True), ((2, 4, 4, 8), None, False),
            ((8, 3, 3, 41), 17, False), ((4, 1, 1, 1), None, True), ((2, 2, 3, 5), 0, True)]


def _batch_norm(fused, x, scale, bias, active, relu6, cotangents):
  """SlimBatchNorm in training mode: (output, sown mean, sown variance) and their vjp wrt (x, scale, bias)."""
  def fn(x, scale, bias):
    layer = slim.SlimBatchNorm(scale.shape[0], relu6=relu6, fused=fused)
    y, state = layer.apply({'params': {'scale': scale, 'bias': bias}}, x, True, active, mutable=['bn_moments'])
    return y, state['bn_moments']['mean'], state['bn_moments']['var']
  out, vjp = jax.vjp(fn, x, scale, bias)
  return out + vjp(cotangents)


@pytest.mark.parametrize('case', BN_CASES, ids=lambda c: f'{"x".join(map(str, c[0]))}-active{c[1]}-relu6{c[2]}')
def test_fused_batch_norm_agrees_with_xla(case):
  """The native fused BN + ReLU6 + mask equals XLA's BN followed by ReLU6 and keep_active: output, the statistics it
  sows for calibration, and the gradients wrt input, scale and bias, also for cotangents on the statistics."""
  native_required()
  shape, active, relu6 = case
  rng = np.random.default_rng(BN_CASES.index(case))
  x = jnp.asarray(rng.standard_normal(shape) * 2 + 0.5, jnp.float32)
  scale, bias, dmean, dvar = (jnp.asarray(rng.standard_normal(shape[-1:]), jnp.float32) for _ in range(4))
  cotangents = (jnp.asarray(rng.standard_normal(shape), jnp.float32), dmean, dvar)
  active = None if active is None else jnp.int32(active)
  run = jax.jit(_batch_norm, static_argnums=(0, 5))
  got, ref = run(True, x, scale, bias, active, relu6, cotangents), run(False, x, scale, bias, active, relu6, cotangents)
  for name, a, b in zip(('output', 'mean', 'variance', 'grad wrt input', 'grad wrt scale', 'grad wrt bias'), got, ref):
    assert_close(a, b, what=name, floor=1e-6)
  if active is not None:  # inactive channels: zero output, zero parameter gradients
    assert not np.any(np.asarray(got[0])[..., int(active):])
    assert not np.any(np.asarray(got[4])[int(active):]) and not np.any(np.asarray(got[5])[int(active):])


def test_fused_batch_norm_propagates_nan_like_xla():
  """A NaN input reaches the output through ReLU6 (as jnp.clip lets it): the divergence guard reads the loss."""
  native_required()
  x = jnp.ones((2, 3, 3, 4), jnp.float32).at[0, 0, 0, 1].set(jnp.nan)
  ones = jnp.ones((4,), jnp.float32)
  for fused in (True, False):
    y = slim.SlimBatchNorm(4, relu6=True, fused=fused).apply({'params': {'scale': ones, 'bias': ones}}, x, True)
    assert np.isnan(np.asarray(y)[..., 1]).all() and not np.isnan(np.asarray(y)[..., 0]).any(), fused


def test_the_fused_batch_norm_is_what_a_cpu_fast_model_trains_with():
  """A float32 cpu_fast model's training program calls the fused BN kernels both ways; fused_bn=False, the 'xla'
  path and float64 do not."""
  native_required()
  x = jnp.zeros((2, 16, 16, 3), jnp.float32)

  def text(dtype=jnp.float32, **kwargs):
    model = MODELS['mobilenet_v1'](num_classes=10, num_downsample=3, dtype=dtype, **kwargs)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=True))
    grad = jax.grad(lambda p: model.apply({**variables, 'params': p}, x.astype(dtype), width=0.5, train=True).sum())
    return jax.jit(grad).lower(variables['params']).as_text()

  fused = text(conv_impl='cpu_fast')
  assert 'MutualnetBatchNormForward' in fused and 'MutualnetBatchNormBackward' in fused
  with jax.enable_x64(True):
    float64 = text(jnp.float64, conv_impl='cpu_fast')
  for unfused in (text(conv_impl='cpu_fast', fused_bn=False), text(conv_impl='xla'), float64):
    assert 'MutualnetBatchNorm' not in unfused


@pytest.mark.parametrize('name', ['mobilenet_v1', 'mobilenet_v2'])
def test_models_agree_between_paths(name):
  """Train-mode logits, loss and the gradient of every parameter agree between the kernel paths (width 0.25, 16 px).

  In float64: there the paths agree to ~1e-10, so any difference in the function shows. In float32 a whole-model
  comparison only measures rounding: ReLU6 clips about half the activations, values within rounding of 0 or 6 fall
  on different sides in the two paths, and the BN-parameter gradients (sums that cancel) then differ by up to a few
  % in *either* path against float64 — a comparison loose enough to pass would miss real errors. The float32
  kernels are compared tightly, layer by layer, above.
  """
  rng = np.random.default_rng(0)
  images = rng.standard_normal((2, 16, 16, 3))
  labels = np.array([3, 7])
  with jax.enable_x64(True):
    models = {impl: MODELS[name](num_classes=10, num_downsample=3, conv_impl=impl, dtype=jnp.float64)
              for impl in ('xla', 'cpu_fast')}
    # Initial-value-like random parameters without compiling `init` (a few seconds per model).
    shapes = jax.eval_shape(lambda: models['xla'].init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=True))

    def draw(path, s):
      key = jax.tree_util.keystr(path)
      if key.endswith("['kernel']"):
        value = slim.kaiming_normal_fan_out(rng, s.shape) if len(s.shape) > 2 else rng.normal(0, 0.1, s.shape)
      else:  # BN scale/bias and the classifier bias, random so that no gradient is special
        value = rng.normal(1.0 if key.endswith("['scale']") else 0.0, 0.2, s.shape)
      return jnp.asarray(value, jnp.float64)

    params = jax.tree_util.tree_map_with_path(draw, shapes['params'])

    def run(model):
      def loss(p):
        logits = model.apply({'params': p}, jnp.asarray(images), width=0.25, train=True).astype(jnp.float64)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(labels)[:, None], 1).mean(), logits
      return jax.device_get(jax.jit(jax.value_and_grad(loss, has_aux=True), compiler_options=FAST_COMPILE)(params))

    (loss_ref, logits_ref), grads_ref = run(models['xla'])
    (loss_got, logits_got), grads_got = run(models['cpu_fast'])
  assert logits_ref.dtype == np.float64
  assert_close(logits_got, logits_ref, 1e-9, 'logits')
  assert_close(loss_got, loss_ref, 1e-9, 'loss')
  flat_ref = jax.tree_util.tree_leaves_with_path(grads_ref)
  flat_got = jax.tree_util.tree_leaves(grads_got)
  assert len(flat_ref) == len(flat_got) > 50
  # The BN biases just before a projection's next BN have an exact gradient of 0 (both paths give ~1e-17 noise):
  # an absolute floor of 1e-9 of the largest gradient covers them.
  floor = 1e-9 * max(float(np.abs(g).max()) for _, g in flat_ref)
  for (path, ref), got in zip(flat_ref, flat_got):
    assert ref.dtype == np.float64
    assert_close(got, ref, 1e-7, jax.tree_util.keystr(path), floor=floor)


# (kernel, stride, channels, ReLU6, active channels): the folded-BN epilogue of an inference depthwise layer.
AFFINE_CASES = [(3, 1, 17, True, None), (3, 2, 40, True, 21), (3, 1, 8, False, 0), (9, 1, 3, True, 2)]


@pytest.mark.parametrize('case', AFFINE_CASES, ids=lambda c: f'k{c[0]}-s{c[1]}-c{c[2]}-relu6{c[3]}-active{c[4]}')
def test_depthwise_affine_epilogue_paths_agree(case):
  """depthwise(x) * mul + shift (+ ReLU6), channels from `active` zeroed: the native call (one kernel) = the same
  ops in JAX after the convolution = XLA's convolution then the map; a NaN in the input still reaches the output."""
  k, s, c, act, active = case
  rng = np.random.default_rng(c)
  x = jnp.asarray(rng.standard_normal((2, 7, 10, c)) * 3, jnp.float32).at[1, 3, 4, 0].set(jnp.nan)
  kernel, mul, shift = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((k, k, c), (c,), (c,)))
  count = None if active is None else jnp.int32(active)
  run = lambda impl: jax.jit(lambda *a: slim.depthwise_conv2d(*a[:2], s, impl, (a[2], a[3], act, count)))(  # noqa: E731
      x, kernel, mul, shift)
  ref = run('xla')
  got = {'native': run('cpu_fast')}
  with native.disabled():
    got['pure'] = run('cpu_fast')
  text = jax.jit(lambda *a: slim.depthwise_conv2d(*a[:2], s, 'cpu_fast', (a[2], a[3], act, count))).lower(
      x, kernel, mul, shift).as_text()
  if k in native.DEPTHWISE_KERNEL_SIZES and native.available(x):
    assert 'MutualnetDepthwiseForwardAffine' in text
  else:
    assert 'Mutualnet' not in text
  ref = slim.keep_active(ref, count)
  for path, y in got.items():
    assert bool(jnp.isnan(y).any()) and bool((jnp.isnan(y) == jnp.isnan(ref)).all()), path
    if active is not None:  # zero, or NaN where it was (0 * NaN, as keep_active's mask multiply gives)
      assert not bool(jnp.any(jnp.nan_to_num(y[..., active:]))), path
    assert_close(jnp.nan_to_num(y), jnp.nan_to_num(ref), what=f'{path} output')
    if act:
      assert float(jnp.nanmin(y)) >= 0.0 and float(jnp.nanmax(y)) <= 6.0


@pytest.mark.parametrize('shape,train,expected', [((4, 8, 8, 1), False, 'xla'), ((1, 8, 8, 3), False, 'cpu_fast'),
                                                  ((4, 8, 8, 3), False, 'cpu_fast'), ((4, 8, 8, 1), True, 'cpu_fast')])
def test_the_image_layer_takes_xlas_convolution_only_in_inference_where_it_measured_faster(shape, train, expected):
  """And the same outputs either way (an inference layer with statistics, so train=False runs)."""
  layer = slim.ConvBN(16, None, kernel_size=3, conv_impl='cpu_fast')
  assert layer.conv_impl_for(jnp.zeros(shape), train) == expected
  assert slim.ConvBN(16, 8, kernel_size=3, conv_impl='cpu_fast').conv_impl_for(jnp.zeros(shape), train) == 'cpu_fast'
  x = jax.random.normal(jax.random.key(0), shape)
  variables = layer.init(jax.random.key(1), x, None, False)
  stats = {'bn': {'mean': jnp.full((16,), 0.1), 'var': jnp.full((16,), 2.0)}}
  run = lambda module: module.apply({**variables, 'batch_stats': stats}, x, None, train,  # noqa: E731
                                    mutable=['bn_moments'])[0]
  text = jax.jit(lambda v: layer.apply({**v, 'batch_stats': stats}, x, None, train, mutable=['bn_moments'])[0]).lower(
      variables).as_text()
  assert ('convolution' in text) == (expected == 'xla')
  assert_close(run(layer), run(layer.clone(conv_impl='xla')), what='output')
