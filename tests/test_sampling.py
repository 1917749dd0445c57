"""The sandwich rule with resolutions (MutualNet), its US-Net and independent baselines, the official uniform width
sampler, the bucket (compiled program) of each sub-network, and bad settings."""
import collections

import numpy as np
import pytest

from configs import default, mobilenet_v1_imagenet, mobilenet_v1_wide_imagenet
from mutualnet_jax.errors import UserError
from mutualnet_jax.programs import Bucket
from mutualnet_jax.sampling import Sampler, StepPlan, Subnet
from tests.util import tiny_config

STEPS = 400


def _paper_config(method, **overrides):
  return tiny_config(**{'method': method, 'resolutions': (224, 192, 160, 128), 'independent_width': 0.5,
                        'independent_resolution': 160, 'capacities': (0.4, 0.55, 0.7, 0.85, 1.0), **overrides})


def test_mutualnet_follows_the_sandwich_rule_with_random_resolutions():
  sampler = Sampler(_paper_config('mutualnet'))
  seen_res = collections.Counter()
  for step in range(STEPS):
    plan = sampler.plan(step)
    assert len(plan.subnets) == 4
    assert plan.teacher == Subnet('max', 1.0, 224, 'ce')  # max width, always at the highest resolution, with labels
    assert plan.students[0].width == 0.25 and plan.students[0].name == 'min'  # min width always present
    assert [s.name for s in plan.students[1:]] == ['rand1', 'rand2']
    assert all(s.loss == 'kd' for s in plan.students)
    for s in plan.students:
      assert 0.25 <= s.width <= 1.0
      seen_res[s.resolution] += 1
  # Each resolution (the highest included) is drawn uniformly: ~300 draws each out of 1200.
  assert set(seen_res) == {224, 192, 160, 128}
  assert all(200 < n < 400 for n in seen_res.values()), seen_res


def test_random_widths_are_uniform_and_continuous_like_the_official_sampler():
  """The official code draws np.random.uniform(min, max, 2) per step; the widths lie on no grid."""
  sampler = Sampler(_paper_config('mutualnet'))
  widths = np.array([s.width for step in range(STEPS) for s in sampler.plan(step).students[1:]])
  assert len(set(widths)) == len(widths)  # continuous: no two draws alike
  assert np.mean(np.isclose(widths * 20, np.round(widths * 20))) < 0.01  # almost none on the 0.05 grid
  # Kolmogorov-Smirnov distance to U(0.25, 1.0) over 800 draws: 1.95 / sqrt(800) = 0.069 is the 0.1 % critical value.
  ecdf = np.arange(1, len(widths) + 1) / len(widths)
  ks = np.max(np.abs(ecdf - (np.sort(widths) - 0.25) / 0.75))
  official = np.random.default_rng(0).uniform(0.25, 1.0, len(widths))
  ks_official = np.max(np.abs(ecdf - (np.sort(official) - 0.25) / 0.75))
  assert ks < 0.069 and ks_official < 0.069, (ks, ks_official)
  assert abs(widths.mean() - 0.625) < 0.02 and abs(widths.std() - 0.75 / np.sqrt(12)) < 0.02


def test_grid_sampling_remains_an_option():
  sampler = Sampler(_paper_config('mutualnet', width_sampling='grid', width_step=0.05))
  widths = {s.width for step in range(STEPS) for s in sampler.plan(step).students[1:]}
  assert widths == set(np.round(np.arange(0.3, 0.99, 0.05), 6))  # the 14 interior points of the 0.05 grid


def test_usnet_uses_only_the_highest_resolution():
  sampler = Sampler(_paper_config('usnet'))
  for step in range(100):
    subnets = sampler.plan(step).subnets
    assert [s.resolution for s in subnets] == [224] * 4
    assert subnets[0].width == 1.0 and subnets[1].width == 0.25
  assert len(sampler.buckets()) == 1 + 1 + 5  # teacher + min + 5 capacities, at one resolution


