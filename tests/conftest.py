"""Shared test settings: tiny models and resolutions so each compiled step takes seconds on 2 CPU cores."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

from configs import default  # noqa: E402


def tiny_config(**overrides):
  """The default config shrunk to 16 px inputs, 4 widths and batch 8."""
  config = default.get_config()
  config.model.num_downsample = 2
  config.resolutions = (16, 12, 8)
  config.independent_resolution = 16
  config.width_step = 0.25
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


@pytest.fixture
def config():
  return tiny_config()
