"""Running absl programs so that a user's mistake prints one line instead of a traceback.

Importing this module (main.py does, before JAX and TensorFlow) also keeps TensorFlow's start-up notices off stderr,
unless the user set the variables: TensorFlow 2.21 prints "oneDNN custom operations are on" (twice, each after absl's
"log messages before absl::InitializeLog()" header) while its library loads, before TF_CPP_MIN_LOG_LEVEL applies, so
only TF_ENABLE_ONEDNN_OPTS=0 removes it. Here TensorFlow runs the tf.data input pipeline, which executes no oneDNN
primitive either way (ONEDNN_VERBOSE=1 lists none), and jax2tf's XLA calls; JAX does not read the variable.
"""
from __future__ import annotations

import os
import sys
import traceback
import types
from typing import Any, Callable, Sequence

from absl import flags, logging
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from mutualnet_jax.errors import UserError

os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')  # TensorFlow's C++ INFO lines (its warnings and errors still show)
_QUIET_INFO = ('/orbax/', '/jax/_src/xla_bridge.py')  # per-save chatter; "Unable to initialize backend 'tpu'"


def quiet_library_logs() -> None:
  """Keeps orbax's per-save INFO chatter and JAX's backends that are absent (TPU, ROCm) out of the log (their
  warnings and errors still show)."""
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= logging.converter.STANDARD_WARNING
      or not any(part in record.pathname for part in _QUIET_INFO))


def fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


class _BadConfigFile(Exception):
  """A --config file that does not load (not a ValueError, so that absl passes it on unwrapped)."""


def _config_file_problem(path: str, error: BaseException) -> str:
  """One line for a config file that failed to load: where its syntax is wrong, what it raised, or that it lacks
  get_config."""
  if isinstance(error, SyntaxError):
    return f'{error.filename} line {error.lineno}: {error.msg}: fix the config file.'
  if isinstance(error, AttributeError) and error.name == 'get_config' and isinstance(error.obj, types.ModuleType):
    return (f'{path} has no get_config(): a config file defines get_config() returning an ml_collections.ConfigDict '
            '(see configs/default.py).')
  if 'Error whilst parsing config file' in str(error) and error.__context__ is not None:
    error = error.__context__  # ml_collections re-raises a TypeError/ValueError with the traceback as its message
  lines = [f.lineno for f in traceback.extract_tb(error.__traceback__)
           if os.path.abspath(f.filename) == os.path.abspath(path)]
  where = f' (line {lines[-1]})' if lines else ''
  return (f'{path} raised {type(error).__name__}: {" ".join(str(error).split())}{where} while loading: fix the config '
          'file.')


class _ConfigFileParser(flags.ArgumentParser):
  """ml_collections' config file parser, with a file that fails to load as one line naming the file instead of a
  traceback (a syntax error or an exception escapes absl; ValueError/TypeError come wrapped with their traceback)."""

  def __init__(self, parser: flags.ArgumentParser):
    self.parser = parser

  def parse(self, argument: str) -> Any:
    try:
      return self.parser.parse(argument)
    except Exception as e:  # noqa: BLE001  pylint: disable=broad-except  (whatever the user's file raises)
      raise _BadConfigFile(_config_file_problem(argument.split(':', 1)[0], e)) from None

  def flag_type(self) -> str:
    return self.parser.flag_type()


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl flag parsing where a bad value, a config file that does not load or a config override of a field that does
  not exist is one line.

  (ml_collections raises AttributeError/KeyError for an unknown `--config.field`, which absl does not catch.)
  """
  for name in list(flags.FLAGS):
    flag = flags.FLAGS[name]
    if isinstance(flag.parser, ConfigFileFlagParser):
      flag.parser = _ConfigFileParser(flag.parser)
  seen: set[str] = set()
  for arg in argv[1:]:
    name = arg.split('=', 1)[0]
    if name.startswith('--config.'):
      if name in seen:  # ml_collections would concatenate a tuple given twice, or keep the last value
        fail(f'{name} is given twice: give each config override once.')
      seen.add(name)
  try:
    return flags.FLAGS(argv)
  except _BadConfigFile as e:
    fail(str(e))
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
    except KeyboardInterrupt:  # Ctrl-C outside training (which saves and stops on it): nothing half-written remains
      print('error: interrupted (Ctrl-C); the same command starts again (training resumes from its last '
            'checkpoint).', file=sys.stderr)
      sys.exit(130)
  app.run(guarded, flags_parser=parse_flags)
