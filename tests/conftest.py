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
