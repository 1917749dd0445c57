"""The project's own XLA:CPU kernels (csrc/depthwise.cc, csrc/batchnorm.cc), registered with `jax.ffi` when the
install built them.

`pip install` compiles csrc/ into the `mutualnet_jax._native` shared library (setup.py, for the machine it runs on:
-march=native). When it is missing (no compiler, another platform) or disabled with MUTUALNET_NATIVE=0, everything
falls back to the pure-JAX kernels in slim.py, which compute the same function (tests/test_kernels.py holds both to
it).

Used only on a single CPU device: XLA's SPMD partitioner cannot split a custom call over a sharded batch (it would
gather the whole batch on every device), so multi-device meshes keep the pure-JAX path.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.machinery
import os
from typing import Any, Iterator

import jax
import numpy as np

ENV = 'MUTUALNET_NATIVE'  # '0' disables the native kernels
_LIBRARY = '_native'
DEPTHWISE_KERNEL_SIZES = (1, 3, 5, 7)  # the kernel gradient is compiled for these (csrc/depthwise.cc)
_TARGETS = ('MutualnetDepthwiseForward', 'MutualnetDepthwiseBackwardInput', 'MutualnetDepthwiseBackwardKernel',
            'MutualnetDepthwiseForwardAffine', 'MutualnetBatchNormForward', 'MutualnetBatchNormBackward')


def library_path() -> str | None:
  """The built shared library next to this module, if the install built it."""
  here = os.path.dirname(os.path.abspath(__file__))
  for suffix in importlib.machinery.EXTENSION_SUFFIXES:
    path = os.path.join(here, _LIBRARY + suffix)
    if os.path.exists(path):
      return path
  return None


@functools.cache
def _registered() -> bool:
  path = library_path()
  if path is None or os.environ.get(ENV, '1') == '0':
    return False
  try:
    lib = ctypes.cdll.LoadLibrary(path)
    for name in _TARGETS:
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform='cpu')
  except (OSError, AttributeError):  # built for another machine or an older version of this file
    return False
  return True


_disabled = [False]


@contextlib.contextmanager
def disabled() -> Iterator[None]:
  """Traces inside use the pure-JAX kernels (tests hold the two paths to the same function)."""
  _disabled.append(True)
  try:
    yield
  finally:
    _disabled.pop()


def available(x: jax.Array) -> bool:
  """Whether the native kernels can run `x` here: built, enabled, float32, one CPU device (checked at trace
  time)."""
  return (not _disabled[-1] and x.dtype == np.float32 and jax.default_backend() == 'cpu'
          and jax.device_count() == 1 and _registered())


def _call(target: str, shape: tuple[int, ...], *operands: Any, stride: int) -> jax.Array:
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, np.float32))(*operands, stride=np.int64(stride))


def depthwise_forward(x: jax.Array, kernel: jax.Array, stride: int, out_hw: tuple[int, int]) -> jax.Array:
  return _call('MutualnetDepthwiseForward', (x.shape[0], *out_hw, x.shape[3]), x, kernel, stride=stride)


def depthwise_forward_affine(x: jax.Array, kernel: jax.Array, mul: jax.Array, shift: jax.Array, active: jax.Array,
                             stride: int, out_hw: tuple[int, int], relu6: bool) -> jax.Array:
  """depthwise(x) * mul + shift per channel, then ReLU6 when `relu6`, channels from `active` (an int32 count) on
  zero, in one call (inference; not differentiable)."""
  out = jax.ShapeDtypeStruct((x.shape[0], *out_hw, x.shape[3]), np.float32)
  return jax.ffi.ffi_call('MutualnetDepthwiseForwardAffine', out)(x, kernel, mul, shift, active,
                                                                   stride=np.int64(stride), relu6=np.int64(relu6))


def depthwise_backward_input(g: jax.Array, kernel: jax.Array, stride: int, in_shape: tuple[int, ...]) -> jax.Array:
  return _call('MutualnetDepthwiseBackwardInput', tuple(in_shape), g, kernel, stride=stride)


def depthwise_backward_kernel(x: jax.Array, g: jax.Array, stride: int, kernel_shape: tuple[int, ...]) -> jax.Array:
  return _call('MutualnetDepthwiseBackwardKernel', tuple(kernel_shape), x, g, stride=stride)


def batch_norm_forward(x: jax.Array, scale: jax.Array, bias: jax.Array, active: jax.Array, relu6: bool,
                       eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(activation(BN(x)) with channels >= active zeroed, batch mean, biased batch variance); statistics over every
  axis but the last."""
  c = x.shape[-1]
  out = (jax.ShapeDtypeStruct(x.shape, np.float32),) + (jax.ShapeDtypeStruct((c,), np.float32),) * 2
  return jax.ffi.ffi_call('MutualnetBatchNormForward', out)(x, scale, bias, active, relu6=np.int64(relu6),
                                                            eps=np.float32(eps))


def batch_norm_backward(dy: jax.Array, x: jax.Array, mean: jax.Array, var: jax.Array, scale: jax.Array,
                        bias: jax.Array, dmean: jax.Array, dvar: jax.Array, active: jax.Array, relu6: bool,
                        eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Gradients (dx, dscale, dbias) of `batch_norm_forward` for the cotangents (dy, dmean, dvar)."""
  c = x.shape[-1]
  out = (jax.ShapeDtypeStruct(x.shape, np.float32),) + (jax.ShapeDtypeStruct((c,), np.float32),) * 2
  return jax.ffi.ffi_call('MutualnetBatchNormBackward', out)(dy, x, mean, var, scale, bias, dmean, dvar, active,
                                                             relu6=np.int64(relu6), eps=np.float32(eps))
