"""Local TFDS builders; importing this package registers them with TFDS.

`LOCAL_BUILDERS` maps a dataset name to the module that can find its raw files, so the input pipeline can prepare
it on first use without a network.
"""
from mutualnet_jax.datasets import fashion_mnist_local

LOCAL_BUILDERS = {'fashion_mnist_local': fashion_mnist_local}
