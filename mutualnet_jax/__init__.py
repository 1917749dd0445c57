"""MutualNet in JAX/Flax: one slimmable ConvNet trained across widths and input resolutions."""

__version__ = '0.1.0'
