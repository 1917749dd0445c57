"""Slimmable core: channel rounding, sub-network == plain narrow network, zero gradients outside the slice, grids."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mutualnet_jax import export, profile, slim
from mutualnet_jax.errors import UserError
from mutualnet_jax.models import get_model, init_params, mobilenet_v1, mobilenet_v2

SMALL = dict(num_classes=10, num_downsample=2, conv_impl='cpu_fast')


@pytest.mark.parametrize('value,expected', [(8, 8), (4, 8), (12, 16), (11.9, 16), (11, 16), (32 * 0.25, 8), (1024 * 0.35, 360),
                                            (24 * 0.25, 8), (17, 16), (15, 16), (9.5, 16), (76, 80), (75, 72)])
def test_make_divisible_matches_official_rule(value, expected):
  assert slim.make_divisible(value) == expected


def test_make_divisible_bumps_when_rounding_loses_over_10_percent():
  # 9.5 rounds down to 8 (-16 %) -> bumped to 16; 9.0 -> 8 is -11 % -> 16 as well.
  assert slim.make_divisible(9.0) == 16
  assert slim.make_divisible(100, divisor=64) == 128
  assert slim.make_divisible(3, min_value=4) == 4


def test_width_grid():
  grid = slim.width_grid(0.25, 1.0, 0.05)
  assert len(grid) == 16 and grid[0] == 0.25 and grid[-1] == 1.0 and 0.7 in grid
  assert slim.width_grid(1.0, 2.0, 0.25) == (1.0, 1.25, 1.5, 1.75, 2.0)
  assert slim.width_grid(0.25, 1.0, 0.3) == (0.25, 0.55, 0.85, 1.0)


def _plain_conv_bn(x, features, kernel=1, stride=1, depthwise=False, relu=True):
  """Stock Flax conv (no bias) + BN on batch statistics + optional ReLU6, PyTorch-style symmetric padding."""
  pad = (kernel - 1) // 2
  x = nn.Conv(features, (kernel, kernel), stride, padding=((pad, pad), (pad, pad)),
              feature_group_count=x.shape[-1] if depthwise else 1, use_bias=False)(x)
  x = nn.BatchNorm(use_running_average=False, epsilon=slim.BN_EPSILON, momentum=0.0)(x)
  return jnp.clip(x, 0, 6) if relu else x


class PlainMobileNetV1(nn.Module):
  """A fixed-width MobileNet v1 written with stock Flax layers: the reference a slimmed sub-network must equal."""
  channels: tuple
  strides: tuple
  num_classes: int

  @nn.compact
  def __call__(self, x):
    x = _plain_conv_bn(x, self.channels[0], 3, self.strides[0])
    for c, s in zip(self.channels[1:], self.strides[1:]):
      x = _plain_conv_bn(x, x.shape[-1], 3, s, depthwise=True)
      x = _plain_conv_bn(x, c)
    return nn.Dense(self.num_classes)(x.mean((1, 2)))


class PlainMobileNetV2(nn.Module):
  """A fixed-width MobileNet v2 from stock Flax layers, channel counts by the official slicing rules written out:
  stem and block outputs make_divisible(c * w), expansion = (actual input channels) * t, last conv 1280."""
  width: float
  strides: tuple
  num_classes: int

  @nn.compact
  def __call__(self, x):
    x = _plain_conv_bn(x, slim.make_divisible(mobilenet_v2.STEM * self.width), 3, self.strides[0])
    blocks = [(t, c) for t, c, n, _ in mobilenet_v2.STAGES for _ in range(n)]
    cin = mobilenet_v2.STEM
    for (t, c), s in zip(blocks, self.strides[1:]):
      shortcut, hidden = x, x.shape[-1] * t
      if t != 1:
        x = _plain_conv_bn(x, hidden)
      x = _plain_conv_bn(x, hidden, 3, s, depthwise=True)
      x = _plain_conv_bn(x, slim.make_divisible(c * self.width), relu=False)
      if s == 1 and cin == c:
        x = x + shortcut
      cin = c
    x = _plain_conv_bn(x, mobilenet_v2.LAST)
    return nn.Dense(self.num_classes)(x.mean((1, 2)))


def _plain_params_from_slice(full, plain_shapes, names):
  """Fills the plain network's parameters with the leading slices of the slimmable tree, layer by layer
  (`names`: the slimmable layers in call order, which is the plain network's Conv_i/BatchNorm_i order)."""
  out = {}
  for i, name in enumerate(names):
    conv, bn = f'Conv_{i}', f'BatchNorm_{i}'
    k = full[name]['conv']['kernel']
    shape = plain_shapes[conv]['kernel'].shape
    if k.ndim == 3:  # depthwise (K, K, C) -> HWIO with I=1
      k = k[:, :, None, :]
    out[conv] = {'kernel': k[:shape[0], :shape[1], :shape[2], :shape[3]]}
    c = shape[3]
    out[bn] = {'scale': full[name]['bn']['scale'][:c], 'bias': full[name]['bn']['bias'][:c]}
  kd = plain_shapes['Dense_0']['kernel'].shape
  out['Dense_0'] = {'kernel': full['classifier']['kernel'][:kd[0]], 'bias': full['classifier']['bias']}
  return out


def _plain_v1(model, width):
  blocks = mobilenet_v1.BLOCKS
  channels = tuple(slim.scaled_channels(c, width) for c in (mobilenet_v1.STEM,) + tuple(c for c, _ in blocks))
  names = ['stem'] + [f'block{i}_{k}' for i in range(len(blocks)) for k in ('dw', 'pw')]
  return PlainMobileNetV1(channels, tuple(model.stride_schedule([2] + [s for _, s in blocks])), 10), names


def _plain_v2(model, width):
  blocks = [(t, s if r == 0 else 1) for t, _, n, s in mobilenet_v2.STAGES for r in range(n)]
  names = ['stem'] + [f'block{i}_{k}' for i, (t, _) in enumerate(blocks)
                      for k in (('expand',) if t != 1 else ()) + ('dw', 'project')] + ['last']
  return PlainMobileNetV2(width, tuple(model.stride_schedule([2] + [s for _, s in blocks])), 10), names


@pytest.mark.parametrize('name,plain_fn', [('mobilenet_v1', _plain_v1), ('mobilenet_v2', _plain_v2)])
@pytest.mark.parametrize('width', [0.25, 0.6, 1.0])
def test_subnetwork_equals_plain_fixed_width_network(name, plain_fn, width):
  model = get_model(dict(name=name, **SMALL))
  params = init_params(model, jax.random.key(0), 16, 3)
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  plain, names = plain_fn(model, width)
  shapes = jax.eval_shape(lambda: plain.init(jax.random.key(0), x))['params']
  assert len([k for k in shapes if k.startswith('Conv_')]) == len(names)
  plain_params = _plain_params_from_slice(params, shapes, names)
  expected, _ = jax.jit(lambda p: plain.apply({'params': p}, x, mutable=['batch_stats']))(plain_params)
  got = jax.jit(lambda p: model.apply({'params': p}, x, width=width, train=True))(params)
  np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize('name', ['mobilenet_v1', 'mobilenet_v2'])
def test_gradients_outside_the_slice_are_exactly_zero(name):
  model = get_model(dict(name=name, **SMALL))
  params = init_params(model, jax.random.key(0), 16, 3)
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  labels = jnp.arange(4) % 10
  width = 0.35

  def loss(p):
    logits = model.apply({'params': p}, x, width=width, train=True)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean()

  grads = jax.tree.map(np.asarray, jax.jit(jax.grad(loss))(params))
  # Channels each layer used, read from the calls themselves; the slice is the leading block of that size.
  checked = 0
  for module, in_shape, out_shape in profile.layer_shapes(model, width, 16):
    if module.path[0] not in grads:
      continue  # parameter-free (pooling)
    layer = grads[module.path[0]]
    g = layer['conv']['kernel'] if 'conv' in layer else layer['kernel']
    cin, cout = in_shape[-1], out_shape[-1]
    box = (slice(None),) * (g.ndim - 2) + (slice(0, cin if g.ndim != 3 else None), slice(0, cout))
    if g.ndim == 3:  # depthwise (K, K, C)
      box = (slice(None), slice(None), slice(0, cout))
    outside = g.copy()
    outside[box] = 0
    assert not outside.any(), module.path
    assert g[box].any(), module.path
    if 'bn' in layer:
      for v in layer['bn'].values():
        assert not v[cout:].any() and v[:cout].any(), module.path
    checked += 1
  assert checked >= 27


def _loss_grads_moments(model, params, x, labels, width, active):
  def loss(p):
    logits, state = model.apply({'params': p}, x, width=width, train=True, active=active, mutable=['bn_moments'])
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean(), (logits, state)
  (value, (logits, state)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return value, logits, jax.tree.map(np.asarray, grads), state['bn_moments']


@pytest.mark.parametrize('name', ['mobilenet_v1', pytest.param('mobilenet_v2', marks=pytest.mark.slow)])
@pytest.mark.parametrize('width,capacity', [(0.37, 0.5), (0.613, 1.0)])
def test_capacity_path_equals_the_sliced_subnetwork(name, width, capacity):
  """Width w run in the program of a larger capacity, its channel counts given at run time, is the exact sub-network
  of w: logits, loss, every parameter gradient (zero outside the used channels) and the BN batch statistics of the
  used channels. Compared in float64, where the two must agree to rounding (1e-9 of each tensor's scale); in float32
  they differ by the one-pass BN variance's cancellation, amplified where a batch variance is tiny."""
  with jax.enable_x64(True):
    model = get_model(dict(name=name, **SMALL)).clone(dtype=jnp.float64)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), init_params(model, jax.random.key(0), 16, 3))
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3), jnp.float64)
    labels = jnp.arange(4) % 10
    active = jnp.asarray(model.channel_counts(width))
    model.check_capacity(width, capacity)
    exact = _loss_grads_moments(model, params, x, labels, width, None)
    masked = _loss_grads_moments(model, params, x, labels, capacity, active)
    used = export.used_channels(model, params, width, 16, 3)
  assert float(masked[0]) == pytest.approx(float(exact[0]), rel=1e-12)
  np.testing.assert_allclose(masked[1], exact[1], rtol=1e-10, atol=1e-12)
  for (path, g), h in zip(jax.tree_util.tree_leaves_with_path(exact[2]), jax.tree.leaves(masked[2])):
    np.testing.assert_allclose(h, g, rtol=0, atol=1e-9 * max(np.abs(g).max(), 1e-6), err_msg=jax.tree_util.keystr(path))
  for (path, m), n in zip(jax.tree_util.tree_leaves_with_path(exact[3]), jax.tree.leaves(masked[3])):
    assert n.shape[0] >= m.shape[0]
    np.testing.assert_allclose(n[:m.shape[0]], m, rtol=1e-9, atol=1e-12, err_msg=jax.tree_util.keystr(path))
  # Outside the channels the width uses, the capacity path's gradients are exactly zero (not merely small).
  for path, (_, cin, cout) in used.items():
    layer = masked[2]
    for key in path:
      layer = layer[key]
    for leaf_name, g in layer.items():
      box = [slice(None)] * g.ndim
      box[-1] = slice(cout, None)
      assert not g[tuple(box)].any(), (path, leaf_name)
      if g.ndim == 4:
        box[-1], box[-2] = slice(None), slice(cin, None)
        assert not g[tuple(box)].any(), (path, leaf_name)


