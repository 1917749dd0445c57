"""Nothing lost, ever: the divergence guard, checkpoint fallback, one writer per workdir, refusing a resume that
would silently become another run, and one-line errors from the command line."""
import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from mutualnet_jax import checkpointing, commands, parallel, train, trained_run, workdir as wd
from mutualnet_jax.errors import UserError
from tests.test_main import ROOT, _main, _tiny_overrides, final_params, run_config

pytestmark = pytest.mark.slow  # each test trains


def _steps(workdir):
  return sorted(int(p) for p in os.listdir(os.path.join(workdir, 'checkpoints')) if p.isdigit())


def _all_finite(params):
  return all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_a_real_divergence_stops_the_run_and_saves_nothing_non_finite(fashion_data_dir, tmp_path):
  config = run_config(fashion_data_dir, learning_rate=1e30, warmup_epochs=0.0, checkpoint_every_steps=1,
                      keep_checkpoints=2, log_every_steps=100)
  with pytest.raises(UserError, match=r'training diverged: .* is (nan|inf) at step (\d+)') as error:
    train.train_and_evaluate(config, str(tmp_path))
  message = str(error.value)
  assert '\n' not in message and 'Lower --config.learning_rate' in message
  bad_step = int(message.split(' at step ')[1].split(';')[0])
  saved = _steps(tmp_path) if os.path.isdir(tmp_path / 'checkpoints') else []
  assert all(s < bad_step for s in saved)  # nothing at or after the divergence was saved
  trainer = train.Trainer(config, parallel.make_mesh(), channels=1, image_size=16, total_steps=6, steps_per_epoch=6)
  with checkpointing.Checkpoints(str(tmp_path), keep=2, expected=checkpointing.fingerprint(config, 1)) as ckpt:
    for step in saved:  # every kept checkpoint is finite (the finite ones were never rotated out by NaN states)
      assert _all_finite(ckpt.restore(step, trainer.abstract_state())[0].params)
  assert wd.bookkeeping(str(tmp_path))[wd.DIVERGED_KEY]['step'] == bad_step


def test_after_a_divergence_the_fixed_command_resumes_from_the_last_finite_checkpoint(fashion_data_dir, tmp_path,
                                                                                     monkeypatch):
  """A loss that turns non-finite at step 4 when the learning rate is too high (injected, so the steps before it
  are sound): checkpoints 1-3 stay, the error names them, and a lower learning rate resumes from step 3."""
  step_fn = train.Trainer.step

  def step_that_diverges(self, state, batch, plan):
    state, metrics = step_fn(self, state, batch, plan)
    if self.config.learning_rate > 1 and int(state.step) >= 4:
      metrics = {**metrics, 'loss/max': metrics['loss/max'] * np.nan}
    return state, metrics

  monkeypatch.setattr(train.Trainer, 'step', step_that_diverges)
  bad = run_config(fashion_data_dir, learning_rate=10.0, checkpoint_every_steps=1, log_every_steps=100)
  with pytest.raises(UserError, match='loss/max is nan at step 4; the last finite checkpoint is step 3, which the '
                                      'same command resumes from'):
    train.train_and_evaluate(bad, str(tmp_path))
  assert _steps(tmp_path)[-1] == 3
  not_enough = run_config(fashion_data_dir, learning_rate=5.0, checkpoint_every_steps=1, log_every_steps=100)
  with pytest.raises(UserError, match='diverged again: .* after resuming the checkpoint of step 3 with new settings'):
    train.train_and_evaluate(not_enough, str(tmp_path))
  fixed = run_config(fashion_data_dir, learning_rate=0.05, checkpoint_every_steps=1, log_every_steps=100)
  summary = train.train_and_evaluate(fixed, str(tmp_path))  # no --resume_with_changes needed after a divergence
  assert summary['step'] == 6
  book = wd.bookkeeping(str(tmp_path))
  assert wd.DIVERGED_KEY not in book and book[wd.HISTORY_KEY][-1]['changes']['learning_rate'] == [5.0, 0.05]
  assert _all_finite(final_params(tmp_path, fixed)[0])


def test_post_training_refuses_non_finite_parameters(fashion_data_dir, tmp_path):
  config = run_config(fashion_data_dir, num_train_steps=1)
  trainer = train.Trainer(config, parallel.make_mesh(), channels=1, image_size=16, total_steps=1, steps_per_epoch=1)
  state = trainer.init_state(0)
  state = state.replace(params=jax.tree.map(lambda p: p * np.nan, state.params))
  with checkpointing.Checkpoints(str(tmp_path), keep=1, expected=checkpointing.fingerprint(config, 1)) as ckpt:
    ckpt.save(1, state, {'step': 1})
  wd.save_config(config, str(tmp_path))
  with pytest.raises(UserError, match='non-finite parameters'):
    trained_run.open_run(config, str(tmp_path))


