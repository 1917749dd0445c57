"""Wide MobileNet v1 on ImageNet: width [1.0, 2.0] x resolutions {224, 256, 288, 320} (the paper's Table 1).

Parameters are created at 2.0x; the pipeline delivers 320 px and every sub-network resizes on the device.
"""
import ml_collections

from configs.imagenet_common import imagenet_config


def get_config(method: str | None = None) -> ml_collections.ConfigDict:
  config = imagenet_config('mobilenet_v1', method)
  config.model.max_width = 2.0
  config.width_range = (1.0, 2.0)
  config.capacities = (1.2, 1.4, 1.6, 1.8, 2.0)
  config.resolutions = (320, 288, 256, 224)
  config.independent_width = 2.0
  config.independent_resolution = 320
  return config
