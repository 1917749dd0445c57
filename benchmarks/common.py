"""Helpers shared by the benchmark scripts: a matmul ceiling, a timer, table printing and JSON results.

Every benchmark is an absl program; `define_common_flags()` adds `--out` (the JSON result path, default
benchmarks/results/<name>.json, a git-ignored directory) and `--ceiling_sizes`. Timings are medians of repeated
calls after warm-up, each call ended by `block_until_ready`, so one noisy call (another process on the machine) does
not move the figure much; the machine load (`os.getloadavg`) is recorded next to the results.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')


def define_common_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('out', None, 'Where to write the JSON result (default benchmarks/results/<name>.json).')
  flags.DEFINE_list('ceiling_sizes', ['2048', '4096'], 'Square f32 matmul sizes for the GFLOP/s ceiling.')
  flags.DEFINE_integer('ceiling_repeats', 5, 'Timed calls per ceiling matmul (median).')


def block(tree: Any) -> Any:
  return jax.tree_util.tree_map(lambda a: a.block_until_ready() if hasattr(a, 'block_until_ready') else a, tree)


def time_call(fn: Callable[..., Any], *args: Any, repeats: int = 5, warmup: int = 1,
              min_time: float = 0.0) -> dict[str, float]:
  """Median wall seconds of `fn(*args)` over `repeats` timed calls (at least `min_time` s in all), after `warmup`.

  Returns {'median', 'min', 'max', 'n'}; the output of every call is waited for with `block_until_ready`.
  """
  for _ in range(warmup):
    block(fn(*args))
  times: list[float] = []
  start = time.perf_counter()
  while len(times) < repeats or time.perf_counter() - start < min_time:
    t0 = time.perf_counter()
    block(fn(*args))
    times.append(time.perf_counter() - t0)
  return {'median': statistics.median(times), 'min': min(times), 'max': max(times), 'n': len(times)}


def matmul_ceiling(sizes: Sequence[int] = (2048, 4096), repeats: int = 5) -> dict[str, Any]:
  """GFLOP/s of a jitted f32 square matmul (2 n^3 FLOPs) per size; 'gflops' is the best size's median.

  This is the machine's practical dense-compute ceiling through XLA:CPU (its Eigen/oneDNN GEMM), which is what
  every convolution path ends up calling.
  """
  per_size = {}
  mm = jax.jit(jnp.dot)
  for n in sizes:
    rng = np.random.default_rng(n)
    a = jnp.asarray(rng.standard_normal((n, n), np.float32))
    b = jnp.asarray(rng.standard_normal((n, n), np.float32))
    t = time_call(mm, a, b, repeats=repeats, warmup=1)
    per_size[str(n)] = 2 * n ** 3 / t['median'] / 1e9
  return {'gflops': max(per_size.values()), 'by_size': per_size}


def memory_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
  """GB/s of a jitted elementwise pass over a large f32 array (read once, written once): the ceiling of the
  memory-bound parts of a step (batch norm, activations, depthwise shift-adds)."""
  x = jnp.ones((megabytes * 2 ** 20 // 4,), jnp.float32)
  t = time_call(jax.jit(lambda a: a * 1.0001 + 1.0), x, repeats=repeats, warmup=1)
  return 2 * x.nbytes / t['median'] / 1e9


def cost(compiled: Any) -> dict[str, float]:
  """XLA's own count of FLOPs and bytes accessed by a compiled executable (its HLO cost analysis)."""
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return {'flops': float(analysis.get('flops', 0.0)), 'bytes': float(analysis.get('bytes accessed', 0.0))}


def ceiling_from_flags() -> dict[str, Any]:
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  return matmul_ceiling([int(s) for s in f.ceiling_sizes], f.ceiling_repeats)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
  """Plain-text table. `columns` are (key, header, format spec); a missing value prints as '-'."""
  cells = [[h for _, h, _ in columns]]
  for row in rows:
    line = []
    for key, _, spec in columns:
      v = row.get(key)
      line.append('-' if v is None else format(v, spec))
    cells.append(line)
  widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
  fmt = lambda r: '  '.join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
  out = [fmt(cells[0]), '  '.join('-' * w for w in widths)]
  return '\n'.join(out + [fmt(r) for r in cells[1:]])


def environment() -> dict[str, Any]:
  """What the figures depend on: versions, CPU count, load, allocator, XLA flags."""
  return {
      'time': datetime.datetime.now().isoformat(timespec='seconds'),
      'jax': jax.__version__,
      'backend': jax.default_backend(),
      'devices': [str(d) for d in jax.devices()],
      'cpu_count': os.cpu_count(),
      'machine': platform.machine(),
      'loadavg_at_end': os.getloadavg(),
      'ld_preload': os.environ.get('LD_PRELOAD', ''),
      'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'argv': sys.argv,
  }


def write_result(name: str, payload: dict[str, Any], out: str | None = None) -> str:
  """Writes `payload` plus `environment()` as JSON to `out` (default benchmarks/results/<name>.json)."""
  path = out or os.path.join(RESULTS_DIR, f'{name}.json')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as fh:
    json.dump({'benchmark': name, 'environment': environment(), **payload}, fh, indent=2, default=float)
    fh.write('\n')
  return path
