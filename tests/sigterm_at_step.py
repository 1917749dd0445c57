"""Runs main.py in this process and sends it SIGTERM (as a TPU/GCE preemption does) during step $SIGTERM_AT_STEP.

The signal arrives inside the training step, at a deterministic point, unlike a kill from outside at a polled moment.
$SIGNALS (default SIGTERM) lists the signals to send, comma-separated: the first at that step, each further one
$SIGNAL_GAP_S seconds after the one before (default 0.05), while the final checkpoint is being written.
"""
import os
import runpy
import signal
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mutualnet_jax import train  # noqa: E402  pylint: disable=g-import-not-at-top

AT = int(os.environ['SIGTERM_AT_STEP'])
SIGNALS = [signal.Signals[name] for name in os.environ.get('SIGNALS', 'SIGTERM').split(',')]
GAP = float(os.environ.get('SIGNAL_GAP_S', '0.05'))
_step = train.Trainer.step


def _send_the_rest() -> None:
  for sig in SIGNALS[1:]:
    threading.Event().wait(GAP)
    os.kill(os.getpid(), sig)


def _step_then_signal(self, state, *args, **kwargs):
  out = _step(self, state, *args, **kwargs)
  if int(out[0].step) == AT:
    os.kill(os.getpid(), SIGNALS[0])
    threading.Thread(target=_send_the_rest, daemon=True).start()
  return out


train.Trainer.step = _step_then_signal
os.environ['MUTUALNET_MALLOC'] = 'system'  # main.py must not re-execute itself: that would drop the patch above
sys.argv = [os.path.join(ROOT, 'main.py'), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name='__main__')
