"""Your own dataset: an ImageFolder tree of generated PNGs (3 classes, RGB, mixed sizes) prepared by the README's
examples/image_folder.py, the mean/std-from-config path and its one-line error when unknown, a short training run on
it through main.py, and the CIFAR-10 config's recipe on that stand-in data (CIFAR-10 itself needs a network)."""
import ast
import os
import runpy
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import mutualnet_jax
from configs import cifar10
from mutualnet_jax import input_pipeline
from mutualnet_jax.errors import UserError
from mutualnet_jax.models import get_model
from tests.util import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, 'examples', 'image_folder.py')
CLASSES = ('cat', 'dog', 'fish')


def _write_tree(root, rng):
  """root/{train,test}/<class>/<i>.png: class c's pixels centre on 50 + 70c, sizes 14-33 px."""
  for split, count in (('train', 6), ('test', 3)):
    for c, name in enumerate(CLASSES):
      os.makedirs(root / split / name)
      for i in range(count):
        height, width = rng.randint(14, 34, 2)
        pixels = np.clip(rng.normal(50 + 70 * c, 30, (height, width, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / split / name / f'{i}.png')


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """The tree, prepared as TFDS dataset 'my_images' by the example's `prepare`; its --config flags as {field: value}."""
  base = tmp_path_factory.mktemp('custom')
  _write_tree(base / 'images', np.random.RandomState(0))
  flags = runpy.run_path(EXAMPLE)['prepare'](str(base / 'images'), 'my_images', str(base / 'tfds'))
  return base, dict(flag.removeprefix('--config.').split('=', 1) for flag in flags)


def _config(prepared, with_normalisation=True, **overrides):
  base, flags = prepared
  config = tiny_config(dataset='my_images', data_dir=str(base / 'tfds'), batch_size=6, **overrides)
  config.model.num_classes = int(flags['model.num_classes'])
  if with_normalisation:
    config.mean, config.std = ast.literal_eval(flags['mean']), ast.literal_eval(flags['std'])
  return config


def test_the_folder_becomes_a_dataset_with_its_statistics(prepared):
  base, flags = prepared
  assert flags['model.num_classes'] == '3' and flags['dataset'] == 'my_images'
  info = input_pipeline.get_dataset_info(_config(prepared))
  assert (info.num_train_examples, info.num_eval_examples, info.channels, info.num_classes) == (18, 9, 3, 3)
  pixels = np.concatenate([np.asarray(Image.open(p)).reshape(-1, 3) / 255.0
                           for p in sorted((base / 'images' / 'train').glob('*/*.png'))])
  np.testing.assert_allclose(ast.literal_eval(flags['mean']), pixels.mean(0), atol=1e-4)  # printed to 4 places
  np.testing.assert_allclose(ast.literal_eval(flags['std']), pixels.std(0), atol=1e-4)


def test_the_example_prints_shell_ready_flags(prepared, capsys, monkeypatch):
  base, _ = prepared
  monkeypatch.setattr(sys, 'argv', [EXAMPLE, str(base / 'images'), '--name=other', f'--data_dir={base / "tfds"}'])
  runpy.run_path(EXAMPLE, run_name='__main__')
  line = capsys.readouterr().out.strip().splitlines()[-1]
  assert line.startswith('--config.dataset=other ') and "'--config.mean=(0." in line  # quoted for the shell
  with pytest.raises(SystemExit, match='other exists: pick another --name'):
    runpy.run_path(EXAMPLE, run_name='__main__')


def test_an_unknown_dataset_without_mean_and_std_is_one_clear_error(prepared):
  config = _config(prepared, with_normalisation=False)
  with pytest.raises(UserError, match=r"no normalisation known for dataset 'my_images': set --config.mean and "
                                      r'--config.std .* e.g. "\(0.5, 0.5, 0.5,\)"'):
    input_pipeline.train_iterator(config, global_batch_size=6)
  with pytest.raises(UserError, match='no normalisation known'):
    mutualnet_jax.preprocessing(config, 3)
  config.mean, config.std = (0.5,), (0.25,)
  with pytest.raises(UserError, match='must give 3 values each'):
    input_pipeline.train_iterator(config, global_batch_size=6)


def test_mean_and_std_from_the_config_normalise_the_images(prepared):
  config = _config(prepared, augmentation='none')
  images = np.concatenate([b['image'] for b in input_pipeline.eval_iterator(
      config, global_batch_size=9)] + [next(input_pipeline.train_iterator(config, global_batch_size=6))['image']])
  assert images.shape[1:] == (16, 16, 3)
  # Standardised by the training images' own statistics (resizing to 16 px smooths the noise, lowering the std).
  assert np.all(np.abs(images.mean((0, 1, 2))) < 0.25) and np.all(np.abs(images.std((0, 1, 2)) - 0.9) < 0.2)
  assert mutualnet_jax.preprocessing(config, 3).mean == config.mean


def test_the_cifar10_recipe(prepared):
  config = cifar10.get_config()
  assert (config.method, config.dataset, config.model.name, config.resolutions) == (
      'mutualnet', 'cifar10', 'mobilenet_v2', (32, 28, 24, 20))
  assert cifar10.get_config('usnet').method == 'usnet'
  assert input_pipeline.normalization(config, 3) == ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
  assert get_model(config.model).min_resolution <= min(config.resolutions)
  stand_in = _config(prepared)  # the recipe's pipeline (pad-crop-flip, 32 px) on the generated RGB images
  for field in ('augmentation', 'pad_crop', 'resolutions', 'image_size'):
    stand_in[field] = config[field]
  batch = next(input_pipeline.train_iterator(stand_in, global_batch_size=6))
  assert batch['image'].shape == (6, 32, 32, 3) and np.isfinite(batch['image']).all()


@pytest.mark.slow
def test_train_on_it_with_the_printed_flags_then_use_the_network(prepared, tmp_path):
  """The README's commands: main.py with the example's flags trains; the API's network takes the raw PNGs."""
  base, flags = prepared
  workdir = tmp_path / 'run'
  tiny = ['--config.model.name=tiny_convnet', '--config.model.num_downsample=3', '--config.resolutions=(16,8)',
          '--config.capacities=(1.0,)', '--config.width_step=0.75', '--config.batch_size=6',
          '--config.num_train_steps=2', '--config.eval_every_steps=0', '--config.compilation_cache_dir=',
          '--config.calibration_images=12', '--config.calibration_batch_size=6']  # 18 training images
  given = [f'--config.{k}={v}' for k, v in flags.items()]
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), f'--config={ROOT}/configs/default.py',
                        f'--workdir={workdir}', *given, *tiny], capture_output=True, text=True, cwd=ROOT,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  run = mutualnet_jax.open(workdir)
  net = run.network(1.0, 16)
  image = np.asarray(Image.open(next((base / 'images' / 'test' / 'fish').glob('*.png'))))
  assert net(image).shape == (3,) and net.top_k(image, k=2).classes.shape == (1, 2)


