"""Test session settings.

XLA:CPU compilation dominates test time here, so tests compile with backend optimisation level 0 (about half the
compile time; runtime does not matter for tiny models) and share one persistent compilation cache per session, so
identical programs built by different tests compile once.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0').strip()

import jax  # noqa: E402
import pytest  # noqa: E402

from tests.util import tiny_config  # noqa: E402


@pytest.fixture(scope='session', autouse=True)
def _compilation_cache(tmp_path_factory):
  jax.config.update('jax_compilation_cache_dir', str(tmp_path_factory.mktemp('xla_cache')))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  yield


@pytest.fixture
def config():
  return tiny_config()


@pytest.fixture(scope='session')
def fashion_data_dir(tmp_path_factory):
  """The installed Fashion-MNIST prepared once per session into a fresh data_dir (about 20 s).

  Skips when the Debian package is absent, unless MUTUALNET_REQUIRE_FASHION_MNIST=1 (CI), then fails.
  """
  from mutualnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from mutualnet_jax.datasets import fashion_mnist_local  # pylint: disable=g-import-not-at-top
  from mutualnet_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  try:
    fashion_mnist_local.check_raw_dir(fashion_mnist_local.raw_dir())
  except UserError as error:
    if os.environ.get('MUTUALNET_REQUIRE_FASHION_MNIST') == '1':
      pytest.fail(f'MUTUALNET_REQUIRE_FASHION_MNIST=1 but {error}')
    pytest.skip(str(error))
  data_dir = tmp_path_factory.mktemp('fashion_tfds')
  input_pipeline.get_dataset_info(tiny_config(data_dir=str(data_dir)))
  return data_dir
