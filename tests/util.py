"""Shared test helpers: tiny configs so each compiled step takes seconds on 2 CPU cores."""
import os

from configs import default


def tiny_config(**overrides):
  """The default config with the tiny ConvNet, 16 px inputs, uniform widths in [0.25, 1.0] on one capacity (1.0),
  2 resolutions and batch 8.

  Few buckets means few compilations; `overrides` take dotted keys, e.g. tiny_config(**{'model.name': 'x'}).
  """
  config = default.get_config()
  config.model.name = 'tiny_convnet'
  config.model.num_downsample = 3
  config.resolutions = (16, 8)
  config.independent_resolution = 16
  config.width_step = 0.75
  config.capacities = (1.0,)  # random widths run in one program per resolution: few compilations
  config.sweep_width_step = 0.75
  config.batch_size = 8
  config.learning_rate = 0.05
  config.compilation_cache_dir = ''
  for key, value in overrides.items():
    target = config
    *path, leaf = key.split('.')
    for p in path:
      target = target[p]
    target[leaf] = value
  return config


def snapshot_files(path):
  """Every file under `path` with its bytes and modification time: for 'nothing was touched' assertions. The
  workdir's lock file is left out: taking the lock to find out that a run is refused is not touching the run."""
  out = {}
  for root, _, names in os.walk(path):
    for name in names:
      if name == '.lock':
        continue
      full = os.path.join(root, name)
      with open(full, 'rb') as f:
        out[full] = (f.read(), os.stat(full).st_mtime_ns)
  return out
