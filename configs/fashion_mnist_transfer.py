"""Fine-tuning at CPU scale (benchmarks/transfer): Fashion-MNIST classes 5-9 with 1,000 labelled images, from a
backbone pre-trained on classes 0-4, in the spirit of the paper's transfer setting (configs/transfer.py).

  python main.py --config=configs/default.py:usnet --workdir=runs/pre_usnet \
      --config.dataset=fashion_mnist_local/classes_0_4 --config.model.num_classes=5            # pre-train
  python main.py --config=configs/fashion_mnist_transfer.py --workdir=runs/ft_from_usnet \
      --config.init_from=runs/pre_usnet                                                        # fine-tune
  python main.py --mode=sweep --workdir=runs/ft_from_usnet --widths=1,0.75,0.5,0.25            # every width x res

The method (config argument) is how the fine-tuning trains; the quickstart model and resolutions, so any backbone
pre-trained with configs/default.py loads. init_from='' trains the same recipe from scratch.
"""
import ml_collections

from configs import default


def get_config(method: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(method)
  config.init_from = ''
  config.init_classifier = 'fresh'    # classes 5-9 are new, though as many as the source's 0-4
  config.dataset = 'fashion_mnist_local/classes_5_9'  # labels 0-4
  config.model.num_classes = 5
  config.train_split = 'train[:1000]'  # the small labelled budget (about 200 images per class)
  config.eval_split = 'test'           # 5,000 images
  config.batch_size = 100              # 10 steps per epoch
  config.num_epochs = 15.0
  config.learning_rate = 0.04          # the recipe's 0.1 at batch 256, scaled to batch 100
  config.warmup_epochs = 1.0           # 10 steps: training from scratch diverges without one
  config.calibration_images = 1000     # the whole labelled set
  config.calibration_batch_size = 100
  config.eval_calibration_images = 1000
  config.eval_every_steps = 0          # the sweep measures every configuration afterwards
  config.log_every_steps = 10
  config.checkpoint_every_steps = 50
  return config
