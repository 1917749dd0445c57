"""What switching configuration costs in the budget-adaptive network (mutualnet_jax/adaptive.py), at batch 1.

For every configuration the network holds, interleaved over --rounds rounds so that machine load hits all alike, the
median wall time (output waited for) of:
  program:  that configuration's raw-image program, compiled ahead of time, called directly (the floor; like a
            switch, it runs right after another configuration ran);
  exported: the configuration's ExportedModel called on the images (the per-configuration API: checks on the device);
  same:     the adaptive call when the previous call ran the same configuration;
  switch:   the adaptive call when the previous call ran another configuration (each call a switch).
The switch's overhead is the median over rounds of `switch - program` within a round (paired, so that load drifting
between rounds cancels). Its host-side parts are timed alone too: choosing the row under a budget (`choose`) and the
checks and float32 conversion of the images (`checks`).

  python benchmarks/adaptive_switch.py --workdir=runs/fashion_mnist   # a trained and swept workdir
  python benchmarks/adaptive_switch.py                                # a temporary run, see below

Without --workdir it times the quickstart model (configs/default.py: MobileNet v1, 28 px) untrained, in a temporary
workdir with a table of made-up accuracies over widths {0.35, 1.0} x resolutions {16, 28} (exact MACs): timing does
not depend on the weights, and a budget in MFLOPs picks each configuration. It reads Fashion-MNIST from the TFDS
data_dir to calibrate BN (256 images per configuration). Results: a table and benchmarks/results/adaptive_switch.json.
"""
from __future__ import annotations

import contextlib
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

if __package__ in (None, ''):  # `python benchmarks/adaptive_switch.py` from the repository root
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # pylint: disable=g-import-not-at-top
import numpy as np
import optax

import mutualnet_jax
from benchmarks import common
from configs import default
from mutualnet_jax import checkpointing, parallel, profile, query, workdir as workdir_lib
from mutualnet_jax.cli import run_cli
from mutualnet_jax.models import get_model
from mutualnet_jax.train_state import create_optimizer, init_state

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'A trained and swept workdir (default: a temporary untrained quickstart run).')
flags.DEFINE_integer('rounds', 300, 'Timed calls of each kind per configuration (median reported).')
common.define_common_flags()

METHODS = ('program', 'exported', 'same', 'switch')
WIDTHS, RESOLUTIONS = (0.35, 1.0), (16, 28)


@contextlib.contextmanager
def temporary_run() -> Iterator[str]:
  """An untrained checkpoint of configs/default.py with a made-up table: accuracy grows with MACs, so every
  configuration is on the Pareto set and a budget of its own MFLOPs picks it."""
  with tempfile.TemporaryDirectory(prefix='adaptive_switch_') as path:
    config = default.get_config()
    config.calibration_images, config.calibration_batch_size = 256, 128
    model = get_model(config.model)
    tx = create_optimizer(config, optax.constant_schedule(0.0))
    state = init_state(model, tx, 0, 1, parallel.make_mesh())
    with checkpointing.Checkpoints(path, keep=1, expected=checkpointing.fingerprint(config, 1)) as ckpt:
      ckpt.save(1, state, {'step': 1})
    workdir_lib.save_config(config, path)
    costs = sorted(profile.count(model, w, r, channels=1) + (w, r) for w in WIDTHS for r in RESOLUTIONS)
    rows = [query.Row(w, r, macs, params, 0.5 + 0.1 * i, 0.9, 0.1 * (i + 1))
            for i, (macs, params, w, r) in enumerate(costs)]
    query.write_table(rows, path, {'checkpoint_step': 1, 'made_up': True})
    yield path


def _seconds(fn: Any, *args: Any, **kwargs: Any) -> float:
  start = time.perf_counter()
  fn(*args, **kwargs).block_until_ready()
  return time.perf_counter() - start


def measure(workdir: str, rounds: int) -> dict[str, Any]:
  """Medians in ms per configuration and method, plus the overhead of a switch over the direct program call."""
  start = time.perf_counter()
  net = mutualnet_jax.open(workdir).adaptive()
  build_seconds = time.perf_counter() - start
  images = np.random.default_rng(0).integers(0, 256, net.input_shape, dtype=np.uint8)
  batch = images.astype(np.float32)
  configs = net.configurations
  budgets = [{'budget_mflops': c.row.macs / 1e6} for c in configs]
  times = {(i, m): [] for i in range(len(configs)) for m in METHODS}
  for c, budget in zip(configs, budgets):  # warm-up: each kind once
    c(batch).block_until_ready()
    c.network(images).block_until_ready()
    net(images, **budget).block_until_ready()
  for _ in range(rounds):
    for i, c in enumerate(configs):
      times[i, 'program'].append(_seconds(c, batch))
      times[i, 'exported'].append(_seconds(c.network, images))
      net(images, **budgets[i]).block_until_ready()
      times[i, 'same'].append(_seconds(net, images, **budgets[i]))
    if len(configs) > 1:  # the previous call ran the last configuration: each call below changes configuration
      for i in range(len(configs)):
        times[i, 'switch'].append(_seconds(net, images, **budgets[i]))
  host = {'choose_ms': functools.partial(net.choose, **budgets[0]),
          'checks_ms': functools.partial(net._batch, images)}  # pylint: disable=protected-access  (its cost alone)
  host = {k: 1e3 * common.time_call(fn, repeats=rounds)['median'] for k, fn in host.items()}
  rows = []
  for i, c in enumerate(configs):
    medians = {m: 1e3 * statistics.median(times[i, m]) if times[i, m] else None for m in METHODS}
    paired = [s - p for s, p in zip(times[i, 'switch'], times[i, 'program'])]
    rows.append({'width': c.row.width, 'resolution': c.row.resolution, 'mflops': c.row.macs / 1e6, **medians,
                 'overhead': 1e3 * statistics.median(paired) if paired else None})
  overheads = [r['overhead'] for r in rows if r['overhead'] is not None]
  return {'configurations': rows, 'input_shape': list(net.input_shape), 'rounds': rounds,
          'build_seconds': build_seconds, **host,
          'median_overhead_ms': statistics.median(overheads) if overheads else None}


def main(argv: Any) -> None:
  del argv
  with contextlib.ExitStack() as stack:
    workdir = FLAGS.workdir or stack.enter_context(temporary_run())
    result = measure(workdir, FLAGS.rounds)
  print(common.format_table(result['configurations'], [
      ('width', 'width', 'g'), ('resolution', 'res', 'd'), ('mflops', 'MFLOPs', '.3g'),
      ('program', 'program ms', '.3f'), ('exported', 'ExportedModel ms', '.3f'), ('same', 'adaptive same ms', '.3f'),
      ('switch', 'adaptive switch ms', '.3f'), ('overhead', 'switch - program ms (paired)', '.3f')]))
  print(f"median switch overhead {result['median_overhead_ms']:.3f} ms (host side: choose {result['choose_ms']:.4f} "
        f"ms, checks {result['checks_ms']:.4f} ms); {len(result['configurations'])} configurations built and "
        f"compiled in {result['build_seconds']:.1f} s; input {result['input_shape']}")
  path = common.write_result('adaptive_switch', {'workdir': FLAGS.workdir or 'temporary (made-up table)', **result},
                             FLAGS.out)
  print(f'wrote {path}')


if __name__ == '__main__':
  run_cli(app, main)
