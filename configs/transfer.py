"""The paper's transfer setting (MutualNet Sec. 4.2, Fig. 7): fine-tune an ImageNet-trained slimmable network on a
new dataset at every width in [0.25, 1.0] and resolution in {224, 192, 160, 128}: batch 256, lr 0.1 cosine, 100
epochs. The classifier is always re-initialised (new classes); the backbone comes from --config.init_from.

  python main.py --config=configs/transfer.py --workdir=runs/cifar10_mutualnet \
      --config.init_from=runs/mnv1_imagenet --config.data_dir=gs://.../tfds                # MutualNet fine-tuning
  python main.py --config=configs/transfer.py:usnet ...                                    # or US-Net / independent
  python main.py --config=configs/transfer.py --config.dataset=cifar100 --config.model.num_classes=100 ...

init_from: the ImageNet run's workdir (or an export, or a .npz parameter file; see mutualnet_jax/init_from.py). Its
backbone and max width must be config.model's (MobileNet v1 here; set --config.model.name for another).
"""
import ml_collections

from configs.imagenet_common import imagenet_config


def get_config(method: str | None = None) -> ml_collections.ConfigDict:
  config = imagenet_config('mobilenet_v1', method)
  config.init_from = ''             # the pre-trained source ('' trains the same recipe from scratch, the baseline)
  config.init_classifier = 'fresh'  # new classes, even when as many as the source's
  config.dataset = 'cifar10'        # small images, upsampled by the pipeline to image_size
  config.model.num_classes = 10
  config.train_split = 'train'
  config.eval_split = 'test'
  config.augmentation = 'random_resized_crop'  # the ImageNet crop and flip, the whole image at evaluation
  config.image_size = 224
  config.batch_size = 256
  config.learning_rate = 0.1
  config.num_epochs = 100.0
  config.warmup_epochs = 0.0
  config.log_every_steps = 50
  config.checkpoint_every_steps = 1000
  return config
