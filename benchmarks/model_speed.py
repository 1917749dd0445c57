"""MobileNet v1 training (forward+backward) and inference speed of both kernel paths.

For each setting (width, resolution, batch) and kernel path ('xla' = lax.conv everywhere, 'cpu_fast' = shifted
multiply-adds and matmuls, see mutualnet_jax/slim.py) this measures:
  train: jitted gradient of the mean cross-entropy wrt the parameters, BN in train mode (batch statistics);
  infer: jitted logits with BN in eval mode (per-layer statistics of this width passed as 'batch_stats').
It reports images/s, lowering+compile seconds, the achieved GFLOP/s computed from the model's own multiply-adds
(`mutualnet_jax.profile.count`; forward = 2 x MACs per image, training = 3 x forward) and that as a fraction of a
jitted f32 matmul ceiling measured in the same run, plus the cpu_fast/xla speedup. Results go to a table on stdout and
JSON (--out, default benchmarks/results/model_speed.json).

  python benchmarks/model_speed.py                # all three settings, batch 32 (~3 min on 2 cores, mostly xla)
  python benchmarks/model_speed.py --quick        # smoke run, < 1 min
  python benchmarks/model_speed.py --settings=big --impls=cpu_fast --modes=infer
  python benchmarks/model_speed.py --malloc=hugepages   # re-executes itself with glibc's malloc on transparent
                                                       # huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1)

Settings: big = 1.0x at 224 px (ImageNet model, 1000 classes); tiny = 0.25x at 128 px; small = 1.0x at 32 px with
--small_num_downsample stride-2 layers and 10 classes (the CIFAR/Fashion-MNIST variant).
"""
from __future__ import annotations

import math
import os
import resource
import statistics
import sys
import time
from typing import Any, Sequence

if __package__ in (None, ''):  # `python benchmarks/model_speed.py` from the repository root
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from mutualnet_jax import allocator, profile
from mutualnet_jax.cli import run_cli
from mutualnet_jax.models import get_model, init_params

FLAGS = flags.FLAGS
SETTINGS = ('big', 'tiny', 'small')

flags.DEFINE_list('settings', list(SETTINGS), f'Which of {SETTINGS} to run.')
flags.DEFINE_list('impls', ['xla', 'cpu_fast'], 'Kernel paths to compare.')
flags.DEFINE_list('modes', ['train', 'infer'], 'train (fwd+bwd) and/or infer (fwd, BN eval).')
flags.DEFINE_string('model', 'mobilenet_v1', 'Backbone (mutualnet_jax.models.MODELS).')
flags.DEFINE_integer('batch', 32, 'Images per call.')
flags.DEFINE_integer('small_num_downsample', 4, 'Stride-2 layers of the 32-px variant (configs/default.py uses 4).')
flags.DEFINE_integer('min_repeats', 3, 'Timed calls per case at least (median reported).')
flags.DEFINE_integer('max_repeats', 20, 'Timed calls per case at most.')
flags.DEFINE_float('target_seconds', 6.0, 'Timed calls per case are chosen to take about this long (within '
                   '[min_repeats, max_repeats]), estimated from the warm-up call: slow cases get few repeats.')
flags.DEFINE_float('slow_call_seconds', 5.0, 'A case whose warm-up call took longer than this gets --slow_repeats timed '
                   'calls (the xla path trains 1.0-224 at ~1-2 img/s: ~20 s per call of 32).')
flags.DEFINE_integer('slow_repeats', 2, 'Timed calls of a slow case.')
flags.DEFINE_bool('quick', False, 'Smoke run (< 1 min): setting small at batch 4, 2 repeats, a 1024^2 ceiling.')
flags.DEFINE_enum('malloc', 'default', ['default', 'hugepages', 'tcmalloc'],
                  'Allocator setting, applied by re-executing this script: XLA:CPU allocates each call\'s temporaries '
                  'afresh and the kernel faults in every 4 KiB page (a 1.0-224 training step: ~650k faults, about a '
                  'third of the step). hugepages = GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (glibc >= 2.35: transparent '
                  'huge pages for malloc, ~100x fewer faults); tcmalloc = LD_PRELOAD libtcmalloc_minimal.')
common.define_common_flags()


def setting(name: str) -> dict[str, Any]:
  if name == 'big':
    return dict(width=1.0, resolution=224, num_classes=1000, num_downsample=5)
  if name == 'tiny':
    return dict(width=0.25, resolution=128, num_classes=1000, num_downsample=5)
  if name == 'small':
    return dict(width=1.0, resolution=32, num_classes=10, num_downsample=FLAGS.small_num_downsample)
  raise app.UsageError(f'unknown setting {name!r}; choose from {SETTINGS}.')


