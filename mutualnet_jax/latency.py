"""Wall-clock latency of a compiled function on the current backend: warm-up calls, then the median of repeats."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax


def median_ms(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 10, max_seconds: float = 2.0) -> float:
  """Median milliseconds of `fn()` (which must return device arrays) after `warmup` discarded calls.

  Stops early, after at least 3 timed calls, once `max_seconds` are spent: a slow configuration's median is stable
  long before its 10th call, and a sweep times many of them.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times, spent = [], 0.0
  for _ in range(max(repeats, 1)):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
    spent += times[-1]
    if len(times) >= 3 and spent > max_seconds:
      break
  return 1e3 * statistics.median(times)
