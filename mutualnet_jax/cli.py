"""Running absl programs so that a user's mistake prints one line instead of a traceback."""
from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

from mutualnet_jax.errors import UserError


def quiet_library_logs() -> None:
  """Keeps orbax's per-save INFO chatter out of the training log (its warnings and errors still show)."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= logging.converter.STANDARD_WARNING or '/orbax/' not in record.pathname)


def run_cli(app: Any, main: Callable[[Sequence[str]], Any]) -> None:
  """`app.run(main)`, turning `UserError` into 'error: <message>' on stderr and exit status 2."""
  def guarded(argv: Sequence[str]) -> Any:
    quiet_library_logs()
    try:
      return main(argv)
    except UserError as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)
  app.run(guarded)
