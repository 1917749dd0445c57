"""The reproduction's run list, as data: rounds -> budgets (a training schedule and its settings) -> runs.

A run is one `main.py` training (then one sweep) of one method and seed under one budget; every run of a budget
shares the budget's settings, so within a budget the methods differ only in `config.method` (and, for an
independent network, the one width/resolution it trains). `priority` orders the work: run.py trains and sweeps
every selected priority-1 run before any priority-2 run, and so on, so an interrupted pipeline has the most
informative comparisons first.

Round 1 (2026-11) is kept as it ran: it documents what produced benchmarks/reproduce/round1/query_tables.csv, the
only place its results survive. It is never re-run by default (the library's defaults have changed since, see
`ROUND1.described`).

Round 2 uses the official recipe for a non-ImageNet dataset for every method (uniform continuous widths, weight
decay on every parameter, pad-crop + flip) under the 'overfit' budget (a 1k-image training subset
trained until the independent full network over-fits, after a 5k-image pilot that did not; the whole plan fits about
8 hours of 2 cores, `run.py --list` prints it) and an optional 'long' one (the full training set, one seed, last).
Subsets and epochs live in SCHEDULES.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

CONFIG = 'configs/default.py'
FIT_DIR = 'train_fit'  # in a pilot run's workdir: its query table on the training images
LATENCY_REPEATS = 5
LABELS = {'mutualnet': 'MutualNet', 'usnet': 'US-Net', 'independent': 'Independent'}


@dataclasses.dataclass(frozen=True)
class Diagnostic:
  """A MutualNet variant reported as context against MutualNet at the same seed(s), not as a compared method."""
  series: str                 # the report's series
  label: str                  # the data files' `method` column
  stem: str                   # its workdir's name stem
  overrides: tuple[str, ...]  # what makes it the variant


DIAGNOSTICS = {
    'labels': Diagnostic('Diagnostic', 'MutualNet, no in-place KD', 'mutualnet_labels',
                         ('--config.inplace_distillation=False',)),
    # The official code's resize (F.interpolate, align_corners=True) and BN recalibration (augmented training
    # batches, per-batch unbiased variances averaged): whether this project's deviations change the result.
    'official': Diagnostic('Official recipe', 'MutualNet, official resize and BN recalibration',
                           'mutualnet_official_recipe',
                           ('--config.resize_align_corners=True', '--config.bn_calibration=official')),
}


@dataclasses.dataclass(frozen=True)
class Budget:
  """One training schedule of a round: every run under it gets `settings` (as --config.KEY=VALUE) and the same
  number of epochs of the same split, hence the same number of steps."""
  round: int
  name: str
  epochs: float
  settings: dict[str, Any]                 # --config.KEY=VALUE for every run of the budget (besides num_epochs)
  purpose: str                             # one line for the report
  sweep_widths: tuple[float, ...]          # what MutualNet and US-Net runs are swept at
  sweep_resolutions: tuple[int, ...]

  @property
  def key(self) -> str:
    """Unique across rounds: names the workdirs, logs and the report's data folder."""
    return f'round{self.round}_{self.name}'


