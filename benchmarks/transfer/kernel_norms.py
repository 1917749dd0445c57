"""How far a trained backbone's conv kernels grew from their initialisation: ||W|| / ||W_init||.

Why the transfer report shows it: every conv is followed by BN, so a kernel's effective learning rate is about
lr / ||w||^2. MutualNet sums four sub-networks' gradients on the shared leading channels, whose norms then grow much
faster than an independent network's; a short fine-tuning barely moves a backbone whose kernels grew large. The ratio
is taken over every conv kernel of the tree (the classifier excluded: fine-tuning replaces it) and over the slice the
narrowest sub-network reads, where the summed gradients concentrate.

  python benchmarks/transfer/kernel_norms.py WORKDIR [WORKDIR ...]     # one JSON line per workdir

The initialisation is recomputed from the run's seed exactly as training drew it (train_state: models.init_params
with jax.random.key(seed)).
"""
from __future__ import annotations

import json
import sys
from typing import Any

import jax
import numpy as np

from mutualnet_jax import export, trained_run, workdir as workdir_lib
from mutualnet_jax.models import init_params

NARROW = 0.25  # the slice reported besides the whole tree: the narrowest width of the quickstart's range


def _conv_kernels(params: Any) -> dict[str, np.ndarray]:
  """Every 4-d kernel (regular and depthwise convs) by its path; dense layers (the classifier) are 2-d."""
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(leaf, np.float64) for path, leaf in flat
          if np.ndim(leaf) == 4}


def _ratio(trained: dict[str, np.ndarray], initial: dict[str, np.ndarray]) -> float:
  return float(np.sqrt(sum(np.sum(w ** 2) for w in trained.values()) /
                       sum(np.sum(initial[k] ** 2) for k in trained)))


def ratios(workdir: str) -> dict[str, Any]:
  """The norm ratios of a trained workdir's latest checkpoint: the whole tree, the NARROW slice, and per layer."""
  config = workdir_lib.saved_config(workdir)
  run = trained_run.open_run(config, workdir)
  initial = init_params(run.model, jax.random.key(int(config.seed)), run.model.min_resolution, run.channels)
  # The slice is the leading channels whatever the run trained (an independent network's too); the resolution
  # changes no parameter shape.
  narrow = [export.narrow_params(run.model, p, NARROW, run.model.min_resolution, run.channels)
            for p in (run.params, initial)]
  whole = [_conv_kernels(p) for p in (run.params, initial)]
  sliced = [_conv_kernels(p) for p in narrow]
  return {'workdir': workdir, 'step': run.step, 'seed': int(config.seed), 'whole': _ratio(*whole),
          'narrow_width': NARROW, 'narrow': _ratio(*sliced),
          'per_layer': {k: _ratio({k: whole[0][k]}, whole[1]) for k in whole[0]}}


def main(argv: list[str]) -> int:
  for workdir in argv[1:]:
    print(json.dumps(ratios(workdir)), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
