"""The small setting's kernels one by one: the native depthwise kernels (forward, input and kernel gradient) and the
pointwise matmuls (forward, weight gradient x.T @ dy, input gradient dy @ w.T) at the shapes MobileNet v1 runs at
28 px, batch 128; the native training BN + ReLU6 (forward, backward) against the memory passes it cannot avoid, run
as XLA kernels on the same tensors (forward: a reduction and an elementwise map; backward: a two-input reduction
and a two-input map), which says how far BN is from its memory bound; and the image layer's forward pass (3x3 -> 32
channels, + ReLU6) through cpu_fast's im2col and through XLA's convolution, the measurement behind
slim.ConvBN.conv_impl_for.

What a kernel change is measured with: the median ms of each kernel, their sums, and a SHA-256 of every depthwise
output, which must not change when a change claims the same bits. To compare two builds of csrc/, run this once with
each (interleaved, median of 3: the machines are noisy). Needs the native kernels (`pip install -e .`).

  python benchmarks/kernels.py              # ~40 s on 2 cores
"""
from __future__ import annotations

import hashlib
import os
import sys
import time

if __package__ in (None, ''):  # `python benchmarks/kernels.py` from the repository root
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from mutualnet_jax import allocator, native, slim  # noqa: E402

# (batch, height, width, channels, stride): the depthwise layers of the teacher (1.0 @ 28) and two students'.
DEPTHWISE = ((128, 28, 28, 32, 1), (128, 28, 28, 64, 2), (128, 14, 14, 128, 1), (128, 14, 14, 128, 2),
             (128, 7, 7, 256, 1), (128, 7, 7, 256, 2), (128, 4, 4, 512, 1), (128, 20, 20, 24, 1),
             (128, 10, 10, 40, 1))
# (batch, size, channels, stride): the image layer of the Fashion-MNIST and the ImageNet model.
IMAGE_LAYER = ((1, 28, 1, 1), (128, 28, 1, 1), (500, 28, 1, 1), (1, 224, 3, 2), (32, 224, 3, 2), (250, 224, 3, 2))
# (batch, height, width, channels): the BN layers of the teacher.
BATCH_NORM = ((128, 28, 28, 32), (128, 28, 28, 64), (128, 14, 14, 128), (128, 7, 7, 256), (128, 4, 4, 512))
# (rows = batch x pixels, in channels, out channels): pointwise layers of the teacher.
POINTWISE = ((128 * 16, 512, 512), (128 * 49, 256, 256), (128 * 196, 128, 128), (128 * 784, 32, 64))

flags.DEFINE_integer('repeats', 15, 'Timed calls per kernel (median).')
common.define_common_flags()
FLAGS = flags.FLAGS


def _ms(fn, *args) -> float:
  return 1e3 * common.time_call(fn, *args, repeats=FLAGS.repeats)['median']


def depthwise_rows(digest: 'hashlib._Hash') -> list[dict]:
  rows = []
  for n, h, w, c, s in DEPTHWISE:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, c)), jnp.float32)
    out_hw = ((h - 1) // s + 1, (w - 1) // s + 1)
    g = jnp.asarray(rng.standard_normal((n, *out_hw, c)), jnp.float32)
    calls = {'forward': (jax.jit(lambda x, k: native.depthwise_forward(x, k, s, out_hw)), x, k),
             'input_grad': (jax.jit(lambda g, k: native.depthwise_backward_input(g, k, s, x.shape)), g, k),
             'kernel_grad': (jax.jit(lambda x, g: native.depthwise_backward_kernel(x, g, s, k.shape)), x, g)}
    row = {'shape': f'{n}x{h}x{w}x{c} s{s}'}
    for name, (fn, *args) in calls.items():
      digest.update(np.asarray(fn(*args)).tobytes())
      row[name] = _ms(fn, *args)
    rows.append(row)
  return rows


def pointwise_rows() -> list[dict]:
  rows = []
  for m, k, n in POINTWISE:
    rng = np.random.default_rng(0)
    x, dy, w = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((m, k), (m, n), (k, n)))
    gflop = 2 * m * k * n / 1e9
    row = {'shape': f'{m}x{k}x{n}'}
    for name, fn, args in (('forward', lambda x, w: x @ w, (x, w)), ('weight_grad', lambda x, dy: x.T @ dy, (x, dy)),
                           ('input_grad', lambda dy, w: dy @ w.T, (dy, w))):
      row[name] = _ms(jax.jit(fn), *args)
      row[name + '_gflops'] = gflop / row[name] * 1e3
    rows.append(row)
  return rows


