"""Input pipeline: shapes, normalisation, augmentations, exact resume, eval padding, multi-host shards, bad input.

Most tests run on either a `tfds.testing.mock_data` mock (cifar10, imagenet2012) or a tiny Fashion-MNIST-format
dataset that the real offline builder prepares from idx files written here, whose images encode their own index.
The `test_real_*` tests prepare the installed Fashion-MNIST (the `fashion_data_dir` fixture); they skip when it is
absent unless MUTUALNET_REQUIRE_FASHION_MNIST=1.
"""
import collections
import gzip
import os
import struct

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import default
from mutualnet_jax import config_fields, input_pipeline
from mutualnet_jax.datasets import fashion_mnist_local
from mutualnet_jax.errors import UserError

TINY_TRAIN, TINY_TEST = 100, 37
MOCK_EXAMPLES = {'cifar10': 40, 'imagenet2012': 12}


def _config(data_dir, **overrides):
  config = default.get_config()
  config.data_dir = os.fspath(data_dir)
  config.shuffle_buffer = 64
  for key, value in overrides.items():
    if '.' in key:
      parent, child = key.split('.')
      config[parent][child] = value
    else:
      config[key] = value
  return config


def _write_idx(path, array, magic):
  with gzip.open(path, 'wb') as f:
    f.write(struct.pack('>I', magic) + struct.pack(f'>{array.ndim}I', *array.shape) + array.tobytes())


def _tiny_images(n, offset):
  """Image i holds its global index in its first two pixels, so a test can tell which example it is."""
  images = np.zeros((n, 28, 28), np.uint8)
  index = np.arange(offset, offset + n)
  images[:, 0, 0], images[:, 0, 1] = index % 256, index // 256
  images[:, 10:18, 10:18] = 200
  return images


def _image_index(batch_images):
  """Inverts `_tiny_images` on batches normalised with the Fashion-MNIST statistics ('none' at 28 px)."""
  pixels = np.rint(batch_images[..., 0] * 0.3530 * 255 + 0.2860 * 255).astype(int)
  return pixels[:, 0, 0] + 256 * pixels[:, 0, 1]


@pytest.fixture(scope='module')
def tiny_dir(tmp_path_factory):
  """A prepared `fashion_mnist_local` with 100 train and 37 test images, built from fake idx files."""
  raw = tmp_path_factory.mktemp('raw')
  for prefix, n, offset in (('train', TINY_TRAIN, 0), ('t10k', TINY_TEST, TINY_TRAIN)):
    _write_idx(raw / f'{prefix}-images-idx3-ubyte.gz', _tiny_images(n, offset), 2051)
    _write_idx(raw / f'{prefix}-labels-idx1-ubyte.gz', (np.arange(n) % 10).astype(np.uint8), 2049)
  data_dir = tmp_path_factory.mktemp('tiny_tfds')
  input_pipeline.get_dataset_info(_config(data_dir, manual_dir=os.fspath(raw)))
  return data_dir


@pytest.fixture(scope='module')
def mock_dir(tmp_path_factory):
  """Metadata for mocked cifar10 / imagenet2012 whose splits all hold MOCK_EXAMPLES[name] examples."""
  data_dir = tmp_path_factory.mktemp('mock_tfds')
  for name, n in MOCK_EXAMPLES.items():
    builder = tfds.builder(name, data_dir=data_dir)
    builder.info.set_splits(tfds.core.SplitDict(
        [tfds.core.SplitInfo(name=split, shard_lengths=[n], num_bytes=0) for split in ('train', 'test',
                                                                                      'validation')]))
    os.makedirs(builder.data_dir)
    builder.info.write_to_directory(builder.data_dir)
  return data_dir


def _mock(mock_dir, name):
  return tfds.testing.mock_data(num_examples=MOCK_EXAMPLES[name], data_dir=os.fspath(mock_dir),
                                policy=tfds.testing.MockPolicy.USE_FILES)


def _imagenet_config(mock_dir, **overrides):
  return _config(mock_dir, dataset='imagenet2012', eval_split='validation', augmentation='imagenet',
                 image_size=32, **{'model.num_classes': 1000, **overrides})


