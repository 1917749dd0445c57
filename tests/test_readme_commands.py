"""Every fenced bash command of the README's Use (with its Export and TensorBoard parts), Your own dataset and
Fine-tuning sections, run in order as printed, so that they cannot drift from what works.

Each command runs as a subprocess in a fresh directory that has the repository's main.py, configs/ and examples/
(as a clone does) and its own HOME, with tiny settings appended: the tiny ConvNet, 2 training steps, small
calibration and eval sets, a 2-width sweep grid at 2 resolutions (config fields a command sets itself are left as
printed; `[...]` optional flags are left out, `<the flags it printed>` is what the example printed). The official
checkpoint is an official-shaped one built from the official model definition (tests/test_convert.py); `my_images/`
and `~/pets` are small folders of PNGs made here.

Commands that need what CI lacks are dry-run (DRY_RUN says why for each): their flags and config are parsed and
checked by main.py's own flag definitions and `config_check`, in one subprocess, nothing more.
"""
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mutualnet_jax import query

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ('Use', 'Your own dataset', 'Fine-tuning')
PLACEHOLDER = '<the flags it printed>'
DRY_RUN = {  # a fragment of the command -> why it is only parsed and checked here
    'gs://': 'it reads ImageNet/CIFAR-10 prepared on Google Cloud Storage (CI has no network)',
    'tensorboard ': 'it starts a server that runs until stopped (the test checks that its event files exist)',
}
TINY = {'model.name': 'tiny_convnet', 'model.num_downsample': '3', 'num_train_steps': '2', 'batch_size': '8',
        'capacities': '(1.0,)', 'sweep_width_step': '0.75', 'eval_every_steps': '0', 'calibration_images': '16',
        'calibration_batch_size': '8', 'eval_batch_size': '50', 'log_every_steps': '1'}
SWEEP = ('--latency_repeats=1', '--resolutions=28,20')  # the tiny runs' sweeps
OFFICIAL_SWEEP = ('--widths=1', '--resolutions=224')    # the converted ImageNet model: one configuration


def readme_commands(readme: str) -> list[str]:
  """The commands of the sections' ```bash blocks, in order: continuation lines joined, comments and `[...]`
  optional flags left out."""
  commands = []
  for title in SECTIONS:
    section = readme.split(f'\n## {title}\n', 1)[1].split('\n## ', 1)[0]
    for block in re.findall(r'```bash\n(.*?)```', section, re.S):
      for line in block.replace('\\\n', ' ').splitlines():
        line = '' if line.lstrip().startswith('#') else line.split(' #', 1)[0]
        line = ' '.join(re.sub(r'\[[^\]]*\]', '', line).split())
        if line:
          commands.append(line)
  return commands


def test_the_readme_sections_hold_the_commands_this_test_knows():
  commands = readme_commands(open(os.path.join(ROOT, 'README.md')).read())
  assert len(commands) >= 20 and sum('--mode=sweep' in c for c in commands) >= 3
  assert any(c.startswith('python -m mutualnet_jax.tf_export') and 'tflite' in c for c in commands)
  assert any(PLACEHOLDER in c for c in commands) and any('init_from' in c for c in commands)


def _dry_run_reason(command: str) -> str | None:
  return next((why for fragment, why in DRY_RUN.items() if fragment in command), None)


def _with_tiny_settings(command: str, cache: str, data_dir: str) -> list[str]:
  args = shlex.split(command)
  if args[:2] != ['python', 'main.py']:
    return [sys.executable, *args[1:]] if args[0] == 'python' else args
  mode = next((a.split('=', 1)[1] for a in args if a.startswith('--mode=')), 'train')
  given = {a.split('=', 1)[0] for a in args}
  if mode == 'train':
    extra = {**TINY, 'compilation_cache_dir': cache}
    if not any(a.startswith('--config.dataset=') for a in args):  # Fashion-MNIST: this session's prepared copy
      extra.update(data_dir=data_dir, eval_split='test[:100]')
    args += [f'--config.{k}={v}' for k, v in extra.items() if f'--config.{k}' not in given]
  elif mode == 'sweep':
    args += [a for a in (OFFICIAL_SWEEP if 'official' in command else SWEEP) if a.split('=')[0] not in given]
  return [sys.executable, *args[1:]]


