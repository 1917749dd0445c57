"""Runs main.py in this process and sends it SIGTERM (as a TPU/GCE preemption does) during step $SIGTERM_AT_STEP.

The signal arrives inside the training step, at a deterministic point, unlike a kill from outside at a polled moment.
"""
import os
import runpy
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mutualnet_jax import train  # noqa: E402  pylint: disable=g-import-not-at-top

AT = int(os.environ['SIGTERM_AT_STEP'])
_step = train.Trainer.step


def _step_then_term(self, state, *args, **kwargs):
  out = _step(self, state, *args, **kwargs)
  if int(out[0].step) == AT:
    os.kill(os.getpid(), signal.SIGTERM)
  return out


train.Trainer.step = _step_then_term
os.environ['MUTUALNET_MALLOC'] = 'system'  # main.py must not re-execute itself: that would drop the patch above
sys.argv = [os.path.join(ROOT, 'main.py'), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name='__main__')