def test_capacity_must_hold_the_width():
  model = get_model(dict(name='mobilenet_v2', **SMALL))
  with pytest.raises(ValueError, match='smaller than width'):
    model.check_capacity(0.6, 0.5)
  x = jnp.ones((1, 16, 16, 3))
  params = init_params(model, jax.random.key(0), 16, 3)
  with pytest.raises(ValueError, match='active must hold'):
    jax.eval_shape(lambda p: model.apply({'params': p}, x, width=1.0, active=jnp.ones(3, jnp.int32)), params)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['mobilenet_v1', 'mobilenet_v2'])
def test_every_grid_width_and_several_resolutions_run_on_both_kernel_paths(name):
  """One jit per (model, path) evaluates all 16 widths of the 0.05 grid, so the test compiles 2 programs."""
  widths = slim.width_grid(0.25, 1.0, 0.05)
  model = get_model(dict(name=name, num_classes=10, num_downsample=2, conv_impl='cpu_fast'))
  params = init_params(model, jax.random.key(0), 8, 1)
  xs = {r: jax.random.normal(jax.random.key(r), (2, r, r, 1)) for r in (8, 12, 16)}
  outs = {}
  for impl in ('cpu_fast', 'xla'):
    m = model.clone(conv_impl=impl)
    fn = jax.jit(lambda p: [m.apply({'params': p}, xs[8 + 4 * (i % 3)], width=w, train=True)
                            for i, w in enumerate(widths)])
    outs[impl] = [np.asarray(o) for o in fn(params)]
  for a, b, w in zip(outs['cpu_fast'], outs['xla'], widths):
    assert a.shape == (2, 10) and np.isfinite(a).all(), w
    # float32 rounding through ~50 train-mode BN layers of a batch of 2 (the fused BN sums its statistics in double,
    # XLA in float32): about 1e-5 of the logits' scale; the function itself is compared in float64 (test_kernels).
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max(), err_msg=f'width {w}')


