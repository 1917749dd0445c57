"""MobileNet v1 training (forward+backward) and inference speed of both kernel paths.

For each setting (width, resolution, batch) and kernel path ('xla' = lax.conv everywhere, 'cpu_fast' = shifted
multiply-adds and matmuls, see mutualnet_jax/slim.py) this measures:
  train: jitted gradient of the mean cross-entropy wrt the parameters, BN in train mode (batch statistics);
  infer: jitted logits with BN in eval mode (per-layer statistics of this width passed as 'batch_stats').
It reports images/s, lowering+compile seconds, the achieved GFLOP/s computed from the model's own multiply-adds
(`mutualnet_jax.profile.count`; forward = 2 x MACs per image, training = 3 x forward) and that as a fraction of a
jitted f32 matmul ceiling measured in the same run, plus the cpu_fast/xla speedup. Results go to a table on stdout and
JSON (--out, default benchmarks/results/model_speed.json).

  python benchmarks/model_speed.py                # all three settings, batch 32 (~6 min on 2 cores, mostly xla)
  python benchmarks/model_speed.py --quick        # smoke run, < 1 min
  python benchmarks/model_speed.py --settings=big --impls=cpu_fast --modes=infer
  python benchmarks/model_speed.py --tcmalloc     # re-executes itself with tcmalloc preloaded (if installed)

Settings: big = 1.0x at 224 px (ImageNet model, 1000 classes); tiny = 0.25x at 128 px; small = 1.0x at 32 px with
--small_num_downsample stride-2 layers and 10 classes (the CIFAR/Fashion-MNIST variant).
"""
from __future__ import annotations

import math
import os
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
from mutualnet_jax import profile
from mutualnet_jax.models import get_model, init_params

FLAGS = flags.FLAGS
SETTINGS = ('big', 'tiny', 'small')
TCMALLOC = ('/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4', '/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4')

flags.DEFINE_list('settings', list(SETTINGS), f'Which of {SETTINGS} to run.')
flags.DEFINE_list('impls', ['xla', 'cpu_fast'], 'Kernel paths to compare.')
flags.DEFINE_list('modes', ['train', 'infer'], 'train (fwd+bwd) and/or infer (fwd, BN eval).')
flags.DEFINE_string('model', 'mobilenet_v1', 'Backbone (mutualnet_jax.models.MODELS).')
flags.DEFINE_integer('batch', 32, 'Images per call.')
flags.DEFINE_integer('small_num_downsample', 3, 'Stride-2 layers of the 32-px variant (configs/default.py uses 3).')
flags.DEFINE_integer('min_repeats', 3, 'Timed calls per case at least (median reported).')
flags.DEFINE_integer('max_repeats', 20, 'Timed calls per case at most.')
flags.DEFINE_float('target_seconds', 6.0, 'Timed calls per case are chosen to take about this long (within '
                   '[min_repeats, max_repeats]), estimated from the warm-up call: slow cases get few repeats.')
flags.DEFINE_bool('quick', False, 'Smoke run (< 1 min): settings tiny,small, batch 8, 2 repeats, small ceiling.')
flags.DEFINE_bool('tcmalloc', False, 'Re-execute with tcmalloc preloaded (faster fresh buffers, ~2x peak RSS).')
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
  """`sow` stores a tuple per call; a model applied once has 1-tuples."""
  if isinstance(tree, tuple):
    return tree[0]
  return {k: _unwrap_sown(v) for k, v in tree.items()}


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


def run_case(fn: Any, args: Sequence[Any]) -> dict[str, Any]:
  t0 = time.perf_counter()
  lowered = fn.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  common.block(compiled(*args))  # warm-up, also the repeat-count estimate
  first = time.perf_counter() - t2
  repeats = int(min(FLAGS.max_repeats, max(FLAGS.min_repeats, math.ceil(FLAGS.target_seconds / max(first, 1e-6)))))
  timing = common.time_call(compiled, *args, repeats=repeats, warmup=0)
  return {'lower_s': t1 - t0, 'compile_s': t2 - t1, 'first_call_s': first, **timing}


def main(argv: Sequence[str]) -> None:
  del argv
  if FLAGS.tcmalloc and not os.environ.get('LD_PRELOAD'):
    lib = next((p for p in TCMALLOC if os.path.exists(p)), None)
    if lib is None:
      print('tcmalloc not found (Debian: libgoogle-perftools4); running with the default allocator.')
    else:
      os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, 'LD_PRELOAD': lib})
  if FLAGS.quick:
    for name, value in [('settings', ['tiny', 'small']), ('batch', 8), ('min_repeats', 2), ('max_repeats', 2),
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
    params = None
    for impl in FLAGS.impls:
      model = get_model(dict(base, conv_impl=impl))
      if params is None:
        params = init_params(model, jax.random.key(0), s['resolution'], 3)
      fns = build_fns(model, s['width'])
      for mode in FLAGS.modes:
        if mode == 'train':
          args = (params, images, labels)
        else:
          args = (params, bn_stats(model, params, images, s['width']), images)
        r = run_case(fns[mode], args)
        flops_per_image = 2 * macs * (3 if mode == 'train' else 1)
        ips = FLAGS.batch / r['median']
        row = dict(setting=name, width=s['width'], resolution=s['resolution'], num_classes=s['num_classes'],
                   num_downsample=s['num_downsample'], batch=FLAGS.batch, impl=impl, mode=mode, macs=macs,
                   params=n_params, img_per_s=ips, gflops=ips * flops_per_image / 1e9,
                   ceiling_frac=ips * flops_per_image / 1e9 / ceiling['gflops'], **r)
        rows.append(row)
        print(f"{name:>5} {impl:>8} {mode:>5}: {ips:8.1f} img/s  {row['gflops']:6.1f} GFLOP/s "
              f"({100 * row['ceiling_frac']:4.1f} %)  compile {r['lower_s'] + r['compile_s']:.1f} s  "
              f"n={r['n']}", flush=True)
      del fns
  for row in rows:
    ref = [r for r in rows if r['setting'] == row['setting'] and r['mode'] == row['mode'] and r['impl'] == 'xla']
    row['speedup_vs_xla'] = row['img_per_s'] / ref[0]['img_per_s'] if ref else None
    row['ceiling_pct'] = 100 * row['ceiling_frac']
    row['compile_total_s'] = row['lower_s'] + row['compile_s']
    row['ms_per_call'] = 1e3 * row['median']

  columns = [('setting', 'setting', ''), ('width', 'width', '.2f'), ('resolution', 'res', 'd'),
             ('batch', 'batch', 'd'), ('mode', 'mode', ''), ('impl', 'impl', ''), ('img_per_s', 'img/s', '.1f'),
             ('ms_per_call', 'ms/call', '.0f'), ('gflops', 'GFLOP/s', '.1f'), ('ceiling_pct', '% ceiling', '.1f'),
             ('speedup_vs_xla', 'vs xla', '.2f'), ('compile_total_s', 'compile s', '.1f'), ('n', 'n', 'd')]
  print()
  print(f"MobileNet v1 ({FLAGS.model}), f32, matmul ceiling {ceiling['gflops']:.1f} GFLOP/s, "
        f"load avg {os.getloadavg()[0]:.2f}, LD_PRELOAD={os.environ.get('LD_PRELOAD', '') or '-'}")
  print(common.format_table(rows, columns))
  path = common.write_result('model_speed', {'ceiling': ceiling, 'rows': rows,
                                             'wall_s': time.perf_counter() - start}, FLAGS.out)
  print(f'\nwrote {path} ({time.perf_counter() - start:.0f} s)')


if __name__ == '__main__':
  app.run(main)