def _fake_processes(monkeypatch, index, count):
  monkeypatch.setattr(jax, 'process_index', lambda: index)
  monkeypatch.setattr(jax, 'process_count', lambda: count)


@pytest.mark.parametrize('augmentation', config_fields.AUGMENTATIONS)
@pytest.mark.parametrize('image_size', [32, 24])
def test_cifar_batches(mock_dir, augmentation, image_size):
  config = _config(mock_dir, dataset='cifar10', augmentation=augmentation, image_size=image_size)
  with _mock(mock_dir, 'cifar10'):
    batch = next(input_pipeline.train_iterator(config, global_batch_size=8))
  assert batch['image'].shape == (8, image_size, image_size, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
  assert np.isfinite(batch['image']).all() and 0 <= batch['label'].min() and batch['label'].max() < 10


def test_eval_normalises_with_dataset_statistics(mock_dir):
  """At the source size eval is decode + normalise only, so undoing the CIFAR statistics gives the raw pixels."""
  config = _config(mock_dir, dataset='cifar10', augmentation='small', image_size=32)
  with _mock(mock_dir, 'cifar10'):
    raw = next(iter(tfds.as_numpy(tfds.builder('cifar10').as_dataset(split='test').batch(16))))
    batch = next(input_pipeline.eval_iterator(config, global_batch_size=16))
  mean, std = np.array([0.4914, 0.4822, 0.4465]) * 255, np.array([0.2470, 0.2435, 0.2616]) * 255
  np.testing.assert_allclose(batch['image'] * std + mean, raw['image'], atol=1e-3)
  np.testing.assert_array_equal(batch['label'], raw['label'])


def test_imagenet_jpeg_train_and_eval(mock_dir):
  """Variable-size JPEGs: fused decode-and-crop for random-resized-crop, centre crop for eval."""
  config = _imagenet_config(mock_dir)
  with _mock(mock_dir, 'imagenet2012'):
    info = input_pipeline.get_dataset_info(config)
    batch = next(input_pipeline.train_iterator(config, global_batch_size=4))
    evals = list(input_pipeline.eval_iterator(config, global_batch_size=8))
  assert (info.num_classes, info.channels, info.num_train_examples) == (1000, 3, 12)
  assert batch['image'].shape == (4, 32, 32, 3) and np.isfinite(batch['image']).all()
  assert [b['image'].shape for b in evals] == [(8, 32, 32, 3)] * 2
  assert [b['mask'].sum() for b in evals] == [8, 4]


def _batches(config, count, start_step=0, global_batch_size=16):
  iterator = input_pipeline.train_iterator(config, global_batch_size=global_batch_size, start_step=start_step)
  return [next(iterator) for _ in range(count)]


def _assert_same_batches(expected, actual):
  for want, got in zip(expected, actual, strict=True):
    assert want.keys() == got.keys()
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])


@pytest.mark.parametrize('augmentation', ['small', 'imagenet'])
def test_resume_is_exact_cached(tiny_dir, augmentation):
  """100 images / batch 16 = 6 steps per epoch; resuming inside epoch 0 and across the epoch boundary."""
  config = _config(tiny_dir, augmentation=augmentation)
  fresh = _batches(config, 15)
  for start in (4, 6, 9):
    _assert_same_batches(fresh[start:], _batches(config, 15 - start, start_step=start))


def test_resume_is_exact_streaming(mock_dir):
  """ImageNet-like data is not cached: every epoch re-reads the files in a seeded order."""
  config = _imagenet_config(mock_dir)
  with _mock(mock_dir, 'imagenet2012'):
    fresh = _batches(config, 8, global_batch_size=4)
    _assert_same_batches(fresh[2:], _batches(config, 6, start_step=2, global_batch_size=4))
    _assert_same_batches(fresh[4:], _batches(config, 4, start_step=4, global_batch_size=4))


