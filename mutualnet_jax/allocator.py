"""Which malloc the process runs on: tcmalloc when the machine has it, chosen before anything else is imported.

XLA:CPU writes a fresh output buffer for every op of a step. With glibc's malloc those buffers are returned to the
kernel and every page is faulted in again on the next call; tcmalloc keeps them: a faster step for more resident
memory (benchmarks/train_step.py measures both, README "Benchmarks"). tcmalloc runs with TCMALLOC_RELEASE_RATE=10
(unless set): it hands idle pages back ten times as fast as its default, which lowers the peak memory of the paper
setting at the same speed (README "Benchmarks", the lever table). On GPU/TPU hosts tcmalloc is the usual choice too
(TPU VM images preload it). The allocator is read when the process starts, so `use` re-executes the program once
with `LD_PRELOAD` set.

MUTUALNET_MALLOC: 'auto' (default: tcmalloc if installed, else the system allocator), 'tcmalloc' (required),
'system' (glibc's malloc: an inherited tcmalloc preload is removed), 'hugepages' (glibc on transparent huge pages,
a benchmark comparison).
"""
from __future__ import annotations

import os
import sys
from typing import Mapping, Sequence

from mutualnet_jax.errors import UserError

ENV = 'MUTUALNET_MALLOC'
CHOICES = ('auto', 'tcmalloc', 'system', 'hugepages')
TCMALLOC = ('/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4', '/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4',
            '/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4', '/usr/lib/aarch64-linux-gnu/libtcmalloc.so.4')
_HUGEPAGES = 'glibc.malloc.hugetlb=1'
RELEASE_RATE = '10'


def find_tcmalloc(candidates: Sequence[str] = TCMALLOC) -> str | None:
  return next((p for p in candidates if os.path.exists(p)), None)


def environment(choice: str, environ: Mapping[str, str], tcmalloc: str | None) -> dict[str, str] | None:
  """The environment to restart with for `choice`, or None when the current process already runs as asked.

  `tcmalloc` is the library's path (None: not installed).
  """
  if choice not in CHOICES:
    raise UserError(f'{ENV}={choice!r} is not one of {CHOICES}.')
  env = dict(environ)
  preload = [p for p in env.get('LD_PRELOAD', '').split(':') if p]
  others = [p for p in preload if 'tcmalloc' not in p]
  if choice in ('auto', 'tcmalloc'):
    if others != preload:
      return None  # already running under tcmalloc (e.g. the re-executed process itself)
    if tcmalloc is None:
      if choice == 'tcmalloc':
        raise UserError(f'{ENV}=tcmalloc but libtcmalloc is not installed: apt-get install libgoogle-perftools4, '
                        f'or set {ENV}=auto.')
      return None
    env['LD_PRELOAD'] = ':'.join([tcmalloc] + preload)
    env.setdefault('TCMALLOC_RELEASE_RATE', RELEASE_RATE)
    return env
  tunables = env.get('GLIBC_TUNABLES', '')
  if choice == 'hugepages' and _HUGEPAGES not in tunables:
    env['GLIBC_TUNABLES'] = ':'.join(filter(None, [tunables, _HUGEPAGES]))
  if others != preload:
    env['LD_PRELOAD'] = ':'.join(others)
    if not others:
      del env['LD_PRELOAD']
  return None if env == dict(environ) else env


def use(choice: str | None = None) -> None:
  """Re-executes this program under the allocator `choice` (default: $MUTUALNET_MALLOC or 'auto') if it is not
  already running under it; returns otherwise. Call it first thing, before JAX or TensorFlow are imported."""
  choice = choice or os.environ.get(ENV, 'auto')
  env = environment(choice, os.environ, find_tcmalloc())
  if env is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)  # the interpreter's own flags (-X, -W, -u) included