def batch_norm_rows() -> list[dict]:
  rows = []
  for shape in BATCH_NORM:
    c = shape[-1]
    rng = np.random.default_rng(0)
    x, dy = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))
    scale, bias, zero, active = jnp.ones(c), jnp.zeros(c), jnp.zeros(c), jnp.int32(c)
    _, mean, var = native.batch_norm_forward(x, scale, bias, active, True, slim.BN_EPSILON)
    axes = (0, 1, 2)
    row = {'shape': 'x'.join(map(str, shape)),
           'forward': _ms(jax.jit(lambda x: native.batch_norm_forward(x, scale, bias, active, True, slim.BN_EPSILON)),
                          x),
           'backward': _ms(jax.jit(lambda dy, x: native.batch_norm_backward(
               dy, x, mean, var, scale, bias, zero, zero, active, True, slim.BN_EPSILON)), dy, x),
           'forward_bound': (_ms(jax.jit(lambda x: x.sum(axes)), x)
                             + _ms(jax.jit(lambda x: jnp.clip(x * 1.5 + 0.1, 0.0, 6.0)), x)),
           'backward_bound': (_ms(jax.jit(lambda x, dy: (x * dy).sum(axes)), x, dy)
                              + _ms(jax.jit(lambda x, dy: x * 1.5 + dy), x, dy))}
    rows.append(row)
  return rows


def image_layer_rows() -> list[dict]:
  rows = []
  for n, size, c, s in IMAGE_LAYER:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, size, size, c)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, c, 32)), jnp.float32)
    row = {'shape': f'{n}x{size}x{size}x{c} s{s}'}
    for impl in ('cpu_fast', 'xla'):
      fn = jax.jit(lambda x, k, impl=impl: slim.relu6(slim.conv2d(x, k, s, impl)))
      start = time.perf_counter()
      fn.lower(x, k).compile()
      row[impl + '_compile_s'] = time.perf_counter() - start
      row[impl] = _ms(fn, x, k)
    rows.append(row)
  return rows


def main(argv):
  del argv
  allocator.use()  # main.py's allocator: under glibc every fresh output buffer is faulted in, timed with the kernel
  if not native.available(jnp.zeros((1,), jnp.float32)):
    sys.exit('native kernels not built: pip install -e . with a C++ compiler')
  digest = hashlib.sha256()
  dw, pw, bn, image = depthwise_rows(digest), pointwise_rows(), batch_norm_rows(), image_layer_rows()
  totals = {k: sum(r[k] for r in dw) for k in ('forward', 'input_grad', 'kernel_grad')}
  print(common.format_table(dw + [{'shape': 'sum', **totals}], [
      ('shape', 'depthwise', 's'), ('forward', 'forward ms', '.2f'), ('input_grad', 'input grad ms', '.2f'),
      ('kernel_grad', 'kernel grad ms', '.2f')]))
  print(f'depthwise outputs SHA-256: {digest.hexdigest()[:16]}\n')
  print(common.format_table(pw, [('shape', 'pointwise M x K x N', 's')] + [
      (f'{k}{suffix}', f'{k.replace("_", " ")} {unit}', spec) for k in ('forward', 'weight_grad', 'input_grad')
      for suffix, unit, spec in (('', 'ms', '.2f'), ('_gflops', 'GFLOP/s', '.0f'))]))
  print()
  print(common.format_table(bn, [('shape', 'BN + ReLU6', 's'), ('forward', 'forward ms', '.3f'),
                                 ('forward_bound', 'XLA reduce + map ms', '.3f'), ('backward', 'backward ms', '.3f'),
                                 ('backward_bound', 'XLA 2-input reduce + map ms', '.3f')]))
  print()
  print(common.format_table(image, [('shape', 'image layer', 's'), ('cpu_fast', 'im2col ms', '.3f'),
                                    ('xla', 'XLA conv ms', '.3f'), ('cpu_fast_compile_s', 'im2col compile s', '.2f'),
                                    ('xla_compile_s', 'XLA conv compile s', '.2f')]))
  print('wrote', common.write_result('kernels', {'depthwise': dw, 'depthwise_totals_ms': totals,
                                                  'depthwise_sha256': digest.hexdigest(), 'pointwise': pw,
                                                  'batch_norm': bn, 'image_layer': image}, FLAGS.out))


if __name__ == '__main__':
  app.run(main)
