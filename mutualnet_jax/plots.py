"""Accuracy-MACs figures from query tables (matplotlib, PNG, no display needed).

`accuracy_macs`: one run's configurations coloured by resolution with their Pareto frontier (the MutualNet paper's
Fig. 5). `overlay`: the frontiers of several runs (MutualNet, US-Net, US-Net+, independent networks) on one axis
(Figs. 4 and 6); runs given the same label are pooled, so independently trained networks form one curve.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import matplotlib
import numpy as np
from etils import epath
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mutualnet_jax.errors import UserError
from mutualnet_jax.query import Row, pareto_frontier, read_table

PLOT_NAME = 'accuracy_macs.png'
OVERLAY_NAME = 'accuracy_macs_overlay.png'


def axes(title: str | None, ylabel: str = 'top-1 accuracy (%)',
         figsize: tuple[float, float] = (6.4, 4.8)) -> tuple[Figure, Any]:
  """An Accuracy-MACs figure (no pyplot state: safe in threads and without a display)."""
  fig = Figure(figsize=figsize, dpi=120)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  ax.set_xlabel('MFLOPs (multiply-adds per image)')
  ax.set_ylabel(ylabel)
  ax.grid(True, alpha=0.3)
  if title:
    ax.set_title(title, fontsize='medium')
  return fig, ax


def save(fig: Figure, path: str | epath.PathLike) -> epath.Path:
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, format='png')
  return path


def _xy(rows: Sequence[Row]) -> tuple[np.ndarray, np.ndarray]:
  """MFLOPs and top-1 %; a row without accuracy is NaN, which matplotlib leaves out."""
  return (np.array([r.macs / 1e6 for r in rows]),
          np.array([np.nan if r.top1 is None else 100 * r.top1 for r in rows]))


def accuracy_macs(rows: Sequence[Row], path: str | epath.PathLike, title: str | None = None) -> epath.Path:
  """Every configuration as a point coloured by resolution (one line per resolution, widths along it) and the
  Pareto frontier in black, its points labelled with their widths; returns the PNG's path."""
  return save(accuracy_macs_figure(rows, title), path)


def accuracy_macs_figure(rows: Sequence[Row], title: str | None = None) -> Figure:
  """`accuracy_macs`' figure. Only frontier points get a width label: the colour gives the resolution, and the
  width is what a reader picks from the frontier; labelling every point would bury the curve."""
  fig, ax = axes(title)
  resolutions = sorted({r.resolution for r in rows}, reverse=True)
  colours = matplotlib.colormaps['viridis'](np.linspace(0.0, 0.9, max(len(resolutions), 1)))
  for colour, res in zip(colours, resolutions):
    x, y = _xy(sorted((r for r in rows if r.resolution == res), key=lambda r: r.width))
    ax.plot(x, y, '-o', color=colour, markersize=3.5, linewidth=0.8, label=f'{res} px')
  frontier = pareto_frontier(rows)
  x, y = _xy(frontier)
  ax.plot(x, y, '-', color='black', linewidth=1.6, label='Pareto frontier', zorder=3)
  for r, xi, yi in zip(frontier, x, y):
    ax.annotate(f'{r.width:g}', (xi, yi), xytext=(-3, 4), textcoords='offset points', ha='right',
                fontsize='x-small', zorder=4)
  ax.legend(loc='lower right', fontsize='small')
  return fig


def overlay(series: Mapping[str, Sequence[Row]], path: str | epath.PathLike, title: str | None = None) -> epath.Path:
  """One Pareto frontier (line) per label over that label's points (markers); returns the PNG's path."""
  fig, ax = axes(title)
  for i, (label, rows) in enumerate(series.items()):
    colour = f'C{i}'
    x, y = _xy(rows)
    ax.plot(x, y, 'o', color=colour, markersize=2.5, alpha=0.35)
    x, y = _xy(pareto_frontier(rows))
    ax.plot(x, y, '-o', color=colour, markersize=4, linewidth=1.5, label=label)
  ax.legend(loc='lower right', fontsize='small')
  return save(fig, path)


def _table(spec: str) -> tuple[list[Row], dict]:
  """Rows of 'WORKDIR' or of 'WORKDIR@RES' (only that resolution: US-Net from the table that gives US-Net+)."""
  workdir, _, resolution = spec.rpartition('@') if '@' in spec else (spec, '', '')
  rows, meta = read_table(workdir)
  if resolution:
    rows = [r for r in rows if str(r.resolution) == resolution]
    if not rows:
      raise UserError(f'{workdir} has no rows at resolution {resolution}: pick one its table holds.')
  return rows, meta


def series(workdirs: Sequence[str], labels: Sequence[str] | None) -> tuple[dict[str, list[Row]], list[dict]]:
  """{label: rows} from swept workdirs (labels default to each run's method; equal labels pool their rows) and the
  tables' metadata. An entry 'WORKDIR@RES' keeps only that resolution's rows, so one US-Net sweep over all
  resolutions gives both the US-Net curve (its training resolution) and US-Net+ (every resolution)."""
  if labels and len(labels) != len(workdirs):
    raise UserError(f'{len(labels)} --labels for {len(workdirs)} --workdirs: give one label per workdir.')
  tables = [_table(w) for w in workdirs]
  pooled: dict[str, list[Row]] = {}
  for spec, label, (rows, meta) in zip(workdirs, labels or [None] * len(workdirs), tables):
    pooled.setdefault(label or f"{meta.get('method', epath.Path(spec).name)}", []).extend(rows)
  return pooled, [meta for _, meta in tables]


def from_workdirs(workdirs: Sequence[str], labels: Sequence[str] | None, out: str | epath.PathLike) -> epath.Path:
  """The Fig. 5 plot of one swept workdir, or the overlay of several (see `series`)."""
  pooled, metas = series(workdirs, labels)
  if len(workdirs) == 1 and not labels:
    (rows,) = pooled.values()
    return accuracy_macs(rows, out, title=f"{metas[0].get('method', '')} {metas[0].get('model', '')}".strip())
  return overlay(pooled, out)
