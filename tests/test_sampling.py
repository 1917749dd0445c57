"""The sandwich rule with resolutions (MutualNet), its US-Net and independent baselines, and bad settings."""
import collections

import pytest

from mutualnet_jax.errors import UserError
from mutualnet_jax.sampling import Bucket, Sampler, StepPlan, Subnet

from tests.util import tiny_config

STEPS = 400


def _paper_config(method):
  return tiny_config(method=method, width_step=0.05, resolutions=(224, 192, 160, 128),
                     independent_width=0.5, independent_resolution=160)


def test_mutualnet_follows_the_sandwich_rule_with_random_resolutions():
  sampler = Sampler(_paper_config('mutualnet'))
  seen_res, seen_widths = collections.Counter(), collections.Counter()
  for step in range(STEPS):
    plan = sampler.plan(step)
    assert len(plan.subnets) == 4
    assert plan.teacher == Subnet('max', 1.0, 224, 'ce')  # max width, always at the highest resolution, with labels
    assert plan.students[0].width == 0.25 and plan.students[0].name == 'min'  # min width always present
    assert [s.name for s in plan.students[1:]] == ['rand1', 'rand2']
    assert all(s.loss == 'kd' for s in plan.students)
    for s in plan.students:
      assert s.width in sampler.widths and 0.25 <= s.width < 1.0
      seen_res[s.resolution] += 1
      seen_widths[s.width] += 1
  # Each resolution (the highest included) is drawn uniformly: ~300 draws each out of 1200.
  assert set(seen_res) == {224, 192, 160, 128}
  assert all(200 < n < 400 for n in seen_res.values()), seen_res
  # Random widths cover the interior of the 0.05 grid.
  assert len([w for w in seen_widths if 0.25 < w < 1.0]) == 14


def test_usnet_uses_only_the_highest_resolution():
  sampler = Sampler(_paper_config('usnet'))
  for step in range(100):
    subnets = sampler.plan(step).subnets
    assert [s.resolution for s in subnets] == [224] * 4
    assert subnets[0].width == 1.0 and subnets[1].width == 0.25
  assert len(sampler.buckets()) == 1 + 15  # teacher + (min + 14 interior widths) at one resolution


def test_independent_trains_one_fixed_network_with_labels():
  sampler = Sampler(_paper_config('independent'))
  assert sampler.plan(0) == sampler.plan(9) == StepPlan(Subnet('fixed', 0.5, 160, 'ce'))
  assert sampler.buckets() == [Bucket(0.5, 160, 'ce')]


def test_bucket_count_is_bounded_by_the_grid_and_covers_every_sample():
  sampler = Sampler(_paper_config('mutualnet'))
  buckets = set(sampler.buckets())
  assert len(buckets) == 1 + 15 * 4  # teacher + (min + 14 interior widths) x 4 resolutions
  for step in range(200):
    assert {s.bucket for s in sampler.plan(step).subnets} <= buckets


def test_without_inplace_distillation_students_use_labels():
  sampler = Sampler(tiny_config(inplace_distillation=False))
  assert all(s.loss == 'ce' for s in sampler.plan(0).subnets)


def test_each_steps_choice_is_a_pure_function_of_seed_and_step():
  """No sampler state: a resumed run (a fresh sampler) draws what an uninterrupted one draws at the same step."""
  a, b = Sampler(_paper_config('mutualnet')), Sampler(_paper_config('mutualnet'))
  expected = [a.plan(step) for step in range(20)]
  assert [b.plan(step) for step in reversed(range(20))][::-1] == expected
  assert len({p.students for p in expected}) > 10  # steps differ
  other_seed = Sampler(tiny_config(seed=1, width_step=0.05, resolutions=(224, 192, 160, 128)))
  assert [other_seed.plan(step) for step in range(20)] != expected


@pytest.mark.parametrize('overrides,match', [
    (dict(resolutions=()), 'resolutions is empty'),
    (dict(width_range=(0.8, 0.5)), 'width_range'),
    (dict(width_range=(0.25, 1.5)), 'exceeds model.max_width'),
    (dict(method='slimmable'), "unknown method 'slimmable'"),
    (dict(num_subnets=1), 'num_subnets'),
    (dict(width_step=0.0), 'width_step'),
])
def test_bad_settings_are_one_clear_error(overrides, match):
  with pytest.raises(UserError, match=match):
    Sampler(tiny_config(**overrides))
