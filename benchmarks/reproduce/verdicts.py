"""The paper's claims as verdict records, computed by pure functions from loaded query tables (no files, no text).

Tables: {series: {seed: rows}} with series 'MutualNet', 'US-Net' (the US-Net runs at their training resolution),
'US-Net+' (the same runs at every resolution), 'Independent' (one network per configuration; a seed's rows are
several separate networks) and 'Diagnostic' (MutualNet without in-place distillation).

One rule judges every difference (RULE says it in words):
  - a method's accuracy at a point (one configuration, or the best configuration within a MACs budget) is the mean
    over its seeds; its noise is sigma = sqrt(s^2/n + p(1-p)/N), where s is the standard deviation over its n seeds
    (ddof=1; s/sqrt(n) is the standard error of the seed mean, for 2 seeds equal to the half-range; no seed term
    for one seed) and p(1-p)/N the binomial variance of an accuracy p measured on N eval images (the seeds share
    the test set, so that term does not shrink with n);
  - a difference d = a - b is judged against sigma_d = sqrt(sigma_a^2 + sigma_b^2): held when d > K sigma_d, not held
    when d < -K sigma_d, inconclusive otherwise;
  - a claim over several points (every budget, every configuration) is held when every point is held, not held
    when any point is not held, inconclusive otherwise; the 'widths' context record ("no dip") is held when no
    point is not held.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from mutualnet_jax import query
from mutualnet_jax.query import Row

K = 2.0
HELD, NOT_HELD, INCONCLUSIVE = 'held', 'not held', 'inconclusive'
RULE = (f'a difference d between two seed means counts when |d| > {K:g} sigma_d, sigma_d = sqrt(sigma_a^2 + '
        'sigma_b^2); each sigma = sqrt(s^2/n + p(1-p)/N): s the standard deviation over the n seeds (standard error '
        'of the seed mean; none for a single seed), p(1-p)/N the binomial variance of an accuracy p on N eval images')
POOLED = frozenset({'Independent'})  # series whose seeds are separate networks per configuration
CLAIMS = {
    '1': 'MutualNet above US-Net at every budget',
    '2': 'the MutualNet–US-Net gap is largest at small budgets',
    '3': 'MutualNet above US-Net+ (US-Net evaluated at every resolution) at every budget',
    '4': 'MutualNet\'s full configuration beats an independently trained network of that configuration',
    '4b': 'MutualNet beats an independently trained network at every other configuration',
    'diagnostic': 'MutualNet without in-place distillation, against MutualNet (context, not a claim)',
    'recipe': ('MutualNet with the official code\'s resize (align_corners) and BN recalibration (augmented '
               'batches, averaged unbiased variances), against this project\'s (context: inconclusive everywhere = '
               'the deviations do not change the result beyond the noise)'),
    'widths': 'accuracy does not dip where the width grows (context: widths off the old 0.25 grid included)',
}
CONTEXT = frozenset({'diagnostic', 'recipe', 'widths'})  # records that explain, not claims of the paper
Tables = dict[str, dict[int, list[Row]]]
Config = tuple[float, int]


def binomial_se(p: float, n: int) -> float:
  return math.sqrt(max(p * (1 - p), 0.0) / n)


def judge(diff: float, noise: float, k: float = K) -> str:
  if abs(diff) <= k * noise:
    return INCONCLUSIVE
  return HELD if diff > 0 else NOT_HELD


def overall(statuses: Sequence[str], every_point: bool = True) -> str:
  """every_point: held only when every point is held; else held when no point is not held (no counter-evidence)."""
  if NOT_HELD in statuses:
    return NOT_HELD
  if statuses and (not every_point or all(s == HELD for s in statuses)):
    return HELD
  return INCONCLUSIVE


def config_name(width: float, resolution: int) -> str:
  return f'{width:g}@{resolution}'


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A method's top-1 at one point: one value per seed (and, at a budget, the configuration each seed picked)."""
  values: tuple[float, ...]
  eval_images: int
  picks: tuple[str, ...] = ()

  @property
  def mean(self) -> float:
    return float(np.mean(self.values))

  @property
  def seeds(self) -> int:
    return len(self.values)

  @property
  def seed_term(self) -> float:
    return float(np.std(self.values, ddof=1) / math.sqrt(self.seeds)) if self.seeds > 1 else 0.0

  @property
  def noise(self) -> float:
    return math.hypot(self.seed_term, binomial_se(self.mean, self.eval_images))