def test_epochs_cover_each_example_once_and_reshuffle(tiny_dir):
  config = _config(tiny_dir, augmentation='none')
  iterator = input_pipeline.train_iterator(config, global_batch_size=20)
  assert iterator.steps_per_epoch == 5
  epochs = [np.concatenate([_image_index(next(iterator)['image']) for _ in range(5)]) for _ in range(2)]
  for seen in epochs:
    np.testing.assert_array_equal(np.sort(seen), np.arange(TINY_TRAIN))
  assert not np.array_equal(epochs[0], epochs[1])
  other_seed = _batches(_config(tiny_dir, augmentation='none', seed=1), 1, global_batch_size=20)[0]
  assert not np.array_equal(_image_index(other_seed['image']), epochs[0][:20])


def test_train_shards_are_disjoint_per_process(tiny_dir, monkeypatch):
  config = _config(tiny_dir, augmentation='none')
  seen = []
  for index in range(2):
    _fake_processes(monkeypatch, index, 2)
    iterator = input_pipeline.train_iterator(config, global_batch_size=20)
    assert iterator.steps_per_epoch == 5
    batches = [next(iterator) for _ in range(5)]
    assert {b['image'].shape[0] for b in batches} == {10}
    seen.append(set(np.concatenate([_image_index(b['image']) for b in batches])))
  assert len(seen[0]) == len(seen[1]) == 50 and not seen[0] & seen[1]


def test_eval_pads_to_equal_batch_counts(tiny_dir, monkeypatch):
  """37 images over 3 processes (13, 12, 12) with local batch 5: 3 batches each, the rest masked out."""
  config = _config(tiny_dir, augmentation='none')
  seen = []
  for index in range(3):
    _fake_processes(monkeypatch, index, 3)
    batches = list(input_pipeline.eval_iterator(config, global_batch_size=15))
    assert len(batches) == 3 and all(b['image'].shape == (5, 28, 28, 1) for b in batches)
    mask = np.concatenate([b['mask'] for b in batches])
    assert mask.dtype == np.float32 and set(np.unique(mask)) <= {0.0, 1.0}
    images = np.concatenate([b['image'] for b in batches])
    assert not images[mask == 0].any()
    seen.extend(_image_index(images[mask == 1]))
  np.testing.assert_array_equal(np.sort(seen), TINY_TRAIN + np.arange(TINY_TEST))


def test_calibration_is_fixed_and_uses_eval_preprocessing(tiny_dir):
  config = _config(tiny_dir, augmentation='small')
  first = list(input_pipeline.calibration_iterator(config, num_images=45, global_batch_size=10))
  again = list(input_pipeline.calibration_iterator(config, num_images=45, global_batch_size=10))
  assert len(first) == 4
  _assert_same_batches(first, again)
  indices = np.concatenate([_image_index(b['image']) for b in first])  # decodes only without augmentation
  assert len(set(indices)) == 40 and indices.max() < TINY_TRAIN


def test_official_calibration_batches_are_augmented_and_still_fixed(tiny_dir):
  """bn_calibration='official' recalibrates on the training augmentation (as the official code's train loader), yet
  every call yields the same batches."""
  exact = list(input_pipeline.calibration_iterator(_config(tiny_dir, augmentation='small'), num_images=45,
                                                   global_batch_size=10))
  config = _config(tiny_dir, augmentation='small', bn_calibration='official')
  first = list(input_pipeline.calibration_iterator(config, num_images=45, global_batch_size=10))
  _assert_same_batches(first, list(input_pipeline.calibration_iterator(config, num_images=45, global_batch_size=10)))
  assert len(first) == len(exact) == 4
  assert [b['image'].shape for b in first] == [b['image'].shape for b in exact]
  assert not all(np.array_equal(a['image'], b['image']) for a, b in zip(first, exact))  # pad-crop and flip


def test_local_builder_has_the_stock_features(tmp_path):
  ours = tfds.builder('fashion_mnist_local', data_dir=tmp_path).info.features
  stock = tfds.builder('fashion_mnist', data_dir=tmp_path).info.features
  assert ours.to_json() == stock.to_json() and ours['label'].names == stock['label'].names


