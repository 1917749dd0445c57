"""One exception type for mistakes a user can fix (bad config, missing data, wrong checkpoint).

`main.py` prints these as a single line and exits with status 2; anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
  """A problem in what the user asked for; the message says what to do about it."""
