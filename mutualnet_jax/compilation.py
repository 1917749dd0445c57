"""XLA compilation: JAX's persistent compilation cache, and counting the executables a piece of code builds (what
the "compiled once per bucket" tests and the sweep's summary rely on)."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import jax


def enable_cache(directory: str) -> None:
  """JAX's persistent compilation cache: a bucket compiled by an earlier run (or process) is loaded, not compiled
  again (README "Quickstart results" gives the cold-cache compile times this saves)."""
  if directory:
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(directory))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


class CompileCounter:
  """Executables built while the context is open, from JAX's monitoring events: XLA compilations plus loads from
  the persistent compilation cache (which JAX reports under the same compile event)."""

  def __init__(self):
    self.executables, self.cache_hits, self.seconds = 0, 0, 0.0

  @property
  def compiles(self) -> int:
    return self.executables - self.cache_hits

  def _duration(self, event: str, duration: float, **kwargs: Any) -> None:
    del kwargs
    if event == '/jax/core/compile/backend_compile_duration':
      self.executables += 1
      self.seconds += duration

  def _event(self, event: str, **kwargs: Any) -> None:
    del kwargs
    self.cache_hits += event == '/jax/compilation_cache/cache_hits'

  @contextlib.contextmanager
  def counting(self) -> Iterator['CompileCounter']:
    jax.monitoring.register_event_duration_secs_listener(self._duration)
    jax.monitoring.register_event_listener(self._event)
    try:
      yield self
    finally:
      jax.monitoring.unregister_event_duration_listener(self._duration)
      jax.monitoring.unregister_event_listener(self._event)