def _damage(step_dir):
  """Truncates every array file of a checkpoint step, as a full disk or a bad copy would."""
  for root, _, names in os.walk(step_dir):
    for name in names:
      path = os.path.join(root, name)
      if 'state' in path and os.path.getsize(path) > 64:
        with open(path, 'r+b') as f:
          f.truncate(16)


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(fashion_data_dir, tmp_path):
  config = run_config(fashion_data_dir, num_train_steps=4, checkpoint_every_steps=2)
  train.train_and_evaluate(config, str(tmp_path))
  assert _steps(tmp_path) == [2, 4]
  _damage(tmp_path / 'checkpoints' / '4')
  run = trained_run.open_run(config, str(tmp_path))  # post-training: read-only fallback, nothing moved
  assert run.step == 2 and _steps(tmp_path) == [2, 4]
  longer = run_config(fashion_data_dir, num_train_steps=6, checkpoint_every_steps=2)
  summary = train.train_and_evaluate(longer, str(tmp_path), accept_changes=True)  # the step count changed
  assert summary['step'] == 6 and _steps(tmp_path) == [2, 4, 6]
  damaged = os.listdir(tmp_path / 'damaged_checkpoints')
  assert len(damaged) == 1 and damaged[0].startswith('4-')  # moved aside, never deleted


def test_resuming_with_changed_settings_is_refused_unless_asked_and_then_recorded(fashion_data_dir, tmp_path):
  config = run_config(fashion_data_dir, num_train_steps=2)
  train.train_and_evaluate(config, str(tmp_path))
  before = (tmp_path / 'config.json').read_text()
  changed = run_config(fashion_data_dir, num_train_steps=4, learning_rate=0.01, batch_size=8,
                       log_every_steps=1)  # log_every_steps is free to change
  with pytest.raises(UserError) as error:
    train.train_and_evaluate(changed, str(tmp_path))
  message = str(error.value)
  for text in ('batch_size 16 -> 8', 'learning_rate 0.05 -> 0.01', 'num_train_steps 2 -> 4', '--resume_with_changes'):
    assert text in message, message
  assert 'log_every_steps' not in message and (tmp_path / 'config.json').read_text() == before
  summary = train.train_and_evaluate(changed, str(tmp_path), accept_changes=True)
  assert summary['step'] == 4
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['learning_rate'] == 0.01
  (entry,) = saved[wd.HISTORY_KEY]
  assert entry['step'] == 2 and entry['changes']['batch_size'] == [16, 8]
  assert wd.saved_config(str(tmp_path)).learning_rate == 0.01  # the history is not a config field


def test_an_old_run_sampled_on_the_grid_is_not_resumed_with_the_uniform_sampler(fashion_data_dir, tmp_path):
  config = run_config(fashion_data_dir, num_train_steps=2)
  train.train_and_evaluate(config, str(tmp_path))
  saved = json.loads((tmp_path / 'config.json').read_text())
  for field in ('width_sampling', 'capacities'):  # as config.json files written before these fields existed
    del saved[field]
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  with pytest.raises(UserError, match="width_sampling 'grid' -> 'uniform'"):
    train.train_and_evaluate(run_config(fashion_data_dir, num_train_steps=4), str(tmp_path))


def test_two_trainers_on_one_workdir_one_refused_in_one_line(fashion_data_dir, tmp_path):
  cmd = _main(tmp_path, *_tiny_overrides(fashion_data_dir, 6))
  env = {**os.environ, 'MUTUALNET_MALLOC': 'system'}
  first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  deadline = time.time() + 300
  while time.time() < deadline and 'training (pid' not in ((tmp_path / '.lock').read_text()
                                                           if (tmp_path / '.lock').exists() else ''):
    time.sleep(0.2)
  # The first run is held (SIGSTOP; it keeps its lock) while the second tries: a 6-step run compiles in seconds and
  # could otherwise finish before the second has started.
  os.kill(first.pid, signal.SIGSTOP)
  try:
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
  finally:
    os.kill(first.pid, signal.SIGCONT)
  out, err = first.communicate(timeout=600)
  assert first.returncode == 0, err[-3000:]
  assert second.returncode == 2, second.stderr[-3000:]
  errors = [line for line in second.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and f'is in use by training (pid {first.pid}' in errors[0], second.stderr[-2000:]
  assert 'Traceback' not in second.stderr
  assert _steps(tmp_path)[-1] == 6  # the first run's checkpoints are intact
  # A lock file left by a dead process holds no lock: the next run takes it over.
  (tmp_path / '.lock').write_text('training (pid 999999 on nowhere, since long ago)')
  again = subprocess.run(_main(tmp_path, *_tiny_overrides(fashion_data_dir, 6)), cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env=env)
  assert again.returncode == 0 and 'Resumed from step 6.' in again.stderr, again.stderr[-3000:]


@pytest.mark.parametrize('args,fragment', [
    (['--config.resolutions=(16,8)', '--config.resolutions=(12,)'], '--config.resolutions is given twice'),
    (['--config.keep_checkpoints=0'], 'config.keep_checkpoints=0 is invalid'),
    (['--config.batch_size=0'], 'config.batch_size=0 is invalid'),
    (['--config.width_range=(0.25,)'], 'config.width_range=(0.25,) is invalid'),
])
def test_bad_command_lines_are_one_line_before_any_work(tmp_path, args, fragment):
  out = subprocess.run(_main(tmp_path / 'w', *args), cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'MUTUALNET_MALLOC': 'system'})
  assert out.returncode == 2, out.stderr[-2000:]
  errors = [line for line in out.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and fragment in errors[0], out.stderr[-2000:]
  assert 'Traceback' not in out.stderr and not os.path.exists(tmp_path / 'w' / 'checkpoints')


def test_latency_repeats_below_one_is_refused(fashion_data_dir, tmp_path):
  config = run_config(fashion_data_dir, num_train_steps=1)
  train.train_and_evaluate(config, str(tmp_path))
  with pytest.raises(UserError, match='--latency_repeats must be at least 1'):
    commands.run('sweep', None, str(tmp_path), commands.Options(latency_repeats=0))