def _assert_one_line_user_error(config, *fragments):
  with pytest.raises(UserError) as error:
    input_pipeline.get_dataset_info(config)
  message = str(error.value)
  assert '\n' not in message and all(fragment in message for fragment in fragments), message


def test_unknown_dataset(tmp_path):
  _assert_one_line_user_error(_config(tmp_path, dataset='no_such_dataset'), "'no_such_dataset'", '--config.dataset')


def test_missing_data_dir(tmp_path):
  _assert_one_line_user_error(_config(tmp_path / 'absent'), 'does not exist', '--config.data_dir')


def test_missing_manual_files(tmp_path):
  empty = tmp_path / 'raw'
  empty.mkdir()
  _assert_one_line_user_error(_config(tmp_path, manual_dir=os.fspath(empty)), 'apt-get install dataset-fashion-mnist',
                              '--config.manual_dir', 'train-images-idx3-ubyte.gz')


def test_unprepared_dataset_says_how_to_build_it(tmp_path):
  _assert_one_line_user_error(_config(tmp_path, dataset='cifar10'), f'tfds build cifar10 --data_dir={tmp_path}')


@pytest.mark.parametrize('overrides, fragment', [
    ({'model.num_classes': 1000}, '--config.model.num_classes=10'),
    ({'train_split': 'trian'}, "'trian'"),
])
def test_bad_config(tiny_dir, overrides, fragment):
  config = _config(tiny_dir, **overrides)
  with pytest.raises(UserError, match=fragment):
    input_pipeline.train_iterator(config, global_batch_size=10)


@pytest.fixture(scope='module')
def real_dir(fashion_data_dir):
  """The installed Fashion-MNIST, prepared once per session (conftest)."""
  return fashion_data_dir


@pytest.mark.slow
def test_real_fashion_mnist_counts(real_dir):
  """Split sizes as written by the preparation; the test histogram (1000 per class) read back through TFDS."""
  info = input_pipeline.get_dataset_info(_config(real_dir))
  assert info == input_pipeline.DatasetInfo('fashion_mnist_local', 10, 60_000, 10_000, 1)
  builder = tfds.builder('fashion_mnist_local', data_dir=real_dir)
  labels = builder.as_dataset(split='test', decoders={'image': tfds.decode.SkipDecoding()}).map(lambda ex: ex['label'])
  assert collections.Counter(next(iter(tfds.as_numpy(labels.batch(10_000)))).tolist()) == {c: 1000 for c in range(10)}


@pytest.mark.slow
def test_real_fashion_mnist_pipeline(real_dir):
  """The normalisation constants match the real training images, and a full eval pass sees all 10k."""
  batch = next(input_pipeline.train_iterator(_config(real_dir), global_batch_size=128))
  assert batch['image'].shape == (128, 28, 28, 1)
  masks = [b['mask'].sum() for b in input_pipeline.eval_iterator(_config(real_dir), global_batch_size=500)]
  assert len(masks) == 20 and sum(masks) == 10_000
  calibration = next(input_pipeline.calibration_iterator(_config(real_dir), num_images=4000,
                                                         global_batch_size=4000))
  assert abs(calibration['image'].mean()) < 0.03 and abs(calibration['image'].std() - 1) < 0.03


def test_colour_jitter_and_lighting_are_random_per_image_but_reproducible(mock_dir):
  plain = _config(mock_dir, dataset='cifar10', augmentation='random_resized_crop', image_size=32)
  jitter = _config(mock_dir, dataset='cifar10', augmentation='random_resized_crop', image_size=32, color_jitter=0.4,
                   lighting=0.1)
  with _mock(mock_dir, 'cifar10'):
    a = next(input_pipeline.train_iterator(plain, global_batch_size=8))['image']
    b = next(input_pipeline.train_iterator(jitter, global_batch_size=8))['image']
    again = next(input_pipeline.train_iterator(jitter, global_batch_size=8))['image']
  np.testing.assert_array_equal(b, again)  # a pure function of (seed, step, element)
  assert np.isfinite(b).all() and not np.allclose(a, b)
  # The same crops (same seeds): brightness/contrast/saturation change each image's mean by a different factor.
  ratio = (b.mean((1, 2, 3)) + 10) / (a.mean((1, 2, 3)) + 10)
  assert np.std(ratio) > 1e-3


