"""Runs main.py in this process and SIGKILLs it in the middle of saving checkpoint step $KILL_AT_STEP.

Orbax writes a step into a temporary directory and renames it when complete; this wraps that final rename so the
process dies with every file of the step written but not committed, the worst moment for a preemption. Deterministic,
unlike killing from outside at a polled moment.
"""
import os
import runpy
import signal
import sys

from orbax.checkpoint._src.path import atomicity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILL_AT = os.environ['KILL_AT_STEP']
_finalize = atomicity.AtomicRenameTemporaryPath.finalize


async def _finalize_or_die(self):
  if self.get_final().name == KILL_AT:
    os.kill(os.getpid(), signal.SIGKILL)
  return await _finalize(self)


atomicity.AtomicRenameTemporaryPath.finalize = _finalize_or_die
os.environ['MUTUALNET_MALLOC'] = 'system'  # main.py must not re-execute itself: that would drop the patch above
sys.path.insert(0, ROOT)
sys.argv = [os.path.join(ROOT, 'main.py'), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name='__main__')