def test_eval_mode_uses_passed_statistics_of_the_right_width():
  model = get_model(dict(name='mobilenet_v1', **SMALL))
  params = init_params(model, jax.random.key(0), 16, 3)
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  train_out, state = jax.jit(lambda p: model.apply({'params': p}, x, width=0.5, train=True,
                                                   mutable=['bn_moments']))(params)
  stats = state['bn_moments']
  # With the batch's own statistics as running statistics, eval mode reproduces train mode exactly.
  eval_out = jax.jit(lambda v: model.apply(v, x, width=0.5, train=False))({'params': params, 'batch_stats': stats})
  np.testing.assert_allclose(eval_out, train_out, rtol=1e-4, atol=1e-5)
  with pytest.raises(Exception, match='statistics'):
    jax.eval_shape(lambda v: model.apply(v, x, width=0.75, train=False), {'params': params, 'batch_stats': stats})


def test_per_device_bn_groups_normalise_each_group_separately():
  model = get_model(dict(name='mobilenet_v1', **SMALL))
  params = init_params(model, jax.random.key(0), 16, 3)
  x = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
  grouped = jax.jit(lambda p: model.clone(bn_groups=2).apply({'params': p}, x, width=0.5, train=True))(params)
  halves = jax.jit(lambda p: [model.apply({'params': p}, x[i:i + 4], width=0.5, train=True) for i in (0, 4)])(params)
  np.testing.assert_allclose(grouped, np.concatenate(halves), rtol=1e-4, atol=1e-5)