@dataclasses.dataclass(frozen=True)
class Comparison:
  """a - b at one point, judged by the rule."""
  where: str                   # a configuration 'w@r', a budget, or what claim 2 compares
  mflops: float | None
  a: float
  b: float
  noise_a: float
  noise_b: float
  seeds_a: int = 0
  seeds_b: int = 0
  picks_a: tuple[str, ...] = ()
  picks_b: tuple[str, ...] = ()

  @classmethod
  def of(cls, where: str, mflops: float | None, a: Estimate, b: Estimate) -> Comparison:
    return cls(where, mflops, a.mean, b.mean, a.noise, b.noise, a.seeds, b.seeds, a.picks, b.picks)

  @property
  def diff(self) -> float:
    return self.a - self.b

  @property
  def noise(self) -> float:
    return math.hypot(self.noise_a, self.noise_b)

  @property
  def status(self) -> str:
    return judge(self.diff, self.noise)


@dataclasses.dataclass(frozen=True)
class Verdict:
  claim: str                   # a key of CLAIMS
  round: int
  budget: str
  a: str                       # the series compared: differences are a - b
  b: str
  comparisons: tuple[Comparison, ...]
  kind: str = 'claim'          # 'claim' | 'context'
  every_point: bool = True     # held needs every point held (False: no point not held)
  k: float = K

  @property
  def statuses(self) -> tuple[str, ...]:
    return tuple(c.status for c in self.comparisons)

  @property
  def status(self) -> str:
    return overall(self.statuses, self.every_point)

  @property
  def held(self) -> int:
    return self.statuses.count(HELD)

  @property
  def not_held(self) -> int:
    return self.statuses.count(NOT_HELD)

  @property
  def inconclusive(self) -> int:
    return self.statuses.count(INCONCLUSIVE)

  @property
  def margins(self) -> tuple[float, ...]:
    return tuple(c.diff for c in self.comparisons)

  @property
  def noise(self) -> tuple[float, ...]:
    return tuple(c.noise for c in self.comparisons)

  def as_dict(self) -> dict[str, Any]:
    """JSON-ready, with the derived numbers written out."""
    return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != 'comparisons'},
            'statement': CLAIMS[self.claim], 'status': self.status, 'held': self.held, 'not_held': self.not_held,
            'inconclusive': self.inconclusive,
            'comparisons': [{**dataclasses.asdict(c), 'diff': c.diff, 'noise': c.noise, 'status': c.status}
                            for c in self.comparisons]}


# ----------------------------------------------------------------------------------------------------------------------
# Points: a configuration, or the best configuration within a budget.

def per_config(series: dict[int, list[Row]], eval_images: int) -> dict[Config, tuple[int, Estimate]]:
  """{(width, resolution): (MACs, the seeds' top-1)}."""
  grouped: dict[Config, list[Row]] = {}
  for rows in series.values():
    for r in rows:
      grouped.setdefault((r.width, r.resolution), []).append(r)
  return {key: (rs[0].macs, Estimate(tuple(r.top1 for r in rs), eval_images, (config_name(*key),)))
          for key, rs in grouped.items()}


def _fits(rows: Sequence[Row], mflops: float) -> list[Row]:
  return [r for r in rows if r.macs <= mflops * 1e6 * (1 + 1e-9)]


def at_budget(tables: Tables, name: str, mflops: float, eval_images: int) -> Estimate | None:
  """The best top-1 within `mflops`: each seed's own best configuration (what a user of that one trained model
  gets); for separately trained networks (POOLED) the configuration with the best seed mean. None: nothing fits
  (in some seed)."""
  series = tables[name]
  if name in POOLED:
    points = [(est.mean, -macs, est) for macs, est in per_config(series, eval_images).values()
              if macs <= mflops * 1e6 * (1 + 1e-9)]
    return max(points, key=lambda p: p[:2])[2] if points else None
  picks = []
  for seed in sorted(series):
    fits = _fits(series[seed], mflops)
    if not fits:
      return None
    picks.append(query.query(fits, budget_mflops=mflops * (1 + 1e-9)))
  return Estimate(tuple(r.top1 for r in picks), eval_images, tuple(config_name(r.width, r.resolution) for r in picks))


def configuration_budgets(series: dict[int, list[Row]]) -> list[tuple[float, str]]:
  """(MFLOPs, 'w@r') of every configuration of a series, cheapest first: the like-for-like budgets against it."""
  names: dict[float, set[str]] = {}
  for rows in series.values():
    for r in rows:
      names.setdefault(r.macs / 1e6, set()).add(config_name(r.width, r.resolution))
  return [(m, '/'.join(sorted(n))) for m, n in sorted(names.items())]


def top_resolution(tables: Tables) -> int:
  return max(r.resolution for series in tables.values() for rows in series.values() for r in rows)


# ----------------------------------------------------------------------------------------------------------------------
# Claims.

def _verdict(claim: str, where: tuple[int, str], a: str, b: str, comparisons: Sequence[Comparison],
             kind: str = 'claim', every_point: bool = True) -> Verdict | None:
  return Verdict(claim, *where, a, b, tuple(comparisons), kind, every_point) if comparisons else None


