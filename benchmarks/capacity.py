"""What capacity buckets cost and save: step speed against exact slicing, and compiled programs per recipe.

  python benchmarks/capacity.py                                   # both settings, default capacity sets
  python benchmarks/capacity.py --settings=small --capacity_sets=0.5/0.75/1,0.375/0.5/0.625/0.75/0.875/1

step: the same sampled MutualNet steps (the official uniform sampler, a fixed seed) through the capacity programs
  and through exact programs (one per sampled width and resolution); img/s of each after every program is compiled,
  and the slowdown the padding costs.
programs: the training programs each recipe compiles (sampler buckets), with capacities and with the old grid
  (one exact program per grid width), and the quickstart's cold compile time of all its programs, both ways.
Settings as benchmarks/train_step.py: paper (MobileNet v1 at ImageNet shape, batch 32, resolutions 224-128) and
small (the Fashion-MNIST quickstart model, batch 128, resolutions 28-16).
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import common, step_settings  # noqa: E402
from benchmarks.step_settings import SETTINGS  # noqa: E402
from configs import default, mobilenet_v1_imagenet, mobilenet_v1_wide_imagenet, mobilenet_v2_imagenet  # noqa: E402
from mutualnet_jax import compilation, parallel, train  # noqa: E402
from mutualnet_jax.cli import run_cli  # noqa: E402
from mutualnet_jax.sampling import Sampler  # noqa: E402

RECIPES = {'quickstart (configs/default.py)': default.get_config,
           'mobilenet_v1_imagenet': mobilenet_v1_imagenet.get_config,
           'mobilenet_v2_imagenet': mobilenet_v2_imagenet.get_config,
           'mobilenet_v1_wide_imagenet': mobilenet_v1_wide_imagenet.get_config}

flags.DEFINE_list('settings', ['small', 'paper'], f'Which of {sorted(SETTINGS)}.')
flags.DEFINE_list('capacity_sets', ['0.5/0.75/1', '0.4/0.55/0.7/0.85/1'], 'Capacity sets to time, "/"-separated.')
flags.DEFINE_integer('plans', 8, 'Distinct sampled steps (steps 0..plans-1 of seed 0), each timed in rounds.')
flags.DEFINE_integer('rounds', 3, 'Timed passes over the plans (median step time over all).')
flags.DEFINE_list('parts', ['programs', 'step'], 'programs and/or step.')
common.define_common_flags()
FLAGS = flags.FLAGS


def _trainer(config, setting: str) -> train.Trainer:
  spec, size = SETTINGS[setting], max(step_settings.resolutions(setting))
  return train.Trainer(config, parallel.make_mesh(), channels=spec['channels'], image_size=size, total_steps=1000,
                       steps_per_epoch=1000)


def time_steps(setting: str, capacities: tuple[float, ...], plans: list) -> dict:
  """Compiles every program the plans need, then the median seconds per step over `rounds` passes."""
  config = step_settings.config(setting, capacities)
  trainer = _trainer(config, setting)
  spec = SETTINGS[setting]
  size = max(step_settings.resolutions(setting))
  rng = np.random.default_rng(0)
  batch = parallel.global_batch({
      'image': rng.standard_normal((spec['batch'], size, size, spec['channels']), np.float32),
      'label': rng.integers(0, spec['model']['num_classes'], spec['batch']).astype(np.int32)}, trainer.mesh)
  holder = {'state': trainer.init_state(0)}
  start = time.perf_counter()
  for plan in plans:  # compile (and run once) every program the plans use
    holder['state'], _ = trainer.step(holder['state'], batch, plan)
  common.block(holder['state'])
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(FLAGS.rounds):
    for plan in plans:
      t0 = time.perf_counter()
      holder['state'], _ = trainer.step(holder['state'], batch, plan)
      common.block(holder['state'].params)
      times.append(time.perf_counter() - t0)
  median = float(np.median(times))
  return {'setting': setting, 'capacities': '/'.join(f'{c:g}' for c in capacities) or 'exact',
          'programs': trainer.steps.num_compiled, 'first_pass_s': compile_s, 'step_s': median,
          'img_per_s': spec['batch'] / median}


def step_part() -> list[dict]:
  rows = []
  for setting in FLAGS.settings:
    sampler = Sampler(step_settings.config(setting, (1.0,)))
    plans = [sampler.plan(step) for step in range(FLAGS.plans)]
    exact = time_steps(setting, (), plans)
    rows.append(exact)
    for spec in FLAGS.capacity_sets:
      row = time_steps(setting, tuple(float(c) for c in spec.split('/')), plans)
      row['slowdown'] = row['step_s'] / exact['step_s'] - 1
      rows.append(row)
  return rows


def program_part() -> list[dict]:
  rows = []
  for name, get_config in RECIPES.items():
    config = get_config()
    grid = get_config()
    grid.width_sampling, grid.capacities = 'grid', ()
    rows.append({'recipe': name, 'capacities': '/'.join(f'{c:g}' for c in config.capacities),
                 'programs': len(Sampler(config).buckets()), 'grid_programs': len(Sampler(grid).buckets()),
                 'grid_step': grid.width_step})
  # The quickstart's cold compile of every program, both ways, each with a fresh persistent cache.
  spec = SETTINGS['small']
  for label, capacities in (('capacities', default.get_config().capacities), ('grid', ())):
    config = default.get_config()
    config.capacities, config.width_sampling = capacities, 'uniform' if capacities else 'grid'
    compilation.enable_cache(tempfile.mkdtemp(prefix='xla_cache_'))
    trainer = train.Trainer(config, parallel.make_mesh(), channels=spec['channels'], image_size=28, total_steps=1,
                            steps_per_epoch=1)
    buckets = trainer.sampler.buckets()
    start = time.perf_counter()
    for bucket in buckets:
      trainer.steps.programs(bucket, False)
    rows[0][f'quickstart_compile_{label}_s'] = time.perf_counter() - start
    rows[0][f'quickstart_programs_{label}'] = len(buckets)
  return rows


def main(argv):
  del argv
  result = {}
  if 'programs' in FLAGS.parts:
    result['programs'] = program_part()
    print(common.format_table(result['programs'], [
        ('recipe', 'recipe', 's'), ('capacities', 'capacities', 's'), ('programs', 'programs', 'd'),
        ('grid_step', 'old grid step', 'g'), ('grid_programs', 'old grid programs', 'd')]))
    q = result['programs'][0]
    print(f"quickstart cold compile: {q['quickstart_programs_capacities']} programs {q['quickstart_compile_capacities_s']:.1f} s"
          f" vs {q['quickstart_programs_grid']} grid programs {q['quickstart_compile_grid_s']:.1f} s "
          f"({q['quickstart_compile_capacities_s'] / q['quickstart_compile_grid_s']:.2f}x; target <= 1.5x)")
  if 'step' in FLAGS.parts:
    result['step'] = step_part()
    print(common.format_table(result['step'], [
        ('setting', 'setting', 's'), ('capacities', 'capacities', 's'), ('programs', 'programs', 'd'),
        ('first_pass_s', 'compile+first pass s', '.1f'), ('img_per_s', 'img/s', '.1f'),
        ('slowdown', 'vs exact', '+.1%')]))
  print('devices:', jax.devices(), 'wrote', common.write_result('capacity', result, FLAGS.out))


if __name__ == '__main__':
  run_cli(app, main)
