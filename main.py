"""Trains one slimmable network with MutualNet, or turns a trained one into a width x resolution menu.

  python main.py --config=configs/default.py --workdir=/tmp/fmnist [--config.num_epochs=1 ...]
  python main.py --mode=sweep --workdir=/tmp/fmnist   # the config saved by training; or pass --config
  python main.py --mode=calibrate --workdir=/tmp/official --images=DIR_OR_NPY_OR_tfds:NAME   # BN from any images
  python main.py --mode=query --workdir=/tmp/fmnist --budget_mflops=20 [--format=json]
  python main.py --mode=export --workdir=/tmp/fmnist --width=0.75 --resolution=24
  python main.py --mode=predict --workdir=/tmp/fmnist --budget_ms=2 [--images=DIR_OR_NPY] [--count=10]
  python main.py --mode=plot --workdir=/tmp/plots --workdirs=/tmp/mutualnet,/tmp/usnet --labels=MutualNet,US-Net

The process restarts itself once under tcmalloc when the machine has it (mutualnet_jax/allocator.py); the modes
themselves live in mutualnet_jax/commands.py.
"""
from mutualnet_jax import allocator
from mutualnet_jax.cli import fail, loaded_config, parse_numbers, run_cli
from mutualnet_jax.errors import UserError

if __name__ == '__main__':
  try:
    allocator.use()  # before JAX/TensorFlow are loaded: the allocator is fixed when a process starts
  except UserError as e:
    fail(str(e))

from absl import app, flags  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # noqa: E402  pylint: disable=g-import-not-at-top

from mutualnet_jax import commands  # noqa: E402  pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and tables (plot: where the figure goes).')
flags.DEFINE_enum('mode', 'train', commands.MODES,
                  'What to run: train, then calibrate/sweep the trained network, query/plot its table, export one, '
                  'predict with the budget-adaptive network.')
flags.DEFINE_float('width', None, 'calibrate/export: the width (calibrate: default every width of the grid).')
flags.DEFINE_integer('resolution', None, 'calibrate/export: the resolution (calibrate: default every one).')
flags.DEFINE_list('widths', None, 'sweep: widths to measure (default: the config.sweep_width_step grid over the '
                  'trained width range).')
flags.DEFINE_list('resolutions', None, 'sweep: resolutions to measure (default: config.resolutions).')
flags.DEFINE_integer('latency_repeats', 10, 'sweep: most timed calls per latency (median, after a warm-up call; '
                     'stops after 3 calls once 2 s are spent).')
flags.DEFINE_float('budget_mflops', None, 'query/predict: most millions of multiply-adds per image.')
flags.DEFINE_float('budget_ms', None, 'query/predict: most milliseconds at batch 1 (on the device the sweep ran on).')
flags.DEFINE_enum('latency', 'jax', ['jax', 'tflite'], 'query: the runtime --budget_ms bounds (tflite: measured by '
                  '--mode=sweep --tflite_latency).')
flags.DEFINE_bool('tflite_latency', False, 'sweep: also time each configuration in the TFLite interpreter (about 2 s '
                  'more per configuration), so --latency=tflite queries can target it.')
flags.DEFINE_bool('batch_latency', False, 'sweep: also time one eval batch per configuration (one more program to '
                  'compile per configuration; the ms@batch column).')
flags.DEFINE_string('images', None, 'predict: an .npy of raw images (N, H, W, C) or a folder of image files, all of '
                    'one size (default: --count images of --split). calibrate/sweep: calibrate BN on these images '
                    'instead of the training split (sizes may differ; or tfds:NAME, a prepared dataset of any '
                    'classes); no labels needed.')
flags.DEFINE_string('split', None, 'predict: the dataset split to take images and labels from (default: the run\'s '
                    'eval split); calibrate/sweep: the split of --images=tfds:NAME (default: train).')
flags.DEFINE_integer('count', None, f'predict: how many images (default: {commands.PREDICT_COUNT} of the split, or '
                     'all of --images).')
flags.DEFINE_enum('format', 'text', ['text', 'json'], 'query/calibrate/sweep/predict output: for people or for '
                  'scripts.')
flags.DEFINE_list('workdirs', None, 'plot: swept workdirs to overlay, each WORKDIR or WORKDIR@RES (rows at RES only).')
flags.DEFINE_list('labels', None, 'plot: one label per --workdirs entry; equal labels are pooled.')
flags.DEFINE_string('out', None, 'export/plot: output path; sweep/calibrate: directory for the table, plot and BN '
                    'statistics (needed for a read-only workdir). Default: inside --workdir.')
flags.DEFINE_bool('overwrite', False, 'export: replace an earlier export at the output path (nothing else is ever '
                  'replaced: a training workdir, a file or a directory of other files is refused).')
flags.DEFINE_bool('resume_with_changes', False, 'train: resume although settings that change the run differ from '
                  'the checkpoint\'s config.json (the changes are recorded there).')
flags.DEFINE_string('coordinator_address', '', 'Multi-process jobs: host:port of process 0 (empty: auto-detect '
                    'on TPU pods / SLURM when --distributed).')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() before anything else.')
flags.DEFINE_integer('num_processes', 0, 'With --coordinator_address: number of processes.')
flags.DEFINE_integer('process_id', -1, 'With --coordinator_address: this process.')
config_flags.DEFINE_config_file('config', None, 'Training configuration (configs/*.py); calibrate/sweep/export '
                                'default to the config.json that training wrote in --workdir.', lock_config=True)
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.distributed or FLAGS.coordinator_address:
    from mutualnet_jax import parallel  # noqa: PLC0415  heavy (JAX), and only multi-process jobs need it
    parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  options = commands.Options(
      width=FLAGS.width, resolution=FLAGS.resolution, widths=parse_numbers(FLAGS.widths, float, 'widths'),
      resolutions=parse_numbers(FLAGS.resolutions, int, 'resolutions'), latency_repeats=FLAGS.latency_repeats,
      budget_mflops=FLAGS.budget_mflops, budget_ms=FLAGS.budget_ms, format=FLAGS.format, workdirs=FLAGS.workdirs,
      labels=FLAGS.labels, out=FLAGS.out, resume_with_changes=FLAGS.resume_with_changes, overwrite=FLAGS.overwrite,
      tflite_latency=FLAGS.tflite_latency, batch_latency=FLAGS.batch_latency, latency=FLAGS.latency,
      images=FLAGS.images, split=FLAGS.split, count=FLAGS.count)
  print(commands.run(FLAGS.mode, loaded_config(FLAGS.config), FLAGS.workdir, options))


if __name__ == '__main__':
  run_cli(app, main)
