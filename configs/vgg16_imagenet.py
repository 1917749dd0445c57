"""VGG-16 (with batch norm) on ImageNet, width [0.25, 1.0] x resolutions {224, 192, 160, 128}.

The detection backbone, trained like ResNet-50 (no official MutualNet VGG recipe exists): batch 512, lr 0.2 cosine,
120 epochs, crop area 8-100 %. `--config.model.head=pool` drops fc6/fc7 (global average pooling + classifier), the
usual form under a detection head; the 'fc' head (default) is the classification network of the paper's tables.

  python main.py --config=configs/vgg16_imagenet.py --workdir=... --config.data_dir=gs://.../tfds
  python main.py --config=configs/vgg16_imagenet.py:usnet ...        # US-Net baseline
  python main.py --config=configs/vgg16_imagenet.py:independent ...  # one fixed network
"""
import ml_collections

from configs.imagenet_common import imagenet_config
from configs.resnet50_imagenet import CAPACITIES


def get_config(method: str | None = None) -> ml_collections.ConfigDict:
  config = imagenet_config('vgg16', method)
  config.model.head = 'fc'         # 'fc' (fc6, fc7, classifier) | 'pool' (global average pooling, classifier)
  config.model.fc_features = 4096  # fc6/fc7 units at width 1.0
  config.model.head_pool = 7       # the grid fc6 reads (adaptive average pooling)
  config.capacities = CAPACITIES
  config.crop_scale = (0.08, 1.0)
  config.batch_size = 512
  config.learning_rate = 0.2
  config.num_epochs = 120.0
  return config
