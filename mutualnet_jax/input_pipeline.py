"""tf.data input pipelines: training (exactly resumable), evaluation (padded, multi-host safe), BN calibration.

Every random choice is a pure function of (config.seed, process index, epoch, element index): each epoch's file
order and shuffle buffer use seeds derived from them, and augmentations use stateless random ops seeded per
element. So `train_iterator(start_step=k)` yields the batches that steps k, k+1, ... of a fresh run would have seen,
and a restarted job trains on exactly the data it would have trained on without the restart.
"""
import dataclasses
import hashlib
import math
import os
import tempfile
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mutualnet_jax import config_fields, datasets
from mutualnet_jax.errors import UserError
from mutualnet_jax.resizing import input_size

Batch = dict[str, np.ndarray]

_IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_MEAN_STD = {  # per-channel mean and std of the training images, in [0, 1] units
    'fashion_mnist_local': ((0.2860,), (0.3530,)),
    'fashion_mnist': ((0.2860,), (0.3530,)),
    'mnist': ((0.1307,), (0.3081,)),
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    'imagenet2012': _IMAGENET_MEAN_STD,
}
# AlexNet's PCA lighting noise (the official MutualNet/US-Net `Lighting` transform), in [0, 1] pixel units.
_PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
_PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))
EVAL_CROP_FRACTION = 0.875  # ImageNet eval: resize the shorter side to S / 0.875, then take the centre S x S
_CACHE_LIMIT_BYTES = 1 << 30  # decoded splits up to this size are cached in memory after the first epoch
_TRAIN_STREAM, _CALIBRATION_STREAM = 0, 1  # keep the training and calibration random streams apart
_REPLAY_LIMIT_BYTES = 1 << 30  # passes up to this size are kept in host memory after the first


def _hide_gpu_from_tf() -> None:
  """TF would otherwise grab accelerator memory that JAX needs; the pipeline runs on the host only."""
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TF already initialised its devices (someone used it first): nothing left to change.
    pass


_hide_gpu_from_tf()


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the rest of the program needs to know about the dataset; counts are global (all processes)."""
  name: str
  num_classes: int
  num_train_examples: int
  num_eval_examples: int
  channels: int


def _base_name(name: str) -> str:
  """'cifar10:3.0.2' and 'imagenet2012/subset' -> the registered builder name."""
  return name.split(':')[0].split('/')[0]


def _data_dir(config: ml_collections.ConfigDict) -> str | None:
  if not config.data_dir:
    return None
  data_dir = os.path.expanduser(config.data_dir)
  if not os.path.isdir(data_dir):
    raise UserError(f'config.data_dir={config.data_dir!r} does not exist: create it, or set --config.data_dir=\'\' '
                    'for the TFDS default (~/tensorflow_datasets).')
  return data_dir


def _load_builder(config: ml_collections.ConfigDict, name: str | None = None) -> tfds.core.DatasetBuilder:
  """The builder of dataset `name` (default: the run's), prepared: local builders prepare on first use, others must
  already be prepared."""
  name = name or config.dataset
  data_dir = _data_dir(config)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(f'Unknown dataset {name!r}: set --config.dataset to a TFDS name (e.g. cifar10, '
                    f'imagenet2012) or one of the offline builders {sorted(datasets.LOCAL_BUILDERS)}.') from None
  if not builder.is_prepared():
    _prepare(builder, config, name)
  return builder


def _prepare(builder: tfds.core.DatasetBuilder, config: ml_collections.ConfigDict, name: str | None = None) -> None:
  """Prepares a local builder (of dataset `name`, default the run's) from its raw files; anything else would need a
  network, so it is the user's job."""
  name = name or config.dataset
  local = datasets.LOCAL_BUILDERS.get(_base_name(name))
  root = os.fspath(builder.data_dir_root)
  if local is None:
    raise UserError(f'Dataset {name!r} is not prepared in {root}: prepare it with `tfds build '
                    f'{name} --data_dir={root}` on a machine with network (or with its manual files), '
                    'or set --config.data_dir to where it is (BN calibration and the sweep also take any images '
                    'instead: --images=DIR, run.calibrate(images)).')
  _check_writable(root, config)
  manual_dir = local.check_raw_dir(local.raw_dir(config.manual_dir))
  download_config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir), try_download_gcs=False)
  builder.download_and_prepare(download_config=download_config)


