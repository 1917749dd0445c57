"""mutualnet_jax: MutualNet (width x resolution mutual learning) in JAX/Flax.

The native XLA:CPU kernels (mutualnet_jax/csrc, registered through jax.ffi by mutualnet_jax/native.py) are built for
the installing machine (-march=native) against the XLA FFI headers that jaxlib ships; the build is optional: without a
C++ compiler the package installs and runs on its pure-JAX kernels.
"""
import os

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext


class BuildNative(build_ext):
  """Adds jaxlib's XLA FFI headers (known only once the build environment exists) and host-tuned flags."""

  def build_extensions(self):
    import jaxlib  # noqa: PLC0415  a build requirement (pyproject.toml), not importable when setup.py is parsed
    include = os.path.join(os.path.dirname(jaxlib.__file__), 'include')
    for ext in self.extensions:
      ext.include_dirs.append(include)
      ext.extra_compile_args += ['-std=c++17', '-O3', '-march=native', '-fopenmp-simd']
    super().build_extensions()

setup(
    name="mutualnet_jax",
    version="0.1.0",
    description="One slimmable ConvNet trained at every width and resolution (MutualNet / US-Net) in JAX/Flax.",
    packages=find_packages(include=["mutualnet_jax", "mutualnet_jax.*"]),
    ext_modules=[Extension("mutualnet_jax._native", ["mutualnet_jax/csrc/depthwise.cc", "mutualnet_jax/csrc/batchnorm.cc"],
                           depends=["mutualnet_jax/csrc/parallel_for.h", "mutualnet_jax/csrc/affine.h"], language="c++",
                           optional=True)],
    cmdclass={"build_ext": BuildNative},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml-collections>=0.1.1",
        "clu>=0.0.12",
        "absl-py>=2.0",
        "etils[epath]>=1.5",
        "numpy>=1.26",
        # Input pipeline: tf.data + TFDS; clu.metric_writers imports TensorFlow *and* tensorboard.
        "tensorflow-datasets>=4.9.4",
        "tensorflow-cpu>=2.16; platform_machine == 'x86_64'",
        "tensorflow>=2.16; platform_machine != 'x86_64'",
        "tensorboard>=2.16",
        # TFDS needs it to prepare a builder from local files (the offline Fashion-MNIST builder).
        "importlib_resources>=6.0",
        "matplotlib>=3.8",
    ],
    extras_require={
        # torch: tests/test_convert.py checks the converter against a PyTorch model (the CPU wheel, ~30 s to install).
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "torch==2.13.0"],
        # python -m mutualnet_jax.convert: reading official PyTorch checkpoints (weights_only loading).
        "convert": ["torch>=2.4"],
        # mutualnet_jax.tf_export uses LiteRT's TFLite interpreter when present (TensorFlow's own otherwise).
        "tflite": ["ai-edge-litert>=2.3"],
    },
)
