"""The CPU-sized default: MutualNet MobileNet v1 on Fashion-MNIST (offline Debian data), resolutions 28..16."""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  return default.get_config()