def _check_writable(root: str, config: ml_collections.ConfigDict) -> None:
  """A UserError when the prepared dataset cannot be written under `root` (TFDS would fail deep in its download
  manager; e.g. a read-only HOME with data_dir '', which means ~/tensorflow_datasets)."""
  try:
    os.makedirs(root, exist_ok=True)
    tempfile.TemporaryFile(dir=root).close()
  except OSError as e:
    where = f'config.data_dir={config.data_dir!r}' if config.data_dir else f'the TFDS default data directory {root}'
    raise UserError(f'{where} is not writable ({e.strerror or e}), and {config.dataset} is prepared there on first '
                    'use: pass --config.data_dir=<a writable directory>.') from None


def _num_examples(builder: tfds.core.DatasetBuilder, split: str) -> int:
  try:
    return builder.info.splits[split].num_examples
  except (KeyError, ValueError):
    raise UserError(f'Split {split!r} is not in {builder.name} (splits: {", ".join(builder.info.splits)}): set '
                    '--config.train_split / --config.eval_split to one of them or a slice like "train[:90%]".'
                    ) from None


def _local_batch_size(global_batch_size: int) -> int:
  if global_batch_size <= 0 or global_batch_size % jax.process_count():
    raise UserError(f'Batch size {global_batch_size} must be a positive multiple of the number of processes '
                    f'({jax.process_count()}): change the batch size.')
  return global_batch_size // jax.process_count()


def _seeds(*parts: int) -> tuple[int, tf.Tensor]:
  """A tf.data shuffle seed and a stateless-op seed, well mixed from integer parts (numpy's SeedSequence)."""
  words = np.random.SeedSequence([p % 2**64 for p in parts]).generate_state(3, np.uint32).astype(np.int64)
  return int(words[0]), tf.constant(words[1:], tf.int64)


