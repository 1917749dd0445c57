"""Runs one MutualNet step in a fresh process for the multi-device / multi-process tests (test_train.py).

Modes: devices (8 fake CPU devices vs 1), bad_batch, multiprocess (one of 2 processes on localhost), single.
Parameters after the step are written to --out as .npz for the test to compare.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from mutualnet_jax import parallel, train  # noqa: E402
from mutualnet_jax.errors import UserError  # noqa: E402
from mutualnet_jax.sampling import StepPlan, Subnet  # noqa: E402
from tests.util import tiny_config  # noqa: E402

flags.DEFINE_enum('mode', 'single', ['devices', 'bad_batch', 'multiprocess', 'single'], 'What to run.')
flags.DEFINE_string('out', '/tmp', 'Output directory.')
flags.DEFINE_integer('process_id', 0, 'multiprocess: this process.')
flags.DEFINE_string('port', '23456', 'multiprocess: coordinator port.')
FLAGS = flags.FLAGS
PLAN = StepPlan(Subnet('max', 1.0, 16, 'ce'), (Subnet('min', 0.25, 8, 'kd'),))
BATCH = 8


def global_images():
  rng = np.random.RandomState(0)
  return rng.randn(BATCH, 16, 16, 1).astype(np.float32), (np.arange(BATCH) % 10).astype(np.int32)


def one_step(mesh, rows, bn_sync=True):
  """A step on `mesh` with this process's `rows` of the global batch; returns flattened params."""
  trainer = train.Trainer(tiny_config(bn_sync=bn_sync), mesh, channels=1, image_size=16, total_steps=10,
                          steps_per_epoch=10)
  images, labels = global_images()
  batch = parallel.global_batch({'image': images[rows], 'label': labels[rows]}, mesh)
  state, _ = trainer.step(trainer.init_state(0), batch, PLAN)
  leaves = jax.tree_util.tree_leaves_with_path(state.params)
  return {jax.tree_util.keystr(k): np.asarray(v.addressable_data(0)) for k, v in leaves}


def main(argv):
  del argv
  everything = slice(None)
  if FLAGS.mode == 'devices':
    devices = jax.devices()
    assert len(devices) == 8, devices
    np.savez(os.path.join(FLAGS.out, 'devices_8.npz'), **one_step(Mesh(np.asarray(devices), ('data',)), everything))
    np.savez(os.path.join(FLAGS.out, 'devices_1.npz'), **one_step(Mesh(np.asarray(devices[:1]), ('data',)),
                                                                  everything))
    # The default, per-device BN statistics (one group per device), on 8 devices.
    np.savez(os.path.join(FLAGS.out, 'per_device_bn.npz'), **one_step(Mesh(np.asarray(devices), ('data',)),
                                                                      everything, bn_sync=False))
  elif FLAGS.mode == 'bad_batch':
    try:
      train.Trainer(tiny_config(batch_size=12), parallel.make_mesh(), channels=1, image_size=16, total_steps=1,
                    steps_per_epoch=1)
    except UserError as e:
      open(os.path.join(FLAGS.out, 'bad_batch.txt'), 'w').write(str(e))
  elif FLAGS.mode == 'multiprocess':
    parallel.initialize_distributed(f'127.0.0.1:{FLAGS.port}', 2, FLAGS.process_id)
    assert jax.process_count() == 2 and len(jax.devices()) == 2
    half = BATCH // 2
    rows = slice(FLAGS.process_id * half, (FLAGS.process_id + 1) * half)
    np.savez(os.path.join(FLAGS.out, f'process_{FLAGS.process_id}.npz'), **one_step(parallel.make_mesh(), rows))
  else:
    np.savez(os.path.join(FLAGS.out, 'single.npz'), **one_step(parallel.make_mesh(), everything))


if __name__ == '__main__':
  app.run(main)
