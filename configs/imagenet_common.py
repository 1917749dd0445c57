"""The paper's ImageNet recipe (MutualNet, Yang et al. 2020, Sec. 4.1), shared by the ImageNet configs.

Select the baselines with the config argument: `--config=configs/mobilenet_v1_imagenet.py:usnet` (US-Net: widths
only, highest resolution) or `:independent` (one fixed network, --config.independent_width/resolution).
"""
import ml_collections

from configs import default


def imagenet_config(model: str, method: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(method)
  config.model.name = model
  config.model.num_classes = 1000
  config.model.num_downsample = 5
  # The half-precision switch (the Flax ImageNet example's half_precision): --config.model.dtype=bfloat16 on TPUs
  # and recent GPUs; 'float16' (older GPUs) trains with dynamic loss scaling. Parameters and BN statistics stay
  # float32. On CPU float32 is faster (the native kernels are float32).
  config.model.dtype = 'float32'
  config.width_range = (0.25, 1.0)
  config.capacities = (0.4, 0.55, 0.7, 0.85, 1.0)  # 1 + 4 + 5 x 4 = 25 training programs
  config.width_step = 0.05
  config.sweep_width_step = 0.05
  config.resolutions = (224, 192, 160, 128)
  config.independent_width = 1.0
  config.independent_resolution = 224
  config.dataset = 'imagenet2012'
  config.train_split = 'train'
  config.eval_split = 'validation'
  config.augmentation = 'imagenet'
  config.crop_scale = (0.25, 1.0)  # MobileNets: weaker crop augmentation than ResNets' (0.08, 1)
  config.color_jitter = 0.4  # the official transforms: ColorJitter(0.4, 0.4, 0.4), Lighting(0.1), flip
  config.lighting = 0.1
  config.batch_size = 1024
  config.num_epochs = 250.0
  config.learning_rate = 0.5
  config.warmup_epochs = 0.0  # the paper's recipe: cosine from the start
  config.weight_decay = 1e-4
  config.nesterov = True
  config.eval_batch_size = 1000
  config.calibration_images = 2000
  config.calibration_batch_size = 250
  config.eval_calibration_images = 2000
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  return config