@dataclasses.dataclass(frozen=True)
class _ExampleTransform:
  """Turns one example into a model input; `train` is random but a pure function of its seed."""
  augmentation: str
  size: int
  channels: int
  source_shape: tuple[int | None, ...]
  jpeg: bool  # images are JPEG bytes: decode only the crop window
  crop_scale: tuple[float, float]
  pad_crop: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  color_jitter: float = 0.0  # brightness, contrast and saturation factors in [1 - j, 1 + j], in a random order
  lighting: float = 0.0      # std of the PCA lighting noise (3-channel images)

  def decode(self, image: tf.Tensor) -> tf.Tensor:
    image = tf.io.decode_image(image, channels=self.channels, expand_animations=False)
    image.set_shape(self.source_shape)
    return image

  def decode_example(self, example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    return {'image': self.decode(example['image']), 'label': example['label']}

  def train(self, example: dict[str, tf.Tensor], seed: tf.Tensor) -> dict[str, tf.Tensor]:
    crop_seed, flip_seed, colour_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=3))
    image = self._decodable(example['image'])
    if self.augmentation in ('imagenet', 'random_resized_crop'):
      image = self._resize(self._crop(image, self._random_resized_crop_window(image, crop_seed)))
      image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    elif self.augmentation == 'small':
      image = self._pad_and_crop(self._whole(image), crop_seed)
      image = self._resize(tf.image.stateless_random_flip_left_right(image, flip_seed))
    else:
      image = self._resize(self._whole(image))
    return self._finish(self._colour(image, colour_seed), example['label'])

  def _colour(self, image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """torchvision's ColorJitter(j, j, j) (factors uniform in [1 - j, 1 + j], applied in a random order) and the
    PCA Lighting noise of the official recipe, on [0, 255] pixels; a no-op when both are 0. The lighting shift is
    AlexNet's (eigenvalues of [0, 1] pixels, scaled to 255); the official code adds it to uint8 pixels unscaled,
    where it mostly rounds away."""
    if not self.color_jitter and not self.lighting:
      return image
    image = tf.cast(image, tf.float32)
    order_seed, factor_seed, light_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=3))
    if self.color_jitter:
      j = self.color_jitter
      factors = tf.random.stateless_uniform([3], factor_seed, 1 - j, 1 + j)
      gray = tf.image.rgb_to_grayscale if self.channels == 3 else tf.identity
      ops = (lambda x: x * factors[0],                                                      # brightness
             lambda x: (x - tf.reduce_mean(gray(x))) * factors[1] + tf.reduce_mean(gray(x)),  # contrast
             lambda x: (x - gray(x)) * factors[2] + gray(x))                               # saturation
      order = tf.argsort(tf.random.stateless_uniform([3], order_seed))
      for i in range(3):
        image = tf.clip_by_value(tf.switch_case(order[i], [lambda f=f: f(image) for f in ops]), 0.0, 255.0)
    if self.lighting and self.channels == 3:
      alpha = tf.random.stateless_normal([3], light_seed, stddev=self.lighting)
      shift = tf.linalg.matvec(tf.constant(_PCA_EIGVEC), alpha * tf.constant(_PCA_EIGVAL))
      image = image + 255.0 * shift
    return image

  def eval(self, example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    return self._finish(self._eval_pixels(example['image']), example['label'])

  def eval_image(self, image: tf.Tensor) -> tf.Tensor:
    """`eval` of an image without a label (what BN calibration reads)."""
    return self._finish(self._eval_pixels(image), tf.constant(0))['image']

  def _eval_pixels(self, image: tf.Tensor) -> tf.Tensor:
    image = self._decodable(image)
    if self.augmentation == 'imagenet':
      return self._resize(self._crop(image, self._centre_window(image)))
    return self._resize(self._whole(image))

  def padding(self) -> dict[str, tf.Tensor]:
    """An all-zero example with mask 0, to fill the last eval batches."""
    return {'image': tf.zeros([self.size, self.size, self.channels]), 'label': tf.constant(0, tf.int32),
            'mask': tf.constant(0.0)}

  def _decodable(self, image: tf.Tensor) -> tf.Tensor:
    """Decoded pixels, except JPEG bytes, which `_crop` decodes only inside the window."""
    return image if image.dtype != tf.string or self.jpeg else self.decode(image)

  def _height_width(self, image: tf.Tensor) -> tf.Tensor:
    if image.dtype == tf.string:
      return tf.image.extract_jpeg_shape(image)[:2]
    return tf.shape(image)[:2]

  def _crop(self, image: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
    """window = [top, left, height, width]."""
    if image.dtype == tf.string:
      return tf.image.decode_and_crop_jpeg(image, window, channels=self.channels)
    return tf.slice(image, tf.stack([window[0], window[1], 0]), tf.stack([window[2], window[3], -1]))

  def _whole(self, image: tf.Tensor) -> tf.Tensor:
    """All pixels, for the paths that use the whole image (JPEG bytes are decoded here)."""
    return self.decode(image) if image.dtype == tf.string else image

  def _centre_window(self, image: tf.Tensor) -> tf.Tensor:
    height_width = self._height_width(image)
    side = tf.cast(EVAL_CROP_FRACTION * tf.cast(tf.reduce_min(height_width), tf.float32), tf.int32)
    offsets = (height_width - side + 1) // 2
    return tf.concat([offsets, [side, side]], axis=0)

  def _random_resized_crop_window(self, image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Area in `crop_scale`, aspect ratio in [3/4, 4/3] (the official ImageNet recipe); whole image if no fit."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.concat([self._height_width(image), [self.channels]], axis=0),
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]), seed=seed, min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=tuple(self.crop_scale), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    return tf.concat([begin[:2], size[:2]], axis=0)

  def _pad_and_crop(self, image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Zero-pad by `pad_crop` pixels and crop back to the source size at a random offset (the CIFAR recipe)."""
    p = self.pad_crop
    padded = tf.pad(image, [[p, p], [p, p], [0, 0]])
    return tf.image.stateless_random_crop(padded, tf.shape(image), seed=seed)

  def _resize(self, image: tf.Tensor) -> tf.Tensor:
    """Bilinear with antialiasing (like PIL in the official PyTorch code); a no-op when already S x S."""
    if tuple(image.shape[:2]) == (self.size, self.size):
      return tf.cast(image, tf.float32)
    return tf.image.resize(image, [self.size, self.size], method='bilinear', antialias=True)

  def _finish(self, image: tf.Tensor, label: tf.Tensor) -> dict[str, tf.Tensor]:
    image = (tf.cast(image, tf.float32) - tf.constant(self.mean) * 255) / (tf.constant(self.std) * 255)
    return {'image': tf.ensure_shape(image, [self.size, self.size, self.channels]),
            'label': tf.cast(label, tf.int32)}


def normalization(config: ml_collections.ConfigDict, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel (mean, std) of the training images in [0, 1] units: `config.mean`/`config.std` when given, else
  the table of known datasets; a UserError for an unknown dataset without them, or a channel-count mismatch."""
  if config.mean or config.std:
    mean, std = tuple(float(m) for m in config.mean), tuple(float(s) for s in config.std)
  elif _base_name(config.dataset) in _MEAN_STD:
    mean, std = _MEAN_STD[_base_name(config.dataset)]
  else:
    example = ', '.join(['0.5'] * channels)
    raise UserError(f'no normalisation known for dataset {config.dataset!r}: set --config.mean and --config.std to '
                    f'its per-channel training mean and std in [0, 1] units, e.g. "({example},)".')
  if len(mean) != channels or len(std) != channels or min(std) <= 0:
    raise UserError(f'config.mean={mean} and config.std={std} must give {channels} values each (the images have '
                    f'{channels} channels), stds > 0.')
  return mean, std


def _example_transform(config: ml_collections.ConfigDict, source_shape: tuple[int | None, ...],
                       jpeg: bool = False) -> _ExampleTransform:
  """The run's preprocessing (its normalisation, crop and input size) of images shaped `source_shape`, whatever
  dataset they come from."""
  channels = source_shape[-1]
  mean, std = normalization(config, channels)
  return _ExampleTransform(augmentation=config.augmentation, size=input_size(config), channels=channels,
                       source_shape=source_shape, jpeg=jpeg, crop_scale=tuple(config.crop_scale),
                       pad_crop=config.pad_crop, mean=mean, std=std, color_jitter=float(config.color_jitter),
                       lighting=float(config.lighting))


@dataclasses.dataclass(frozen=True)
class _Source:
  """A prepared dataset plus the config, with the reads every pipeline shares."""
  builder: tfds.core.DatasetBuilder
  config: ml_collections.ConfigDict

  @property
  def info(self) -> DatasetInfo:
    features = self.builder.info.features
    return DatasetInfo(name=self.config.dataset, num_classes=features['label'].num_classes,
                       num_train_examples=_num_examples(self.builder, self.config.train_split),
                       num_eval_examples=_num_examples(self.builder, self.config.eval_split),
                       channels=features['image'].shape[-1])

  def transform(self) -> _ExampleTransform:
    image_feature = self.builder.info.features['image']
    return _example_transform(self.config, tuple(image_feature.shape), image_feature.encoding_format == 'jpeg')

  def read(self, split: str, *, shuffle_seed: int | None = None) -> tf.data.Dataset:
    """Examples with encoded images: in file order, or with the files in a seeded order if `shuffle_seed`."""
    read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False)
    return self.builder.as_dataset(split=split, shuffle_files=shuffle_seed is not None, read_config=read_config,
                                   decoders={'image': tfds.decode.SkipDecoding()})

  def fits_in_memory(self, num_examples: int) -> bool:
    shape = self.builder.info.features['image'].shape
    return None not in shape and num_examples * math.prod(shape) <= _CACHE_LIMIT_BYTES


def _load(config: ml_collections.ConfigDict, name: str | None = None, *, labels: bool = True) -> _Source:
  """Dataset `name` (default: the run's) with the run's preprocessing; `labels`: its labels must be the model's
  classes (BN calibration reads none, so it takes a dataset of any classes)."""
  name = name or config.dataset
  source = _Source(_load_builder(config, name), config)
  features = source.builder.info.features
  if not ({'image', 'label'} if labels else {'image'}) <= set(features.keys()):
    raise UserError(f'Dataset {name!r} has features {sorted(features.keys())}, not image + label: use an '
                    'image classification dataset.')
  if labels and features['label'].num_classes != config.model.num_classes:
    raise UserError(f'Dataset {name!r} has {features["label"].num_classes} classes but '
                    f'config.model.num_classes={config.model.num_classes}: set --config.model.num_classes='
                    f'{features["label"].num_classes}.')
  return source


def get_dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
  """Class count, split sizes and channels; prepares the offline builder on first use."""
  return _load(config).info


class TrainIterator:
  """Endless training batches for this process; the batch of step k is a pure function of (config.seed, k).

  Each epoch is a fresh tf.data pipeline seeded from (seed, process, epoch), so starting at any step only needs
  the epoch and the number of its elements to skip; skipped elements are never augmented (nor decoded, unless the
  dataset is small enough to be decoded once into the in-memory cache).
  """

  def __init__(self, source: _Source, *, global_batch_size: int, start_step: int):
    self._source = source
    self._local_batch_size = _local_batch_size(global_batch_size)
    self._num_examples = source.info.num_train_examples
    self.steps_per_epoch = self._num_examples // global_batch_size
    if self.steps_per_epoch < 1:
      raise UserError(f'Batch size {global_batch_size} exceeds the {self._num_examples} training examples: lower '
                      'config.batch_size.')
    self.step = start_step
    self._split = tfds.split_for_jax_process(source.config.train_split, drop_remainder=True)
    self._transform = source.transform()
    self._cached = self._decoded_cache()
    self._batches: Iterator[Batch] | None = None

  def _decoded_cache(self) -> tf.data.Dataset | None:
    """Small datasets are decoded once and kept in memory; file order is then fixed and the buffer shuffles."""
    if not self._source.fits_in_memory(self._num_examples // jax.process_count()):
      return None
    decoded = self._source.read(self._split).map(self._transform.decode_example, tf.data.AUTOTUNE)
    return decoded.cache()

  def _epoch(self, epoch: int, skip_steps: int) -> tf.data.Dataset:
    shuffle_seed, augment_seed = _seeds(self._source.config.seed, _TRAIN_STREAM, jax.process_index(), epoch)
    examples = self._cached if self._cached is not None else self._source.read(self._split,
                                                                                shuffle_seed=shuffle_seed)
    examples = examples.shuffle(self._source.config.shuffle_buffer, seed=shuffle_seed)
    examples = examples.take(self.steps_per_epoch * self._local_batch_size).enumerate()
    examples = examples.skip(skip_steps * self._local_batch_size)
    train = self._transform.train
    examples = examples.map(
        lambda index, example: train(example, tf.random.experimental.stateless_fold_in(augment_seed, index)),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return examples.batch(self._local_batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

  def __iter__(self) -> 'TrainIterator':
    return self

  def __next__(self) -> Batch:
    if self._batches is None:
      self._batches = self._epoch(*divmod(self.step, self.steps_per_epoch)).as_numpy_iterator()
    batch = next(self._batches)
    self.step += 1
    if self.step % self.steps_per_epoch == 0:
      self._batches = None
    return batch


def train_iterator(config: ml_collections.ConfigDict, *, global_batch_size: int,
                   start_step: int = 0) -> TrainIterator:
  """This process's share of every training batch from `start_step` on: {'image': f32 [B, S, S, C], 'label'}."""
  return TrainIterator(_load(config), global_batch_size=global_batch_size, start_step=start_step)


def eval_iterator(config: ml_collections.ConfigDict, *, global_batch_size: int) -> Iterator[Batch]:
  """One pass over this process's shard of `config.eval_split`, in full batches with a 'mask' (1 real, 0 padding).

  Every process yields ceil(ceil(N / processes) / local batch) batches, so a jitted multi-host evaluation runs the
  same number of steps everywhere.
  """
  source = _load(config)
  local_batch_size = _local_batch_size(global_batch_size)
  largest_shard = -(-source.info.num_eval_examples // jax.process_count())
  num_batches = -(-largest_shard // local_batch_size)
  transform = source.transform()
  examples = source.read(tfds.split_for_jax_process(config.eval_split)).map(
      lambda example: {**transform.eval(example), 'mask': tf.constant(1.0)}, num_parallel_calls=tf.data.AUTOTUNE)
  examples = examples.concatenate(tf.data.Dataset.from_tensors(transform.padding()).repeat())
  examples = examples.take(num_batches * local_batch_size).batch(local_batch_size, drop_remainder=True)
  return examples.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


class Replay:
  """Re-iterable batches from an iterator factory; the first full pass is kept in memory when it is small, so a
  sweep decodes the calibration images and the eval split once instead of once per configuration."""

  def __init__(self, make: Callable[[], Iterable[Mapping[str, Any]]], limit_bytes: int = _REPLAY_LIMIT_BYTES):
    self._make, self._limit = make, limit_bytes
    self._kept: list[Mapping[str, Any]] | None = None

  def __iter__(self) -> Iterator[Mapping[str, Any]]:
    if self._kept is not None:
      yield from self._kept
      return
    kept, size = [], 0
    for batch in self._make():
      size += sum(v.nbytes for v in batch.values())
      kept = kept if kept is not None and size <= self._limit else None
      if kept is not None:
        kept.append(batch)
      yield batch
    self._kept = kept


def calibration_iterator(config: ml_collections.ConfigDict, *, num_images: int, global_batch_size: int,
                         dataset: str | None = None, split: str | None = None) -> Iterator[Batch]:
  """The same `num_images` training images on every call (seeded by config.seed only), with eval preprocessing:
  from config.train_split of the run's dataset, or from `split` (default 'train') of another prepared TFDS
  `dataset` of any classes (no labels are read), preprocessed as the run's images. With
  `config.bn_calibration='official'` they get the training augmentation instead (seeded the same way, so every call
  still yields the same batches), as the official code recalibrates on its training loader.

  These recompute batch-norm statistics of a sub-network after training, so they must not depend on how far
  training got; only full batches are yielded (num_images // global_batch_size of them).
  """
  source = _load(config) if dataset is None else _load(config, dataset, labels=False)
  split = config.train_split if dataset is None else split or 'train'
  local_batch_size = _local_batch_size(global_batch_size)
  num_batches = min(num_images, _num_examples(source.builder, split)) // global_batch_size
  if num_batches < 1:
    raise UserError(f'{num_images} calibration images make no batch of {global_batch_size}: raise the image count '
                    'or lower the calibration batch size.')
  shuffle_seed, augment_seed = _seeds(config.seed, _CALIBRATION_STREAM, jax.process_index())
  examples = source.read(tfds.split_for_jax_process(split, drop_remainder=True), shuffle_seed=shuffle_seed)
  examples = examples.shuffle(config.shuffle_buffer, seed=shuffle_seed).take(num_batches * local_batch_size)
  transform = source.transform()
  if config_fields.read(config, 'bn_calibration') == 'official':
    examples = examples.enumerate().map(
        lambda index, e: {'image': transform.train({'image': e['image'], 'label': tf.constant(0)},
                                                      tf.random.experimental.stateless_fold_in(augment_seed,
                                                                                               index))['image']},
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  else:
    examples = examples.map(lambda e: {'image': transform.eval_image(e['image'])},
                            num_parallel_calls=tf.data.AUTOTUNE)
  examples = examples.batch(local_batch_size, drop_remainder=True)
  return examples.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


# ----------------------------------------------------------------------------------------------------------------------
# Images from outside the run's dataset, for BN calibration (which reads no labels).

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp')
TFDS_PREFIX = 'tfds:'


def read_images(path: str, channels: int) -> np.ndarray | list[np.ndarray]:
  """Raw images from an .npy file or a folder of image files (sorted by name, converted to `channels`): one array
  (N, H, W, C), or a list when the files differ in size."""
  if os.path.isdir(path):
    from PIL import Image  # noqa: PLC0415  (matplotlib's dependency) only folders need it
    if channels not in (1, 3):
      raise UserError(f'a folder of image files gives 1 or 3 channels, but the run takes {channels}: pass an .npy.')
    names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_SUFFIXES))
    if not names:
      raise UserError(f'{path} holds no image files ({", ".join(IMAGE_SUFFIXES)}).')
    images = []
    for name in names:
      try:
        with Image.open(os.path.join(path, name)) as image:
          images.append(np.asarray(image.convert('L' if channels == 1 else 'RGB')))
      except OSError as e:
        raise UserError(f'{os.path.join(path, name)} is not a readable image ({" ".join(str(e).split())}).') from None
    return check_images(images, channels, path)
  if path.endswith('.npy'):
    try:
      array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise UserError(f'{path} is not a readable .npy file ({" ".join(str(e).split())}).') from None
    return check_images(array, channels, path)
  raise UserError(f'{path} is neither a folder of image files nor an .npy file.')


def check_images(images: Any, channels: int, what: str = 'the array') -> np.ndarray | list[np.ndarray]:
  """Raw pixels ([0, 255]) as (N, H, W, C) with the run's channels ((N, H, W) too for one channel), or a list of
  (H, W, C) images of different sizes; a one-line UserError for anything else."""
  expected = f'expected raw pixels shaped (N, height, width, {channels})'
  if isinstance(images, (list, tuple)):
    if not images:
      raise UserError(f'got no images from {what}: {expected}.')
    arrays = [np.asarray(i) for i in images]
    if len({a.shape for a in arrays}) == 1:
      return check_images(np.stack(arrays), channels, what)
    arrays = [a[..., None] if a.ndim == 2 and channels == 1 else a for a in arrays]
    bad = next((a for a in arrays if a.ndim != 3 or a.shape[-1] != channels or not _is_numeric(a)), None)
    if bad is not None:
      raise UserError(f'got an image shaped {bad.shape} ({bad.dtype}) from {what}: {expected}, or a list of '
                      f'(height, width, {channels}) images.')
    return arrays
  array = np.asarray(images)
  array = array[..., None] if array.ndim == 3 and channels == 1 else array
  if array.ndim != 4 or array.shape[-1] != channels or not len(array) or not _is_numeric(array):
    raise UserError(f'got images shaped {array.shape} ({array.dtype}) from {what}: {expected}.')
  return array


def _is_numeric(array: np.ndarray) -> bool:
  return np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)


def _images_digest(images: np.ndarray | list[np.ndarray]) -> str:
  digest = hashlib.sha256()
  for image in images:
    image = np.ascontiguousarray(image)
    digest.update(f'{image.dtype}|{image.shape}|'.encode())
    digest.update(image.tobytes())
  return digest.hexdigest()


def array_iterator(config: ml_collections.ConfigDict, images: np.ndarray | list[np.ndarray], *,
                   global_batch_size: int) -> Iterator[Batch]:
  """Full batches of `images` (checked by `check_images`) in order, with the run's eval preprocessing."""
  local_batch_size = _local_batch_size(global_batch_size)
  count = len(images) // global_batch_size * global_batch_size
  if isinstance(images, np.ndarray):
    examples = tf.data.Dataset.from_tensor_slices(images[:count])
    shape = images.shape[1:]
  else:
    dtype = np.result_type(*images)
    shape = (None, None, images[0].shape[-1])
    examples = tf.data.Dataset.from_generator(lambda: (i.astype(dtype) for i in images[:count]),
                                              output_signature=tf.TensorSpec(shape, tf.as_dtype(dtype)))
  transform = _example_transform(config, tuple(shape))
  examples = examples.shard(jax.process_count(), jax.process_index()).map(
      lambda image: {'image': transform.eval_image(image)}, num_parallel_calls=tf.data.AUTOTUNE)
  return examples.batch(local_batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


@dataclasses.dataclass(frozen=True)
class ImageSource:
  """Images for BN calibration from outside the run's training split: an array of raw pixels, a folder of image
  files, an .npy, or a prepared TFDS dataset of any classes (`tfds:NAME`). They get the run's eval preprocessing
  (its normalisation, not theirs), and no labels are read."""
  description: str  # where they come from (stored with the statistics)
  digest: str       # what they hold: statistics calibrated on other images are recalibrated
  num_images: int
  batch_size: int
  batches: Replay

  @property
  def provenance(self) -> dict[str, Any]:
    return {'images': self.description, 'images_digest': self.digest, 'num_images': self.num_images,
            'batch_size': self.batch_size}


def image_source(config: ml_collections.ConfigDict, images: Any, channels: int,
                 split: str | None = None) -> ImageSource:
  """An `ImageSource` from an array (or list) of raw images, a path (folder or .npy) or 'tfds:NAME' (its `split`,
  default 'train', from config.data_dir), for a run that takes `channels`-channel images. At most
  config.calibration_images are used, in batches of config.calibration_batch_size (all of them in one batch when
  fewer)."""
  if isinstance(images, (str, os.PathLike)) and os.fspath(images).startswith(TFDS_PREFIX):
    name = os.fspath(images)[len(TFDS_PREFIX):]
    builder = _load(config, name, labels=False).builder
    if builder.info.features['image'].shape[-1] != channels:
      raise UserError(f'Dataset {name!r} has {builder.info.features["image"].shape[-1]}-channel images, the run '
                      f'takes {channels}: calibrate on images with as many channels.')
    split = split or 'train'
    count = min(config.calibration_images, _num_examples(builder, split))
    batch = min(config.calibration_batch_size, count)
    digest = hashlib.sha256(f'{builder.info.full_name}|{split}|{config.seed}|{count}'.encode()).hexdigest()
    return ImageSource(f'{TFDS_PREFIX}{name} {split}', digest, count, batch, Replay(lambda: calibration_iterator(
        config, num_images=count, global_batch_size=batch, dataset=name, split=split)))
  if isinstance(images, (str, os.PathLike)):
    description, images = os.path.abspath(images), read_images(os.fspath(images), channels)
  else:
    description, images = 'an array', check_images(images, channels, 'the array')
  count = min(config.calibration_images, len(images))
  batch = min(config.calibration_batch_size, count)
  images = images[:count // batch * batch]
  return ImageSource(description, _images_digest(images), len(images), batch,
                     Replay(lambda: array_iterator(config, images, global_batch_size=batch)))