@dataclasses.dataclass(frozen=True)
class RunSpec:
  budget: Budget
  name: str                        # workdir (relative to --out; may contain '/')
  method: str                      # mutualnet | usnet | independent
  seed: int
  priority: int
  width: float | None = None       # independent only
  resolution: int | None = None    # independent only
  diagnostic: str = ''             # a DIAGNOSTICS key: a MutualNet variant, context rather than a compared method
  tag: str = ''                    # round 1: the run's label in its CSV when it was not the method's
  extra: tuple[tuple[str, Any], ...] = ()  # settings that change nothing in training (the pilot's test curves)

  @property
  def series(self) -> str:
    """Which curve of the report the run feeds."""
    return DIAGNOSTICS[self.diagnostic].series if self.diagnostic else LABELS[self.method]

  @property
  def label(self) -> str:
    """The run's `method` column in the data files (round 1's CSV used the tags)."""
    if self.tag:
      return self.tag
    return DIAGNOSTICS[self.diagnostic].label if self.diagnostic else LABELS[self.method]

  def overrides(self) -> list[str]:
    settings = {**self.budget.settings, **dict(self.extra), 'num_epochs': self.budget.epochs, 'seed': self.seed}
    out = [f'--config.{k}={v}' for k, v in settings.items()]
    out += list(DIAGNOSTICS[self.diagnostic].overrides) if self.diagnostic else []
    if self.method == 'independent':
      out += [f'--config.independent_width={self.width}', f'--config.independent_resolution={self.resolution}']
    return out

  @property
  def pilot(self) -> bool:
    """A pilot run: its test curve is logged during training and its fit measured on its training images."""
    return bool(self.extra)

  def fit_args(self) -> list[str]:
    """The sweep that measures how well the run fits its training images (un-augmented, as evaluated): the full
    configuration on the training split (run.py writes it to the workdir's FIT_DIR)."""
    width, resolution = (self.width, self.resolution) if self.method == 'independent' else FULL
    return [f'--config.eval_split={self.budget.settings.get("train_split", "train")}', f'--widths={width:g}',
            f'--resolutions={resolution}']

  def config_arg(self) -> str:
    return f'--config={CONFIG}:{self.method}'

  def sweep_configs(self) -> set[tuple[float, int]]:
    """The (width, resolution) pairs its query table must hold."""
    if self.method == 'independent':
      return {(float(self.width), int(self.resolution))}
    return {(float(w), int(r)) for w in self.budget.sweep_widths for r in self.budget.sweep_resolutions}

  def sweep_args(self) -> list[str]:
    if self.method == 'independent':
      return []  # its own (width, resolution) only: the trained configuration of an independent run
    return [f'--widths={",".join(f"{w:g}" for w in self.budget.sweep_widths)}',
            f'--resolutions={",".join(str(r) for r in self.budget.sweep_resolutions)}']


@dataclasses.dataclass(frozen=True)
class Round:
  number: int
  title: str
  budgets: tuple[Budget, ...]
  runs: tuple[RunSpec, ...]
  run_by_default: bool
  # What the round's runs got from the library's defaults of the time, when no config.json of theirs survives.
  described: dict[str, str] = dataclasses.field(default_factory=dict)

  def budget(self, name: str) -> Budget:
    return next(b for b in self.budgets if b.name == name)


# ----------------------------------------------------------------------------------------------------------------------
# Round 1: as it ran (names, overrides and priorities unchanged).

ROUND1_COMMON = {
    'num_epochs': 2,              # 936 steps of 128 images; the quickstart's 0.5 epoch is too short
    'batch_size': 128,
    'learning_rate': 0.1,         # cosine decay to 0 over the run (mutualnet_jax.train), Nesterov momentum 0.9
    'warmup_epochs': 0.1,         # linear warm-up (configs/default.py: without it the first ~50 steps diverge)
    'weight_decay': 1e-4,
    'eval_every_steps': 0,        # no in-training evaluation: the sweep evaluates every configuration afterwards
    'checkpoint_every_steps': 100,  # resumable mid-run
}
_R1_GRID = dict(sweep_widths=(1.0, 0.75, 0.5, 0.25), sweep_resolutions=(28, 24, 20, 16))
_R1_SHORT = Budget(1, '2ep', 2, ROUND1_COMMON, 'every method, the same 2-epoch schedule', **_R1_GRID)
_R1_LONG = Budget(1, '4ep', 4, ROUND1_COMMON, 'claim 4 re-checked with twice the schedule (one seed each)',
                  **_R1_GRID)


def _r1_independent(width: float, resolution: int, seed: int = 0, priority: int = 1, budget: Budget = _R1_SHORT,
                    tag: str = '') -> RunSpec:
  suffix = f'_{budget.epochs:g}ep' if budget is _R1_LONG else ''
  return RunSpec(budget, f'independent_w{width:g}_r{resolution}_s{seed}{suffix}', 'independent', seed, priority, width,
             resolution, tag=tag)