def _unwrap_sown(tree: Any) -> Any:
  """Sown BN moments as {'mean', 'var'} arrays per layer (a default `sow` stores a tuple per call: keep the last)."""
  if isinstance(tree, tuple):
    return tree[-1]
  if hasattr(tree, 'items'):
    return {k: _unwrap_sown(v) for k, v in tree.items()}
  return tree


def build_fns(model: Any, width: float) -> dict[str, Any]:
  def loss(params, images, labels):
    logits = model.apply({'params': params}, images, width=width, train=True)
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, labels[:, None], axis=1).mean()

  def infer(params, stats, images):
    return model.apply({'params': params, 'batch_stats': stats}, images, width=width, train=False)

  return {'train': jax.jit(jax.value_and_grad(loss)), 'infer': jax.jit(infer)}


def bn_stats(model: Any, params: Any, images: jax.Array, width: float) -> Any:
  """Per-BN-layer {'mean', 'var'} of this width (from a train-mode pass), the shape eval mode reads."""
  _, state = jax.jit(lambda p, x: model.apply({'params': p}, x, width=width, train=True,
                                              mutable=['bn_moments']))(params, images)
  return _unwrap_sown(jax.device_get(state['bn_moments']))


def compile_case(fn: Any, args: Sequence[Any]) -> dict[str, Any]:
  """Lowers and compiles `fn` for `args`, makes the warm-up call and picks the number of timed calls from it."""
  t0 = time.perf_counter()
  lowered = fn.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  common.block(compiled(*args))
  first = time.perf_counter() - t2
  repeats = int(min(FLAGS.max_repeats, max(FLAGS.min_repeats, math.ceil(FLAGS.target_seconds / max(first, 1e-6)))))
  if first > FLAGS.slow_call_seconds:
    repeats = min(repeats, FLAGS.slow_repeats)
  return {'compiled': compiled, 'args': args, 'repeats': repeats, 'times': [], 'faults': 0,
          'info': {'lower_s': t1 - t0, 'compile_s': t2 - t1, 'first_call_s': first}}


def time_interleaved(cases: dict[str, dict[str, Any]]) -> None:
  """Timed calls in rounds over the cases (one call of each per round, until each has its repeats), so that a
  change of machine load during the run affects the compared kernel paths alike; median per case."""
  while any(len(c['times']) < c['repeats'] for c in cases.values()):
    for c in cases.values():
      if len(c['times']) < c['repeats']:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = common.time_call(c['compiled'], *c['args'], repeats=1, warmup=0)
        c['times'].append(t['median'])
        c['faults'] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
  for c in cases.values():
    c['info'].update(median=statistics.median(c['times']), min=min(c['times']), max=max(c['times']),
                     n=len(c['times']), page_faults_per_call=c['faults'] / len(c['times']))


