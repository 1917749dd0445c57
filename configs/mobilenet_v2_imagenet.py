"""MobileNet v2 on ImageNet, width [0.25, 1.0] x resolutions {224, 192, 160, 128} (the paper's Fig. 4/5 setting).

  python main.py --config=configs/mobilenet_v2_imagenet.py --workdir=... --config.data_dir=gs://.../tfds
  python main.py --config=configs/mobilenet_v2_imagenet.py:usnet ...        # US-Net baseline
  python main.py --config=configs/mobilenet_v2_imagenet.py:independent ...  # one fixed network
"""
import ml_collections

from configs.imagenet_common import imagenet_config


def get_config(method: str | None = None) -> ml_collections.ConfigDict:
  return imagenet_config('mobilenet_v2', method)
