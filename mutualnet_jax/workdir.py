"""The layout of a run's workdir, without JAX: where checkpoints live, the config.json the run was trained with
(so post-training modes need only --workdir), and the checks every mode makes before touching it.

  workdir/checkpoints/<step>/   orbax checkpoints (mutualnet_jax.checkpointing); damaged ones are moved to
  workdir/damaged_checkpoints/  (never deleted)
  workdir/config.json           the training config, plus the history of accepted changes on resume
  workdir/.lock                 held by the one process training in the workdir (or converting into it)
  workdir/.post_training.lock   held by the one post-training writer (calibrate, sweep, export), beside training
  workdir/bn_stats/             BN statistics per (width, resolution) (mutualnet_jax.bn_calibration)
  workdir/query_table.{csv,json}, accuracy_macs.png, sweep_summary.json   the sweep (mutualnet_jax.sweep)
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import shutil
import socket
from typing import Any, Callable, Iterator

import ml_collections
from etils import epath

from mutualnet_jax import config_fields
from mutualnet_jax.config_fields import Resume
from mutualnet_jax.errors import UserError

CHECKPOINT_DIR = 'checkpoints'
DAMAGED_DIR = 'damaged_checkpoints'
CONFIG_FILE = 'config.json'
LOCK_FILE = '.lock'
POST_TRAINING_LOCK_FILE = '.post_training.lock'  # post-training writers exclude each other, not training
HISTORY_KEY = 'resume_history'  # in config.json, beside the config: what changed when, accepted on resume
DIVERGED_KEY = 'diverged'       # in config.json: the step a run stopped at with a non-finite loss


def absolute(path: str | os.PathLike) -> epath.Path:
  """`path` made absolute (orbax refuses relative paths; `--workdir=runs/x` is the natural way to call main.py).
  Paths with a scheme (gs://...) are already absolute."""
  return epath.Path(path if '://' in os.fspath(path) else os.path.abspath(path))


def require_checkpoint(workdir: str) -> None:
  """A UserError unless `workdir` holds at least one checkpoint (what every post-training mode starts from)."""
  directory = epath.Path(workdir) / CHECKPOINT_DIR
  if not directory.exists() or not any(p.name.isdigit() for p in directory.iterdir()):
    raise UserError(f'no checkpoint in {directory}: train first (python main.py --mode=train --config=... '
                    f'--workdir={workdir}) or pass the --workdir of a trained run.')


def check_writable(workdir: str) -> None:
  """Fails before any work is done if the workdir cannot be created or written."""
  path = epath.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f'.write_probe_{os.getpid()}'
    probe.write_text('')
    probe.unlink()
  except OSError as e:
    raise UserError(f'workdir {workdir} is not writable ({e.strerror or e}): pass a writable --workdir.') from e


def is_training_workdir(path: str | os.PathLike) -> bool:
  """A directory a training run wrote (its checkpoints or config.json): never an output path to replace."""
  path = epath.Path(path)
  return path.is_dir() and ((path / CHECKPOINT_DIR).exists() or (path / CONFIG_FILE).exists())


def check_output(path: str | os.PathLike, *, overwrite: bool, ours: Callable[[epath.Path], bool], what: str) -> None:
  """A UserError unless `path` is free for `what`: absent, an empty directory, or (with `overwrite`) an earlier
  output of the same kind (`ours`). A training workdir, a regular file or a directory with other files is never
  replaced, with or without `overwrite`: nothing a user had is removed."""
  path = epath.Path(path)
  if not path.exists() or (path.is_dir() and not any(path.iterdir())):
    return
  a_what = f'{"an" if what[0].lower() in "aeiou" else "a"} {what}'
  if path.is_dir() and is_training_workdir(path):
    raise UserError(f'{path} is a training workdir: write the {what} elsewhere (--out=...); it is never replaced.')
  if not ours(path):
    raise UserError(f'{path} already exists and is not {a_what}: choose another --out (nothing was removed).')
  if not overwrite:
    raise UserError(f'{path} already holds {a_what}: pass --overwrite to replace it, or choose another --out.')


def replace_with(path: str | os.PathLike, write: Callable[[epath.Path], Any]) -> epath.Path:
  """Writes an output through `write(temporary sibling)`, then moves it to `path`, replacing an earlier output
  there only once the new one is complete (`check_output` decided that it may be replaced)."""
  path = absolute(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f'.{path.name}.tmp-{os.getpid()}'
  old = path.parent / f'.{path.name}.old-{os.getpid()}'
  try:
    write(tmp)
    if path.exists():
      path.rename(old)
    tmp.rename(path)
  finally:
    for leftover in (tmp, old):
      if leftover.is_dir():
        shutil.rmtree(leftover)
      elif leftover.exists():
        leftover.unlink()
  return path


def _tuples(value: Any) -> Any:
  """JSON has no tuples; configs declare sequences as tuples, so `--config.x=(...)` overrides keep type-checking."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _read_json(workdir: str) -> dict[str, Any] | None:
  """config.json's contents (None when absent); a one-line UserError when it is unreadable or not a settings
  object (a list, a string where the model's settings belong)."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    return None
  try:
    data = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise UserError(f'{path} is unreadable ({" ".join(str(e).split())}): pass --config (the config the run was '
                    'trained with).') from None
  if not isinstance(data, dict) or not isinstance(data.get('model', {}), dict):
    raise UserError(f'{path} is damaged (not a JSON object of settings): pass --config (the config the run was '
                    'trained with).')
  return data


def set_aside_damaged_config(workdir: str) -> epath.Path | None:
  """Moves an unreadable or damaged config.json to config.json.damaged-<time> (kept, never deleted) so that a
  resume can write a sound one; returns where it went, None when config.json is absent or sound."""
  try:
    _read_json(workdir)
    return None
  except UserError:
    path = epath.Path(workdir) / CONFIG_FILE
    target = path.parent / f'{CONFIG_FILE}.damaged-{datetime.datetime.now():%Y%m%dT%H%M%S}'
    path.rename(target)
    return target


def config_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as JSON types: what config.json holds, and what every checkpoint records of its run."""
  return json.loads(config.to_json(sort_keys=True))


def config_from_record(data: dict[str, Any]) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(_tuples({k: v for k, v in data.items() if k not in (HISTORY_KEY, DIVERGED_KEY)}))


def save_config(config: ml_collections.ConfigDict, workdir: str, **extra: Any) -> None:
  """Writes the training config next to the checkpoints (post-training modes then need only --workdir), keeping
  the resume history and any `extra` bookkeeping entries (None removes one); replaced atomically."""
  data = config_record(config)
  old = _read_json(workdir) or {}
  for key in (HISTORY_KEY, DIVERGED_KEY):
    if key in old:
      data[key] = old[key]
  data.update(extra)
  data = {k: v for k, v in data.items() if v is not None}
  path = epath.Path(workdir) / CONFIG_FILE
  tmp = path.parent / f'.{path.name}.tmp{os.getpid()}'
  tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
  tmp.replace(path)


def saved_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (a UserError when the workdir has none or it is damaged)."""
  data = _read_json(workdir)
  if data is None:
    raise UserError(f'{epath.Path(workdir) / CONFIG_FILE} not found: pass --config (the config the run was trained '
                    'with), or the --workdir of a run trained by main.py.')
  return config_from_record(data)


def bookkeeping(workdir: str) -> dict[str, Any]:
  """The resume history and divergence record kept in config.json beside the config (empty when none)."""
  data = _read_json(workdir) or {}
  return {k: data[k] for k in (HISTORY_KEY, DIVERGED_KEY) if k in data}


# Optimisation settings a run that diverged may change without --resume_with_changes (read by train.py).
OPTIMISER_FIELDS = config_fields.resume_fields(Resume.OPTIMISER)


def _flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def config_changes(saved: ml_collections.ConfigDict, current: ml_collections.ConfigDict) -> dict[str, tuple]:
  """{field: (saved value, current value)} for every field whose change would make a resumed run another run (its
  declared resume policy; a field missing from an older config.json has its declared legacy value)."""
  old, new = _flatten(_tuples(saved.to_dict())), _flatten(_tuples(current.to_dict()))
  changes = {}
  for field, value in new.items():
    before = old.get(field, config_fields.legacy_value(field, value))
    if config_fields.resume_policy(field) is not Resume.FREE and before != value:
      changes[field] = (before, value)
  return changes


def describe_changes(changes: dict[str, tuple]) -> str:
  return ', '.join(f'{field} {before!r} -> {after!r}' for field, (before, after) in sorted(changes.items()))


def record_changes(config: ml_collections.ConfigDict, workdir: str, step: int, changes: dict[str, tuple]) -> None:
  """Saves the new config with the accepted changes appended to its history."""
  history = bookkeeping(workdir).get(HISTORY_KEY, [])
  history.append({'step': step, 'time': datetime.datetime.now().isoformat(timespec='seconds'),
                  'changes': {k: [_jsonable(a), _jsonable(b)] for k, (a, b) in changes.items()}})
  save_config(config, workdir, **{HISTORY_KEY: history})


def _jsonable(value: Any) -> Any:
  return list(value) if isinstance(value, tuple) else value


def is_writable(directory: str | os.PathLike) -> bool:
  """Whether files can be created in `directory` (an absent one: in its nearest existing parent)."""
  path = os.path.abspath(os.fspath(directory))
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  return os.access(path, os.W_OK | os.X_OK)


@contextlib.contextmanager
def lock(workdir: str, what: str, *, post_training: bool = False) -> Iterator[None]:
  """Makes this process the one writer of its kind in `workdir` for the duration: training (workdir/.lock) or,
  with `post_training`, calibration, sweep and export (workdir/.post_training.lock), which write other files and
  so run beside a training. An exclusive `flock`, released by the kernel when the process dies, so a killed writer
  never leaves a stale lock; a second writer gets a one-line UserError naming the holder. Remote paths (gs://),
  file systems without locks and read-only workdirs (where nobody writes) are not locked."""
  path = epath.Path(workdir) / (POST_TRAINING_LOCK_FILE if post_training else LOCK_FILE)
  if '://' in os.fspath(workdir) or not is_writable(workdir):
    yield
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError:
    yield  # a lock file that cannot be created (read-only, foreign owner): nothing is locked
    return
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 4096, 0).decode(errors='replace').strip() or 'another process'
      raise UserError(f'workdir {workdir} is in use by {holder}: wait for it to finish, or use another '
                      '--workdir.') from None
    except OSError:
      yield  # no locking on this file system
      return
    stamp = datetime.datetime.now().isoformat(timespec='seconds')
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'{what} (pid {os.getpid()} on {socket.gethostname()}, since {stamp})'.encode(), 0)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)
      fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)


def outputs_dir(workdir: str, out: str | None, what: str) -> str:
  """Where a post-training command writes (its table, plot, BN statistics): `out` when given, else the workdir; a
  one-line UserError when that place is not writable (a read-only workdir needs --out)."""
  target = out or workdir
  if '://' in os.fspath(target) or is_writable(target):
    return target
  if out:
    raise UserError(f'--out={out} is not writable: pass a writable directory for the {what}.')
  raise UserError(f'workdir {workdir} is read-only: pass --out=DIR, a writable directory for the {what} (the '
                  'workdir is only read).')
