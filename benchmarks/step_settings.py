"""The two benchmark settings of a MutualNet step, shared by train_step.py, step_profile.py and capacity.py.

  paper: MobileNet v1, ImageNet shape, batch 32, buckets (1.0,224) (0.25,128) (0.5,160) (0.75,192)
  small: the Fashion-MNIST quickstart model, batch 128, buckets (1.0,28) (0.25,16) (0.5,20) (0.75,24)

`peer` names the preset of ../shared/peers/torch_mutualnet_step.py that runs the same step in PyTorch.
"""
from __future__ import annotations

from typing import Any

SETTINGS = {
    'paper': dict(model=dict(name='mobilenet_v1', num_classes=1000, num_downsample=5), channels=3, batch=32,
                  buckets=((1.0, 224), (0.25, 128), (0.5, 160), (0.75, 192)), peer='imagenet'),
    'small': dict(model=dict(name='mobilenet_v1', num_classes=10, num_downsample=4), channels=1, batch=128,
                  buckets=((1.0, 28), (0.25, 16), (0.5, 20), (0.75, 24)), peer='fmnist'),
}


def resolutions(setting: str) -> tuple[int, ...]:
  return tuple(sorted({r for _, r in SETTINGS[setting]['buckets']}, reverse=True))


def config(setting: str, capacities: tuple[float, ...] = ()) -> Any:
  """The quickstart config with the setting's model, batch and resolutions; exact programs unless `capacities`."""
  from configs import default  # noqa: PLC0415  callers that only print tables must not import JAX
  spec = SETTINGS[setting]
  out = default.get_config()
  out.model.update(spec['model'])
  out.batch_size = spec['batch']
  out.resolutions = resolutions(setting)
  out.capacities = capacities
  out.width_sampling = 'uniform' if capacities else 'grid'
  return out


def fixed_step(setting: str) -> tuple[Any, Any, Any]:
  """(trainer, plan, batch): the setting's four sub-networks as one fixed plan on exact programs (the same work
  as the peer's step), and a random global batch at the highest resolution."""
  import numpy as np  # noqa: PLC0415
  from mutualnet_jax import parallel, train  # noqa: PLC0415
  from mutualnet_jax.sampling import StepPlan, Subnet  # noqa: PLC0415
  spec = SETTINGS[setting]
  subnets = [Subnet(f'sub{i}', w, r, 'ce' if i == 0 else 'kd') for i, (w, r) in enumerate(spec['buckets'])]
  size = subnets[0].resolution
  mesh = parallel.make_mesh()
  trainer = train.Trainer(config(setting), mesh, channels=spec['channels'], image_size=size, total_steps=1000,
                          steps_per_epoch=1000)
  rng = np.random.default_rng(0)
  batch = parallel.global_batch({
      'image': rng.standard_normal((spec['batch'], size, size, spec['channels']), np.float32),
      'label': rng.integers(0, spec['model']['num_classes'], spec['batch']).astype(np.int32)}, mesh)
  return trainer, StepPlan(subnets[0], tuple(subnets[1:])), batch