def test_wide_model_slices_from_max_width_two():
  model = get_model(dict(name='mobilenet_v2', num_classes=10, max_width=2.0, num_downsample=2))
  params = init_params(model, jax.random.key(0), 8, 3)
  assert params['stem']['conv']['kernel'].shape[-1] == 64
  assert params['last']['conv']['kernel'].shape[-1] == 2560
  x = jnp.ones((2, 8, 8, 3))
  for w in (1.0, 1.5, 2.0):
    out = jax.eval_shape(lambda p: model.apply({'params': p}, x, width=w, train=True), params)
    assert out.shape == (2, 10)


@pytest.mark.parametrize('kwargs,match', [
    (dict(width=0.0), 'outside'), (dict(width=-0.5), 'outside'), (dict(width=1.2), 'outside'),
    (dict(width='half'), 'must be a number'), (dict(resolution=2), 'too small')])
def test_bad_width_or_resolution_is_one_clear_error(kwargs, match):
  model = get_model(dict(name='mobilenet_v1', **SMALL))
  params = init_params(model, jax.random.key(0), 8, 3)
  r = kwargs.get('resolution', 8)
  with pytest.raises(UserError, match=match):
    jax.eval_shape(lambda p: model.apply({'params': p}, jnp.ones((1, r, r, 3)), width=kwargs.get('width', 1.0),
                                         train=True), params)


def test_unknown_model_and_bad_settings_are_user_errors():
  with pytest.raises(UserError, match="unknown model 'resnet9'"):
    get_model(dict(name='resnet9'))
  with pytest.raises(UserError, match='conv_impl'):
    slim.resolve_conv_impl('cuda')
  with pytest.raises(UserError, match='num_downsample'):
    model = get_model(dict(name='mobilenet_v1', num_downsample=7))
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)), train=True))
