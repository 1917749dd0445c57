"""Orbax checkpoints of a training run: state (params, optimizer, step) plus JSON metadata (model fingerprint), so a
restarted job resumes exactly where it stopped and refuses a checkpoint of a different model."""
from __future__ import annotations

import contextlib
import datetime
import errno
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from mutualnet_jax import config_fields
from mutualnet_jax import workdir as workdir_lib
from mutualnet_jax.errors import UserError, reason
from mutualnet_jax.workdir import CHECKPOINT_DIR, DAMAGED_DIR, absolute


def fingerprint(config: ml_collections.ConfigDict, channels: int) -> dict[str, Any]:
  """What a checkpoint must match to be resumed or measured (JSON types, as it is stored in the metadata): the
  parameter tree, and what the weights were trained for, so resuming or sweeping under other settings cannot
  silently train or measure a different network (an untrained slice, other widths or resolutions). The fields are
  those declared so in `config_fields.FIELDS`, keyed by their last name part, plus the input channels."""
  record = {name.rsplit('.', 1)[-1]: field.fingerprint.canonical(config_fields.value(config, name))
            for name, field in config_fields.FIELDS.items() if field.fingerprint and field.fingerprint.applies(config)}
  return {**record, 'channels': channels}


class DamagedCheckpoint(UserError):
  """A checkpoint directory that does not restore (as opposed to one of another model, which is refused)."""


@jax.jit
def _finite(leaves: list[jax.Array]) -> jax.Array:
  return jax.numpy.stack([jax.numpy.isfinite(x).all() for x in leaves]).all()


def all_finite(tree: Any) -> bool:
  """Whether every floating-point leaf of `tree` is finite: one program over all leaves (op by op, each leaf shape
  compiled two small programs of its own), one transfer."""
  leaves = [x for x in jax.tree.leaves(tree) if np.issubdtype(np.dtype(getattr(x, 'dtype', np.float32)), np.floating)]
  return bool(jax.device_get(_finite(leaves))) if leaves else True


_READ_ONLY_NOTICES = ('Given directory is read only', 'CheckpointManagerOptions.read_only=True')


def _read_only_options() -> ocp.CheckpointManagerOptions:
  """Options of a manager that only reads (post-training, beside a training that writes). Orbax warns that such a
  manager is read-only, which is what this module asks for: those notices are dropped (`_not_a_read_only_notice`)."""
  return ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)


def _not_a_read_only_notice(record: Any) -> bool:
  return not str(record.msg).startswith(_READ_ONLY_NOTICES)


logging.get_absl_logger().addFilter(_not_a_read_only_notice)


