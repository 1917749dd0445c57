"""The reproduction's run list, as data: which networks are trained, with which overrides, and how each is swept.

Every run shares COMMON (the same training budget: epochs, batch, learning-rate schedule), so the methods differ
only in `config.method` (and, for independent networks, the one width/resolution they train). `priority` orders the
work: all priority-1 runs (the core comparison) are trained and swept before any priority-2 run (extras that are
run only when the time budget allows; the report says which of them exist).
"""
from __future__ import annotations

import dataclasses

CONFIG = 'configs/default.py'

# The same training budget for every method, written out so the report can quote it (configs/default.py values
# except num_epochs, no in-training evaluation and a shorter checkpoint interval).
COMMON = {
    'num_epochs': 2,              # 936 steps of 128 images (60k // 128 * 2); the quickstart's 0.5 epoch is too short
    'batch_size': 128,
    'learning_rate': 0.1,         # cosine decay to 0 over the run (mutualnet_jax.train), Nesterov momentum 0.9
    'warmup_epochs': 0.1,         # linear warm-up (configs/default.py: without it the first ~50 steps diverge)
    'weight_decay': 1e-4,
    'eval_every_steps': 0,        # no in-training evaluation: the sweep evaluates every configuration afterwards
    'checkpoint_every_steps': 100,  # resumable mid-run
}

SWEEP_WIDTHS = (1.0, 0.75, 0.5, 0.25)
SWEEP_RESOLUTIONS = (28, 24, 20, 16)
LATENCY_REPEATS = 5
ABLATION = 'MutualNet, no in-place KD'
# Claim 4 (the full configuration beats an independent network) checked again with a longer schedule.
LONG_EPOCHS = 4
LONG_MUTUALNET = f'MutualNet, {LONG_EPOCHS} epochs'
LONG_INDEPENDENT = f'Independent, {LONG_EPOCHS} epochs'
LONGER = (LONG_MUTUALNET, LONG_INDEPENDENT)


@dataclasses.dataclass(frozen=True)
class Run:
  name: str                 # workdir name under --out
  method: str               # mutualnet | usnet | independent
  seed: int
  priority: int = 1
  width: float | None = None       # independent only
  resolution: int | None = None    # independent only
  extra: tuple[str, ...] = ()      # further overrides: an ablation, reported as its own series under `tag`
  tag: str = ''
  epochs: float | None = None      # a longer (tagged) schedule; None: COMMON's

  @property
  def num_epochs(self) -> float:
    return COMMON['num_epochs'] if self.epochs is None else self.epochs

  @property
  def steps(self) -> int:
    return int(round(self.num_epochs * (60_000 // COMMON['batch_size'])))

  @property
  def label(self) -> str:
    return self.tag or {'mutualnet': 'MutualNet', 'usnet': 'US-Net', 'independent': 'Independent'}[self.method]

  def overrides(self) -> list[str]:
    settings = {**COMMON, 'num_epochs': self.num_epochs, 'seed': self.seed}
    out = [f'--config.{k}={v}' for k, v in settings.items()] + list(self.extra)
    if self.method == 'independent':
      out += [f'--config.independent_width={self.width}', f'--config.independent_resolution={self.resolution}']
    return out

  def config_arg(self) -> str:
    return f'--config={CONFIG}:{self.method}'

  def sweep_args(self) -> list[str]:
    if self.method == 'independent':
      return []  # its own (width, resolution) only: the trained grid of an independent run
    return [f'--widths={",".join(f"{w:g}" for w in SWEEP_WIDTHS)}',
            f'--resolutions={",".join(str(r) for r in SWEEP_RESOLUTIONS)}']


def _independent(width: float, resolution: int, seed: int = 0, priority: int = 1, epochs: float | None = None,
                 tag: str = '') -> Run:
  suffix = f'_{epochs:g}ep' if epochs else ''
  return Run(f'independent_w{width:g}_r{resolution}_s{seed}{suffix}', 'independent', seed, priority, width, resolution,
             tag=tag, epochs=epochs)


# Ordered so that an interrupted pipeline has the most important comparisons first: both methods' seed 0, the
# independent full network, both methods' seed 1, then the narrower independent networks at 28 px.
RUNS: list[Run] = [
    Run('mutualnet_s0', 'mutualnet', 0),
    Run('usnet_s0', 'usnet', 0),
    _independent(1.0, 28),
    Run('mutualnet_s1', 'mutualnet', 1),
    Run('usnet_s1', 'usnet', 1),
    *[_independent(w, 28) for w in (0.25, 0.5, 0.75)],
    # Extras, when time allows: a second seed of the full independent network; claim 4 with twice the schedule;
    # the rest of the 4 x 4 grid of independent networks (the other resolutions); a diagnostic.
    _independent(1.0, 28, seed=1, priority=2),
    Run(f'mutualnet_s0_{LONG_EPOCHS}ep', 'mutualnet', 0, priority=2, tag=LONG_MUTUALNET, epochs=LONG_EPOCHS),
    _independent(1.0, 28, priority=2, epochs=LONG_EPOCHS, tag=LONG_INDEPENDENT),
    *[_independent(w, r, priority=3) for r in (24, 20, 16) for w in (1.0, 0.25, 0.5, 0.75)],
    # Diagnostic, not a baseline: MutualNet whose sub-networks learn from the labels instead of the full network's
    # prediction (in-place distillation off), to see whether distilling from a not yet converged teacher explains a
    # gap to the independent networks at this short budget.
    Run('mutualnet_labels_s0', 'mutualnet', 0, priority=4, extra=('--config.inplace_distillation=False',),
        tag=ABLATION),
]
