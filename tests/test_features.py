"""Multi-scale features: levels and channel counts of every backbone, the capacity path's maps, and a tiny pyramid
head trained on top (loss falls; gradients reach only the width's slice of the backbone)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mutualnet_jax import export, features, slim
from mutualnet_jax.models import MODELS, get_model, init_params

# Channels of the tapped layers at width 1.0 (the ImageNet definitions).
FULL_WIDTH = {'mobilenet_v1': {8: 256, 16: 512, 32: 1024}, 'mobilenet_v2': {8: 32, 16: 96, 32: 320},
              'resnet50': {8: 512, 16: 1024, 32: 2048}, 'vgg16': {8: 512, 16: 512, 32: 512},
              'tiny_convnet': {8: 64}}
SMALL = dict(name='mobilenet_v1', num_classes=10, num_downsample=3, conv_impl='cpu_fast')


def test_every_registered_backbone_reports_its_levels():
  assert set(FULL_WIDTH) == set(MODELS)


@pytest.mark.parametrize('name', sorted(FULL_WIDTH))
def test_channels_at_any_width(name):
  model = get_model(dict(name=name))
  assert features.feature_channels(model, 1.0) == FULL_WIDTH[name]
  assert features.feature_channels(model, 0.37) == {k: slim.make_divisible(c * 0.37)
                                                    for k, c in FULL_WIDTH[name].items()}


@pytest.mark.parametrize('name,num_downsample,strides', [
    ('mobilenet_v1', 5, {8: 8, 16: 16, 32: 32}), ('mobilenet_v1', 3, {8: 2, 16: 4, 32: 8}),
    ('mobilenet_v2', 4, {8: 4, 16: 8, 32: 16}), ('resnet50', 3, {8: 2, 16: 4, 32: 8}),
    ('vgg16', 2, {8: 1, 16: 2, 32: 4})])
def test_levels_keep_their_names_under_the_small_input_variant(name, num_downsample, strides):
  model = get_model(dict(name=name, num_downsample=num_downsample))
  assert features.feature_strides(model) == strides
  r = 8 * model.min_resolution
  shapes = jax.eval_shape(lambda x: features.feature_maps(model, model.init(jax.random.key(0), x, train=True), x,
                                                          train=True), jax.ShapeDtypeStruct((1, r, r, 3), jnp.float32))
  assert {k: v.shape[1] for k, v in shapes.items()} == {k: r // s for k, s in strides.items()}


def test_capacity_path_maps_are_the_exact_maps_padded_with_zeros():
  model = get_model(SMALL)
  params = init_params(model, jax.random.key(0), 16, 3)
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  width = 0.37
  exact = jax.jit(lambda p: features.feature_maps(model, {'params': p}, x, width, train=True))(params)
  masked = jax.jit(lambda p, a: features.feature_maps(model, {'params': p}, x, 1.0, train=True, active=a))(
      params, jnp.asarray(model.channel_counts(width)))
  assert {k: v.shape[-1] for k, v in exact.items()} == features.feature_channels(model, width)
  for level, m in exact.items():
    c = m.shape[-1]
    np.testing.assert_allclose(masked[level][..., :c], m, rtol=1e-4, atol=1e-4, err_msg=str(level))
    assert not np.asarray(masked[level][..., c:]).any(), level


def test_a_pyramid_head_trains_on_the_width_slice_of_the_backbone():
  """A 1x1 lateral conv per level summed top-down, then per-pixel logits at the finest level, trained with the
  backbone on random data at width 0.5: the loss falls, the head and the backbone's used channels get gradient,
  nothing outside them (nor the unused classifier) does."""
  model = get_model(SMALL)
  head = features.FeaturePyramid.for_model(model, 16)
  width = 0.5
  x = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
  maps = jax.eval_shape(lambda p: features.feature_maps(model, {'params': p}, x, width, train=True),
                        init_params(model, jax.random.key(0), 16, 3))
  finest = min(maps)
  labels = jax.random.randint(jax.random.key(2), maps[finest].shape[:3], 0, 3)
  classify = slim.SlimConv(3, 16, conv_impl='xla')
  params = {'backbone': init_params(model, jax.random.key(0), 16, 3),
            'head': head.init(jax.random.key(3), jax.tree.map(jnp.zeros_like, maps))['params'],
            'classify': classify.init(jax.random.key(4), jnp.zeros(maps[finest].shape[:3] + (16,)))['params']}

  def loss_fn(p):
    pyramid = head.apply({'params': p['head']},
                         features.feature_maps(model, {'params': p['backbone']}, x, width, train=True))
    logits = classify.apply({'params': p['classify']}, pyramid[finest])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  tx = optax.adam(1e-4)  # small enough that 6 steps descend on any kernel path (at 1e-3 the loss oscillates)

  @jax.jit
  def step(p, opt):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), opt, loss, grads

  opt, losses = tx.init(params), []
  for i in range(6):
    new, opt, loss, grads = step(params, opt)
    if i == 0:
      first_grads = jax.tree.map(np.asarray, grads)
    params, losses = new, losses + [float(loss)]
  assert losses[-1] < 0.8 * losses[0], losses
  assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(first_grads['head']))
  backbone = first_grads['backbone']
  assert not any(np.asarray(g).any() for g in jax.tree.leaves(backbone['classifier']))
  used = export.used_channels(model, params['backbone'], width, 16, 3)
  for path, (_, cin, cout) in used.items():
    if path[0] == 'classifier':
      continue
    layer = backbone
    for key in path:
      layer = layer[key]
    for name, g in layer.items():
      inside = [slice(None)] * g.ndim
      inside[-1] = slice(0, cout)
      if g.ndim == 4:
        inside[-2] = slice(0, cin)
      assert np.abs(g[tuple(inside)]).max() > 0, (path, name)
      outside = g.copy()
      outside[tuple(inside)] = 0
      assert not outside.any(), (path, name)
