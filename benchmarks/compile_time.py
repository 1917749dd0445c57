"""Where the quickstart's compile time goes: every training program it precompiles, traced/lowered and compiled one
at a time (seconds of each phase), then the whole set precompiled as `main.py` does (threads), cold and with a warm
persistent cache, in one process.

  python benchmarks/compile_time.py                         # configs/default.py (the quickstart)
  python benchmarks/compile_time.py --threads=1,2 --serial=false
  python benchmarks/compile_time.py --set=capacities='(1.0,)'   # any config field, a Python literal

Run it under the allocator main.py uses (MUTUALNET_MALLOC as in main.py); lowering holds the GIL, XLA's compile does
not, so threads overlap compiles but not lowerings.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from benchmarks import common  # noqa: E402
from mutualnet_jax.cli import run_cli  # noqa: E402

flags.DEFINE_list('threads', ['2'], 'Thread counts for the precompile-as-main.py-does measurement (cold cache).')
flags.DEFINE_bool('serial', True, 'Also lower and compile each program alone, one after the other (per phase).')
flags.DEFINE_bool('warm', True, 'Also precompile again with the persistent cache filled by the cold run.')
flags.DEFINE_multi_string('set', [], 'Config overrides field=value (python literal), e.g. --set=capacities=(0.5,1.0)')
common.define_common_flags()
FLAGS = flags.FLAGS


def quickstart_trainer(overrides):
  import ast  # noqa: PLC0415
  from configs import default  # noqa: PLC0415
  from mutualnet_jax import parallel, train  # noqa: PLC0415
  config = default.get_config()
  for item in overrides:
    key, value = item.split('=', 1)
    node = config
    *path, last = key.split('.')
    for p in path:
      node = node[p]
    node[last] = ast.literal_eval(value)
  trainer = train.Trainer(config, parallel.make_mesh(), channels=1, image_size=28, total_steps=234,
                          steps_per_epoch=468)
  return trainer


def main(argv):
  del argv
  import jax  # noqa: PLC0415
  from mutualnet_jax import compilation  # noqa: PLC0415
  rows, result = [], {}
  trainer = quickstart_trainer(FLAGS.set)
  buckets = trainer.sampler.buckets()
  keys = [(b, i == 0) for i, b in enumerate(buckets)]
  print(f'{len(keys)} training programs')
  if FLAGS.serial:
    _cache(False)
    for bucket, first in keys:
      t0, c0 = time.perf_counter(), time.process_time()
      lowered = _lower(trainer, bucket, first)
      t1 = time.perf_counter()
      lowered.compile()
      t2, c2 = time.perf_counter(), time.process_time()
      rows.append({'bucket': f'{bucket.width:g}@{bucket.resolution} {bucket.loss}{" masked" if bucket.masked else ""}'
                             f'{" first" if first else ""}', 'lower_s': t1 - t0, 'compile_s': t2 - t1,
                   'cpu_s': c2 - c0,
                   'hlo_kb': len(lowered.as_text()) / 1024})
      print(rows[-1], flush=True)
    result['serial'] = rows
    result['serial_lower_s'] = sum(r['lower_s'] for r in rows)
    result['serial_compile_s'] = sum(r['compile_s'] for r in rows)
    result['serial_cpu_s'] = sum(r['cpu_s'] for r in rows)
    print(common.format_table(rows, [('bucket', 'program', 's'), ('lower_s', 'trace+lower s', '.2f'),
                                     ('compile_s', 'XLA compile s', '.2f'), ('cpu_s', 'CPU s (both)', '.2f'),
                                     ('hlo_kb', 'HLO text KiB', '.0f')]))
    print(f"one by one: lowering {result['serial_lower_s']:.1f} s + compiling {result['serial_compile_s']:.1f} s wall, "
          f"{result['serial_cpu_s']:.1f} s CPU")
    _cache(True)
  for threads in FLAGS.threads:
    compilation.enable_cache(tempfile.mkdtemp(prefix='xla_cache_'))
    _cache(True)
    for label in ('cold', 'warm') if FLAGS.warm else ('cold',):
      fresh = quickstart_trainer(FLAGS.set)
      cpu = time.process_time()
      with compilation.CompileCounter().counting() as counter:
        wall = fresh.steps.precompile(fresh.sampler.buckets(), int(threads))
      cpu = time.process_time() - cpu
      result[f'precompile_{label}_threads{threads}'] = {'wall_s': wall, 'cpu_s': cpu,
                                                         'executables': counter.executables,
                                                         'cache_hits': counter.cache_hits,
                                                         'compile_seconds': counter.seconds}
      print(f'precompile {label} cache, {threads} threads: {wall:.1f} s wall, {cpu:.1f} s CPU, '
            f'{counter.executables} executables, {counter.cache_hits} cache hits, {counter.seconds:.1f} s in '
            'backend compiles (summed over threads)', flush=True)
  print('wrote', common.write_result('compile_time', result, FLAGS.out))


def _cache(enabled: bool) -> None:
  """Turns JAX's persistent cache on or off for the following compiles (JAX memoizes whether it uses the cache at
  its first compile, so the memo is reset)."""
  import jax  # noqa: PLC0415
  from jax._src import compilation_cache  # noqa: PLC0415
  jax.config.update('jax_enable_compilation_cache', enabled)
  compilation_cache.reset_cache()


def _lower(trainer, bucket, first):
  """The same jit(...).lower(...) as SubnetSteps._compile, stopping before XLA's compile."""
  return trainer.steps.lower(bucket, first)


if __name__ == '__main__':
  run_cli(app, main)
