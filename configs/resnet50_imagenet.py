"""ResNet-50 on ImageNet, width [0.25, 1.0] x resolutions {224, 192, 160, 128} (the paper's ResNet-50 setting).

The official MutualNet ResNet-50 recipe (apps/resnet50.yml): batch 512, lr 0.2 cosine, Nesterov, weight decay 1e-4,
120 epochs; ResNet's stronger crop augmentation (area 8-100 %).

  python main.py --config=configs/resnet50_imagenet.py --workdir=... --config.data_dir=gs://.../tfds
  python main.py --config=configs/resnet50_imagenet.py:usnet ...        # US-Net baseline
  python main.py --config=configs/resnet50_imagenet.py:independent ...  # one fixed network
"""
import ml_collections

from configs.imagenet_common import imagenet_config

# A step of these backbones costs far more than compiling its programs, so random widths get 7 capacities, finer
# than the MobileNets' 5: a random width pads fewer multiply-adds, for 1 + 4 + 7 x 4 = 33 training programs (not 25).
CAPACITIES = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def get_config(method: str | None = None) -> ml_collections.ConfigDict:
  config = imagenet_config('resnet50', method)
  config.capacities = CAPACITIES
  config.crop_scale = (0.08, 1.0)
  config.batch_size = 512
  config.learning_rate = 0.2
  config.num_epochs = 120.0
  return config
