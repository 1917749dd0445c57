"""The launcher's allocator choice: tcmalloc preloaded when present, never twice, a clear error when required."""
import os
import subprocess
import sys

import pytest

from mutualnet_jax import allocator
from mutualnet_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIB = '/opt/lib/libtcmalloc_minimal.so.4'


def test_auto_preloads_tcmalloc_when_installed_and_keeps_other_preloads():
  env = allocator.environment('auto', {'PATH': '/bin', 'LD_PRELOAD': '/x/libfoo.so'}, LIB)
  assert env == {'PATH': '/bin', 'LD_PRELOAD': f'{LIB}:/x/libfoo.so', 'TCMALLOC_RELEASE_RATE': '10'}
  # A release rate the user chose is kept.
  env = allocator.environment('tcmalloc', {'TCMALLOC_RELEASE_RATE': '2'}, LIB)
  assert env == {'LD_PRELOAD': LIB, 'TCMALLOC_RELEASE_RATE': '2'}


def test_no_restart_when_already_running_under_it_or_when_absent_or_system():
  assert allocator.environment('auto', {'LD_PRELOAD': LIB}, LIB) is None  # the re-executed process stops here
  assert allocator.environment('tcmalloc', {'LD_PRELOAD': LIB}, LIB) is None
  assert allocator.environment('auto', {}, None) is None
  assert allocator.environment('system', {'LD_PRELOAD': '/x/libfoo.so'}, LIB) is None


def test_system_removes_an_inherited_tcmalloc_preload():
  assert allocator.environment('system', {'LD_PRELOAD': f'{LIB}:/x/libfoo.so', 'A': '1'}, LIB) == {
      'LD_PRELOAD': '/x/libfoo.so', 'A': '1'}
  assert allocator.environment('system', {'LD_PRELOAD': LIB, 'A': '1'}, LIB) == {'A': '1'}


def test_hugepages_sets_the_glibc_tunable_once():
  env = allocator.environment('hugepages', {'GLIBC_TUNABLES': 'glibc.x=1'}, LIB)
  assert env['GLIBC_TUNABLES'] == 'glibc.x=1:glibc.malloc.hugetlb=1' and 'LD_PRELOAD' not in env
  assert allocator.environment('hugepages', env, LIB) is None


def test_required_but_missing_or_unknown_choice_is_a_user_error():
  with pytest.raises(UserError, match='apt-get install libgoogle-perftools4'):
    allocator.environment('tcmalloc', {}, None)
  with pytest.raises(UserError, match='MUTUALNET_MALLOC'):
    allocator.environment('jemalloc', {}, LIB)


@pytest.mark.slow
def test_use_re_executes_the_program_with_its_interpreter_flags():
  """hugepages works without tcmalloc installed: the child prints the environment it was restarted with."""
  code = ('import os, sys; from mutualnet_jax import allocator; allocator.use("hugepages"); '
          'print(os.environ["GLIBC_TUNABLES"], sys.flags.dont_write_bytecode)')
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  out = subprocess.run([sys.executable, '-B', '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=env)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ['glibc.malloc.hugetlb=1', '1']


@pytest.mark.slow
def test_main_reports_a_bad_choice_in_one_line():
  out = subprocess.run([sys.executable, 'main.py', '--mode=query', '--workdir=/nonexistent'], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, 'MUTUALNET_MALLOC': 'jemalloc'})
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == ["error: MUTUALNET_MALLOC='jemalloc' is not one of "
                                             "('auto', 'tcmalloc', 'system', 'hugepages')."]
