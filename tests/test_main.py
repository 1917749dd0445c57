"""The training program end to end on real Fashion-MNIST: exact resume, SIGKILL mid-save, one-line errors."""
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from mutualnet_jax import checkpointing, parallel, train, workdir as wd
from mutualnet_jax.errors import UserError
from tests.util import snapshot_files, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow  # every test here trains or runs main.py
STEPS = 6


def run_config(fashion_dir, **overrides):
  """Tiny model on real data at 16 px; evaluation only at the end, on few images, to keep the test short."""
  settings = dict(data_dir=str(fashion_dir), num_train_steps=STEPS, batch_size=16, log_every_steps=2,
                  checkpoint_every_steps=2, eval_every_steps=1000, eval_calibration_images=64,
                  calibration_batch_size=32, eval_batch_size=2000, shuffle_buffer=256)
  return tiny_config(**{**settings, **overrides})


def final_params(workdir, config):
  trainer = train.Trainer(config, parallel.make_mesh(), channels=1, image_size=16, total_steps=STEPS,
                          steps_per_epoch=STEPS)
  ckpt = checkpointing.Checkpoints(str(workdir), keep=3, expected=checkpointing.fingerprint(config, 1))
  state, meta = ckpt.restore(ckpt.latest_step(), trainer.abstract_state())
  ckpt.close()
  return jax.tree.map(np.asarray, jax.device_get(state.params)), meta


def assert_bit_identical(a, b):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope='module')
def straight(fashion_data_dir, tmp_path_factory):
  """A run of STEPS steps without interruption: the reference for the resume tests."""
  workdir = tmp_path_factory.mktemp('straight')
  config = run_config(fashion_data_dir)
  summary = train.train_and_evaluate(config, str(workdir))
  return workdir, config, summary


def test_straight_run_trains_evaluates_and_checkpoints(straight):
  workdir, config, summary = straight
  assert summary['step'] == STEPS
  assert 0.0 <= summary['eval_top1/max'] <= 1.0 and 'eval_top1/min' in summary
  assert sorted(int(p) for p in os.listdir(workdir / 'checkpoints') if p.isdigit()) == [2, 4, 6]
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))
  saved = wd.saved_config(str(workdir))  # what calibrate/sweep/export use when --config is omitted
  assert saved.to_dict() == config.to_dict() and isinstance(saved.resolutions, tuple)


