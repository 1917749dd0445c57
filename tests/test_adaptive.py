"""The budget-adaptive network on a tiny untrained run with a made-up query table (choice depends only on the table,
so it is deterministic): which configuration each budget runs, nothing compiled after construction, logits equal to
the chosen configuration's own network, one-line errors, and --mode=predict."""
import dataclasses
import json
import math

import numpy as np
import optax
import pytest
from PIL import Image

import mutualnet_jax
from mutualnet_jax import adaptive, checkpointing, commands, parallel, query, workdir as wd
from mutualnet_jax.compilation import CompileCounter
from mutualnet_jax.errors import UserError
from mutualnet_jax.models import get_model
from mutualnet_jax.query import Row
from mutualnet_jax.train_state import create_optimizer, init_state
from tests.util import tiny_config

# width, resolution, MACs, params, top-1, top-5, batch-1 ms
ROWS = [Row(0.25, 8, 80_000, 5_000, 0.50, 0.85, 0.10),
        Row(0.5, 8, 1_000_000, 20_000, 0.58, 0.88, 0.12),  # fast but not frugal: only a budget in ms picks it
        Row(0.25, 16, 300_000, 5_000, 0.60, 0.90, 0.20),
        Row(1.0, 8, 800_000, 60_000, 0.55, 0.90, 0.30),  # (0.25, 16) beats it on every count: never picked
        Row(0.75, 16, 2_000_000, 40_000, math.nan, math.nan, 0.25),  # no accuracy: never picked
        Row(1.0, 16, 3_000_000, 60_000, 0.70, 0.95, 0.50)]
HELD = [(0.25, 8), (0.25, 16), (0.5, 8), (1.0, 16)]
BUDGETS = [({'budget_ms': 0.15}, (0.5, 8)), ({'budget_mflops': 0.5}, (0.25, 16)), ({'budget_ms': 0.1}, (0.25, 8)),
           ({'budget_mflops': 0.5, 'budget_ms': 0.15}, (0.25, 8)), ({'budget_mflops': 10}, (1.0, 16))]


def _key(row):
  return row.width, row.resolution


@pytest.fixture(scope='module')
def workdir(fashion_data_dir, tmp_path_factory):
  """An untrained tiny run on Fashion-MNIST (16 px pipeline, 28 px raw images): checkpoint, config.json, table."""
  path = str(tmp_path_factory.mktemp('adaptive_run'))
  config = tiny_config(data_dir=str(fashion_data_dir), calibration_images=64, calibration_batch_size=32)
  tx = create_optimizer(config, optax.constant_schedule(0.0))
  state = init_state(get_model(config.model), tx, 0, 1, parallel.make_mesh())
  with checkpointing.Checkpoints(path, keep=1, expected=checkpointing.fingerprint(config, 1)) as ckpt:
    ckpt.save(1, state, {'step': 1})
  wd.save_config(config, path)
  query.write_table(ROWS, path, {'checkpoint_step': 1})
  return path


@pytest.fixture(scope='module')
def net(workdir):
  """Batches of two raw 28 px images; a default budget of 10 MFLOPs."""
  return mutualnet_jax.open(workdir).adaptive(budget_mflops=10, batch_size=2, image_size=28)


@pytest.fixture(scope='module')
def images(workdir):
  return mutualnet_jax.open(workdir).examples(2)[0]


def test_held_rows_pick_what_the_whole_table_picks():
  held = adaptive.pareto_set(ROWS)
  assert [_key(r) for r in held] == HELD
  for budget, _ in BUDGETS + [({'budget_ms': 0.2}, None), ({'budget_mflops': 1.0, 'budget_ms': 0.3}, None)]:
    assert query.query(held, **budget) == query.query(ROWS, **budget)
  # The frontier by MACs alone misses the fast configuration a latency budget picks.
  assert _key(query.query(query.pareto_frontier(ROWS), budget_ms=0.15)) == (0.25, 8)
  given = adaptive.held_rows(ROWS, [(0.75, 16), (0.25, 8), ROWS[3]])
  assert [_key(r) for r in given] == [(0.25, 8), (1.0, 8)]  # the row without an accuracy is not held
  with pytest.raises(UserError, match=r'width 0.5 at 16 px is not in the query table.*--widths=0.5 --resolutions=16'):
    adaptive.held_rows(ROWS, [(0.5, 16)])
  with pytest.raises(UserError, match='no configuration to hold has a top-1 accuracy .*sweep on a labelled eval split'):
    adaptive.held_rows(ROWS, [(0.75, 16)])
  unmeasured = [dataclasses.replace(r, top1=None, top5=None) for r in ROWS]  # a sweep on images without labels
  with pytest.raises(UserError, match='not measured'):
    adaptive.held_rows(unmeasured)


