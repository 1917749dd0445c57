"""The layout of a run's workdir, without JAX: where checkpoints live, the config.json the run was trained with
(so post-training modes need only --workdir), and the checks every mode makes before touching it.

  workdir/checkpoints/<step>/   orbax checkpoints (mutualnet_jax.checkpointing)
  workdir/config.json           the training config
  workdir/bn_stats/             BN statistics per (width, resolution) (mutualnet_jax.bn_calibration)
  workdir/query_table.{csv,json}, accuracy_macs.png, sweep_summary.json   the sweep (mutualnet_jax.sweep)
"""
from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
from etils import epath

from mutualnet_jax.errors import UserError

CHECKPOINT_DIR = 'checkpoints'
CONFIG_FILE = 'config.json'


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


def _tuples(value: Any) -> Any:
  """JSON has no tuples; configs declare sequences as tuples, so `--config.x=(...)` overrides keep type-checking."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the training config next to the checkpoints, so post-training modes need only --workdir."""
  (epath.Path(workdir) / CONFIG_FILE).write_text(config.to_json(indent=2, sort_keys=True))


def saved_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (a UserError when the workdir has none or it is damaged)."""
  path = epath.Path(workdir) / CONFIG_FILE
  try:
    return ml_collections.ConfigDict(_tuples(json.loads(path.read_text())))
  except FileNotFoundError:
    raise UserError(f'{path} not found: pass --config (the config the run was trained with), or the --workdir '
                    'of a run trained by main.py.') from None
  except (OSError, ValueError) as e:
    raise UserError(f'{path} is unreadable ({e}): pass --config (the config the run was trained with).') from None