def test_independent_trains_one_fixed_network_with_labels():
  sampler = Sampler(_paper_config('independent'))
  assert sampler.plan(0) == sampler.plan(9) == StepPlan(Subnet('fixed', 0.5, 160, 'ce'))
  assert sampler.buckets() == [Bucket(0.5, 160, 'ce')]


def test_max_and_min_run_exact_programs_other_widths_their_capacitys():
  sampler = Sampler(_paper_config('mutualnet'))
  assert sampler.bucket(Subnet('max', 1.0, 224, 'ce')) == Bucket(1.0, 224, 'ce')
  assert sampler.bucket(Subnet('min', 0.25, 128, 'kd')) == Bucket(0.25, 128, 'kd')
  assert sampler.bucket(Subnet('rand1', 0.37, 160, 'kd')) == Bucket(0.4, 160, 'kd', masked=True)
  assert sampler.bucket(Subnet('rand1', 0.4, 160, 'kd')) == Bucket(0.4, 160, 'kd', masked=True)
  assert sampler.bucket(Subnet('rand2', 0.613, 192, 'kd')) == Bucket(0.7, 192, 'kd', masked=True)
  assert sampler.bucket(Subnet('rand2', 0.999, 224, 'kd')) == Bucket(1.0, 224, 'kd', masked=True)
  exact = Sampler(_paper_config('mutualnet', capacities=(), width_sampling='grid', width_step=0.05))
  assert exact.bucket(Subnet('rand1', 0.35, 160, 'kd')) == Bucket(0.35, 160, 'kd')  # every width exact


def test_bucket_count_is_bounded_and_covers_every_sample():
  sampler = Sampler(_paper_config('mutualnet'))
  buckets = set(sampler.buckets())
  assert len(buckets) == 1 + 4 + 5 * 4  # teacher + min x 4 resolutions + 5 capacities x 4 resolutions
  for step in range(STEPS):
    assert {sampler.bucket(s) for s in sampler.plan(step).subnets} <= buckets


@pytest.mark.parametrize('get_config,count', [
    (default.get_config, 1 + 4 + 3 * 4),  # the quickstart: 17 programs (was 13 with the 0.25 grid)
    (mobilenet_v1_imagenet.get_config, 1 + 4 + 5 * 4),  # the paper's recipes: 25 (was 61 with the 0.05 grid)
    (mobilenet_v1_wide_imagenet.get_config, 1 + 4 + 5 * 4),
])
def test_recipes_train_with_a_bounded_number_of_programs(get_config, count):
  assert len(Sampler(get_config()).buckets()) == count


def test_without_inplace_distillation_students_use_labels():
  sampler = Sampler(tiny_config(inplace_distillation=False))
  assert all(s.loss == 'ce' for s in sampler.plan(0).subnets)


def test_each_steps_choice_is_a_pure_function_of_seed_and_step():
  """No sampler state: a resumed run (a fresh sampler) draws what an uninterrupted one draws at the same step."""
  a, b = Sampler(_paper_config('mutualnet')), Sampler(_paper_config('mutualnet'))
  expected = [a.plan(step) for step in range(20)]
  assert [b.plan(step) for step in reversed(range(20))][::-1] == expected
  assert len({p.students for p in expected}) == 20  # steps differ
  other_seed = Sampler(_paper_config('mutualnet', seed=1))
  assert [other_seed.plan(step) for step in range(20)] != expected


# What only the sampler knows; each field's own type and range: tests/test_config_check.py.
@pytest.mark.parametrize('overrides,match', [
    (dict(width_range=(0.25, 1.5)), 'exceeds model.max_width'),
    (dict(method='slimmable'), "unknown method 'slimmable'"),
    (dict(num_subnets=1), 'num_subnets'),
    (dict(width_step=0.0), 'width_step'),
    (dict(capacities=(0.5, 0.75)), 'capacity >= the max width'),
    (dict(capacities=(0.5, 1.5)), r'must lie in \(0'),
    (dict(capacities=()), 'give config.capacities'),
])
def test_bad_settings_are_one_clear_error(overrides, match):
  with pytest.raises(UserError, match=match):
    Sampler(tiny_config(**overrides))
