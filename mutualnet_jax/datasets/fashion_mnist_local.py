"""Fashion-MNIST as a TFDS builder that reads the raw idx files from disk and never touches the network.

TFDS's stock `fashion_mnist` builder always downloads, so it cannot be prepared offline. This builder has the same
features (28x28x1 uint8 `image`, 10-class `label`) and splits (`train`, `test`) and reads the files that the Debian
package `dataset-fashion-mnist` installs, or the same four files anywhere else.

Builder configs keep a subset of the classes, relabelled 0..k-1 in their original order, from the same raw files
(the transfer experiment pre-trains on one half and fine-tunes on the other):
  fashion_mnist_local                all 10 classes (= fashion_mnist_local/all; prepared where it was before configs)
  fashion_mnist_local/classes_0_4    T-shirt/top, Trouser, Pullover, Dress, Coat        (30k train, 5k test)
  fashion_mnist_local/classes_5_9    Sandal, Shirt, Sneaker, Bag, Ankle boot -> 0..4    (30k train, 5k test)
Splits and slices (`train[:1000]`) work as for any TFDS dataset.
"""
import dataclasses
import gzip
import os
import struct
import zlib

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from mutualnet_jax.errors import UserError

DEFAULT_DIR = '/usr/share/datasets/fashion-mnist'
ENV_VAR = 'MUTUALNET_FASHION_MNIST_DIR'
_RAW_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
_IMAGE_MAGIC, _LABEL_MAGIC = 2051, 2049
_CLASS_NAMES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                'Ankle boot')


def raw_dir(manual_dir: str = '') -> epath.Path:
  """Where the raw files are: `manual_dir`, else $MUTUALNET_FASHION_MNIST_DIR, else the Debian package's folder."""
  return epath.Path(manual_dir or os.environ.get(ENV_VAR) or DEFAULT_DIR).expanduser()


def check_raw_dir(directory: epath.Path) -> epath.Path:
  """Fails with a fix-it message before TFDS starts a preparation that cannot finish."""
  missing = [name for names in _RAW_FILES.values() for name in names if not (directory / name).exists()]
  if missing:
    raise UserError(f'Fashion-MNIST files {", ".join(missing)} not found in {directory}: run '
                    f'`apt-get install dataset-fashion-mnist`, or set --config.manual_dir (or ${ENV_VAR}) to a '
                    'directory that holds them.')
  return directory


_FIX = 'replace it with the original Fashion-MNIST file (apt-get install --reinstall dataset-fashion-mnist)'


def _read_idx(path: epath.Path, magic: int) -> np.ndarray:
  """Reads one gzipped big-endian idx file (header: magic, dimension sizes; then uint8 data); a damaged file is a
  one-line UserError naming it."""
  try:
    with path.open('rb') as raw, gzip.GzipFile(fileobj=raw) as f:
      data = f.read()
  except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
    raise UserError(f'{path} is not a readable gzip file ({type(e).__name__}: {e}): {_FIX}.') from None
  ndim = magic & 0xFF
  if len(data) < 4 * (1 + ndim):
    raise UserError(f'{path} holds {len(data)} bytes, too few for an idx header: {_FIX}.')
  header = np.frombuffer(data, dtype='>u4', count=1 + ndim)
  if header[0] != magic:
    raise UserError(f'{path} is not an idx file of this kind (magic {header[0]}, expected {magic}): {_FIX}.')
  shape = tuple(int(n) for n in header[1:])
  payload = len(data) - 4 * (1 + ndim)
  if payload != int(np.prod(shape)):
    raise UserError(f'{path} declares {shape} values but holds {payload} bytes of them (truncated?): {_FIX}.')
  return np.frombuffer(data, dtype=np.uint8, offset=4 * (1 + ndim)).reshape(shape)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
  return struct.pack('>I', len(data)) + tag + data + struct.pack('>I', zlib.crc32(tag + data))


def _png(image: np.ndarray) -> bytes:
  """PNG bytes of one 8-bit grayscale image, written directly: encoding is most of the preparation time, and this
  skips the per-image overhead of PIL and of TFDS's own TF-graph encoder."""
  height, width = image.shape
  rows = np.concatenate([np.zeros((height, 1), np.uint8), image], axis=1)  # filter type 0 before every row
  header = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)  # 8-bit, grayscale, deflate, no interlace
  return (b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', header) + _png_chunk(b'IDAT', zlib.compress(rows.tobytes()))
          + _png_chunk(b'IEND', b''))


