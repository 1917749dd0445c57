"""Slimmable building blocks: channel rounding, width grids, two convolution kernel paths and Flax layers.

Every layer creates its parameters once, at the model's maximum width, and a call slices the leading channels it
needs. The number of channels a call slices is a static Python int. Two ways to run a width w:
- exact: slice make_divisible(C * w) channels; each width is its own fixed-shape XLA program (export, latency, and
  the sandwich's max and min widths);
- capacity: slice the channels of a larger *capacity* width and zero, after each unit's activation, the channels
  beyond the real width's count, which arrives at run time (`active`, an int32 scalar per layer). Zeroed channels
  contribute nothing downstream and receive zero gradient, so the result equals the exact sub-network, and every width
  up to the capacity runs in one compiled program.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mutualnet_jax import native, parallel
from mutualnet_jax.errors import UserError

CONV_IMPLS = ('xla', 'cpu_fast', 'auto')
BN_EPSILON = 1e-5  # PyTorch's default, as in the official code
# Widths are rounded to WIDTH_DIGITS decimals wherever they become keys (jit static arguments, program buckets,
# statistics-store and query-table keys), so the same width computed two ways is one key; comparisons allow WIDTH_TOL.
WIDTH_DIGITS = 6
WIDTH_TOL = 10.0 ** -WIDTH_DIGITS


# ----------------------------------------------------------------------------------------------------------------------
# Channel arithmetic.

def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
  """Rounds a channel count to the nearest multiple of `divisor` (official MobileNet/US-Net rule).

  Never goes below `min_value` (default `divisor`), and bumps up by one `divisor` when rounding lost more than 10 %.
  """
  min_value = divisor if min_value is None else min_value
  rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * value:
    rounded += divisor
  return rounded


def scaled_channels(base: int, width: float) -> int:
  """Channels a layer with `base` channels at width 1.0 uses at `width`."""
  return make_divisible(base * width)


def canonical_width(width: float) -> float:
  """`width` as the float every key of it uses."""
  return round(float(width), WIDTH_DIGITS)


def width_grid(min_width: float, max_width: float, step: float) -> tuple[float, ...]:
  """Widths min, min+step, …, max, canonical so grid points compare equal across calls (they are jit static args)."""
  if step <= 0:
    raise UserError(f'width_step must be > 0, got {step}.')
  n = int(math.floor((max_width - min_width) / step + WIDTH_TOL))
  grid = [canonical_width(min_width + i * step) for i in range(n + 1)]
  if abs(grid[-1] - max_width) > WIDTH_TOL:
    grid.append(canonical_width(max_width))
  return tuple(grid)


def capacity_for(width: float, capacities: Sequence[float]) -> float | None:
  """The smallest capacity that holds `width` (its compiled program runs it on the capacity path); None when no
  capacity is large enough, or none is configured: run the exact sub-network."""
  fits = [c for c in capacities if c >= width - WIDTH_TOL]
  return canonical_width(min(fits)) if fits else None


def check_width(width: float, max_width: float, trained: tuple[float, float] | None = None) -> float:
  """`width` as a canonical float, or a one-line UserError: not a number, outside (0, max_width] (the parameters'
  width), or, given the `trained` (min, max) range of a run, outside it (every width in it is a trained
  sub-network: US-Net's promise; within the tolerance, the nearest end)."""
  if not isinstance(width, (int, float)) or isinstance(width, bool):
    raise UserError(f'width must be a number in (0, {max_width}], got {width!r}.')
  if trained is not None:
    lo, hi = trained
    if not lo - WIDTH_TOL <= width <= hi + WIDTH_TOL:
      what = f'width {lo:g}' if lo == hi else f'range [{lo:g}, {hi:g}]'
      raise UserError(f'width {width:g} is outside the trained {what}: pick a width in it.')
    width = min(max(width, lo), hi)
  if not 0 < width <= max_width + WIDTH_TOL:
    raise UserError(f'width {width} is outside (0, {max_width}]: pass a width in that range '
                    f'(or raise model.max_width, which changes the parameter shapes).')
  return canonical_width(width)


# ----------------------------------------------------------------------------------------------------------------------
# Kernel paths. 'xla' is lax.conv everywhere (the natural choice on TPU/GPU); 'cpu_fast' writes depthwise convolutions
# as K*K strided shifted multiply-adds and dense convolutions as matmuls (im2col for K > 1), which XLA:CPU runs 5-30x
# faster than its grouped/1x1 convolutions (benchmarks/model_speed.py). Both compute the same function.

def resolve_conv_impl(impl: str) -> str:
  """Maps 'auto' to the kernel path suited to the default backend."""
  if impl not in CONV_IMPLS:
    raise UserError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}.")
  if impl == 'auto':
    return 'cpu_fast' if jax.default_backend() == 'cpu' else 'xla'
  return impl


