"""Speed of a full MutualNet training step (4 sub-networks, summed gradients, one optax update), through `Trainer`.

  python benchmarks/train_step.py                      # paper + small settings, glibc and tcmalloc, cold/warm cache
  python benchmarks/train_step.py --settings=small --allocators=glibc --quick

Settings (fixed buckets, so every run times the same work):
  paper: MobileNet v1, ImageNet shape, batch 32, buckets (1.0,224) (0.25,128) (0.5,160) (0.75,192)
  small: MobileNet v1 small-input variant (Fashion-MNIST config), batch 128, buckets (1.0,28) (0.25,16) (0.5,20)
         (0.75,24)
Reports img/s, compile seconds per bucket and in total with a cold and a warm persistent compilation cache, peak RSS,
and achieved GFLOP/s (training FLOPs = 3 x forward = 6 x MACs per image) as a fraction of a matmul ceiling measured in
the same process. To say what bounds the step it also reports XLA's count of bytes each bucket's executable accesses
(HLO cost analysis; an upper bound on memory traffic), the GB/s that implies and a streaming-bandwidth ceiling
measured in the same process. Each
(setting, allocator) runs in its own subprocess so peak memory and the allocator are its own.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from benchmarks import common  # noqa: E402
from mutualnet_jax import allocator as malloc  # noqa: E402
from mutualnet_jax.cli import run_cli  # noqa: E402

SETTINGS = {
    'paper': dict(model=dict(name='mobilenet_v1', num_classes=1000, num_downsample=5), channels=3, batch=32,
                  buckets=((1.0, 224), (0.25, 128), (0.5, 160), (0.75, 192))),
    'small': dict(model=dict(name='mobilenet_v1', num_classes=10, num_downsample=4), channels=1, batch=128,
                  buckets=((1.0, 28), (0.25, 16), (0.5, 20), (0.75, 24))),
}

flags.DEFINE_list('settings', ['paper', 'small'], f'Which of {sorted(SETTINGS)}.')
flags.DEFINE_list('allocators', ['glibc', 'tcmalloc'], 'glibc and/or tcmalloc (LD_PRELOAD of Debian libtcmalloc).')
flags.DEFINE_integer('steps', 5, 'Timed steps (median) after one warm-up step.')
flags.DEFINE_bool('quick', False, 'Small setting only, glibc only, 2 timed steps: a smoke run.')
flags.DEFINE_string('worker', '', 'Internal: run one setting in this process and print JSON.')
common.define_common_flags()
FLAGS = flags.FLAGS


def run_one(setting: str) -> dict:
  """Builds the Trainer for `setting`, compiles every bucket (cold cache, then warm) and times the step."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  from mutualnet_jax import compilation, parallel, profile, train  # pylint: disable=g-import-not-at-top
  from mutualnet_jax.sampling import StepPlan, Subnet  # pylint: disable=g-import-not-at-top

  spec = SETTINGS[setting]
  config = default.get_config()
  config.model.update(spec['model'])
  config.batch_size = spec['batch']
  config.resolutions = tuple(sorted({r for _, r in spec['buckets']}, reverse=True))
  subnets = [Subnet(f'sub{i}', w, r, 'ce' if i == 0 else 'kd') for i, (w, r) in enumerate(spec['buckets'])]
  plan = StepPlan(subnets[0], tuple(subnets[1:]))
  size = subnets[0].resolution
  mesh = parallel.make_mesh()
  ceiling = common.ceiling_from_flags()

  cache_dir = tempfile.mkdtemp(prefix='xla_cache_')
  compilation.enable_cache(cache_dir)
  compile_s, hlo = {}, {}
  for label in ('cold', 'warm'):  # a fresh Trainer each time: the second compile can only hit the disk cache
    trainer = train.Trainer(config, mesh, channels=spec['channels'], image_size=size, total_steps=1000,
                            steps_per_epoch=1000)
    per_bucket = {}
    for s in subnets:
      t0 = time.perf_counter()
      hlo[f'{s.width}@{s.resolution}'] = common.cost(trainer.steps.compile(s.bucket))
      per_bucket[f'{s.width}@{s.resolution}'] = time.perf_counter() - t0
    compile_s[label] = {'per_bucket': per_bucket, 'total': sum(per_bucket.values())}
  bandwidth = common.memory_bandwidth()

  rng = np.random.default_rng(0)
  batch = parallel.global_batch({
      'image': rng.standard_normal((spec['batch'], size, size, spec['channels']), np.float32),
      'label': rng.integers(0, spec['model']['num_classes'], spec['batch']).astype(np.int32)}, mesh)
  state = trainer.init_state(0)
  holder = {'state': state}

  def step():
    holder['state'], metrics = trainer.step(holder['state'], batch, plan)
    return holder['state'].params, metrics

  timing = common.time_call(step, repeats=FLAGS.steps, warmup=1)
  macs = sum(profile.count(trainer.model, s.width, s.resolution, spec['channels'])[0] for s in subnets)
  img_s = spec['batch'] / timing['median']
  gflops = 6 * macs * img_s / 1e9
  # XLA's per-op operand+result bytes: an upper bound on memory traffic (fusions that stay in cache count too).
  step_bytes = sum(c['bytes'] for c in hlo.values())
  return {'setting': setting, 'batch': spec['batch'], 'buckets': [f'{s.width}@{s.resolution}' for s in subnets],
          'step_s': timing['median'], 'img_per_s': img_s, 'macs_per_image_all_subnets': macs, 'gflops': gflops,
          'ceiling_gflops': ceiling['gflops'], 'ceiling_frac': gflops / ceiling['gflops'],
          'bandwidth_gbs': bandwidth, 'hlo_cost_per_bucket': hlo, 'step_gbytes': step_bytes / 1e9,
          'achieved_gbs': step_bytes / timing['median'] / 1e9, 'hlo_flops_per_byte': sum(
              c['flops'] for c in hlo.values()) / step_bytes,
          'compile_cold_s': compile_s['cold']['total'], 'compile_warm_s': compile_s['warm']['total'],
          'compile_per_bucket_cold_s': compile_s['cold']['per_bucket'],
          'compile_per_bucket_warm_s': compile_s['warm']['per_bucket'],
          'peak_rss_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def main(argv):
  del argv
  if FLAGS.worker:
    print('RESULT ' + json.dumps(run_one(FLAGS.worker)))
    return
  settings, allocators, steps = FLAGS.settings, FLAGS.allocators, FLAGS.steps
  if FLAGS.quick:
    settings, allocators, steps = ['small'], ['glibc'], 2
  rows, lib = [], malloc.find_tcmalloc()
  for setting in settings:
    for allocator in allocators:
      if allocator == 'tcmalloc' and lib is None:
        print('skipping tcmalloc: not installed (apt-get install libgoogle-perftools4)')
        continue
      choice = 'tcmalloc' if allocator == 'tcmalloc' else 'system'
      env = malloc.environment(choice, os.environ, lib) or dict(os.environ)
      cmd = [sys.executable, os.path.abspath(__file__), f'--worker={setting}', f'--steps={steps}',
             f'--ceiling_sizes={",".join(FLAGS.ceiling_sizes)}']
      out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
      lines = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')]
      if out.returncode or not lines:
        raise RuntimeError(f'{setting}/{allocator} failed:\n{out.stderr[-3000:]}')
      rows.append({**json.loads(lines[-1][len('RESULT '):]), 'allocator': allocator})
  print(common.format_table(rows, [
      ('setting', 'setting', 's'), ('allocator', 'alloc', 's'), ('img_per_s', 'img/s', '.1f'),
      ('gflops', 'GFLOP/s', '.1f'), ('ceiling_frac', 'of ceiling', '.0%'), ('step_gbytes', 'GB/step', '.1f'),
      ('achieved_gbs', 'GB/s', '.1f'), ('bandwidth_gbs', 'bw ceiling', '.1f'), ('compile_cold_s', 'compile cold s', '.1f'),
      ('compile_warm_s', 'compile warm s', '.1f'), ('peak_rss_gib', 'peak RSS GiB', '.2f')]))
  print('matmul ceiling GFLOP/s:', ', '.join(f"{r['setting']}/{r['allocator']}: {r['ceiling_gflops']:.0f}"
                                            for r in rows))
  for r in rows:
    per_bucket = ', '.join(f'{b} {c:.1f}/{r["compile_per_bucket_warm_s"][b]:.1f}'
                           for b, c in r['compile_per_bucket_cold_s'].items())
    print(f"{r['setting']}/{r['allocator']}: compile s per bucket cold/warm: {per_bucket}; target >= 40 % of the "
          f"ceiling: {r['ceiling_frac']:.0%} ({'met' if r['ceiling_frac'] >= 0.4 else 'NOT met'})")
  print('wrote', common.write_result('train_step', {'rows': rows}, FLAGS.out))


if __name__ == '__main__':
  run_cli(app, main)