@dataclasses.dataclass(eq=False)
class ClassSubset(tfds.core.BuilderConfig):
  """The classes a config keeps (original labels, ascending); their new labels are their positions."""
  classes: tuple[int, ...] = tuple(range(len(_CLASS_NAMES)))


ALL = 'all'


def _subset(first: int, last: int) -> ClassSubset:
  classes = tuple(range(first, last + 1))
  return ClassSubset(name=f'classes_{first}_{last}', classes=classes,
                     description=f'Classes {first}-{last} ({", ".join(_CLASS_NAMES[c] for c in classes)}), '
                                 f'relabelled 0-{len(classes) - 1}.')


class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST prepared from local idx files; configs select classes."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Same features and splits as TFDS `fashion_mnist` 3.0.1, read from local files.'}
  BUILDER_CONFIGS = [ClassSubset(name=ALL, description='All 10 classes.'), _subset(0, 4), _subset(5, 9)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'Install the Debian package `dataset-fashion-mnist` (files land in {DEFAULT_DIR}), or put the four '
      '*-ubyte.gz files from https://github.com/zalandoresearch/fashion-mnist in the manual dir.')

  def _build_data_dir(self, given_data_dir: str | None) -> tuple[str, str]:
    """The 'all' config (the plain name) lives where the builder put it before it had configs (NAME/VERSION, no
    config folder), so data prepared then stays valid."""
    root, dataset_dir = super()._build_data_dir(given_data_dir)
    if self.builder_config_name == ALL:
      dataset_dir = os.path.join(os.path.dirname(os.path.dirname(dataset_dir)), os.path.basename(dataset_dir))
    return root, dataset_dir

  def _create_builder_config(self, builder_config: str | tfds.core.BuilderConfig | None,
                             version: str | tfds.core.Version | None) -> tfds.core.BuilderConfig | None:
    """The plain name is the 'all' config, on purpose (it predates the configs): chosen here instead of by TFDS's
    default, which logs "No config specified" on every load of the dataset."""
    return super()._create_builder_config(ALL if builder_config is None else builder_config, version)

  def _log_download_bytes(self) -> None:
    """One log line instead of TFDS's "Downloading and preparing", which this builder never does."""
    logging.info('Preparing %s from the local Fashion-MNIST files into %s (once).', self.name, self.data_dir)

  def _log_download_done(self) -> None:
    logging.info('Prepared %s in %s.', self.name, self.data_dir)

  def _info(self) -> tfds.core.DatasetInfo:
    names = [_CLASS_NAMES[c] for c in self.builder_config.classes]
    return self.dataset_info_from_configs(
        description='Fashion-MNIST: 28x28 grayscale images of Zalando articles in 10 classes, 60k train, 10k test.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(28, 28, 1)),
            'label': tfds.features.ClassLabel(names=names),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/zalandoresearch/fashion-mnist',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    directory = check_raw_dir(self._manual_dir(dl_manager))
    return {split: self._generate_examples(directory, *names) for split, names in _RAW_FILES.items()}

  def _manual_dir(self, dl_manager: tfds.download.DownloadManager) -> epath.Path:
    """TFDS's manual dir when it holds anything (`tfds build --manual_dir`), else this module's default."""
    try:
      return dl_manager.manual_dir
    except AssertionError:  # TFDS's way of saying the manual dir does not exist or is empty.
      return raw_dir()

  def _generate_examples(self, directory: epath.Path, images_file: str, labels_file: str):
    images = _read_idx(directory / images_file, _IMAGE_MAGIC)
    labels = _read_idx(directory / labels_file, _LABEL_MAGIC)
    if len(images) != len(labels):
      raise UserError(f'{images_file} has {len(images)} images but {labels_file} has {len(labels)} labels in '
                      f'{directory}: replace them with the original Fashion-MNIST files.')
    if images.shape[1:] != (28, 28):
      raise UserError(f'{directory / images_file} holds {images.shape[1:]} images, not 28x28: {_FIX}.')
    if len(labels) and labels.max() >= len(_CLASS_NAMES):
      raise UserError(f'{directory / labels_file} has label {labels.max()}, outside 0-{len(_CLASS_NAMES) - 1}: '
                      f'{_FIX}.')
    relabel = {c: i for i, c in enumerate(self.builder_config.classes)}
    for index, (image, label) in enumerate(zip(images, labels)):
      if int(label) in relabel:
        yield index, {'image': _png(image), 'label': relabel[int(label)]}
