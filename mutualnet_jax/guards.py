"""What stops a training run cleanly: a signal (save, then stop at a step boundary) or a divergence (stop before
anything non-finite is logged or saved)."""
from __future__ import annotations

import signal
import threading
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import logging

from mutualnet_jax import workdir as workdir_lib
from mutualnet_jax.errors import UserError


class PreemptionGuard:
  """Turns SIGTERM (TPU/GCE preemption, `kill`) and SIGINT (Ctrl-C) into 'save and stop at the next step boundary'.

  A context manager held for the whole run, from before the checkpoint manager opens until after its last save has
  finished: a second signal at any moment (while the final save is written, say) is logged and cannot cut that save
  short. Multi-process jobs ask JAX's preemption sync service instead, so every process stops at the same step.
  """
  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested: str | None = None  # the signal's name once one arrived
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> 'PreemptionGuard':
    if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
      self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
    return self

  def __exit__(self, *exc: Any) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.requested:
      logging.warning('%s received again: still saving the checkpoint; the run stops once it is complete.', name)
      return
    logging.warning('%s received: saving a checkpoint and stopping at the end of this step.', name)
    self.requested = name

  def should_stop(self, step: int, manager: Any) -> bool:
    if jax.process_count() > 1:
      return manager.reached_preemption(step)
    return bool(self.requested)


def check_finite(history: Sequence[Mapping[str, jax.Array]], first_step: int, last_saved: int,
                   workdir: str, retrying: bool = False) -> list[dict[str, float]]:
  """The divergence guard: the metrics of steps first_step+1, ... on the host (one transfer); a UserError at the
  first step whose loss, gradient norm or updated parameters' norm is not finite, after recording the divergence in
  config.json so that the fix (an optimiser setting) may be resumed without --resume_with_changes. Nothing after
  `last_saved` was saved, so no non-finite state ever reaches a checkpoint. `retrying`: this run resumed
  `last_saved` after an earlier divergence and saved nothing since, so that checkpoint itself is suspect."""
  host = jax.device_get(list(history))
  for i, metrics in enumerate(host):
    bad = {k: float(v) for k, v in metrics.items() if not np.isfinite(v)}
    if bad:
      step = first_step + i + 1
      if jax.process_index() == 0:
        workdir_lib.save_config(workdir_lib.saved_config(workdir), workdir,
                                **{workdir_lib.DIVERGED_KEY: {'step': step, 'last_checkpoint': last_saved}})
      name, value = sorted(bad.items())[0]
      if retrying:
        raise UserError(f'training diverged again: {name} is {value} at step {step}, after resuming the checkpoint of '
                        f'step {last_saved} with new settings: its weights may already be damaged; start a fresh '
                        '--workdir (with the lower learning rate).')
      where = (f'the last finite checkpoint is step {last_saved}, which the same command resumes from' if last_saved
               else 'no checkpoint was saved before it, so the same command starts afresh')
      raise UserError(f'training diverged: {name} is {value} at step {step}; {where}. Lower --config.learning_rate '
                      '(or raise --config.warmup_epochs) and run it again.')
  return host