ROUND1 = Round(
    number=1,
    title='Round 1: 2 epochs, random widths on a 0.25 grid, pad-crop augmentation',
    budgets=(_R1_SHORT, _R1_LONG),
    run_by_default=False,
    described={'dataset': '`fashion_mnist_local`, training split `train`, eval split `test`',
               'width sampling': 'random widths on a 0.25 grid (`config.width_step=0.25`)',
               'sub-networks per step': '4 (the full network, the narrowest and 2 random widths)',
               'augmentation': 'pad-crop (4 px) + flip (`config.augmentation=small`)'},
    runs=(
        RunSpec(_R1_SHORT, 'mutualnet_s0', 'mutualnet', 0, 1),
        RunSpec(_R1_SHORT, 'usnet_s0', 'usnet', 0, 1),
        _r1_independent(1.0, 28),
        RunSpec(_R1_SHORT, 'mutualnet_s1', 'mutualnet', 1, 1),
        RunSpec(_R1_SHORT, 'usnet_s1', 'usnet', 1, 1),
        *[_r1_independent(w, 28) for w in (0.25, 0.5, 0.75)],
        _r1_independent(1.0, 28, seed=1, priority=2),
        RunSpec(_R1_LONG, 'mutualnet_s0_4ep', 'mutualnet', 0, 2, tag='MutualNet, 4 epochs'),
        _r1_independent(1.0, 28, priority=2, budget=_R1_LONG, tag='Independent, 4 epochs'),
        *[_r1_independent(w, r, priority=3) for r in (24, 20, 16) for w in (1.0, 0.25, 0.5, 0.75)],
        RunSpec(_R1_SHORT, 'mutualnet_labels_s0', 'mutualnet', 0, 4, diagnostic='labels'),
    ))


# ----------------------------------------------------------------------------------------------------------------------
# Round 2.

