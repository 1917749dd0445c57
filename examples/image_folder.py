"""Your own images as a dataset to train on: an ImageFolder-style directory written as a prepared TFDS dataset, and
its per-channel mean/std printed as the flags to pass (the README's "Your own dataset"; tests/test_custom_data.py
runs it).

  root/train/<class>/<image>   root/test/<class>/<image>    (PNG, JPEG, BMP or GIF; any sizes; classes sorted)

  python examples/image_folder.py ~/pets --name=pets --data_dir=~/tensorflow_datasets
  python main.py --config=configs/default.py --workdir=runs/pets <the flags this prints>

Grayscale images stay one channel: the channel count is read off the first training image unless --channels says.
"""
import argparse
import os
import shlex

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image


def channel_stats(images) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std of all pixels of `images` (uint8 arrays of any sizes), in [0, 1] units."""
  total = total_sq = count = 0
  for image in images:
    pixels = image.reshape(-1, image.shape[-1]).astype(np.float64) / 255.0
    total, total_sq, count = total + pixels.sum(0), total_sq + (pixels ** 2).sum(0), count + len(pixels)
  mean = total / count
  return mean, np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))


def detect_channels(root: str, train_split: str = 'train') -> int:
  """1 when the first training image (classes and files sorted) is grayscale, else 3."""
  split = os.path.join(os.path.expanduser(root), train_split)
  for directory, _, files in sorted(os.walk(split)):
    for name in sorted(files):
      try:
        with Image.open(os.path.join(directory, name)) as image:
          return 1 if image.mode in ('1', 'L', 'LA', 'I', 'I;16', 'F') else 3
      except OSError:
        continue
  raise SystemExit(f'{root} has no readable image under {train_split}/: put the training images in '
                   f'{root}/{train_split}/<class>/.')


def prepare(root: str, name: str, data_dir: str, channels: int = 0, train_split: str = 'train') -> list[str]:
  """Writes `root`'s images as TFDS dataset `name` under `data_dir` (`channels` 0: as the first training image);
  returns the --config flags to train on it."""
  channels = channels or detect_channels(root, train_split)
  folder = tfds.ImageFolder(os.path.expanduser(root), shape=(None, None, channels))
  if train_split not in folder.info.splits:
    raise SystemExit(f'{root} has no {train_split}/ directory (it has {sorted(folder.info.splits)}): put the '
                     f'training images in {root}/{train_split}/<class>/.')
  splits = {split: folder.as_dataset(split=split, shuffle_files=False).map(
      lambda e: {'image': e['image'], 'label': e['label']}) for split in folder.info.splits}  # streamed, not held
  target = os.path.join(os.path.expanduser(data_dir), name)
  if os.path.exists(target):
    raise SystemExit(f'{target} exists: pick another --name, or delete it to prepare the dataset again.')
  label = folder.info.features['label']
  features = tfds.features.FeaturesDict({'image': tfds.features.Image(shape=(None, None, channels)), 'label': label})
  tfds.dataset_builders.store_as_tfds_dataset(name=name, version='1.0.0', features=features, split_datasets=splits,
                                              data_dir=os.path.expanduser(data_dir))
  mean, std = channel_stats(e['image'] for e in splits[train_split].as_numpy_iterator())
  as_tuple = lambda v: '(' + ','.join(f'{x:.4f}' for x in v) + ',)'  # noqa: E731
  return [f'--config.dataset={name}', f'--config.data_dir={data_dir}',
          f'--config.model.num_classes={label.num_classes}', f'--config.mean={as_tuple(mean)}',
          f'--config.std={as_tuple(std)}']


if __name__ == '__main__':
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('root', help='the directory holding train/<class>/<image> (and test/, ...)')
  parser.add_argument('--name', required=True, help='the dataset name to train with (--config.dataset)')
  parser.add_argument('--data_dir', default='~/tensorflow_datasets', help='where TFDS datasets live')
  parser.add_argument('--channels', type=int, default=0, choices=(0, 1, 3),
                      help='1 grayscale, 3 colour; 0 (default): as the first training image')
  args = parser.parse_args()
  print(' '.join(shlex.quote(flag) for flag in prepare(args.root, args.name, args.data_dir, args.channels)))
