"""Trains one slimmable network with MutualNet, or turns a trained one into a width x resolution menu.

  python main.py --config=configs/fashion_mnist.py --workdir=/tmp/fmnist [--config.num_epochs=1 ...]
"""
from absl import app, flags, logging
from ml_collections import config_flags

from mutualnet_jax.cli import run_cli

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and tables.')
flags.DEFINE_enum('mode', 'train', ['train'], 'What to run.')
flags.DEFINE_string('coordinator_address', '', 'Multi-process jobs: host:port of process 0 (empty: auto-detect '
                    'on TPU pods / SLURM when --distributed).')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() before anything else.')
flags.DEFINE_integer('num_processes', 0, 'With --coordinator_address: number of processes.')
flags.DEFINE_integer('process_id', -1, 'With --coordinator_address: this process.')
config_flags.DEFINE_config_file('config', None, 'Training configuration (configs/*.py).', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from mutualnet_jax import parallel, train  # pylint: disable=g-import-not-at-top
  if FLAGS.distributed or FLAGS.coordinator_address:
    parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  logging.info('Config:\n%s', FLAGS.config)
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  run_cli(app, main)
