"""The transfer experiment's runs, as data: pre-training on Fashion-MNIST classes 0-4, fine-tuning on classes 5-9.

Pre-training (configs/default.py, the quickstart model, with the 5-class dataset): one MutualNet, one US-Net and one
independently trained network (1.0x at 28 px) per seed, PRETRAIN_EPOCHS long (the report checks that each source's
training loss has flattened). Fine-tuning (configs/fashion_mnist_transfer.py with FINETUNE_SETTINGS: 5,000 labelled
images for 30 epochs, 1,500 steps, ten times the first version's 150): every source fine-tuned the same way
(`FINETUNE_METHOD`, slimmably), plus the same recipe from scratch, so the initialisation is the only difference
between the compared series. Seed s of a fine-tuning starts from seed s of its source. Each fine-tuned run is swept
over the width x resolution grid.

The independent baseline is one 1.0x@28 backbone fine-tuned slimmably, not the paper's one network per
configuration fine-tuned on its own: the report labels it so.

A run offers what benchmarks/reproduce/run.py's train/sweep functions use (name, config_arg, overrides, sweep_args,
sweep_configs), so the reproduction's resumable runner does the work.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parent.parent / 'reproduce'))
import archive  # noqa: E402  benchmarks/reproduce/archive.py: committed per-run records
import runs as reproduce_runs  # noqa: E402  benchmarks/reproduce/runs.py: the measured training rates

PRETRAIN_CONFIG = 'configs/default.py'
FINETUNE_CONFIG = 'configs/fashion_mnist_transfer.py'
PRETRAIN_DATASET = 'fashion_mnist_local/classes_0_4'
FINETUNE_METHOD = 'mutualnet'  # how every source is fine-tuned (its sweep needs a slimmable run)
PRETRAIN_EPOCHS = 8            # of the 30k images of classes 0-4: 1,872 steps of 128 (4 left the sources well
                               # below 8's held-out top-1: README, the transfer study)
FINETUNE_SETTINGS = {'train_split': 'train[:5000]', 'num_epochs': 30, 'calibration_images': 2000,
                     'eval_calibration_images': 2000}
SEEDS = (0, 1)
INDEPENDENT = (1.0, 28)        # the independently pre-trained network's (width, resolution)
SWEEP_WIDTHS = (1.0, 0.75, 0.5, 0.25)
SWEEP_RESOLUTIONS = (28, 24, 20, 16)
# A source's held-out fit: top-1 on its own dataset's test split (classes 0-4) at these (width, resolution), beside
# its training-loss flatness in the report (an annealed training loss keeps falling while the model still improves).
SOURCE_CONFIGS = ((1.0, 28), (0.25, 28))
# Series of the report: label -> the pre-training method ('' = from scratch).
SOURCES = {'MutualNet-pre-trained': 'mutualnet', 'US-Net-pre-trained': 'usnet',
           'Independent-1.0@28-pre-trained': 'independent', 'Scratch': ''}

# Finished runs' committed records: a fine-tuning's query table, last training interval and timings; a source's loss
# curve, last training interval and timings (with its kernel norms).
RECORDS = archive.Records(Path(__file__).resolve().parent / 'records')
# The official code's resize (align_corners) for every run: the reproduction's round 2 found that training with it
# changes MutualNet's result (docs/RESULTS.md, Recipe deviations; README).
COMMON = {'eval_every_steps': 0, 'log_every_steps': 25, 'checkpoint_every_steps': 100, 'resize_align_corners': True}


@dataclasses.dataclass(frozen=True)
class TransferRunSpec:
  name: str                      # workdir, relative to the runner's --out
  phase: str                     # 'pretrain' | 'finetune'
  method: str                    # the training method of this run
  seed: int
  series: str = ''               # fine-tuning: the report's label
  source: str | None = None      # fine-tuning: the name of the pre-training run it starts from
  settings: tuple[tuple[str, Any], ...] = ()
  out: str = ''                  # the runner's --out (absolute): where the source's workdir is
  steps: int | None = None       # overrides the epochs (the runner's --steps, for a smoke test)

  def config_arg(self) -> str:
    return f'--config={PRETRAIN_CONFIG if self.phase == "pretrain" else FINETUNE_CONFIG}:{self.method}'

  def overrides(self) -> list[str]:
    settings = {**COMMON, **dict(self.settings), 'seed': self.seed}
    if self.source is not None:
      settings['init_from'] = f'{self.out}/{self.source}'
    if self.steps is not None:
      settings['num_train_steps'] = self.steps
    return [f'--config.{k}={v}' for k, v in settings.items()]

  def sweep_args(self) -> list[str]:
    widths, resolutions = zip(*sorted(self.sweep_configs(), reverse=True))
    return [f'--widths={",".join(f"{w:g}" for w in dict.fromkeys(widths))}',
            f'--resolutions={",".join(str(r) for r in dict.fromkeys(resolutions))}']

  def sweep_configs(self) -> set[tuple[float, int]]:
    """A fine-tuning's grid; a source's SOURCE_CONFIGS (its held-out fit), of them the independent network's own
    configuration only (it runs at no other width)."""
    if self.phase == 'pretrain':
      return {(float(w), int(r)) for w, r in SOURCE_CONFIGS if self.method != 'independent' or (w, r) == INDEPENDENT}
    return {(float(w), int(r)) for w in SWEEP_WIDTHS for r in SWEEP_RESOLUTIONS}

  def estimated_seconds(self) -> float:
    """Training at the measured rate of its method, plus the sweep of a fine-tuning."""
    if self.phase == 'pretrain':
      return 30_000 * PRETRAIN_EPOCHS / reproduce_runs.RATE[self.method]
    images = int(FINETUNE_SETTINGS['train_split'].split(':')[1].rstrip(']')) * FINETUNE_SETTINGS['num_epochs']
    return images / reproduce_runs.RATE[self.method] + reproduce_runs.SWEEP_SECONDS[self.method]


def pretrain_run(method: str, seed: int) -> TransferRunSpec:
  settings = {'dataset': PRETRAIN_DATASET, 'model.num_classes': 5, 'num_epochs': PRETRAIN_EPOCHS}
  if method == 'independent':
    settings.update(independent_width=INDEPENDENT[0], independent_resolution=INDEPENDENT[1])
  return TransferRunSpec(f'pretrain_{PRETRAIN_EPOCHS:g}ep/{method}_s{seed}', 'pretrain', method, seed,
                         settings=tuple(settings.items()))


def finetune_run(series: str, seed: int) -> TransferRunSpec:
  method = SOURCES[series]
  source = pretrain_run(method, seed).name if method else None
  stem = f'from_{method}' if method else 'scratch'
  budget = f'{FINETUNE_SETTINGS["train_split"].split(":")[1].rstrip("]")}x{FINETUNE_SETTINGS["num_epochs"]}ep'
  return TransferRunSpec(f'finetune_{PRETRAIN_EPOCHS:g}ep_{budget}/{stem}_s{seed}', 'finetune', FINETUNE_METHOD,
                         seed, series, source, settings=tuple(FINETUNE_SETTINGS.items()))


def runs(out: str = '', steps: int | None = None) -> list[TransferRunSpec]:
  """Every run in the order the runner works through them: all pre-training (seed-major), then all fine-tuning."""
  pre = [pretrain_run(m, s) for s in SEEDS for m in SOURCES.values() if m]
  fine = [finetune_run(series, s) for s in SEEDS for series in SOURCES]
  return [dataclasses.replace(r, out=out, steps=steps) for r in pre + fine]