@pytest.mark.parametrize('overrides, fragment', [
    ({'mean': (0.5,), 'std': (0.5, 0.5)}, 'must give 1 values each'),
    ({'mean': (0.5,), 'std': (0.0,)}, 'stds > 0'),
])
def test_bad_normalisation_is_one_clear_error(tiny_dir, overrides, fragment):
  with pytest.raises(UserError, match=fragment):
    input_pipeline.train_iterator(_config(tiny_dir, **overrides), global_batch_size=10)


def test_normalisation_from_the_config_and_unknown_datasets():
  config = default.get_config()
  assert input_pipeline.normalization(config, 1) == ((0.2860,), (0.3530,))
  config.mean, config.std = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)
  assert input_pipeline.normalization(config, 3) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
  config.mean, config.std, config.dataset = (), (), 'my_flowers'
  with pytest.raises(UserError, match='set --config.mean and --config.std'):
    input_pipeline.normalization(config, 3)


@pytest.mark.parametrize('damage, fragment', [
    (lambda path: path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2]), 'not a readable gzip file'),
    (lambda path: path.write_bytes(b'not gzip at all' * 10), 'not a readable gzip file'),
    (lambda path: path.write_bytes(gzip.compress(b'')), 'too few for an idx header'),
    (lambda path: path.write_bytes(b''), 'too few for an idx header'),
    (lambda path: _write_idx(path, np.zeros((5, 28, 27), np.uint8), 2051), 'not 28x28'),
    (lambda path: path.write_bytes(gzip.compress(struct.pack('>IIII', 2051, 5, 28, 28) + b'\0' * 100)), 'truncated'),
    (lambda path: _write_idx(path, np.zeros((5, 28, 28), np.uint8), 2049), 'not an idx file of this kind'),
])
def test_damaged_raw_files_are_one_clear_error_naming_the_file(tmp_path, damage, fragment):
  raw = tmp_path / 'raw'
  raw.mkdir()
  for prefix in ('train', 't10k'):
    _write_idx(raw / f'{prefix}-images-idx3-ubyte.gz', _tiny_images(5, 0), 2051)
    _write_idx(raw / f'{prefix}-labels-idx1-ubyte.gz', np.arange(5, dtype=np.uint8), 2049)
  damage(raw / 'train-images-idx3-ubyte.gz')
  (tmp_path / 'tfds').mkdir()
  _assert_one_line_user_error(_config(tmp_path / 'tfds', manual_dir=os.fspath(raw)), fragment,
                              'train-images-idx3-ubyte.gz', 'dataset-fashion-mnist')


def test_labels_out_of_range_are_one_clear_error(tmp_path):
  raw = tmp_path / 'raw'
  raw.mkdir()
  for prefix in ('train', 't10k'):
    _write_idx(raw / f'{prefix}-images-idx3-ubyte.gz', _tiny_images(5, 0), 2051)
    _write_idx(raw / f'{prefix}-labels-idx1-ubyte.gz', np.array([0, 1, 2, 3, 12], np.uint8), 2049)
  (tmp_path / 'tfds').mkdir()
  _assert_one_line_user_error(_config(tmp_path / 'tfds', manual_dir=os.fspath(raw)), 'label 12, outside 0-9',
                              'labels-idx1-ubyte.gz')


# ----------------------------------------------------------------------------------------------------------------------
# Images from outside the run's dataset, for BN calibration.

def _source_images(source):
  return np.concatenate([b['image'] for b in source.batches])