def conv_output_size(size: int, kernel: int, stride: int) -> int:
  """Spatial output size with symmetric padding (kernel - 1) // 2, as in the PyTorch reference models."""
  pad = (kernel - 1) // 2
  return (size + 2 * pad - kernel) // stride + 1


def _pad_hw(x: jax.Array, lo: int, hi: int) -> jax.Array:
  """Zero-pads the two spatial axes of an NHWC array."""
  if lo == hi == 0:
    return x
  return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (lo, hi, 0), (lo, hi, 0), (0, 0, 0)))


def _taps(xp: jax.Array, kernel: int, stride: int, ho: int, wo: int) -> list[jax.Array]:
  """The K*K strided (ho, wo) windows of an already padded NHWC array, row-major over the kernel taps."""
  n, _, _, c = xp.shape
  return [
      lax.slice(xp, (0, i, j, 0), (n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c), (1, stride, stride, 1))
      for i in range(kernel) for j in range(kernel)
  ]


def _shifted_views(x: jax.Array, kernel: int, stride: int) -> list[jax.Array]:
  """The K*K strided windows of the padded input whose weighted sum is a KxK convolution."""
  pad = (kernel - 1) // 2
  ho, wo = conv_output_size(x.shape[1], kernel, stride), conv_output_size(x.shape[2], kernel, stride)
  return _taps(_pad_hw(x, pad, pad), kernel, stride, ho, wo)


def _matmul_nhwc(x: jax.Array, w: jax.Array) -> jax.Array:
  """(N, H, W, Cin) x (Cin, Cout) as one 2-D matmul.

  Flattening first matters for the backward pass: the kernel gradient is then a plain (P, Cin)^T (P, Cout) dot, which
  XLA:CPU runs without moving data, where the 4-D form made it materialise a transposed copy of the incoming
  gradient with the whole BN/ReLU backward fused into it, read in a cache-hostile order.
  """
  n, h, wd, c = x.shape
  return jnp.dot(x.reshape(n * h * wd, c), w).reshape(n, h, wd, w.shape[-1])


