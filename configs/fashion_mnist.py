"""The CPU-sized default: MutualNet on Fashion-MNIST from the offline Debian package, in minutes on 2 cores.

  python main.py --config=configs/fashion_mnist.py --workdir=/tmp/fmnist
  python main.py --config=configs/fashion_mnist.py:usnet --workdir=/tmp/fmnist_usnet
"""
import ml_collections

from configs import default


def get_config(method: str = 'mutualnet') -> ml_collections.ConfigDict:
  config = default.get_config()
  config.method = method or 'mutualnet'
  return config