class Checkpoints:
  """Keeps the last `keep` checkpoints of `workdir`; saves are asynchronous and atomic (a save killed midway leaves
  only a temporary directory that is never restored). A context manager: leaving it waits for the last save.

  read_only: for post-training modes, which may run while training still writes to the same workdir: nothing is
  created, deleted, moved or cleaned up (a training job's in-progress save is a temporary directory it still owns).
  """

  def __init__(self, workdir: str, *, keep: int, expected: dict[str, Any], read_only: bool = False):
    self.directory = absolute(workdir) / CHECKPOINT_DIR
    self.expected, self.read_only = expected, read_only
    options = (_read_only_options() if read_only else
               ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True))
    try:
      self.manager = ocp.CheckpointManager(self.directory, item_names=('state', 'meta'), options=options)
    except (PermissionError, OSError) as e:
      if read_only:
        raise UserError(f'cannot read checkpoints under {self.directory} ({e.strerror or e}): pass the --workdir '
                        'of a trained run that this user can read.') from e
      raise UserError(f'cannot write checkpoints under {self.directory} ({e.strerror or e}): '
                      'pass a writable --workdir.') from e

  def __enter__(self) -> 'Checkpoints':
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, metadata) of the newest checkpoint that restores, or None when there is none. A damaged newer
    one is skipped with a warning saying which and why; a training job also moves it to workdir/damaged_checkpoints
    (never deletes it), so its step number is free to be written again."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state, meta = self.restore(step, abstract_state)
      except DamagedCheckpoint as e:
        logging.warning('%s; falling back to the checkpoint before it.', e)
        self._set_aside(step)
        continue
      return step, state, meta
    return None

  def _set_aside(self, step: int) -> None:
    if self.read_only:
      return
    target = self.directory.parent / DAMAGED_DIR / f'{step}-{datetime.datetime.now():%Y%m%dT%H%M%S}'
    target.parent.mkdir(parents=True, exist_ok=True)
    (self.directory / str(step)).rename(target)
    logging.warning('Moved the damaged checkpoint of step %d to %s (kept for inspection).', step, target)
    self.manager.reload()

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    meta = {**meta, 'fingerprint': self.expected}
    try:
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:  # the previous asynchronous save's failure surfaces here, wrapped by orbax
      self._raise_if_disk_full(e)
      raise

  def _raise_if_disk_full(self, error: BaseException) -> None:
    """A full disk (or quota) as one line saying which checkpoint is safe and what to do."""
    cause = error
    while cause is not None and not (isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)):
      cause = cause.__cause__ or cause.__context__
    if cause is None and 'No space left on device' not in str(error):
      return
    with contextlib.suppress(Exception):  # an earlier save may still be finishing: it is what resuming starts from
      self.manager.wait_until_finished()
    self.manager.reload()
    last = self.manager.latest_step()
    kept = f'the checkpoint of step {last} is complete' if last is not None else 'no checkpoint was completed'
    raise UserError(f'disk full while saving a checkpoint under {self.directory}: {kept}; free some space, then run '
                    'the same command to resume.') from error

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """State and metadata of `step`; a clear error for a different model or an unreadable checkpoint."""
    where = self.directory / str(step)
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    except Exception as e:  # orbax/tensorstore raise many types for a damaged directory
      raise DamagedCheckpoint(f'checkpoint {where} is unreadable ({reason(e)})') from e
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
    except Exception as e:  # orbax/tensorstore raise many types for a damaged directory
      raise DamagedCheckpoint(f'checkpoint {where} does not restore ({reason(e)})') from e
    return restored['state'], meta

  def close(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # the last asynchronous save failed
      self._raise_if_disk_full(e)
      raise
    finally:
      self.manager.close()


def _newest_meta(workdir: str, key: str) -> dict[str, Any] | None:
  """The `key` entry of the newest readable checkpoint's metadata that holds it as a dict, or None."""
  directory = absolute(workdir) / CHECKPOINT_DIR
  if not directory.exists():
    return None
  manager = ocp.CheckpointManager(directory, item_names=('state', 'meta'),
                                  options=_read_only_options())
  try:
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
      except Exception:  # noqa: BLE001  a damaged checkpoint: the one before may still hold the record
        continue
      if isinstance(meta.get(key), dict):
        return meta[key]
  finally:
    manager.close()
  return None


def recorded_config(workdir: str) -> ml_collections.ConfigDict | None:
  """The config that the newest readable checkpoint of `workdir` recorded (checkpoints keep it in their metadata),
  or None: what decides resume refusals and post-training settings when config.json is gone or damaged."""
  record = _newest_meta(workdir, 'config')
  return None if record is None else workdir_lib.config_from_record(record)


def recorded_channels(workdir: str) -> int | None:
  """The input channels the newest readable checkpoint was trained for (its fingerprint), or None: what lets a
  trained or converted run open without reading its dataset."""
  channels = (_newest_meta(workdir, 'fingerprint') or {}).get('channels')
  return channels if isinstance(channels, int) else None


def training_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with: its config.json, or when that is gone or damaged the record of its
  newest checkpoint (with a warning); a one-line UserError when neither exists."""
  try:
    return workdir_lib.saved_config(workdir)
  except UserError as e:
    recorded = recorded_config(workdir)
    if recorded is None:
      raise
    logging.warning('%s; using the settings its newest checkpoint recorded instead.', e)
    return recorded