def test_the_readme_command_with_the_printed_flags_gives_each_field_once(prepared):
  """The README's "Your own dataset" train command, with the example's flags where it says so, as a user pastes it."""
  _, flags = prepared
  readme = open(os.path.join(ROOT, 'README.md')).read()
  section = readme.split('## Your own dataset', 1)[1].split('\n## ', 1)[0]
  block = section.split('```bash\n', 1)[1].split('```', 1)[0].replace('\\\n', ' ')
  (command,) = [line for line in block.splitlines() if line.startswith('python main.py')]
  printed = [f'--config.{k}={v}' for k, v in flags.items()]
  args = command.replace('<the flags it printed>', ' '.join(printed)).split()
  fields = [a.split('=', 1)[0] for a in args if a.startswith('--config.')]
  assert len(fields) == len(set(fields)) and set(printed) <= set(args)


def test_grayscale_images_stay_one_channel(tmp_path):
  rng = np.random.RandomState(1)
  for split in ('train', 'test'):
    for c, name in enumerate(CLASSES[:2]):
      os.makedirs(tmp_path / 'gray' / split / name)
      for i in range(2):
        pixels = np.clip(rng.normal(60 + 100 * c, 20, (16, 16)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode='L').save(tmp_path / 'gray' / split / name / f'{i}.png')
  example = runpy.run_path(EXAMPLE)
  assert example['detect_channels'](str(tmp_path / 'gray')) == 1
  flags = dict(f.removeprefix('--config.').split('=', 1)
               for f in example['prepare'](str(tmp_path / 'gray'), 'gray_images', str(tmp_path / 'tfds')))
  assert len(ast.literal_eval(flags['mean'])) == 1
  config = tiny_config(dataset='gray_images', data_dir=str(tmp_path / 'tfds'), batch_size=2)
  config.model.num_classes = 2
  config.mean, config.std = ast.literal_eval(flags['mean']), ast.literal_eval(flags['std'])
  assert input_pipeline.get_dataset_info(config).channels == 1
