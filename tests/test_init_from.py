"""Fine-tuning initialisation: the backbone from a workdir, an export or a parameter file; the classifier kept or
re-initialised; other architectures refused in one line naming both."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mutualnet_jax import checkpointing, export, init_from, parallel, workdir as workdir_lib
from mutualnet_jax.errors import UserError
from mutualnet_jax.models import get_model, init_params
from mutualnet_jax.train_state import create_optimizer, init_state
from tests.util import tiny_config

CHANNELS = 1


def _params(config, seed):
  return jax.device_get(init_params(get_model(config.model), jax.random.key(seed), 8, CHANNELS))


def _flat(tree):
  return init_from.flatten(tree)


def _target(**overrides):
  return tiny_config(**{'model.num_classes': 5, **overrides})


def _save_workdir(path, config, seed=7):
  """A workdir as training leaves it: config.json and a checkpoint of a (here untrained) state."""
  mesh = parallel.make_mesh()
  tx = create_optimizer(config, optax.constant_schedule(0.1))
  state = init_state(get_model(config.model), tx, seed, CHANNELS, mesh)
  workdir_lib.check_writable(str(path))
  workdir_lib.save_config(config, str(path))
  ckpt = checkpointing.Checkpoints(str(path), keep=1, expected=checkpointing.fingerprint(config, CHANNELS))
  ckpt.save(3, state, {'step': 3})
  ckpt.close()
  return jax.device_get(state.params)


def test_no_init_from_keeps_the_fresh_parameters():
  fresh = _params(tiny_config(), 0)
  assert init_from.initial_params(tiny_config(), fresh) is fresh


def test_workdir_backbone_is_loaded_and_a_classifier_for_other_classes_is_fresh(tmp_path):
  source = _save_workdir(tmp_path / 'src', tiny_config())
  config = _target(init_from=str(tmp_path / 'src'))
  fresh = _params(config, 0)
  loaded = _flat(init_from.initial_params(config, fresh))
  expected, fresh_flat = _flat(source), _flat(fresh)
  assert loaded.keys() == fresh_flat.keys()
  for path, value in loaded.items():
    np.testing.assert_array_equal(value, fresh_flat[path] if path.startswith('classifier/') else expected[path],
                                  err_msg=path)
  assert loaded['classifier/kernel'].shape == (64, 5)


def test_initial_state_is_replicated_with_a_fresh_optimizer(tmp_path):
  _save_workdir(tmp_path / 'src', tiny_config())
  config = _target(init_from=str(tmp_path / 'src'))
  mesh = parallel.make_mesh()
  tx = create_optimizer(config, optax.constant_schedule(0.1))
  fresh = init_state(get_model(config.model), tx, 0, CHANNELS, mesh)
  state = init_from.initial_state(config, fresh, tx, mesh)
  assert int(state.step) == 0
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(fresh.opt_state)
  assert all(not np.asarray(m).any() for m in jax.tree.leaves(state.opt_state))  # momentum starts at zero
  assert state.params['stem']['conv']['kernel'].sharding == parallel.replicated_sharding(mesh)
  assert init_from.initial_state(tiny_config(), fresh, tx, mesh) is fresh


@pytest.mark.parametrize('mode,same_classes,reinitialised', [
    ('auto', True, False), ('auto', False, True), ('fresh', True, True), ('load', True, False)])
def test_classifier_modes(tmp_path, mode, same_classes, reinitialised):
  source = _params(tiny_config(), 7)
  init_from.save_params(tmp_path / 'p.npz', source, tiny_config().model.to_dict())
  config = tiny_config(init_from=str(tmp_path / 'p.npz'), init_classifier=mode,
                       **({} if same_classes else {'model.num_classes': 5}))
  fresh = _params(config, 0)
  loaded = _flat(init_from.initial_params(config, fresh))
  np.testing.assert_array_equal(loaded['stem/conv/kernel'], _flat(source)['stem/conv/kernel'])
  want = _flat(fresh if reinitialised else source)['classifier/kernel']
  np.testing.assert_array_equal(loaded['classifier/kernel'], want)


def test_loading_a_classifier_of_other_classes_is_refused(tmp_path):
  init_from.save_params(tmp_path / 'p.npz', _params(tiny_config(), 7))
  config = _target(init_from=str(tmp_path / 'p.npz'), init_classifier='load')
  with pytest.raises(UserError, match='classifies 10 classes, config.model.num_classes is 5'):
    init_from.initial_params(config, _params(config, 0))
  with pytest.raises(UserError, match='init_classifier must be one of'):
    init_from.initial_params(_target(init_from=str(tmp_path / 'p.npz'), init_classifier='new'), _params(config, 0))


def test_export_fills_the_leading_slice_only(tmp_path):
  source_config = tiny_config()
  model = get_model(source_config.model)
  source = _params(source_config, 7)
  moments = jax.eval_shape(lambda p: model.apply({'params': p}, jnp.zeros((1, 8, 8, 1)), width=0.5, train=True,
                                                 mutable=['bn_moments'])[1]['bn_moments'], source)
  stats = jax.tree.map(lambda s: np.ones(s.shape, np.float32), moments)
  path = export.save(export.build(model, source, stats, 0.5, 8, CHANNELS), tmp_path / 'export',
                     source_config.model.to_dict())
  config = _target(init_from=str(path))
  fresh = _flat(_params(config, 0))
  narrow = _flat(export.load(path).variables['params'])
  loaded = _flat(init_from.initial_params(config, init_from.unflatten(fresh)))
  kernel = loaded['block1_pw/conv/kernel']  # 32 -> 64 channels at width 1.0, 16 -> 32 at 0.5
  np.testing.assert_array_equal(kernel[:, :, :16, :32], narrow['block1_pw/conv/kernel'])
  np.testing.assert_array_equal(kernel[:, :, 16:, :], fresh['block1_pw/conv/kernel'][:, :, 16:, :])
  np.testing.assert_array_equal(kernel[:, :, :, 32:], fresh['block1_pw/conv/kernel'][:, :, :, 32:])
  np.testing.assert_array_equal(loaded['classifier/kernel'], fresh['classifier/kernel'])  # 10 vs 5 classes


@pytest.mark.parametrize('source_model,match', [
    (dict(name='mobilenet_v1', num_downsample=3),
     'holds a mobilenet_v1 max_width=1.0 network but config.model is a tiny_convnet max_width=1.0'),
    (dict(name='tiny_convnet', max_width=1.5),
     'holds a tiny_convnet max_width=1.5 network but config.model is a tiny_convnet max_width=1.0')])
def test_another_architecture_or_max_width_is_refused_naming_both(tmp_path, source_model, match):
  model = get_model(source_model)
  params = jax.device_get(init_params(model, jax.random.key(0), 8, CHANNELS))
  init_from.save_params(tmp_path / 'p.npz', params, source_model)
  config = _target(init_from=str(tmp_path / 'p.npz'))
  with pytest.raises(UserError, match=match):
    init_from.initial_params(config, _params(config, 0))


def test_a_bare_parameter_file_is_checked_by_names_and_shapes(tmp_path):
  params = _flat(_params(tiny_config(), 0))
  config = _target(init_from=str(tmp_path / 'p.npz'))
  init_from.save_params(tmp_path / 'p.npz', init_from.unflatten({k: v for k, v in params.items()
                                                                   if not k.startswith('stem/')}))
  with pytest.raises(UserError, match='lacks parameter stem/bn/bias'):
    init_from.initial_params(config, _params(config, 0))
  params['stem/conv/kernel'] = np.zeros((3, 3, 3, 16), np.float32)  # RGB images: 3 input channels, not 1
  init_from.save_params(tmp_path / 'p.npz', init_from.unflatten(params))
  with pytest.raises(UserError, match=r'stem/conv/kernel is \(3, 3, 3, 16\), config.model needs \(3, 3, 1, 16\)'):
    init_from.initial_params(config, _params(config, 0))


@pytest.mark.parametrize('make,match', [
    (lambda p: p / 'missing', 'does not exist'),
    (lambda p: p, 'neither a training workdir'),
    (lambda p: (p / 'x.npz').write_text('no') and p / 'x.npz', 'not a readable .npz parameter file')])
def test_unreadable_sources_are_one_line_errors(tmp_path, make, match):
  config = _target(init_from=str(make(tmp_path)))
  with pytest.raises(UserError, match=match):
    init_from.initial_params(config, _params(config, 0))


def test_class_subsets_of_fashion_mnist_for_transfer(fashion_data_dir):
  """The transfer experiment's data: builder configs keep classes 0-4 or 5-9, relabelled 0-4, with TFDS splits and
  slices; the plain name stays all 10 classes in the folder it was prepared in before configs existed."""
  from mutualnet_jax import input_pipeline  # noqa: PLC0415  heavy (TensorFlow): only this test reads data
  assert (fashion_data_dir / 'fashion_mnist_local' / '1.0.0' / 'dataset_info.json').exists()
  assert not (fashion_data_dir / 'fashion_mnist_local' / 'all').exists()
  everything = input_pipeline.get_dataset_info(tiny_config(data_dir=str(fashion_data_dir)))
  assert (everything.num_classes, everything.num_train_examples) == (10, 60_000)
  config = _target(data_dir=str(fashion_data_dir), dataset='fashion_mnist_local/classes_5_9',
                   train_split='train[:1000]', eval_batch_size=500)
  info = input_pipeline.get_dataset_info(config)
  assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (5, 1000, 5000)
  labels = np.concatenate([b['label'][b['mask'] > 0] for b in
                           input_pipeline.eval_iterator(config, global_batch_size=500)])
  assert labels.shape == (5000,) and np.array_equal(np.bincount(labels), [1000] * 5)
