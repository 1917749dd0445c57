"""Orbax checkpoints of a training run: state (params, optimizer, step) plus JSON metadata (model fingerprint), so a
restarted job resumes exactly where it stopped and refuses a checkpoint of a different model."""
from __future__ import annotations

from typing import Any

import ml_collections
import orbax.checkpoint as ocp

from mutualnet_jax.errors import UserError
from mutualnet_jax.workdir import CHECKPOINT_DIR, absolute

# Model settings that change the parameter tree; `fingerprint` adds what the weights were trained for.
_FINGERPRINT_FIELDS = ('name', 'max_width', 'num_classes', 'num_downsample')


def fingerprint(config: ml_collections.ConfigDict, channels: int) -> dict[str, Any]:
  """What a checkpoint must match to be resumed or measured (JSON types, as it is stored in the metadata): the
  parameter tree, and what the weights were trained for, so resuming or sweeping under other settings cannot
  silently train or measure a different network (an untrained slice, other widths or resolutions)."""
  if config.method == 'independent':
    trained = {'independent_width': float(config.independent_width),
               'independent_resolution': int(config.independent_resolution)}
  else:
    trained = {'width_range': [float(w) for w in config.width_range],
               'resolutions': sorted({int(r) for r in config.resolutions}, reverse=True)}
  return {**{k: config.model[k] for k in _FINGERPRINT_FIELDS}, 'channels': channels, 'method': config.method,
          **trained}


class Checkpoints:
  """Keeps the last `keep` checkpoints of `workdir`; saves are asynchronous and atomic (a save killed midway leaves
  only a temporary directory that is never restored).

  read_only: for post-training modes, which may run while training still writes to the same workdir: nothing is
  created, deleted or cleaned up (a training job's in-progress save is a temporary directory it still owns).
  """

  def __init__(self, workdir: str, *, keep: int, expected: dict[str, Any], read_only: bool = False):
    self.directory = absolute(workdir) / CHECKPOINT_DIR
    self.expected = expected
    options = (ocp.CheckpointManagerOptions(read_only=True) if read_only else
               ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True))
    try:
      self.manager = ocp.CheckpointManager(self.directory, item_names=('state', 'meta'), options=options)
    except (PermissionError, OSError) as e:
      if read_only:
        raise UserError(f'cannot read checkpoints under {self.directory} ({e.strerror or e}): pass the --workdir '
                        'of a trained run that this user can read.') from e
      raise UserError(f'cannot write checkpoints under {self.directory} ({e.strerror or e}): '
                      'pass a writable --workdir.') from e

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    meta = {**meta, 'fingerprint': self.expected}
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """State and metadata of `step`; a clear error for a different model or an unreadable checkpoint."""
    where = self.directory / str(step)
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    except Exception as e:  # orbax raises many types for a damaged directory
      raise UserError(f'checkpoint {where} is unreadable ({type(e).__name__}): move it away to resume from an '
                      'earlier one, or start a fresh --workdir.') from e
    found = meta.get('fingerprint') or {}
    if found != self.expected:
      keys = sorted(self.expected.keys() | found.keys())
      diff = ', '.join(f'{k}: checkpoint {found.get(k)!r} vs config {self.expected.get(k)!r}' for k in keys
                       if found.get(k) != self.expected.get(k))
      hint = ('the config it was trained with (its config.json)' if 'method' in found else
              'the mutualnet_jax version that wrote it (its fingerprint predates the method/width fields)')
      raise UserError(f'checkpoint {where} is of a different model/method/width setting ({diff}): use a fresh '
                      f'--workdir, or {hint}.')
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    except Exception as e:
      raise UserError(f'checkpoint {where} does not restore ({type(e).__name__}: {str(e).splitlines()[0][:200]}): '
                      'move it away to resume from an earlier one, or start a fresh --workdir.') from e
    return restored['state'], meta

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