def check_targets(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """The issue's targets at 1.0-224: cpu_fast training >= 5x xla, cpu_fast inference >= 30 % of the ceiling."""
  find = lambda impl, mode: next((r for r in rows if r['setting'] == 'big' and r['impl'] == impl
                                  and r['mode'] == mode), None)
  out: dict[str, Any] = {'lines': []}
  train = find('cpu_fast', 'train')
  if train and train.get('speedup_vs_xla') is not None:
    out['train_speedup'] = train['speedup_vs_xla']
    out['lines'].append(f"target 1.0-224 train cpu_fast >= 5x xla: {train['speedup_vs_xla']:.1f}x "
                        f"({'met' if train['speedup_vs_xla'] >= 5 else 'NOT met'})")
  infer = find('cpu_fast', 'infer')
  if infer:
    out['infer_ceiling_pct'] = infer['ceiling_pct']
    out['lines'].append(f"target 1.0-224 infer cpu_fast >= 30 % of ceiling: {infer['ceiling_pct']:.0f} % "
                        f"({'met' if infer['ceiling_pct'] >= 30 else 'NOT met'})")
  return out


def main(argv: Sequence[str]) -> None:
  del argv
  allocator.use('system' if FLAGS.malloc == 'default' else FLAGS.malloc)  # re-executes once if it must
  if FLAGS.quick:
    for name, value in [('settings', ['small']), ('batch', 4), ('min_repeats', 2), ('max_repeats', 2),
                        ('ceiling_sizes', ['1024']), ('ceiling_repeats', 3)]:
      if not FLAGS[name].present:
        FLAGS[name].value = value
  start = time.perf_counter()
  ceiling = common.ceiling_from_flags()
  print(f"matmul ceiling: {ceiling['gflops']:.1f} GFLOP/s  "
        + '  '.join(f'{n}^2: {g:.1f}' for n, g in ceiling['by_size'].items()), flush=True)

  rows = []
  for name in FLAGS.settings:
    s = setting(name)
    base = dict(name=FLAGS.model, num_classes=s['num_classes'], num_downsample=s['num_downsample'])
    macs, n_params = profile.count(get_model(dict(base, conv_impl='xla')), s['width'], s['resolution'])
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((FLAGS.batch, s['resolution'], s['resolution'], 3), np.float32))
    labels = jnp.asarray(rng.integers(0, s['num_classes'], FLAGS.batch), jnp.int32)
    models = {impl: get_model(dict(base, conv_impl=impl)) for impl in FLAGS.impls}
    params = init_params(models[FLAGS.impls[0]], jax.random.key(0), s['resolution'], 3)
    fns = {impl: build_fns(model, s['width']) for impl, model in models.items()}
    for mode in FLAGS.modes:
      cases = {}
      for impl in FLAGS.impls:
        if mode == 'train':
          args = (params, images, labels)
        else:
          args = (params, bn_stats(models[impl], params, images, s['width']), images)
        cases[impl] = compile_case(fns[impl][mode], args)
      time_interleaved(cases)
      for impl, case in cases.items():
        r = case['info']
        flops_per_image = 2 * macs * (3 if mode == 'train' else 1)
        ips = FLAGS.batch / r['median']
        row = dict(setting=name, width=s['width'], resolution=s['resolution'], num_classes=s['num_classes'],
                   num_downsample=s['num_downsample'], batch=FLAGS.batch, impl=impl, mode=mode, macs=macs,
                   params=n_params, img_per_s=ips, gflops=ips * flops_per_image / 1e9, **r)
        rows.append(row)
        print(f"{name:>5} {impl:>8} {mode:>5}: {ips:8.1f} img/s  {row['gflops']:6.1f} GFLOP/s  "
              f"compile {r['lower_s'] + r['compile_s']:.1f} s  n={r['n']}  load {os.getloadavg()[0]:.1f}", flush=True)
      del cases
    del fns
  # The ceiling is measured again at the end and the higher figure is used: other processes on a small machine slow
  # a measurement down, and a depressed ceiling would flatter the fractions.
  ceiling_end = common.ceiling_from_flags()
  ceiling = {'gflops': max(ceiling['gflops'], ceiling_end['gflops']), 'start': ceiling, 'end': ceiling_end}
  print(f"matmul ceiling at the end: {ceiling_end['gflops']:.1f} GFLOP/s; using {ceiling['gflops']:.1f}")
  for row in rows:
    row['ceiling_frac'] = row['gflops'] / ceiling['gflops']
    ref = [r for r in rows if r['setting'] == row['setting'] and r['mode'] == row['mode'] and r['impl'] == 'xla']
    row['speedup_vs_xla'] = row['img_per_s'] / ref[0]['img_per_s'] if ref else None
    row['ceiling_pct'] = 100 * row['ceiling_frac']
    row['compile_total_s'] = row['lower_s'] + row['compile_s']
    row['ms_per_call'] = 1e3 * row['median']
    row['kfaults'] = row['page_faults_per_call'] / 1e3

  columns = [('setting', 'setting', ''), ('width', 'width', '.2f'), ('resolution', 'res', 'd'),
             ('batch', 'batch', 'd'), ('mode', 'mode', ''), ('impl', 'impl', ''), ('img_per_s', 'img/s', '.1f'),
             ('ms_per_call', 'ms/call', '.0f'), ('gflops', 'GFLOP/s', '.1f'), ('ceiling_pct', '% ceiling', '.1f'),
             ('speedup_vs_xla', 'vs xla', '.2f'), ('compile_total_s', 'compile s', '.1f'), ('kfaults', 'kfaults/call', '.0f'),
             ('n', 'n', 'd')]
  print()
  print(f"{FLAGS.model}, f32, matmul ceiling {ceiling['gflops']:.1f} GFLOP/s, "
        f"load avg {os.getloadavg()[0]:.2f}, malloc={FLAGS.malloc}")
  print(common.format_table(rows, columns))
  targets = check_targets(rows)
  for line in targets['lines']:
    print(line)
  path = common.write_result('model_speed', {'ceiling': ceiling, 'rows': rows, 'targets': targets,
                                             'wall_s': time.perf_counter() - start}, FLAGS.out)
  print(f'\nwrote {path} ({time.perf_counter() - start:.0f} s)')


if __name__ == '__main__':
  run_cli(app, main)