def conv2d(x: jax.Array, kernel: jax.Array, stride: int, impl: str) -> jax.Array:
  """Dense KxK convolution, NHWC input and HWIO kernel, symmetric 'same-style' padding."""
  k = kernel.shape[0]
  if impl == 'xla':
    pad = (k - 1) // 2
    return lax.conv_general_dilated(x, kernel, (stride, stride), [(pad, pad), (pad, pad)],
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  if k == 1:
    if stride > 1:
      x = x[:, ::stride, ::stride, :]
    return _matmul_nhwc(x, kernel[0, 0])
  patches = jnp.concatenate(_shifted_views(x, k, stride), axis=-1)  # im2col, (tap, channel) order = HWIO rows
  return _matmul_nhwc(patches, kernel.reshape(-1, kernel.shape[-1]))


def _depthwise_taps(xp: jax.Array, kernel: jax.Array, stride: int, ho: int, wo: int) -> jax.Array:
  """sum over taps of window * weight: one fused elementwise loop in XLA (no window is materialised)."""
  k = kernel.shape[0]
  out = None
  for t, view in enumerate(_taps(xp, k, stride, ho, wo)):
    term = view * kernel[t // k, t % k]
    out = term if out is None else out + term
  return out


def _depthwise_geometry(x_shape: Sequence[int], k: int, stride: int) -> tuple[int, int, int]:
  return (k - 1) // 2, conv_output_size(x_shape[1], k, stride), conv_output_size(x_shape[2], k, stride)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_shift_add(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  pad, ho, wo = _depthwise_geometry(x.shape, kernel.shape[0], stride)
  return _depthwise_taps(_pad_hw(x, pad, pad), kernel, stride, ho, wo)


def _depthwise_shift_add_fwd(x: jax.Array, kernel: jax.Array, stride: int) -> tuple[jax.Array, Any]:
  pad, ho, wo = _depthwise_geometry(x.shape, kernel.shape[0], stride)
  xp = _pad_hw(x, pad, pad)  # materialised once; the backward pass reuses it
  return _depthwise_taps(xp, kernel, stride, ho, wo), (xp, kernel)


def _depthwise_shift_add_bwd(stride: int, res: Any, g: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Gradients written for XLA:CPU (autodiff of the shifted slices gives K*K padded full-size copies of the
  gradient and K*K materialised windows for the kernel reductions; each is a fresh multi-MB buffer).

  input:  the transposed convolution = a stride-1 shift-add of the (dilated by stride-1, padded) gradient with the
          flipped kernel, one fused loop;
  kernel: K*K window-times-gradient products reduced over rows in ONE variadic reduce (the products fuse into it,
          nothing full-size is written), then the small (K*K, N, Wo, C) partial sums are added up.
  """
  xp, kernel = res
  k = kernel.shape[0]
  pad = (k - 1) // 2
  n, hp, wp, c = xp.shape
  h, w = hp - 2 * pad, wp - 2 * pad
  ho, wo = g.shape[1], g.shape[2]
  zero = jnp.zeros((), g.dtype)
  lo = k - 1 - pad
  gp = lax.pad(g, zero, ((0, 0, 0), (lo, h + pad - (ho - 1) * stride - 1, stride - 1),
                         (lo, w + pad - (wo - 1) * stride - 1, stride - 1), (0, 0, 0)))
  dx = _depthwise_taps(gp, kernel[::-1, ::-1], 1, h, w)
  f32 = jnp.promote_types(g.dtype, jnp.float32)
  prods = [(view * g).astype(f32) for view in _taps(xp, k, stride, ho, wo)]
  rows = lax.reduce(prods, [jnp.zeros((), f32)] * len(prods),
                    lambda a, b: [u + v for u, v in zip(a, b)], (1,))
  dk = jnp.stack(rows).sum((1, 2)).reshape(k, k, c).astype(kernel.dtype)
  return dx, dk


_depthwise_shift_add.defvjp(_depthwise_shift_add_fwd, _depthwise_shift_add_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_native(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  _, ho, wo = _depthwise_geometry(x.shape, kernel.shape[0], stride)
  return native.depthwise_forward(x, kernel, stride, (ho, wo))


def _depthwise_native_fwd(x: jax.Array, kernel: jax.Array, stride: int) -> tuple[jax.Array, Any]:
  return _depthwise_native(x, kernel, stride), (x, kernel)


def _depthwise_native_bwd(stride: int, res: Any, g: jax.Array) -> tuple[jax.Array, jax.Array]:
  x, kernel = res
  return (native.depthwise_backward_input(g, kernel, stride, x.shape),
          native.depthwise_backward_kernel(x, g, stride, kernel.shape))


_depthwise_native.defvjp(_depthwise_native_fwd, _depthwise_native_bwd)


# (mul, shift, relu6, active): an inference BN folded on the host, its ReLU6, and the run-time channel count (None:
# every channel; see keep_active).
Affine = tuple[jax.Array, jax.Array, bool, 'jax.Array | None']


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, stride: int, impl: str,
                     affine: Affine | None = None) -> jax.Array:
  """Depthwise KxK convolution; `kernel` is (K, K, C). With `affine` (mul, shift, relu6, active) the output is mapped
  to y * mul + shift per channel, then ReLU6 when asked, and channels from `active` on zeroed: where the native
  kernels run, in the same call (no separate kernel per layer in a compiled inference network), else as JAX ops
  after the convolution.

  'cpu_fast' runs the project's native kernels (csrc/depthwise.cc through jax.ffi: one pass over memory per operand,
  where XLA's fused shift-add makes several) when the install built them, the array is float32 on one CPU device and
  K is one they are compiled for (native.DEPTHWISE_KERNEL_SIZES), else the shift-add with a hand-written gradient.
  Both are `jax.custom_vjp`s: reverse mode only; forward-mode `jax.jvp` is not supported.
  """
  k, _, c = kernel.shape
  if affine is not None:
    mul, shift, act, active = affine
    if impl != 'xla' and native.available(x) and kernel.dtype == x.dtype and k in native.DEPTHWISE_KERNEL_SIZES:
      _, ho, wo = _depthwise_geometry(x.shape, k, stride)
      count = jnp.asarray(c if active is None else active, jnp.int32)
      return native.depthwise_forward_affine(x, kernel, mul.astype(x.dtype), shift.astype(x.dtype), count, stride,
                                             (ho, wo), act)
    y = depthwise_conv2d(x, kernel, stride, impl) * mul.astype(x.dtype) + shift.astype(x.dtype)
    return keep_active(relu6(y) if act else y, active)
  if impl == 'xla':
    pad = (k - 1) // 2
    return lax.conv_general_dilated(x, kernel[:, :, None, :], (stride, stride), [(pad, pad), (pad, pad)],
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=c)
  if native.available(x) and kernel.dtype == x.dtype and k in native.DEPTHWISE_KERNEL_SIZES:
    return _depthwise_native(x, kernel, stride)
  return _depthwise_shift_add(x, kernel, stride)


# ----------------------------------------------------------------------------------------------------------------------
# Initialisers. Random parameters are drawn on the host with NumPy (seeded from the Flax key) through a callback:
# XLA:CPU spends ~0.3 s compiling each random-number op, which made `init` of a MobileNet take 10-30 s; as a callback
# the whole init compiles in about a second and the forward pass it traces is dead code.

def host_initializer(sample: Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]) -> Callable[..., jax.Array]:
  """A Flax initialiser that runs `sample(rng, shape)` on the host; deterministic in the key."""
  def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    shape = tuple(shape)
    def draw(seed: np.ndarray) -> np.ndarray:
      return np.asarray(sample(np.random.default_rng(np.asarray(seed)), shape), dtype=dtype)
    return jax.pure_callback(draw, jax.ShapeDtypeStruct(shape, dtype), jax.random.key_data(key))
  return init


def kaiming_normal_fan_out(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  """He-normal with fan_out = K*K*outputs, PyTorch's `kaiming_normal_(mode='fan_out')` used by the official code."""
  return rng.normal(0.0, math.sqrt(2.0 / (shape[0] * shape[1] * shape[-1])), shape)


def classifier_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  return rng.normal(0.0, 0.01, shape)


# ----------------------------------------------------------------------------------------------------------------------
# Flax layers. `features` attributes are the maximum (parameter) sizes; the call's `features` argument (or the input's
# channel count) is what this width uses. Layers that know their cost expose `cost(in_shape, out_shape)` -> (macs,
# params) per image, which `mutualnet_jax.profile` collects by intercepting calls: the MACs come from the model itself.

class SlimConv(nn.Module):
  """KxK convolution whose parameters exist at (`in_features`, `features`); a call uses the leading channels.

  in_features=None means the input never slims (the image), so its size is taken from the input.
  """
  features: int
  in_features: int | None = None
  kernel_size: int = 1
  strides: int = 1
  depthwise: bool = False
  conv_impl: str = 'xla'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, features: int | None = None, affine: Affine | None = None) -> jax.Array:
    """`affine`: a depthwise layer's folded inference BN and ReLU6 (see depthwise_conv2d)."""
    cin = x.shape[-1]
    k = self.kernel_size
    if self.depthwise:
      kernel = self.param('kernel', host_initializer(kaiming_normal_fan_out), (k, k, self.features))
      if cin > self.features:
        raise ValueError(f'{self.name}: {cin} input channels exceed the {self.features} this layer holds.')
      return depthwise_conv2d(x, kernel[:, :, :cin].astype(self.dtype), self.strides, self.conv_impl, affine)
    if affine is not None:
      raise ValueError(f'{self.name}: only a depthwise convolution takes its BN map (affine).')
    features = self.features if features is None else features
    kernel = self.param('kernel', host_initializer(kaiming_normal_fan_out),
                        (k, k, self.in_features or cin, self.features))
    if cin > kernel.shape[2] or features > self.features:
      raise ValueError(f'{self.name}: asked for {cin}->{features} channels, parameters hold '
                       f'{kernel.shape[2]}->{self.features}; initialise the model at its maximum width.')
    return conv2d(x, kernel[:, :, :cin, :features].astype(self.dtype), self.strides, self.conv_impl)

  def cost(self, in_shape: Sequence[int], out_shape: Sequence[int]) -> tuple[int, int]:
    _, ho, wo, cout = out_shape
    weights = self.kernel_size ** 2 * (1 if self.depthwise else in_shape[-1]) * cout
    return ho * wo * weights, weights


class SlimDense(nn.Module):
  """Fully connected layer with a sliceable input (and optionally output) dimension; parameters at the maxima."""
  features: int
  in_features: int | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, features: int | None = None) -> jax.Array:
    features = self.features if features is None else features
    cin = x.shape[-1]
    kernel = self.param('kernel', host_initializer(classifier_normal), (self.in_features or cin, self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    if cin > kernel.shape[0] or features > self.features:
      raise ValueError(f'{self.name}: asked for {cin}->{features} features, parameters hold '
                       f'{kernel.shape[0]}->{self.features}; initialise the model at its maximum width.')
    return jnp.dot(x, kernel[:cin, :features].astype(self.dtype)) + bias[:features].astype(self.dtype)

  def cost(self, in_shape: Sequence[int], out_shape: Sequence[int]) -> tuple[int, int]:
    weights = in_shape[-1] * out_shape[-1]
    return weights, weights + out_shape[-1]


class SlimBatchNorm(nn.Module):
  """Batch norm with shared, sliced scale/bias and per-configuration statistics, then the optional ReLU6 and the
  zeroing of inactive channels (`active`, see ConvBN).

  train=True normalises with the statistics of the batch (split into `groups` equal groups, one per device, when
  statistics are not synchronised) and, when the 'bn_moments' collection is mutable, records the batch mean and
  variance there, which is how BN calibration reads them. train=False reads 'batch_stats' {'mean', 'var'} of exactly
  this width's channel count: statistics belong to one (width, resolution) and are passed in with the variables; or
  {'mul', 'shift'}, the same map folded on the host (fold_batch_norm).

  fused: in training, one native kernel for statistics + normalisation + ReLU6 + mask and one for its gradient
  (csrc/batchnorm.cc) where it can run (float32, one group, one CPU device), instead of XLA's several small kernels
  per layer. The same function; the statistics are summed in double in another order, so a run's numbers differ in
  the last bits.
  """
  features: int
  groups: int = 1
  dtype: Any = jnp.float32
  relu6: bool = False
  fused: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, active: jax.Array | None = None) -> jax.Array:
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (self.features,))[:c]
    bias = self.param('bias', nn.initializers.zeros, (self.features,))[:c]
    keep_last = dict(reduce_fn=lambda _, v: v, init_fn=lambda: None)  # one value, shaped like 'batch_stats'
    if train and self.fused and self.groups == 1 and native.available(x):
      count = jnp.asarray(c if active is None else active, jnp.int32)
      y, mean, var = _batch_norm_native(x, scale, bias, count, self.relu6)
      self.sow('bn_moments', 'mean', mean, **keep_last)
      self.sow('bn_moments', 'var', var, **keep_last)
      return y
    if train:
      n = x.shape[0]
      if self.groups < 1 or n % self.groups:
        raise ValueError(f'{self.name}: a batch of {n} does not split into {self.groups} BN groups.')
      xg = x.reshape((self.groups, n // self.groups) + x.shape[1:])
      mean, var = _moments(xg, axes=(1, 2, 3))
      self.sow('bn_moments', 'mean', mean.mean(0), **keep_last)
      self.sow('bn_moments', 'var', var.mean(0) + ((mean - mean.mean(0)) ** 2).mean(0), **keep_last)
      mul = scale * lax.rsqrt(var + BN_EPSILON)
      shift = bias - mean * mul
      y = xg * mul[:, None, None, None].astype(self.dtype) + shift[:, None, None, None].astype(self.dtype)
      y = y.reshape(x.shape)
    elif (folded := self.folded()) is not None:
      y = x * folded[0] + folded[1]
    else:
      mean = self.variable('batch_stats', 'mean', jnp.zeros, (c,), jnp.float32).value
      var = self.variable('batch_stats', 'var', jnp.ones, (c,), jnp.float32).value
      if mean.shape != (c,):
        raise ValueError(f'{self.name}: statistics for {mean.shape[0]} channels passed to a {c}-channel layer; '
                         'use the statistics calibrated for this width.')
      mul = scale * lax.rsqrt(var + BN_EPSILON)
      y = x * mul.astype(self.dtype) + (bias - mean * mul).astype(self.dtype)
    return keep_active(relu6(y) if self.relu6 else y, active)

  def folded(self) -> tuple[jax.Array, jax.Array] | None:
    """(mul, shift) of the inference map folded once on the host (fold_batch_norm), or None."""
    if not self.has_variable('batch_stats', 'mul'):
      return None
    return (self.get_variable('batch_stats', 'mul').astype(self.dtype),
            self.get_variable('batch_stats', 'shift').astype(self.dtype))


def fold_batch_norm(params: Any, stats: Any) -> Any:
  """BN statistics (a tree shaped like 'batch_stats', layers {'mean', 'var'}) as the inference map SlimBatchNorm
  reads instead, layers {'mul', 'shift'}: mul = scale / sqrt(var + eps), shift = bias - mean * mul, computed once
  on the host from each layer's leading scale and bias (as many channels as its statistics: a width's, or the
  capacity's that runs it), as deployment converters fold BN. A compiled network then computes no map per layer,
  and a depthwise layer applies it inside its native kernel. The same function up to float32 rounding of the map."""
  flat = flax.traverse_util.flatten_dict(params)
  layers = flax.traverse_util.flatten_dict(stats, is_leaf=lambda _, v: isinstance(v, Mapping) and 'mean' in v)
  needed = {path: (layer['mean'], layer['var'], flat[path + ('scale',)], flat[path + ('bias',)])
            for path, layer in layers.items()}
  folded = {}
  for path, values in parallel.host_values(needed).items():
    mean, var, scale, bias = (v[:values[0].shape[0]].astype(np.float32) for v in values)
    mul = scale / np.sqrt(var + np.float32(BN_EPSILON))
    folded[path] = {'mul': mul, 'shift': bias - mean * mul}
  return flax.traverse_util.unflatten_dict(folded)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _batch_norm_native(x: jax.Array, scale: jax.Array, bias: jax.Array, active: jax.Array,
                       relu6: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  return native.batch_norm_forward(x, scale, bias, active, relu6, BN_EPSILON)


def _batch_norm_native_fwd(x: jax.Array, scale: jax.Array, bias: jax.Array, active: jax.Array,
                           relu6: bool) -> tuple[tuple[jax.Array, jax.Array, jax.Array], Any]:
  y, mean, var = native.batch_norm_forward(x, scale, bias, active, relu6, BN_EPSILON)
  return (y, mean, var), (x, mean, var, scale, bias, active)


def _batch_norm_native_bwd(relu6: bool, res: Any, cotangents: Any) -> tuple[Any, ...]:
  x, mean, var, scale, bias, active = res
  dy, dmean, dvar = cotangents
  dx, dscale, dbias = native.batch_norm_backward(dy, x, mean, var, scale, bias, dmean, dvar, active, relu6,
                                                 BN_EPSILON)
  return dx, dscale, dbias, None


_batch_norm_native.defvjp(_batch_norm_native_fwd, _batch_norm_native_bwd)


def _moments(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """Mean and biased variance from one pass over `x` (E[x^2] - E[x]^2, clamped at 0), in at least float32."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = x.mean(axes)
  return mean, jnp.maximum((x * x).mean(axes) - mean * mean, 0.0)


class GlobalAvgPool(nn.Module):
  """Global average pooling: what makes every input resolution valid. Counted as C*H*W MACs (official convention)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return x.mean(axis=(1, 2))

  def cost(self, in_shape: Sequence[int], out_shape: Sequence[int]) -> tuple[int, int]:
    _, h, w, c = in_shape
    return h * w * c, 0


@jax.custom_jvp
def relu6(x: jax.Array) -> jax.Array:
  """min(max(x, 0), 6), whose derivative is read off its output: the backward pass keeps only the output (which the
  next layer keeps anyway), where autodiff of clip kept its input and two masks (twice the activation memory)."""
  return jnp.clip(x, 0, 6)


@relu6.defjvp
def _relu6_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]) -> tuple[jax.Array, jax.Array]:
  y = relu6(primals[0])
  return y, tangents[0] * ((y > 0) & (y < 6)).astype(tangents[0].dtype)


def keep_active(x: jax.Array, active: jax.Array | None) -> jax.Array:
  """Zeroes the channels of `x` at and beyond `active` (a run-time count); None keeps every channel."""
  if active is None:
    return x
  mask = lax.broadcasted_iota(jnp.int32, (x.shape[-1],), 0) < active
  return x * mask.astype(x.dtype)


class ConvBN(nn.Module):
  """Convolution -> batch norm -> optional ReLU6 -> zeroing of inactive channels: the unit of every backbone.

  `active` (run time) is how many of the output channels the real width uses; the rest are zeroed so they neither
  feed later layers nor receive gradient (the capacity path). None: every sliced channel is used (the exact path).
  """
  features: int
  in_features: int | None = None
  kernel_size: int = 1
  strides: int = 1
  depthwise: bool = False
  relu: bool = True
  conv_impl: str = 'xla'
  bn_groups: int = 1
  dtype: Any = jnp.float32
  fused_bn: bool = False

  def conv_impl_for(self, x: jax.Array, train: bool) -> str:
    """The image layer (a dense KxK convolution of the unslimmed input) of a single-channel image runs XLA's own
    convolution in inference, where it measured faster than cpu_fast's im2col and compiles without its ~9 kernels.
    cpu_fast elsewhere: 3-channel images, where im2col measured faster at every batch, and training (XLA's
    convolution gradients are slow on CPU). `python benchmarks/kernels.py` measures both (benchmarks/README.md)."""
    image_layer = self.in_features is None and not self.depthwise and self.kernel_size > 1
    if self.conv_impl == 'cpu_fast' and image_layer and not train and x.shape[-1] == 1:
      return 'xla'
    return self.conv_impl

  @nn.compact
  def __call__(self, x: jax.Array, features: int | None, train: bool, active: jax.Array | None = None) -> jax.Array:
    conv = SlimConv(self.features, self.in_features, self.kernel_size, self.strides, self.depthwise,
                    self.conv_impl_for(x, train), self.dtype, name='conv')
    bn = SlimBatchNorm(self.features, self.bn_groups, self.dtype, relu6=self.relu, fused=self.fused_bn, name='bn')
    folded = None if train or not self.depthwise else bn.folded()
    if folded is not None:  # the depthwise kernel applies the folded BN, ReLU6 and the channel count itself
      return conv(x, features, affine=(*folded, self.relu, active))
    return bn(conv(x, features), train, active)
