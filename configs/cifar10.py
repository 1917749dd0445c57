"""MutualNet on CIFAR-10: MobileNet v2 for 32 px images, widths [0.25, 1.0] x resolutions {32, 28, 24, 20}.

  tfds build cifar10 --data_dir=~/tensorflow_datasets     # once, on a machine with network
  python main.py --config=configs/cifar10.py --workdir=runs/cifar10 [--config.data_dir=...]
  python main.py --config=configs/cifar10.py:usnet --workdir=runs/cifar10_usnet   # or :independent

The optimisation and the resolution set are the official MutualNet CIFAR recipe (apps/wideresnet.yml: SGD nesterov
0.9, lr 0.1 cosine, weight decay 5e-4, batch 128, 200 epochs, resolutions 32/28/24/20); the backbone is this
project's MobileNet v2 with 3 stride-2 layers (the ImageNet 5 would leave 1x1 maps at 32 px). The normalisation is
CIFAR-10's known per-channel mean/std (input_pipeline); for another dataset set --config.mean/--config.std.
"""
import ml_collections

from configs import default


def get_config(method: str | None = None) -> ml_collections.ConfigDict:
  """`method`: the text after the config file's colon ('' or None: MutualNet), as in configs/default.py."""
  config = default.get_config(method)
  config.model.name = 'mobilenet_v2'
  config.model.num_classes = 10
  config.model.num_downsample = 3   # 32 px -> 4x4 final maps; min resolution 8
  config.dataset = 'cifar10'
  config.train_split = 'train'
  config.eval_split = 'test'
  config.augmentation = 'small'     # pad 4 + random crop + flip, the CIFAR recipe
  config.pad_crop = 4
  config.resolutions = (32, 28, 24, 20)
  config.independent_resolution = 32
  config.batch_size = 128
  config.num_epochs = 200.0
  config.learning_rate = 0.1
  config.weight_decay = 5e-4
  config.eval_batch_size = 1000
  config.checkpoint_every_steps = 2000
  config.log_every_steps = 100
  return config
