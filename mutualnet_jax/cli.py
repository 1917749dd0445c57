"""Running absl programs so that a user's mistake prints one line instead of a traceback."""
from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

from absl import flags, logging

from mutualnet_jax.errors import UserError


def quiet_library_logs() -> None:
  """Keeps orbax's per-save INFO chatter out of the training log (its warnings and errors still show)."""
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= logging.converter.STANDARD_WARNING or '/orbax/' not in record.pathname)


def fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl flag parsing where a bad value or a config override of a field that does not exist is one line.

  (ml_collections raises AttributeError/KeyError for an unknown `--config.field`, which absl does not catch.)
  """
  seen: set[str] = set()
  for arg in argv[1:]:
    name = arg.split('=', 1)[0]
    if name.startswith('--config.'):
      if name in seen:  # ml_collections would concatenate a tuple given twice, or keep the last value
        fail(f'{name} is given twice: give each config override once.')
      seen.add(name)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f'{e} (see --helpfull)')
  except (AttributeError, KeyError) as e:
    detail = str(e).replace('\\n', ' ').replace("\\'", '').replace("'", '').strip('"')
    fail(f'no such config field: {" ".join(detail.split())}')
  return []


def loaded_config(config: Any) -> Any:
  """A `config_flags` value, with its deferred load failure (a missing or broken --config file, which
  ml_collections raises as OSError on first use) as a one-line UserError."""
  try:
    if config is not None:
      config.get('method')
  except OSError as e:
    raise UserError(' '.join(str(e).split())) from None
  return config


def parse_numbers(values: Sequence[str] | None, kind: type, flag: str) -> list[Any] | None:
  """A comma-separated list flag as numbers (None when the flag was not given), or a one-line UserError."""
  if values is None:
    return None
  try:
    parsed = [kind(v) for v in values]
  except ValueError:
    raise UserError(f'--{flag} must be a comma-separated list of {kind.__name__} values, got '
                    f'{",".join(values)!r}.') from None
  if not parsed:
    raise UserError(f'--{flag} is empty: give at least one value or leave the flag out.')
  return parsed


def run_cli(app: Any, main: Callable[[Sequence[str]], Any]) -> None:
  """`app.run(main)`, turning `UserError` into 'error: <message>' on stderr and exit status 2."""
  def guarded(argv: Sequence[str]) -> Any:
    quiet_library_logs()
    try:
      return main(argv)
    except UserError as e:
      fail(str(e))
  app.run(guarded, flags_parser=parse_flags)
