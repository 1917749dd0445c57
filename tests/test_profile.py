"""MACs/params read off the models reproduce the published tables; the profile command line and its errors."""
import json
import os
import subprocess
import sys

import pytest

from mutualnet_jax import profile, slim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET = dict(num_classes=1000, num_downsample=5)

# MobileNet v1 (Howard et al. 2017, Tables 6/7) and v2 (Sandler et al. 2018, Table 4), millions of multiply-adds;
# parameters: v1 4.2 M (Table 6), v2 3.47 M (the reference implementation's exact count; the paper rounds to 3.4 M).
PUBLISHED_MACS = [
    ('mobilenet_v1', 1.0, 224, 569), ('mobilenet_v1', 0.75, 224, 325), ('mobilenet_v1', 0.5, 224, 149),
    ('mobilenet_v1', 0.25, 224, 41), ('mobilenet_v1', 1.0, 192, 418), ('mobilenet_v1', 1.0, 160, 290),
    ('mobilenet_v1', 1.0, 128, 186), ('mobilenet_v2', 1.0, 224, 300),
]


@pytest.mark.parametrize('name,width,resolution,mmacs', PUBLISHED_MACS)
def test_macs_match_the_published_tables(name, width, resolution, mmacs):
  (row,) = profile.profile_grid(dict(name=name, **IMAGENET), [width], [resolution])
  assert abs(row.macs / 1e6 - mmacs) <= 1.0, row


@pytest.mark.parametrize('name,mparams', [('mobilenet_v1', 4.21), ('mobilenet_v2', 3.47)])
def test_params_match_the_published_tables(name, mparams):
  (row,) = profile.profile_grid(dict(name=name, **IMAGENET), [1.0], [224])
  assert abs(row.params / 1e6 - mparams) <= 0.01, row


def test_grid_equals_one_trace_per_configuration():
  """profile_grid combines |W| + |R| traces; each cell must equal a direct count of that configuration."""
  model_config = dict(name='mobilenet_v2', num_classes=10, num_downsample=3)
  grid = profile.profile_grid(model_config, [0.35, 0.8], [32, 20])
  from mutualnet_jax.models import get_model  # pylint: disable=g-import-not-at-top
  model = get_model(model_config)
  for row in grid:
    assert (row.macs, row.params) == profile.count(model, row.width, row.resolution), row
  assert grid[0].macs > grid[1].macs and grid[2].macs > grid[0].macs


def _cli(*args, env=None):
  """Runs the profile CLI; reports on stderr whether TensorFlow got imported (atexit runs after absl's exit)."""
  code = ('import atexit, runpy, sys\n'
          'atexit.register(lambda: print("TF_IMPORTED=" + str("tensorflow" in sys.modules), file=sys.stderr))\n'
          f'sys.argv = ["profile"] + {list(args)!r}\n'
          'runpy.run_module("mutualnet_jax.profile", run_name="__main__")\n')
  return subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=600,
                        env=env)


@pytest.mark.slow
def test_cli_prints_json_for_a_16_by_4_grid_without_tensorflow():
  widths = slim.width_grid(0.25, 1.0, 0.05)
  out = _cli('--model=mobilenet_v1', f'--widths={",".join(map(str, widths))}', '--resolutions=224,192,160,128',
             '--format=json')
  assert out.returncode == 0, out.stderr[-2000:]
  rows = json.loads(out.stdout)
  assert len(rows) == 64
  assert set(rows[0]) == {'model', 'width', 'resolution', 'macs', 'params'}
  full = next(r for r in rows if (r['width'], r['resolution']) == (1.0, 224))
  assert full['model'] == 'mobilenet_v1' and abs(full['macs'] / 1e6 - 569) <= 1
  assert 'TF_IMPORTED=False' in out.stderr
  table = _cli('--model=mobilenet_v2', '--widths=1.0', '--resolutions=224')
  assert table.returncode == 0 and '300.8' in table.stdout and 'mobilenet_v2' in table.stdout


@pytest.mark.slow
@pytest.mark.parametrize('args,match', [
    (['--widths=abc'], '--widths must be a comma-separated list of float'),
    (['--resolutions='], '--resolutions is empty'),
    (['--widths=1.5'], 'outside (0, 1.0]'),
    (['--model=resnet9'], "unknown model 'resnet9'"),
    (['--resolutions=8'], 'too small'),
    (['--channels=0'], '--channels must be at least 1'),
    (['--num_classes=0'], '--num_classes must be at least 1'),
])
def test_cli_bad_input_is_one_line(args, match):
  out = _cli(*args)
  assert out.returncode == 2
  errors = [l for l in out.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and match in errors[0], out.stderr[-2000:]
  assert 'Traceback' not in out.stderr
