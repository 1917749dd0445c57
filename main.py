"""Trains one slimmable network with MutualNet, or turns a trained one into a width x resolution menu.

  python main.py --config=configs/fashion_mnist.py --workdir=/tmp/fmnist [--config.num_epochs=1 ...]
  python main.py --mode=sweep --workdir=/tmp/fmnist   # the config saved by training; or pass --config
  python main.py --mode=query --workdir=/tmp/fmnist --budget_mflops=20 [--format=json]
  python main.py --mode=export --workdir=/tmp/fmnist --width=0.75 --resolution=24
  python main.py --mode=plot --workdir=/tmp/plots --workdirs=/tmp/mutualnet,/tmp/usnet --labels=MutualNet,US-Net

The process restarts itself once under tcmalloc when the machine has it (mutualnet_jax/allocator.py: ~1.5x faster
steps on XLA:CPU); MUTUALNET_MALLOC=system keeps the system allocator.
"""
from mutualnet_jax import allocator
from mutualnet_jax.cli import fail, parse_numbers, run_cli
from mutualnet_jax.errors import UserError

if __name__ == '__main__':
  try:
    allocator.use()  # before JAX/TensorFlow are loaded: the allocator is fixed when a process starts
  except UserError as e:
    fail(str(e))

import json  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and tables (plot: where the figure goes).')
flags.DEFINE_enum('mode', 'train', ['train', 'calibrate', 'sweep', 'query', 'export', 'plot'],
                  'What to run: train, then calibrate/sweep the trained network, query/plot its table, export one.')
flags.DEFINE_float('width', None, 'calibrate/export: the width (calibrate: default every width of the grid).')
flags.DEFINE_integer('resolution', None, 'calibrate/export: the resolution (calibrate: default every one).')
flags.DEFINE_list('widths', None, 'sweep: widths to measure (default: the config.sweep_width_step grid over the '
                  'trained width range).')
flags.DEFINE_list('resolutions', None, 'sweep: resolutions to measure (default: config.resolutions).')
flags.DEFINE_integer('latency_repeats', 10, 'sweep: timed calls per latency (median, after a warm-up call).')
flags.DEFINE_float('budget_mflops', None, 'query: most millions of multiply-adds per image.')
flags.DEFINE_float('budget_ms', None, 'query: most milliseconds at batch 1 (on the device the sweep ran on).')
flags.DEFINE_enum('format', 'text', ['text', 'json'], 'query/calibrate/sweep output: for people or for scripts.')
flags.DEFINE_list('workdirs', None, 'plot: swept workdirs to overlay, each WORKDIR or WORKDIR@RES (rows at RES only).')
flags.DEFINE_list('labels', None, 'plot: one label per --workdirs entry; equal labels are pooled.')
flags.DEFINE_string('out', None, 'export/plot: output path (default: inside --workdir).')
flags.DEFINE_string('coordinator_address', '', 'Multi-process jobs: host:port of process 0 (empty: auto-detect '
                    'on TPU pods / SLURM when --distributed).')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() before anything else.')
flags.DEFINE_integer('num_processes', 0, 'With --coordinator_address: number of processes.')
flags.DEFINE_integer('process_id', -1, 'With --coordinator_address: this process.')
config_flags.DEFINE_config_file('config', None, 'Training configuration (configs/*.py); calibrate/sweep/export '
                                'default to the config.json that training wrote in --workdir.', lock_config=True)
flags.mark_flags_as_required(['workdir'])


def _optional(value):
  return None if value is None else [value]


def _print(result, text):
  print(json.dumps(result) if FLAGS.format == 'json' else text)


def train(config, workdir):
  from mutualnet_jax import train as training  # pylint: disable=g-import-not-at-top
  logging.info('Config:\n%s', config)
  training.train_and_evaluate(config, workdir)


def calibrate(config, workdir):
  from mutualnet_jax import sweep  # pylint: disable=g-import-not-at-top
  r = sweep.calibrate(config, workdir, _optional(FLAGS.width), _optional(FLAGS.resolution))
  _print(r, f"{r['calibrated']} configurations calibrated, {r['reused']} reused from {r['store']} in "
            f"{r['seconds']:.1f} s ({r['compiles']} compilations).")


def sweep_grid(config, workdir):
  from mutualnet_jax import sweep  # pylint: disable=g-import-not-at-top
  s = sweep.run_sweep(config, workdir, parse_numbers(FLAGS.widths, float, 'widths'),
                      parse_numbers(FLAGS.resolutions, int, 'resolutions'),
                      latency_repeats=FLAGS.latency_repeats)
  _print(s, f"{s['configurations']} configurations in {s['wall_seconds']:.0f} s ({s['compiles']} compilations): "
            f"{', '.join(s.get('table', []))}; plot {s.get('plot')}")


def query(config, workdir):
  del config
  from mutualnet_jax import sweep  # pylint: disable=g-import-not-at-top
  rows, _ = sweep.read_table(workdir)
  if FLAGS.budget_mflops is None and FLAGS.budget_ms is None:
    frontier = sweep.pareto_frontier(rows)
    _print([json.loads(sweep.query_json(r)) for r in frontier], 'Pareto frontier (MACs):\n' +
           sweep.format_rows(frontier))
  else:
    best = sweep.query(rows, FLAGS.budget_mflops, FLAGS.budget_ms)
    print(sweep.query_json(best) if FLAGS.format == 'json' else sweep.describe(best))


def export(config, workdir):
  from mutualnet_jax import export as exporting  # pylint: disable=g-import-not-at-top
  if FLAGS.width is None or FLAGS.resolution is None:
    raise UserError('--mode=export needs --width and --resolution.')
  print(exporting.export_run(config, workdir, FLAGS.width, FLAGS.resolution, FLAGS.out))


def plot(config, workdir):
  del config
  from mutualnet_jax import plots  # pylint: disable=g-import-not-at-top
  out = FLAGS.out or f"{workdir}/{plots.OVERLAY_NAME if FLAGS.workdirs else plots.PLOT_NAME}"
  print(plots.from_workdirs(FLAGS.workdirs or [workdir], FLAGS.labels, out))


MODES = {'train': train, 'calibrate': calibrate, 'sweep': sweep_grid, 'query': query, 'export': export, 'plot': plot}
NEEDS_CONFIG = ('calibrate', 'sweep', 'export')  # default: the config.json that training saved


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = FLAGS.config
  if config is None and FLAGS.mode == 'train':
    raise UserError('--mode=train needs --config, e.g. --config=configs/fashion_mnist.py.')
  if config is None and FLAGS.mode in NEEDS_CONFIG:
    from mutualnet_jax import checkpointing, trained  # pylint: disable=g-import-not-at-top
    checkpointing.require_checkpoint(FLAGS.workdir)  # the first thing missing from an untrained workdir
    config = trained.saved_config(FLAGS.workdir)
  if FLAGS.distributed or FLAGS.coordinator_address:
    from mutualnet_jax import parallel  # pylint: disable=g-import-not-at-top
    parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  MODES[FLAGS.mode](config, FLAGS.workdir)


if __name__ == '__main__':
  run_cli(app, main)
