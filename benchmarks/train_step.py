"""Speed and memory of a full MutualNet training step, side by side with the PyTorch peer, in one run.

  python benchmarks/train_step.py                                # both settings: this project (tcmalloc) vs PyTorch
  python benchmarks/train_step.py --variants=tcmalloc,glibc,pure_jax --settings=small
  python benchmarks/train_step.py --quick                        # small setting, 2 timed steps: a smoke run
  python benchmarks/train_step.py --repeats=3                    # 3 interleaved rounds (peer, project, ...): medians
  python benchmarks/train_step.py --repeats=3 --other=../before  # also another checkout's step, interleaved

Settings (fixed buckets, so every run times the same work; presets of ../shared/peers/torch_mutualnet_step.py):
  paper: MobileNet v1, ImageNet shape, batch 32, buckets (1.0,224) (0.25,128) (0.5,160) (0.75,192)
  small: the Fashion-MNIST quickstart model, batch 128, buckets (1.0,28) (0.25,16) (0.5,20) (0.75,24)
Variants of this project: tcmalloc (what main.py runs under), glibc (the system allocator), thp (glibc on transparent
huge pages), pure_jax (tcmalloc without the native depthwise kernels: MUTUALNET_NATIVE=0), tcmalloc_default_release
(tcmalloc at gperftools' default TCMALLOC_RELEASE_RATE=1 instead of main.py's 10), tcmalloc_no_release (release
rate 0). Each (setting, variant) and the peer run in their own subprocess, one after the other, so peak memory is each
one's own.

Reported per row: img/s (the median step over at least --peer_min_time seconds, the peer's own window), the ratio
to the peer's img/s measured in the same run, achieved GFLOP/s (training = 6 x MACs per image) as a fraction of a
matmul ceiling measured in the same process, compile seconds of every bucket with a cold and a warm persistent cache,
peak RSS over the process (compilation included), the resident memory while stepping and the pages faulted in per
step.
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
from benchmarks.step_settings import SETTINGS  # noqa: E402
from mutualnet_jax import allocator as malloc  # noqa: E402
from mutualnet_jax.cli import run_cli  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {  # name: (MUTUALNET_MALLOC, extra environment)
    'tcmalloc': ('tcmalloc', {}),
    'glibc': ('system', {}),
    'thp': ('hugepages', {}),
    'pure_jax': ('tcmalloc', {'MUTUALNET_NATIVE': '0'}),
    'tcmalloc_default_release': ('tcmalloc', {'TCMALLOC_RELEASE_RATE': '1'}),  # gperftools' own release rate
    'tcmalloc_no_release': ('tcmalloc', {'TCMALLOC_RELEASE_RATE': '0'}),  # pages once used stay mapped
    # YNNPACK also takes the elementwise ops around the matmuls (XLA's default gives it the matmuls alone).
    'ynn_eltwise': ('tcmalloc', {'XLA_FLAGS': '--xla_cpu_experimental_ynn_fusion_type=dot,eltwise'}),
}

flags.DEFINE_list('settings', ['paper', 'small'], f'Which of {sorted(SETTINGS)}.')
flags.DEFINE_list('variants', ['tcmalloc'], f'Which of {sorted(VARIANTS)}.')
flags.DEFINE_integer('steps', 8, 'At least this many timed steps (median) after one warm-up step.')
flags.DEFINE_string('peer', os.path.join(os.path.dirname(REPO), 'shared', 'peers', 'torch_mutualnet_step.py'),
                    'The PyTorch peer script; skipped with a message when it or torch is missing.')
flags.DEFINE_string('peer_python', sys.executable, 'Python interpreter with torch for the peer.')
flags.DEFINE_float('peer_min_time', 20.0, 'Seconds the peer times its step for, and this project too (the same window '
                   'on both sides: a few seconds of a noisy machine cannot decide one side alone).')
flags.DEFINE_integer('repeats', 1, 'Rounds, interleaved (peer, then each variant, per round): the table reports each '
                     "row's median over the rounds and its spread; one noisy run cannot decide a ratio.")
flags.DEFINE_string('other', '', 'Another checkout of this project (a directory): its step is timed as variant '
                    "'other' in every round, under tcmalloc, beside this one's (before/after comparisons; a checkout "
                    'before 47d3590 times its step over --steps alone, not the peer\'s window).')
flags.DEFINE_bool('quick', False, 'Small setting, tcmalloc, 2 timed steps, no peer: a smoke run.')
flags.DEFINE_string('worker', '', 'Internal: run one setting in this process and print JSON.')
common.define_common_flags()
FLAGS = flags.FLAGS


def _resident_gib() -> float:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 30


def run_one(setting: str) -> dict:
  """Builds the Trainer for `setting`, compiles every bucket (cold cache, then warm) and times the step."""
  import jax  # noqa: PLC0415  the worker process only: the parent must not initialise JAX or pick an allocator
  import numpy as np  # noqa: PLC0415
  from benchmarks import step_settings  # noqa: PLC0415
  from mutualnet_jax import compilation, native, profile  # noqa: PLC0415

  spec = SETTINGS[setting]
  ceiling = common.ceiling_from_flags()

  compilation.enable_cache(tempfile.mkdtemp(prefix='xla_cache_'))
  compile_s, hlo = {}, {}
  for label in ('cold', 'warm'):  # a fresh Trainer each time: the second compile can only hit the disk cache
    trainer, plan, batch = step_settings.fixed_step(setting)
    subnets = (plan.teacher, *plan.students)
    per_bucket = {}
    for i, s in enumerate(subnets):
      t0 = time.perf_counter()
      hlo[f'{s.width}@{s.resolution}'] = common.cost(trainer.steps.programs(trainer.sampler.bucket(s), i == 0))
      per_bucket[f'{s.width}@{s.resolution}'] = time.perf_counter() - t0
    compile_s[label] = {'per_bucket': per_bucket, 'total': sum(per_bucket.values())}
  bandwidth = common.memory_bandwidth()

  holder, resident = {'state': trainer.init_state(0)}, []

  def step():
    holder['state'], metrics = trainer.step(holder['state'], batch, plan)
    return holder['state'].params, metrics

  common.block(step())
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  timing = common.time_call(lambda: (step(), resident.append(_resident_gib()))[0], repeats=FLAGS.steps, warmup=1,
                            min_time=FLAGS.peer_min_time)
  # Pages first touched while stepping (each a kernel trap, dearer in a VM): what the allocator's release costs.
  faults_per_step = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (timing['n'] + 1)
  macs = sum(profile.count(trainer.model, s.width, s.resolution, spec['channels'])[0] for s in subnets)
  img_s = spec['batch'] / timing['median']
  gflops = 6 * macs * img_s / 1e9
  # XLA's per-op operand+result bytes: an upper bound on memory traffic (fusions that stay in cache count too).
  step_bytes = sum(c['bytes'] for c in hlo.values())
  return {'setting': setting, 'batch': spec['batch'], 'buckets': [f'{s.width}@{s.resolution}' for s in subnets],
          'native_depthwise': native.available(jax.numpy.zeros((1,), np.float32)),
          'step_s': timing['median'], 'img_per_s': img_s, 'macs_per_image_all_subnets': macs, 'gflops': gflops,
          'ceiling_gflops': ceiling['gflops'], 'ceiling_frac': gflops / ceiling['gflops'],
          'bandwidth_gbs': bandwidth, 'hlo_cost_per_bucket': hlo, 'step_gbytes': step_bytes / 1e9,
          'compile_cold_s': compile_s['cold']['total'], 'compile_warm_s': compile_s['warm']['total'],
          'compile_per_bucket_cold_s': compile_s['cold']['per_bucket'],
          'compile_per_bucket_warm_s': compile_s['warm']['per_bucket'],
          'peak_rss_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
          'stepping_rss_gib': max(resident), 'page_faults_per_step': faults_per_step,
          'timed_steps': timing['n']}


def run_peer(setting: str) -> dict | None:
  """The PyTorch peer at the same setting (channels_last, 2 threads), or None with a message when unavailable."""
  if not os.path.exists(FLAGS.peer):
    print(f'skipping the PyTorch peer: {FLAGS.peer} not found (pass --peer)')
    return None
  probe = subprocess.run([FLAGS.peer_python, '-c', 'import torch'], capture_output=True, text=True, check=False)
  if probe.returncode:
    print(f'skipping the PyTorch peer: torch is not importable by {FLAGS.peer_python} (pass --peer_python)')
    return None
  spec = SETTINGS[setting]
  out = subprocess.run([FLAGS.peer_python, FLAGS.peer, '--preset', spec['peer'], '--batch', str(spec['batch']),
                        '--cl', '--min-time', str(FLAGS.peer_min_time), '--threads', str(os.cpu_count() or 2)],
                       capture_output=True, text=True, check=False)
  lines = [line for line in out.stdout.splitlines() if line.startswith('{')]
  if out.returncode or not lines:
    raise RuntimeError(f'peer {setting} failed:\n{out.stderr[-3000:]}')
  peer = json.loads(lines[-1])
  return {'setting': setting, 'variant': f"pytorch {peer['torch']} channels_last", 'img_per_s': peer['img_s'],
          'peak_rss_gib': peer['peak_rss_mib'] / 1024, 'step_s': peer['step_ms'] / 1e3}


def run_variant(setting: str, variant: str, steps: int, min_time: float, lib: str | None) -> dict | None:
  """One (setting, variant) in its own worker process (this checkout's, or --other's for variant 'other')."""
  choice, extra = VARIANTS.get(variant, VARIANTS['tcmalloc'])
  if choice == 'tcmalloc' and lib is None:
    print(f'skipping {variant}: tcmalloc is not installed (apt-get install libgoogle-perftools4)')
    return None
  base = {**os.environ, **extra}  # the allocator's settings build on the variant's (GLIBC_TUNABLES, release rate)
  env = malloc.environment(choice, base, lib) or base
  root = os.path.abspath(FLAGS.other) if variant == 'other' else REPO
  cmd = [sys.executable, os.path.join(root, 'benchmarks', 'train_step.py'), f'--worker={setting}', f'--steps={steps}',
         f'--peer_min_time={min_time}', f'--ceiling_sizes={",".join(FLAGS.ceiling_sizes)}']
  out = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, check=False)
  lines = [line for line in out.stdout.splitlines() if line.startswith('RESULT ')]
  if out.returncode or not lines:
    raise RuntimeError(f'{setting}/{variant} failed:\n{out.stderr[-3000:]}')
  return {**json.loads(lines[-1][len('RESULT '):]), 'variant': variant}


def median_rows(rounds: list[list[dict]]) -> list[dict]:
  """Per (setting, variant): the round with the median img/s, its ratios replaced by the medians of the per-round
  ratios (each measured against the peer of its own round), plus the img/s and ratio spreads over the rounds."""
  by_key: dict[tuple[str, str], list[dict]] = {}
  for rows in rounds:
    for row in rows:
      by_key.setdefault((row['setting'], row['variant']), []).append(row)
  out = []
  for group in by_key.values():
    group = sorted(group, key=lambda r: r['img_per_s'])
    row = dict(group[len(group) // 2])
    row['rounds'] = len(group)
    row['img_per_s_spread'] = f"{group[0]['img_per_s']:.1f}-{group[-1]['img_per_s']:.1f}"
    for key in ('vs_peer', 'rss_vs_peer', 'peak_rss_gib'):
      values = sorted(r[key] for r in group if key in r)
      if values:
        row[key] = values[len(values) // 2]
        row[f'{key}_spread'] = f'{values[0]:.2f}-{values[-1]:.2f}'
    out.append(row)
  return out


def main(argv):
  del argv
  if FLAGS.worker:
    print('RESULT ' + json.dumps(run_one(FLAGS.worker)))
    return
  settings, variants, with_peer = FLAGS.settings, FLAGS.variants, True
  steps, min_time = FLAGS.steps, FLAGS.peer_min_time
  if FLAGS.quick:
    settings, variants, with_peer = ['small'], ['tcmalloc'], False
    steps, min_time = 2, 0.0
  lib = malloc.find_tcmalloc()
  rounds = [[] for _ in range(FLAGS.repeats)]
  for setting in settings:
    for rows in rounds:  # interleaved: each round times the peer and every variant once
      peer = run_peer(setting) if with_peer else None
      for variant in variants + (['other'] if FLAGS.other else []):
        row = run_variant(setting, variant, steps, min_time, lib)
        if row is None:
          continue
        if peer:
          row['vs_peer'] = row['img_per_s'] / peer['img_per_s']
          row['rss_vs_peer'] = row['peak_rss_gib'] / peer['peak_rss_gib']
        rows.append(row)
      if peer:
        rows.append(peer)
  rows = median_rows(rounds)
  print(common.format_table(rows, [
      ('setting', 'setting', 's'), ('variant', 'variant', 's'), ('img_per_s', 'img/s', '.1f'),
      ('img_per_s_spread', 'img/s spread', 's'), ('vs_peer', 'x peer', '.2f'),
      ('vs_peer_spread', 'x peer spread', 's'), ('ceiling_frac', 'of ceiling', '.0%'),
      ('compile_cold_s', 'compile cold s', '.1f'), ('compile_warm_s', 'compile warm s', '.1f'),
      ('peak_rss_gib', 'peak RSS GiB', '.2f'), ('stepping_rss_gib', 'RSS stepping', '.2f'),
      ('page_faults_per_step', 'faults/step', '.0f'),
      ('rss_vs_peer', 'peak x peer', '.2f')]))
  ceilings = ', '.join(f"{r['setting']}/{r['variant']}: {r['ceiling_gflops']:.0f}" for r in rows
                       if 'ceiling_gflops' in r)
  print('matmul ceiling GFLOP/s:', ceilings)
  for r in rows:
    if 'vs_peer' in r:
      print(f"{r['setting']}/{r['variant']}: {r['vs_peer']:.2f}x the peer's img/s (floor 1.0x, goal 1.5x), peak "
            f"memory {r['rss_vs_peer']:.2f}x the peer's (target <= 1.5x)")
  print('wrote', common.write_result('train_step', {'rows': rows, 'repeats': FLAGS.repeats,
                                                    'rounds': rounds}, FLAGS.out))


if __name__ == '__main__':
  run_cli(app, main)