def test_an_array_source_gets_the_runs_eval_preprocessing(tiny_dir):
  config = _config(tiny_dir, calibration_images=45, calibration_batch_size=10)
  images = _tiny_images(50, 0)
  source = input_pipeline.image_source(config, images, channels=1)
  assert (source.num_images, source.batch_size, source.description) == (40, 10, 'an array')
  np.testing.assert_array_equal(_image_index(_source_images(source)), np.arange(40))  # in order, as the run normalises
  assert input_pipeline.image_source(config, images[..., None], 1).digest == source.digest  # (N, H, W, 1) alike
  assert input_pipeline.image_source(config, images[1:], 1).digest != source.digest
  few = input_pipeline.image_source(config, images[:3], 1)
  assert (few.num_images, few.batch_size) == (3, 3)  # fewer than a batch: one batch of all of them
  mixed = input_pipeline.image_source(config, [images[0], np.zeros((40, 30), np.uint8)], 1)
  assert _source_images(mixed).shape == (2, 28, 28, 1)  # other sizes are resized like the dataset's images


@pytest.mark.parametrize('images,fragment', [
    (np.zeros((4, 28, 28, 3), np.uint8),
     r'^got images shaped \(4, 28, 28, 3\) \(uint8\) from the array: expected raw pixels shaped '
     r'\(N, height, width, 1\)'),
    (np.zeros((28, 28), np.uint8), r'shaped \(28, 28\)'),
    (np.zeros((0, 28, 28, 1), np.uint8), r'shaped \(0, 28, 28, 1\)'),
    (np.array([['a']]), r'\(<U1\)'),
    ([np.zeros((28, 28, 1)), np.zeros((20, 20, 3))], r'got an image shaped \(20, 20, 3\)'),
    ([], 'got no images from the array'),
])
def test_bad_arrays_are_one_line_errors(tiny_dir, images, fragment):
  with pytest.raises(UserError, match=fragment) as error:
    input_pipeline.image_source(_config(tiny_dir), images, channels=1)
  assert '\n' not in str(error.value)


def test_a_tfds_dataset_of_other_classes_calibrates(tmp_path):
  """Calibration reads no labels: a prepared dataset of 3 classes serves a 10-class run, which its own pipeline
  (with labels) refuses."""
  features = tfds.features.FeaturesDict({'image': tfds.features.Image(shape=(28, 28, 1)),
                                         'label': tfds.features.ClassLabel(num_classes=3)})
  examples = [(i, {'image': _tiny_images(1, i)[0][..., None], 'label': i % 3}) for i in range(12)]
  tfds.dataset_builders.store_as_tfds_dataset(name='fm3', version='1.0.0', features=features,
                                              split_datasets={'train': examples}, data_dir=str(tmp_path))
  config = _config(tmp_path, dataset='fm3', calibration_images=8, calibration_batch_size=4,
                   mean=(0.2860,), std=(0.3530,))
  with pytest.raises(UserError, match="Dataset 'fm3' has 3 classes but config.model.num_classes=10"):
    input_pipeline.get_dataset_info(config)
  source = input_pipeline.image_source(_config(tmp_path, calibration_images=8, calibration_batch_size=4), 'tfds:fm3',
                                       channels=1)
  assert (source.num_images, source.batch_size, source.description) == (8, 4, 'tfds:fm3 train')
  assert len(set(_image_index(_source_images(source)))) == 8  # Fashion-MNIST's normalisation (the run's), 8 images
  with pytest.raises(UserError, match="'fm3' has 1-channel images, the run takes 3"):
    input_pipeline.image_source(_config(tmp_path), 'tfds:fm3', channels=3)


def test_the_local_builder_says_nothing_about_configs_or_downloads(tiny_dir, caplog, capsys):
  """TFDS logs "No config specified" on every load of a builder with configs, and prints "Downloading and
  preparing" before preparing one; this builder prepares from local files and its plain name is meant."""
  with caplog.at_level('INFO'):
    builder = tfds.builder('fashion_mnist_local', data_dir=tiny_dir)
    builder._log_download_bytes()  # pylint: disable=protected-access  (what download_and_prepare prints first)
  assert builder.builder_config.name == fashion_mnist_local.ALL
  assert 'No config specified' not in caplog.text and 'Downloading' not in capsys.readouterr().out
