"""ResNet-50 and VGG-16: published costs at 1.0x / 224 px (abstract traces), the official slimming rules, the
capacity path equal to the sliced sub-network (float64), the small-input variant, export, registry errors.

Numerical tests use small stand-ins (`ResNetMini`, `VGGMini`) that only restate the class constants, so every code
path runs at a fraction of the compile time; the full networks' versions are marked slow."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mutualnet_jax import export, profile, slim
from mutualnet_jax.errors import UserError
from mutualnet_jax.models import architecture, get_model, init_params, resnet, vgg
from mutualnet_jax.models.vgg import POOL

IMAGENET = dict(num_classes=1000, num_downsample=5)


class ResNetMini(resnet.ResNet50):
  stages = ((16, 2, 1), (32, 1, 2))  # projections with and without stride, an identity shortcut


class VGGMini(vgg.VGG16):
  layers = (16, POOL, 32, POOL, 32, 32, POOL, 64, POOL, 64, POOL)


MINI = {'resnet': lambda **kw: ResNetMini(**kw),
        'vgg_fc': lambda **kw: VGGMini(head='fc', fc_features=32, head_pool=2, **kw),
        'vgg_pool': lambda **kw: VGGMini(head='pool', **kw)}
SMALL = dict(num_classes=10, num_downsample=2, conv_impl='cpu_fast')


# ----------------------------------------------------------------------------------------------------------------------
# Costs, read off the models by abstract tracing.

# Published: ResNet-50 4.1 G multiply-adds (He et al.; 4.09 G for v1.5 counted as conv + fc + pooling) and 25.56 M
# parameters (torchvision's 25,557,032, of which 53,120 are BN scale/bias, which this library's convention leaves
# out); VGG-16 15.5 G multiply-adds and 138.36 M parameters (138,357,544, of which 4,224 are conv biases, which the
# BN variant does not have).
@pytest.mark.parametrize('name,settings,gmacs,params', [
    ('resnet50', {}, 4.09, 25_557_032 - 53_120),
    ('vgg16', {}, 15.47, 138_357_544 - 4_224),
    ('vgg16', dict(head='pool'), 15.35, 14_714_688 - 4_224 + 513_000),  # torchvision's convs, 512 -> 1000 classifier
])
def test_costs_at_full_width_match_the_published_networks(name, settings, gmacs, params):
  (row,) = profile.profile_grid(dict(name=name, **IMAGENET, **settings), [1.0], [224])
  assert abs(row.macs / 1e9 - gmacs) < 0.01, row
  assert row.params == params, row


def test_costs_shrink_with_width_and_resolution():
  rows = {(r.width, r.resolution): r for r in profile.profile_grid(dict(name='resnet50', **IMAGENET),
                                                                     [1.0, 0.5, 0.25], [224, 128])}
  assert rows[1.0, 224].macs > rows[0.5, 224].macs > rows[0.25, 224].macs > rows[0.25, 128].macs
  # Multiply-adds scale about quadratically with width (the stem's 3 input channels do not slim).
  assert 3.5 < rows[1.0, 224].macs / rows[0.5, 224].macs < 4.1


def test_resnet_slims_by_the_official_quarter_rule():
  """Stage outputs and projections slim as make_divisible(c * w); bottleneck inner convs and the stem are a quarter of
  their stage's slimmed output (the official ratio=0.25 rule), so they follow it exactly."""
  model = get_model(dict(name='resnet50', **IMAGENET))
  width = 0.37
  params = profile._param_shapes(model, 3)  # pylint: disable=protected-access
  used = {path[0]: (cin, cout) for path, (_, cin, cout) in export.used_channels(model, params, width, 32, 3).items()
          if path[-1] == 'conv'}
  out = {c: slim.make_divisible(c * width) for c, _, _ in resnet.STAGES}
  assert used['stem'] == (3, out[256] // 4)
  assert used['stage0_block0_conv1'] == (out[256] // 4, out[256] // 4)
  assert used['stage0_block0_shortcut'] == (out[256] // 4, out[256])
  assert used['stage2_block3_conv2'] == (out[1024] // 4, out[1024] // 4)
  assert used['stage3_block0_shortcut'] == (out[1024], out[2048])
  assert used['stage3_block2_conv3'] == (out[2048] // 4, out[2048])


# ----------------------------------------------------------------------------------------------------------------------
# The capacity path equals the sliced sub-network.

def _loss_grads_moments(model, params, x, labels, width, active):
  def loss(p):
    logits, state = model.apply({'params': p}, x, width=width, train=True, active=active, mutable=['bn_moments'])
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean(), (logits, state)
  (value, (logits, state)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return value, logits, jax.tree.map(np.asarray, grads), state['bn_moments']


def assert_capacity_path_equals_exact(model, widths, capacity=1.0, resolution=16):
  """Each width in the program of a larger capacity (channel counts at run time; one program for all) is the exact
  sub-network of that width: loss, logits, every gradient (exactly zero outside the used channels, shortcuts
  included) and the BN batch statistics, in float64 where the two agree to rounding."""
  with jax.enable_x64(True):
    model = model.clone(dtype=jnp.float64)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), init_params(model, jax.random.key(0), resolution, 3))
    x = jax.random.normal(jax.random.key(1), (4, resolution, resolution, 3), jnp.float64)
    labels = jnp.arange(4) % model.num_classes
    for width in widths:
      model.check_capacity(width, capacity)
      exact = _loss_grads_moments(model, params, x, labels, width, None)
      masked = _loss_grads_moments(model, params, x, labels, capacity, jnp.asarray(model.channel_counts(width)))
      _assert_same_subnetwork(exact, masked, export.used_channels(model, params, width, resolution, 3))


def _assert_same_subnetwork(exact, masked, used):
  assert float(masked[0]) == pytest.approx(float(exact[0]), rel=1e-12)
  np.testing.assert_allclose(masked[1], exact[1], rtol=1e-10, atol=1e-12)
  for (path, g), h in zip(jax.tree_util.tree_leaves_with_path(exact[2]), jax.tree.leaves(masked[2])):
    scale = max(np.abs(g).max(), 1e-6)
    np.testing.assert_allclose(h, g, rtol=0, atol=1e-9 * scale, err_msg=jax.tree_util.keystr(path))
  for (path, m), n in zip(jax.tree_util.tree_leaves_with_path(exact[3]), jax.tree.leaves(masked[3])):
    np.testing.assert_allclose(n[:m.shape[0]], m, rtol=1e-9, atol=1e-12, err_msg=jax.tree_util.keystr(path))
  for path, (_, cin, cout) in used.items():
    layer = masked[2]
    for key in path:
      layer = layer[key]
    for leaf_name, g in layer.items():
      box = [slice(None)] * g.ndim
      box[-1] = slice(cout, None)
      assert not g[tuple(box)].any(), (path, leaf_name)
      if g.ndim in (2, 4):  # dense / conv kernels: rows of unused inputs too
        box[-1], box[-2] = slice(None), slice(cin, None)
        assert not g[tuple(box)].any(), (path, leaf_name)


@pytest.mark.parametrize('kind', ['resnet', 'vgg_fc'])  # the 'pool' head is the shared classify() of the MobileNets
def test_capacity_path_equals_the_sliced_subnetwork(kind):
  assert_capacity_path_equals_exact(MINI[kind](**SMALL), (0.37, 0.613))


@pytest.mark.slow
@pytest.mark.parametrize('name,settings', [('resnet50', {}), ('vgg16', dict(fc_features=64, head_pool=2))])
def test_capacity_path_of_the_full_networks(name, settings):
  assert_capacity_path_equals_exact(get_model(dict(name=name, **SMALL, **settings)), (0.37, 0.613))


# ----------------------------------------------------------------------------------------------------------------------
# Small inputs, export, registry.

@pytest.mark.parametrize('name,num_downsample,resolution,final', [
    ('resnet50', 5, 224, 7), ('resnet50', 3, 32, 4), ('resnet50', 0, 8, 8),
    ('vgg16', 5, 224, 7), ('vgg16', 4, 28, 1), ('vgg16', 2, 16, 4)])
def test_small_input_variant_drops_the_earliest_downsamplings(name, num_downsample, resolution, final):
  model = get_model(dict(name=name, num_classes=10, num_downsample=num_downsample, head='pool') if name == 'vgg16'
                    else dict(name=name, num_classes=10, num_downsample=num_downsample))
  pool_input = next(i for m, i, _ in profile.layer_shapes(model, 0.5, resolution) if isinstance(m, slim.GlobalAvgPool))
  assert pool_input[1:3] == (final, final)
  assert model.min_resolution == 2 ** num_downsample
  with pytest.raises(UserError, match='too small'):
    profile.count(model, 0.5, model.min_resolution - 1)


@pytest.mark.parametrize('kind', sorted(MINI))
def test_export_runs_each_layer_at_its_narrow_size(kind):
  model = MINI[kind](num_classes=10, num_downsample=2, conv_impl='xla')
  width, resolution = 0.37, 12
  params = jax.device_get(init_params(model, jax.random.key(0), 8, 3))
  moments = jax.eval_shape(lambda p, x: model.apply({'params': p}, x, width=width, train=True,
                                                    mutable=['bn_moments'])[1]['bn_moments'],
                           params, jnp.zeros((1, resolution, resolution, 3)))
  stats = jax.tree.map(lambda s: {'mean': np.full(s['mean'].shape, 0.01, np.float32),
                                  'var': np.full(s['mean'].shape, 0.5, np.float32)},
                       moments, is_leaf=lambda d: isinstance(d, dict) and 'mean' in d)
  exported = export.build(model, params, stats, width, resolution, channels=3)
  narrow = sum(x.size for x in jax.tree.leaves(exported.variables['params']))
  assert narrow < sum(x.size for x in jax.tree.leaves(params)) / 2
  images = np.random.RandomState(0).randn(2, resolution, resolution, 3).astype(np.float32)
  expected = model.apply({'params': params, 'batch_stats': stats}, images, width=width, train=False)
  np.testing.assert_allclose(exported.predict(images), expected, rtol=1e-5, atol=1e-5)


def test_exported_vgg_saves_and_loads_through_the_registry(tmp_path):
  model_config = dict(name='vgg16', num_classes=10, num_downsample=2, max_width=0.25, fc_features=64, head_pool=2,
                      conv_impl='xla')
  model = get_model(model_config)
  params = jax.device_get(init_params(model, jax.random.key(0), 8, 1))
  moments = jax.eval_shape(lambda p, x: model.apply({'params': p}, x, width=0.2, train=True,
                                                    mutable=['bn_moments'])[1]['bn_moments'],
                           params, jnp.zeros((1, 8, 8, 1)))
  stats = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), moments)
  stats = jax.tree.map(lambda d: {'mean': d['mean'], 'var': d['var'] + 1.0}, stats,
                       is_leaf=lambda d: isinstance(d, dict) and 'mean' in d)
  path = export.save(export.build(model, params, stats, 0.2, 8, channels=1), tmp_path / 'vgg', model_config)
  loaded = export.load(path)
  # Widths count in 1.0x channels whatever max_width is: 512 x 0.2 -> 104 channels in each of 2 x 2 cells, 16 units.
  assert loaded.variables['params']['fc6']['kernel'].shape == (2 * 2 * 104, 16)
  assert loaded.predict(np.zeros((1, 8, 8, 1), np.float32)).shape == (1, 10)


def test_registry_builds_the_new_backbones_and_names_their_architecture():
  assert architecture(get_model(dict(name='resnet50'))) == 'resnet50 max_width=1.0'
  vgg16 = get_model(dict(name='vgg16', head='pool', num_downsample=3))
  assert architecture(vgg16) == 'vgg16 max_width=1.0 head=pool fc_features=4096 head_pool=7'
  assert vgg16.channel_bases() == (64, 128, 256, 512)
  assert get_model(dict(name='vgg16')).channel_bases() == (64, 128, 256, 512, 4096)


def test_bad_settings_are_one_line_errors():
  with pytest.raises(UserError, match='mobilenet_v1 has no setting head'):
    get_model(dict(name='mobilenet_v1', head='fc'))
  with pytest.raises(UserError, match="model.head must be one of"):
    profile.count(get_model(dict(name='vgg16', head='gap')), 1.0, 224)
  with pytest.raises(UserError, match='num_downsample must be in'):
    profile.count(get_model(dict(name='resnet50', num_downsample=6)), 1.0, 224)
