"""One exception type for mistakes a user can fix (bad config, missing data, wrong checkpoint).

`main.py` prints these as a single line and exits with status 2; anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
  """A problem in what the user asked for; the message says what to do about it."""


def reason(error: BaseException) -> str:
  """`error` in one line, type first: orbax and tensorstore raise many types, often with multi-line messages, for a
  missing or damaged file, so their callers catch Exception and quote this in their own message."""
  first = next((line.strip() for line in str(error).splitlines() if line.strip()), '')
  return f'{type(error).__name__}: {first[:160]}' if first else type(error).__name__
