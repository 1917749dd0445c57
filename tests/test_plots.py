"""The Accuracy-MACs figure labels its Pareto frontier's points with their widths, and only those."""
from mutualnet_jax import plots, query


def row(width: float, resolution: int, mmacs: float, top1: float) -> query.Row:
  return query.Row(width, resolution, int(mmacs * 1e6), 1000, top1, 0.95, 1.0)


# (1.0, 16) is dominated by (0.75, 24); the other three form the frontier.
TABLE = [row(0.25, 16, 10, 0.60), row(0.5, 24, 50, 0.80), row(0.75, 24, 100, 0.85), row(1.0, 16, 110, 0.84)]


def test_frontier_points_are_labelled_with_their_widths():
  ax = plots.accuracy_macs_figure(TABLE, title='t').axes[0]
  labels = {t.get_text(): t.xy for t in ax.texts}
  assert labels == {'0.25': (10.0, 60.0), '0.5': (50.0, 80.0), '0.75': (100.0, 85.0)}  # not the dominated 1.0


def test_accuracy_macs_still_writes_a_png(tmp_path):
  path = plots.accuracy_macs(TABLE, tmp_path / 'a.png')
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