def test_each_budget_runs_its_most_accurate_configuration(net, images):
  assert [_key(r) for r in net.rows] == HELD
  for budget, expected in BUDGETS:
    assert _key(net.choose(**budget)) == expected
    logits = net(images, **budget)
    assert _key(net.last) == expected and logits.shape == (2, 10)
  net(images)  # no budget in the call: the construction's 10 MFLOPs
  assert _key(net.last) == (1.0, 16)


def test_too_small_a_budget_names_the_cheapest_configuration(net, images):
  net(images, budget_ms=0.15)
  with pytest.raises(UserError, match=r'no configuration fits 0.01 MFLOPs: the smallest is width 0.25 at 8 px '
                                      r'\(0.08 MFLOPs, 0.1 ms\)'):
    net(images, budget_mflops=0.01)
  with pytest.raises(UserError, match=r'no configuration fits 0.05 ms: .*the fastest runs in 0.1 ms'):
    net.choose(budget_ms=0.05)
  assert _key(net.last) == (0.5, 8)  # a refused call runs nothing


def test_switching_compiles_nothing_after_construction(workdir, images):
  """A fresh network of a shape no other test uses: its first call of every configuration is counted too."""
  fresh = mutualnet_jax.open(workdir).adaptive(image_size=28)
  with CompileCounter().counting() as counter:
    ran = set()
    for _ in range(2):
      for budget, _ in BUDGETS:
        fresh(images[:1], **budget).block_until_ready()
        ran.add(_key(fresh.last))
    assert ran == set(HELD) and counter.executables == 0
    # Positive control: the same counter sees a program built for a shape nothing compiled before.
    fresh.configurations[0].network(np.zeros((3, 20, 20, 1), np.uint8)).block_until_ready()
    assert counter.executables >= 1


def test_logits_equal_the_chosen_configurations_own_network(net, images):
  outputs = {}
  for budget, expected in BUDGETS:
    logits = net(images, **budget)
    own = net.configuration(net.last).network
    assert (own.width, own.resolution) == expected
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(own(images)))  # the same program
    outputs[expected] = np.asarray(logits)
  assert float(np.abs(outputs[(1.0, 16)] - outputs[(0.25, 8)]).max()) > 1e-4  # the configurations differ


def test_mistaken_inputs_are_one_line_errors(net, images):
  with pytest.raises(UserError, match=r'compiled for raw images shaped \(2, 28, 28, 1\).*got \(1, 28, 28, 1\): '
                                      r'build one for that shape with run.adaptive\(batch_size=..., image_size=...\)'):
    net(images[:1])
  with pytest.raises(UserError, match=r'floats in \[0, 1\].*multiply them by 255'):
    net(images / 255.0)
  with pytest.raises(UserError, match='1 of 1568 pixel values are NaN'):
    net(np.where(np.arange(images.size).reshape(images.shape) == 7, np.nan, images.astype(np.float32)))
  with pytest.raises(UserError, match='got dtype <U1'):
    net(np.full(images.shape, 'a'))


def test_predict_mode_on_the_split_a_file_and_a_folder(workdir, images, tmp_path):
  out = commands.run('predict', None, workdir, commands.Options(budget_ms=0.15, count=3))
  lines = out.splitlines()
  assert [line.split(' -> ')[0] for line in lines[:3]] == [f'image {i}: width 0.5 at 8 px' for i in range(3)]
  assert all('(label ' in line for line in lines[:3]) and 'top-1 on these images:' in lines[-1]
  assert 'the most accurate of 4 configurations within the budget: width 0.5 at 8 px' in lines[3]
  result = json.loads(commands.run('predict', None, workdir,
                                   commands.Options(budget_mflops=0.5, count=3, format='json')))
  assert [p['resolution'] for p in result['predictions']] == [16] * 3 and 0 <= result['top1'] <= 1
  np.save(tmp_path / 'images.npy', images[..., 0])  # (N, H, W): one channel
  folder = tmp_path / 'folder'
  folder.mkdir()
  for i, image in enumerate(images):
    Image.fromarray(image[..., 0]).save(folder / f'{i}.png')
  from_file, from_folder = (commands.run('predict', None, workdir, commands.Options(budget_ms=0.15, images=str(p)))
                             for p in (tmp_path / 'images.npy', folder))
  classes = [line.split(' -> ')[1] for line in from_file.splitlines()[:2]]
  assert classes == [line.split(' -> ')[1] for line in from_folder.splitlines()[:2]]
  assert classes == [line.split(' -> ')[1].split(' (label')[0] for line in lines[:2]]
  assert 'top-1 on these images' not in from_file  # no labels
  with pytest.raises(UserError, match=r'no configuration fits 0.01 MFLOPs'):
    commands.run('predict', None, workdir, commands.Options(budget_mflops=0.01))
  with pytest.raises(UserError, match='--mode=predict needs a budget'):
    commands.run('predict', None, workdir, commands.Options())
  with pytest.raises(UserError, match='neither a folder of image files nor an .npy file'):
    commands.run('predict', None, workdir, commands.Options(budget_ms=1, images=str(tmp_path / 'x.txt')))