def above_at_budgets(tables: Tables, a: str, b: str, eval_images: int) -> list[Comparison]:
  """a against b at the MACs of each of b's configurations (b gets its own configuration there, or a cheaper
  better one); budgets where a has nothing are left out."""
  out = []
  for mflops, source in configuration_budgets(tables[b]):
    ea, eb = at_budget(tables, a, mflops, eval_images), at_budget(tables, b, mflops, eval_images)
    if ea is not None and eb is not None:
      out.append(Comparison.of(f'{mflops:.2f} MFLOPs ({b} {source})', mflops, ea, eb))
  return out


def gap_small_vs_large(gaps: Sequence[Comparison]) -> Comparison | None:
  """Claim 2: the mean gap over the smaller half of the budgets minus that over the larger half (the middle budget
  of an odd count in neither); each half's noise propagated from its gaps' as if they were independent."""
  half = len(gaps) // 2
  if half < 1:
    return None
  ordered = sorted(gaps, key=lambda c: c.mflops)
  small, large = ordered[:half], ordered[-half:]

  def mean_and_noise(cs: Sequence[Comparison]) -> tuple[float, float]:
    return float(np.mean([c.diff for c in cs])), math.sqrt(sum(c.noise ** 2 for c in cs)) / len(cs)

  (a, na), (b, nb) = mean_and_noise(small), mean_and_noise(large)
  return Comparison(f'mean gap over the {half} smallest budgets ({small[0].mflops:.2f}–{small[-1].mflops:.2f} MFLOPs)'
                    f' minus over the {half} largest ({large[0].mflops:.2f}–{large[-1].mflops:.2f})', None,
                    a, b, na, nb)


def same_configuration(tables: Tables, a: str, b: str, eval_images: int,
                       keep=lambda key: True) -> list[Comparison]:
  """a against b at every configuration both have (and `keep` accepts), highest resolution and width first."""
  pa, pb = per_config(tables[a], eval_images), per_config(tables[b], eval_images)
  keys = sorted((k for k in pa.keys() & pb.keys() if keep(k)), key=lambda k: (-k[1], -k[0]))
  return [Comparison.of(config_name(*k), pa[k][0] / 1e6, pa[k][1], pb[k][1]) for k in keys]


def width_steps(tables: Tables, name: str, resolution: int, eval_images: int) -> list[Comparison]:
  """Each swept width against the next narrower one at `resolution`: a 'not held' is a dip."""
  points = sorted((k, v) for k, v in per_config(tables[name], eval_images).items() if k[1] == resolution)
  return [Comparison.of(f'{config_name(*wide)} vs {config_name(*narrow)}', macs / 1e6, est, narrow_est)
          for (narrow, (_, narrow_est)), (wide, (macs, est)) in itertools.pairwise(points)]


def compute(tables: Tables, eval_images: int, round_number: int, budget: str) -> list[Verdict]:
  """Every claim and context record the tables allow (a claim whose series are missing is absent)."""
  where = (round_number, budget)
  have = lambda *names: all(tables.get(n) for n in names)  # noqa: E731
  out: list[Verdict | None] = []
  if have('MutualNet', 'US-Net'):
    gaps = above_at_budgets(tables, 'MutualNet', 'US-Net', eval_images)
    out.append(_verdict('1', where, 'MutualNet', 'US-Net', gaps))
    gap = gap_small_vs_large(gaps)
    out.append(_verdict('2', where, 'small budgets', 'large budgets', [gap] if gap else []))
  if have('MutualNet', 'US-Net+'):
    out.append(_verdict('3', where, 'MutualNet', 'US-Net+',
                        above_at_budgets(tables, 'MutualNet', 'US-Net+', eval_images)))
  if have('MutualNet', 'Independent'):
    mutualnet = per_config(tables['MutualNet'], eval_images)
    full = max(mutualnet, key=lambda k: (mutualnet[k][0], k))
    out.append(_verdict('4', where, 'MutualNet', 'Independent', same_configuration(
        tables, 'MutualNet', 'Independent', eval_images, keep=lambda k: k == full)))
    out.append(_verdict('4b', where, 'MutualNet', 'Independent', same_configuration(
        tables, 'MutualNet', 'Independent', eval_images, keep=lambda k: k != full)))
  if have('Diagnostic', 'MutualNet'):
    top = top_resolution(tables)
    out.append(_verdict('diagnostic', where, 'Diagnostic', 'MutualNet', same_configuration(
        tables, 'Diagnostic', 'MutualNet', eval_images, keep=lambda k: k[1] == top), kind='context'))
  if have('Official recipe', 'MutualNet'):
    out.append(_verdict('recipe', where, 'Official recipe', 'MutualNet', same_configuration(
        tables, 'Official recipe', 'MutualNet', eval_images), kind='context'))
  for name in ('MutualNet', 'US-Net'):
    if have(name):
      out.append(_verdict('widths', where, name, name,
                          width_steps(tables, name, top_resolution({name: tables[name]}), eval_images),
                          kind='context', every_point=False))
  return [v for v in out if v is not None]