def test_resume_is_bit_identical(straight, fashion_data_dir, tmp_path):
  workdir, config, _ = straight
  split = run_config(fashion_data_dir, steps_per_run=STEPS // 2)
  first = train.train_and_evaluate(split, str(tmp_path))
  assert first['step'] == STEPS // 2
  second = train.train_and_evaluate(split, str(tmp_path))  # the same command again continues
  assert second['step'] == STEPS
  expected, expected_meta = final_params(workdir, config)
  got, got_meta = final_params(tmp_path, config)
  assert_bit_identical(expected, got)
  assert got_meta['step'] == expected_meta['step'] == STEPS


def test_a_checkpoint_with_the_old_sampler_state_still_resumes(fashion_data_dir, tmp_path):
  """Checkpoints written before the stateless sampler carry a NumPy generator state; they resume (with a warning)."""
  config = run_config(fashion_data_dir)
  trainer = train.Trainer(config, parallel.make_mesh(), channels=1, image_size=16, total_steps=STEPS,
                          steps_per_epoch=STEPS)
  ckpt = checkpointing.Checkpoints(str(tmp_path), keep=3, expected=checkpointing.fingerprint(config, 1))
  old_meta = {'step': 4, 'sampler': np.random.default_rng(0).bit_generator.state}
  ckpt.save(4, trainer.init_state(0), old_meta)
  ckpt.close()
  assert train.train_and_evaluate(config, str(tmp_path))['step'] == STEPS


def _main(workdir, *overrides):
  return [sys.executable, os.path.join(ROOT, 'main.py'), '--config=configs/default.py', f'--workdir={workdir}',
          *overrides]


def _tiny_overrides(data_dir, steps, *replacements):
  """Command-line overrides for a tiny run; `replacements` ('--config.x=y') replace the defaults of their fields
  (main.py refuses a field given twice)."""
  replaced = {r.split('=', 1)[0] for r in replacements}
  return [a for a in _tiny_defaults(data_dir, steps) if a.split('=', 1)[0] not in replaced] + list(replacements)


def _tiny_defaults(data_dir, steps):
  return [f'--config.data_dir={data_dir}', '--config.model.name=tiny_convnet', '--config.model.num_downsample=3',
          '--config.resolutions=(16,8)', '--config.capacities=(1.0,)',
          '--config.width_step=0.75', '--config.batch_size=16', f'--config.num_train_steps={steps}',
          '--config.checkpoint_every_steps=1', '--config.eval_every_steps=0',
          '--config.eval_calibration_images=64', '--config.calibration_batch_size=32',
          '--config.eval_batch_size=2000', '--config.shuffle_buffer=256', '--config.compilation_cache_dir=',
          '--config.keep_checkpoints=100']


def test_sigkill_mid_save_resumes_from_the_last_complete_checkpoint(fashion_data_dir, tmp_path):
  steps, kill_at = 12, 7
  ckpt_dir = tmp_path / 'checkpoints'
  killed = subprocess.run([sys.executable, os.path.join(ROOT, 'tests', 'kill_mid_save.py'),
                           *_main(tmp_path, *_tiny_overrides(fashion_data_dir, steps))[2:]],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, 'KILL_AT_STEP': str(kill_at)})
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert [e for e in os.listdir(ckpt_dir) if 'tmp' in e], 'the killed save left no temporary directory'
  complete = sorted(int(e) for e in os.listdir(ckpt_dir) if e.isdigit())
  assert complete[-1] == kill_at - 1
  resumed = subprocess.run(_main(tmp_path, *_tiny_overrides(fashion_data_dir, steps)), cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'Resumed from step {complete[-1]}.' in resumed.stderr
  assert not [e for e in os.listdir(ckpt_dir) if 'tmp' in e]
  assert max(int(e) for e in os.listdir(ckpt_dir) if e.isdigit()) == steps


def test_sigterm_saves_stops_and_the_same_command_resumes(fashion_data_dir, tmp_path):
  steps, term_at = 8, 3
  cmd = _main(tmp_path, *_tiny_overrides(fashion_data_dir, steps, '--config.checkpoint_every_steps=100'))
  stopped = subprocess.run([sys.executable, os.path.join(ROOT, 'tests', 'sigterm_at_step.py'), *cmd[2:]], cwd=ROOT,
                           capture_output=True, text=True, timeout=600,
                           env={**os.environ, 'SIGTERM_AT_STEP': str(term_at)})
  assert stopped.returncode == 0, stopped.stderr[-3000:]
  assert f'Stopped at step {term_at} after SIGTERM' in stopped.stderr
  assert sorted(e for e in os.listdir(tmp_path / 'checkpoints') if e.isdigit()) == [str(term_at)]
  resumed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'Resumed from step {term_at}.' in resumed.stderr
  assert sorted(int(e) for e in os.listdir(tmp_path / 'checkpoints') if e.isdigit()) == [term_at, steps]


def test_relative_workdir_trains_checkpoints_and_resumes(fashion_data_dir, tmp_path):
  """`--workdir=runs/x` as the README writes it: orbax only takes absolute paths, so the program resolves it."""
  cmd = [sys.executable, os.path.join(ROOT, 'main.py'), f'--config={ROOT}/configs/default.py',
         '--workdir=runs/x', *_tiny_overrides(fashion_data_dir, 2)]
  first = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  assert sorted(os.listdir(tmp_path / 'runs' / 'x' / 'checkpoints')) == ['1', '2']
  assert first.stdout.splitlines()[-1].startswith('Next: python main.py --mode=sweep --workdir=runs/x ')
  again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0 and 'Resumed from step 2.' in again.stderr, again.stderr[-3000:]


@pytest.mark.parametrize('overrides,message', [
    (dict(dataset='imagenet3000'), 'imagenet3000'),
    (dict(data_dir='/nonexistent/tfds'), '/nonexistent/tfds'),
])
def test_bad_data_is_one_clear_error(fashion_data_dir, tmp_path, overrides, message):
  with pytest.raises(UserError, match=message):
    train.train_and_evaluate(run_config(fashion_data_dir, **overrides), str(tmp_path))


def test_unwritable_workdir_is_one_clear_error(fashion_data_dir, tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  with pytest.raises(UserError, match='not writable'):
    train.train_and_evaluate(run_config(fashion_data_dir), str(blocker / 'workdir'))


@pytest.mark.parametrize('overrides,match', [
    ({'model.max_width': 2.0, 'width_range': (1.0, 2.0), 'capacities': (2.0,)},
     'max_width: checkpoint 1.0 vs config 2.0'),
    ({'width_range': (0.5, 1.0)}, r'width_range: checkpoint \[0.25, 1.0\] vs config \[0.5, 1.0\]'),
    ({'method': 'usnet'}, "method: checkpoint 'mutualnet' vs config 'usnet'"),
    ({'resolutions': (16, 12)}, r'resolutions: checkpoint \[16, 8\] vs config \[16, 12\]'),
])
def test_checkpoint_of_another_setting_is_refused_and_nothing_is_touched(straight, fashion_data_dir, overrides,
                                                                         match):
  workdir, _, _ = straight
  before = snapshot_files(workdir)
  with pytest.raises(UserError, match=match):
    train.train_and_evaluate(run_config(fashion_data_dir, **overrides), str(workdir))
  assert snapshot_files(workdir) == before


def test_fingerprint_names_what_the_weights_were_trained_for():
  def independent(width):
    return checkpointing.fingerprint(tiny_config(method='independent', independent_width=width), 1)

  assert independent(0.5) != independent(0.75) and 'width_range' not in independent(0.5)
  assert checkpointing.fingerprint(tiny_config(), 1)['resolutions'] == [16, 8]


def test_checkpoint_from_before_the_method_fields_says_so(tmp_path):
  config = tiny_config()
  trainer = train.Trainer(config, parallel.make_mesh(), channels=1, image_size=16, total_steps=1, steps_per_epoch=1)
  new = checkpointing.fingerprint(config, 1)
  old = {k: v for k, v in new.items() if k not in ('method', 'width_range', 'resolutions')}
  ckpt = checkpointing.Checkpoints(str(tmp_path), keep=1, expected=old)
  ckpt.save(1, trainer.init_state(0), {'step': 1})
  ckpt.close()
  ckpt = checkpointing.Checkpoints(str(tmp_path), keep=1, expected=new)
  with pytest.raises(UserError, match="method: checkpoint None vs config 'mutualnet'.*predates"):
    ckpt.restore(1, trainer.abstract_state())
  ckpt.close()


def test_cli_errors_are_one_line(fashion_data_dir, tmp_path):
  """A typo'd override and a wrong type stop before any work; a UserError prints 'error: ...' and exits 2."""
  typo = subprocess.run(_main(tmp_path, '--config.lerning_rate=0.1'), cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert typo.returncode != 0 and 'lerning_rate' in typo.stderr and 'Traceback' not in typo.stderr
  wrong_type = subprocess.run(_main(tmp_path, '--config.batch_size=big'), cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
  assert wrong_type.returncode != 0 and 'batch_size' in wrong_type.stderr and 'Traceback' not in wrong_type.stderr
  unknown = subprocess.run(_main(tmp_path, *_tiny_overrides(fashion_data_dir, 1, '--config.model.name=resnet9')),
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert unknown.returncode == 2 and 'Traceback' not in unknown.stderr
  assert unknown.stderr.strip().splitlines()[-1].startswith("error: unknown model 'resnet9'")
  assert not os.path.exists(tmp_path / 'checkpoints')
