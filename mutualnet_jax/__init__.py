"""MutualNet in JAX/Flax: one slimmable ConvNet trained across widths and input resolutions.

The Python API (`mutualnet_jax.api`: `open`, `load`, ...) is re-exported here but imported on first use, so
`import mutualnet_jax` and the table-only modes (--mode=query/plot import submodules of this package) stay free of
JAX and TensorFlow.
"""
from typing import Any

__version__ = '0.1.0'
_API = ('open', 'load', 'Run', 'Row', 'ExportedModel', 'TopK', 'UserError', 'preprocessing')
__all__ = list(_API)


def __getattr__(name: str) -> Any:
  if name in _API:
    from mutualnet_jax import api  # noqa: PLC0415  lazy: the API loads JAX and TensorFlow
    return getattr(api, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