def _folder(path, count, size, rng):
  os.makedirs(path, exist_ok=True)
  for i in range(count):
    Image.fromarray(rng.randint(0, 256, (*size, 3), np.uint8)).save(os.path.join(path, f'{i}.png'))


def _prepare(tmp_path):
  """The directory a user runs the README in: a clone's files, their images, a downloaded official checkpoint."""
  for name in ('main.py', 'configs', 'examples'):
    os.symlink(os.path.join(ROOT, name), tmp_path / name)
  rng = np.random.RandomState(0)
  _folder(tmp_path / 'my_images', 4, (40, 36), rng)
  for split, count in (('train', 8), ('test', 4)):
    for label in ('cat', 'dog'):
      _folder(tmp_path / 'home' / 'pets' / split / label, count, (32, 32), rng)
  torch_ok = False
  try:
    from tests import test_convert  # noqa: PLC0415  needs torch (the `test` extra)
    save = test_convert._save  # pylint: disable=protected-access  (the official scripts' file layout)
    save(test_convert.MobileNetV1(1000), tmp_path / 'mutualnet_mbv1.pt')
    torch_ok = True
  except pytest.skip.Exception:
    pass
  return torch_ok


def _dry_run(argv: list[str], cwd) -> subprocess.CompletedProcess:
  """Parses a main.py command's flags with main.py's definitions (ml_collections reads the config overrides off
  sys.argv when main.py defines --config) and checks its config, as main.py does before it dispatches."""
  code = ('import sys; sys.argv = sys.argv[1:]; import main\n'
          'from mutualnet_jax import cli, config_check\n'
          'cli.parse_flags(sys.argv); assert main.FLAGS.mode in main.commands.MODES\n'
          'config_check.check(cli.loaded_config(main.FLAGS.config)); print("checked")\n')
  return subprocess.run([sys.executable, '-c', code, *argv], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.slow
def test_every_readme_command_runs_as_printed(tmp_path, fashion_data_dir):
  readme = open(os.path.join(ROOT, 'README.md')).read()
  torch_ok = _prepare(tmp_path)
  env = {**os.environ, 'HOME': str(tmp_path / 'home'), 'PYTHONPATH': ROOT}
  printed, dry, ran = '', [], []
  for command in readme_commands(readme):
    command = command.replace(PLACEHOLDER, printed)
    why = _dry_run_reason(command) or (None if torch_ok or 'official' not in command else 'torch is not installed')
    if why:
      args = shlex.split(command)
      if args[:2] == ['python', 'main.py']:
        dry.append(['main.py', *args[2:]])
      elif args[0] == 'tensorboard':
        logdir = args[1].split('=', 1)[1]
        assert any('events.out.tfevents' in f for _, _, fs in os.walk(tmp_path / logdir) for f in fs), command
      continue
    out = subprocess.run(_with_tiny_settings(command, str(tmp_path / 'xla'), str(fashion_data_dir)),
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert out.returncode == 0, f'{command}\n{out.stderr[-3000:]}'
    ran.append(command)
    if command.startswith('python examples/image_folder.py'):
      printed = out.stdout.strip().splitlines()[-1]
    if command.startswith('python -m mutualnet_jax.convert'):
      assert 'BN statistics of the official checkpoint kept for width 0.25, 1 at 224 px' in out.stdout
  for argv in dry:
    result = _dry_run(argv, tmp_path)
    assert result.returncode == 0 and 'checked' in result.stdout, f'{argv}\n{result.stderr[-3000:]}'
  assert len(dry) == 4 and len(ran) >= 18
  rows, _ = query.read_table(str(tmp_path / 'runs' / 'official_mbv1'))
  assert [(r.width, r.resolution, r.top1) for r in rows] == [(1.0, 224, None)]  # no ImageNet: no accuracy
  for path in ('runs/fashion_mnist/export/w0.5_r20', 'runs/plots/accuracy_macs_overlay.png', 'runs/ft/query_table.csv',
               'runs/pets/config.json'):
    assert (tmp_path / path).exists(), path