# The official recipe for a dataset other than ImageNet (taoyang1122/MutualNet train.py and utils/datasets.py):
# SGD Nesterov 0.9, lr 0.1, cosine per step, weight decay 1e-4 on every parameter, pad-crop (4 px) + flip. One
# deviation, the same for every method: a 47-step linear warm-up (without it the first ~50 steps diverge here).
ROUND2_COMMON = {
    'batch_size': 128,
    'learning_rate': 0.1,
    'weight_decay': 1e-4,
    'weight_decay_params': 'all',
    'augmentation': 'small',
    'eval_every_steps': 0,
    'checkpoint_every_steps': 200,
    'model.fused_bn': False,    # XLA's BN kernels, as every round-2 run before the fused kernel trained: one numerics
}
# Budgets as data: name -> (training images, epochs). 'overfit' is a subset small and a schedule long enough that the
# independent full network over-fits (its pilot, priority 1, shows whether it does: >= 99 % top-1 on its training
# images while its test top-1 has passed its peak). 'pilot5k' is the first pilot, kept as evidence: 5k images for
# 60 epochs did not over-fit (docs/RESULTS.md). 'long' is the full training set, optional and last.
SCHEDULES = {'overfit': (1000, 300), 'pilot5k': (5000, 60), 'long': (60_000, 10), 'overfit_official': (1000, 300)}
WARMUP_STEPS = 47               # the same linear warm-up for every budget and method (round 1's)
PILOT_EVALS = 30                # test evaluations during a pilot run (its curve)
EPOCHS = {name: epochs for name, (_, epochs) in SCHEDULES.items()}
STEPS_PER_EPOCH = {name: images // ROUND2_COMMON['batch_size'] for name, (images, _) in SCHEDULES.items()}


def _pilot_eval(budget: str) -> tuple[tuple[str, Any], ...]:
  """The pilot's in-training evaluation: changes nothing in training (the field is free to change on resume)."""
  return (('eval_every_steps', max(1, STEPS_PER_EPOCH[budget] * EPOCHS[budget] // PILOT_EVALS)),)


# MutualNet and US-Net: the widths of the old 0.25 grid plus three off it (untrained widths dipped in round 1),
# at every resolution.
ROUND2_SWEEP = dict(sweep_widths=(1.0, 0.9, 0.75, 0.6, 0.5, 0.35, 0.25), sweep_resolutions=(28, 24, 20, 16))
FULL = (1.0, 28)
OTHER_INDEPENDENT = ((0.25, 16), (0.5, 20), (0.75, 24))  # claim 4b: one per resolution, across the width range
CORE_SEEDS = (0, 1, 2, 3)       # MutualNet, US-Net and the independent FULL network
GRID_SEEDS = (0, 1)             # the other independent networks

# Training throughput per method (images/s, this project on a 2-core AMD EPYC AVX-512 under the runner's nice, the
# small budgets' settings, the independent network at 1.0@28: round 3's uninterrupted runs, 300,000 images each,
# timings.json; python benchmarks/reproduce/run.py --list prints the plan from it). Sweeps: seconds.
RATE = {'mutualnet': 280.0, 'usnet': 380.0, 'independent': 550.0}
SWEEP_SECONDS = {'mutualnet': 150.0, 'usnet': 150.0, 'independent': 30.0}
PILOT_EVAL_SECONDS = 20.0       # one in-training evaluation (quick BN recalibration + 10k test images)


def _budget(name: str, purpose: str, number: int = 2, **settings: Any) -> Budget:
  images = SCHEDULES[name][0]
  split = 'train' if images >= 60_000 else f'train[:{images}]'
  return Budget(number, name, EPOCHS[name], {**ROUND2_COMMON, 'train_split': split,
                                             'warmup_epochs': round(WARMUP_STEPS / STEPS_PER_EPOCH[name], 1),
                                             **settings}, purpose, **ROUND2_SWEEP)


_R2_BUDGETS = (
    _budget('overfit', f'a {SCHEDULES["overfit"][0]:,}-image training subset for {EPOCHS["overfit"]} epochs, long '
                       'enough that the independent full network over-fits'),
    _budget('pilot5k', 'the first pilot: 5,000 images for 60 epochs (the independent full network only)'),
    _budget('long', 'the full training set (optional, last): one seed of MutualNet and the independent full network'),
)


def _r2_runs(budget: Budget) -> list[RunSpec]:
  def run(method: str, seed: int, priority: int, width: float | None = None, resolution: int | None = None,
          diagnostic: str = '', extra: tuple[tuple[str, Any], ...] = ()) -> RunSpec:
    stem = (DIAGNOSTICS[diagnostic].stem if diagnostic else
            f'independent_w{width:g}_r{resolution}' if method == 'independent' else method)
    # The subset and epochs in the folder name: changing them starts fresh workdirs instead of resuming another run.
    split = budget.settings['train_split'].replace('train[:', '').rstrip(']') or 'all'
    return RunSpec(budget, f'round{budget.round}/{budget.name}_{split}_{budget.epochs:g}ep/{stem}_s{seed}', method,
                   seed, priority, width, resolution, diagnostic=diagnostic, extra=extra)

  pilot = _pilot_eval(budget.name)
  if budget.name == 'long':
    return [run('mutualnet', 0, 7), run('independent', 0, 7, *FULL)]
  if budget.name == 'overfit_official':  # round 3: the overfit comparisons again, claim 4 first
    return [*[r for seed in CORE_SEEDS for r in (run('mutualnet', seed, 6), run('independent', seed, 6, *FULL))],
            *[run('usnet', seed, 6) for seed in CORE_SEEDS],
            *[run('independent', seed, 6, w, r) for seed in GRID_SEEDS for w, r in OTHER_INDEPENDENT]]
  if budget.name == 'pilot5k':
    return [run('independent', 0, 1, *FULL, extra=pilot)]
  return [
      # 1: the pilot (<= 1 h): the independent full network and MutualNet, seed 0, with test curves.
      run('independent', 0, 1, *FULL, extra=pilot), run('mutualnet', 0, 1, extra=pilot),
      # 2: claim 4 with 4 seeds.
      *[r for seed in CORE_SEEDS[1:] for r in (run('mutualnet', seed, 2), run('independent', seed, 2, *FULL))],
      # 3: US-Net (claims 1 and 3) with 4 seeds.
      *[run('usnet', seed, 3) for seed in CORE_SEEDS],
      # 4: independent networks at other configurations (claim 4b), 2 seeds.
      *[run('independent', seed, 4, w, r) for seed in GRID_SEEDS for w, r in OTHER_INDEPENDENT],
      # 5: context: MutualNet with the official resize and BN recalibration (the recipe deviations decided on this
      # pair with seed 0), and without in-place distillation.
      run('mutualnet', 0, 5, diagnostic='official'), run('mutualnet', 0, 5, diagnostic='labels'),
  ]


def estimated_seconds(run: RunSpec) -> float:
  """Training (images / measured rate), in-training evaluations and the sweep of one run."""
  steps = STEPS_PER_EPOCH[run.budget.name] * run.budget.epochs
  evals = PILOT_EVALS if run.pilot else 0
  return (steps * run.budget.settings['batch_size'] / RATE[run.method] + evals * PILOT_EVAL_SECONDS
          + SWEEP_SECONDS[run.method])


ROUND2 = Round(
    number=2,
    title='Round 2: the official non-ImageNet recipe (uniform widths, decay on every parameter, pad-crop + flip)',
    budgets=_R2_BUDGETS,
    run_by_default=True,
    runs=tuple(run for budget in _R2_BUDGETS for run in _r2_runs(budget)))

# Round 3: round 2's overfit budget under the official code's resize (align_corners) and BN recalibration for every
# method: the 'official' diagnostic of round 2 found that they change the result (docs/RESULTS.md, Recipe deviations).
# A new series, so it takes the fused BN kernel (faster; the same function).
OFFICIAL_RECIPE = {'resize_align_corners': True, 'bn_calibration': 'official', 'model.fused_bn': True}
_R3_BUDGET = _budget('overfit_official', f'round 2\'s overfit budget ({SCHEDULES["overfit"][0]:,} images, '
                     f'{EPOCHS["overfit"]} epochs) with the official resize (align_corners) and BN recalibration '
                     'for every method', number=3, **OFFICIAL_RECIPE)
ROUND3 = Round(
    number=3,
    title='Round 3: round 2\'s overfit comparisons under the official resize and BN recalibration',
    budgets=(_R3_BUDGET,),
    run_by_default=True,
    runs=tuple(_r2_runs(_R3_BUDGET)))

ROUNDS = (ROUND1, ROUND2, ROUND3)
RECORDED = (ROUND3, ROUND2)  # the rounds run.py records (benchmarks/reproduce/round<N>/) and reports, latest first


def select(rounds: Iterable[int] | None = None, budgets: Iterable[str] | None = None,
           max_priority: int | None = None, only: Sequence[str] = ()) -> list[RunSpec]:
  """Runs in the order run.py works through them (priority, then listing order). `rounds` None: the rounds run by
  default; `budgets` None: every budget; `only`: these run names (still within the rounds/budgets chosen)."""
  wanted = None if rounds is None else set(rounds)
  chosen = [r for r in ROUNDS if (r.run_by_default if wanted is None else r.number in wanted)]
  runs = [run for rnd in chosen for run in rnd.runs
          if (budgets is None or run.budget.name in set(budgets))
          and (max_priority is None or run.priority <= max_priority) and (not only or run.name in set(only))]
  return sorted(runs, key=lambda run: run.priority)  # stable: listing order within a priority


def by_name() -> dict[str, RunSpec]:
  out = {run.name: run for rnd in ROUNDS for run in rnd.runs}
  assert len(out) == sum(len(rnd.runs) for rnd in ROUNDS), 'run names collide'
  return out
