"""The query table without JAX: budget queries (ties, empty results), Pareto frontier, table files, plots."""
import json
import subprocess
import sys

import pytest

from mutualnet_jax import commands, plots, query
from mutualnet_jax.errors import UserError


def row(width, resolution, mmacs, top1, ms, top5=0.9):
  return query.Row(width, resolution, int(mmacs * 1e6), 1000, top1, top5, ms, 10 * ms)


# A hand-made table: (0.5, 24) and (0.75, 16) tie on top-1 at different costs; (0.5, 28) ties (0.5, 24) on top-1
# and MACs but is slower; (1.0, 16) is dominated by (0.75, 24).
TABLE = [
    row(0.25, 16, 10, 0.60, 1.0),
    row(0.25, 28, 30, 0.70, 2.0),
    row(0.5, 24, 50, 0.80, 3.0),
    row(0.5, 28, 50, 0.80, 3.5),
    row(0.75, 16, 60, 0.80, 2.5),
    row(0.75, 24, 100, 0.85, 5.0),
    row(1.0, 16, 110, 0.84, 4.0),
    row(1.0, 28, 200, 0.90, 9.0),
]


@pytest.mark.parametrize('mflops,ms,expected', [
    (1000, None, (1.0, 28)),   # everything fits: the most accurate
    (150, None, (0.75, 24)),   # (1.0, 16) fits too but is less accurate
    (60, None, (0.5, 24)),     # three rows tie at 0.80: fewest MACs, then lower latency
    (49.9, None, (0.25, 28)),
    (10, None, (0.25, 16)),    # exactly the budget
    (None, 3.0, (0.75, 16)),   # by latency: the 0.80 tie goes to the fastest
    (None, 2.4, (0.25, 28)),
    (55, 3.2, (0.5, 24)),      # both budgets
])
def test_query_picks_the_most_accurate_row_within_budget(mflops, ms, expected):
  best = query.query(TABLE, budget_mflops=mflops, budget_ms=ms)
  assert (best.width, best.resolution) == expected


def test_query_tie_on_everything_prefers_the_narrower_network():
  tied = [row(0.5, 16, 40, 0.8, 2.0), row(0.4, 20, 40, 0.8, 2.0)]
  assert query.query(tied, budget_mflops=50).width == 0.4


@pytest.mark.parametrize('mflops,ms,match', [
    (9.99, None, 'no configuration fits 9.99 MFLOPs: the smallest is width 0.25 at 16 px'),
    (None, 0.5, 'no configuration fits 0.5 ms'),
    (100, 0.9, 'no configuration fits 100 MFLOPs and 0.9 ms'),
    (None, None, 'give a budget'),
])
def test_query_with_nothing_in_budget_is_one_clear_error(mflops, ms, match):
  with pytest.raises(UserError, match=match):
    query.query(TABLE, budget_mflops=mflops, budget_ms=ms)


def test_query_on_an_empty_table_is_a_clear_error():
  with pytest.raises(UserError, match='empty'):
    query.query([], budget_mflops=100)


def test_pareto_frontier():
  by_macs = [(r.width, r.resolution) for r in query.pareto_frontier(TABLE)]
  assert by_macs == [(0.25, 16), (0.25, 28), (0.5, 24), (0.75, 24), (1.0, 28)]
  by_latency = [(r.width, r.resolution) for r in query.pareto_frontier(TABLE, 'latency_ms')]
  assert by_latency == [(0.25, 16), (0.25, 28), (0.75, 16), (1.0, 16), (0.75, 24), (1.0, 28)]
  assert query.pareto_frontier([]) == []


def test_table_round_trips_through_json_and_csv(tmp_path):
  csv_path, _ = query.write_table(TABLE, str(tmp_path), {'method': 'mutualnet'})
  rows, meta = query.read_table(str(tmp_path))
  assert rows == TABLE and meta == {'method': 'mutualnet'}
  assert query.read_csv(str(csv_path)) == TABLE


def test_missing_or_damaged_table_is_a_clear_error(tmp_path):
  with pytest.raises(UserError, match='run --mode=sweep'):
    query.read_table(str(tmp_path))
  (tmp_path / 'query_table.json').write_text('{"rows": [{"width": 1}]')
  with pytest.raises(UserError, match='damaged'):
    query.read_table(str(tmp_path))


def test_plots_write_pngs(tmp_path):
  single = plots.accuracy_macs(TABLE, tmp_path / 'a.png', title='t')
  both = plots.overlay({'MutualNet': TABLE, 'US-Net': [r for r in TABLE if r.resolution == 28]}, tmp_path / 'b.png')
  for path in (single, both):
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_overlay_of_workdirs_pools_equal_labels_and_filters_a_resolution(tmp_path):
  for name, rows in (('mutualnet', TABLE), ('usnet', TABLE[:4]), ('ind1', TABLE[5:6]), ('ind2', TABLE[7:])):
    query.write_table(rows, str(tmp_path / name), {'method': name})
  specs = [str(tmp_path / 'mutualnet'), str(tmp_path / 'usnet') + '@28', str(tmp_path / 'usnet'),
           str(tmp_path / 'ind1'), str(tmp_path / 'ind2')]
  labels = ['MutualNet', 'US-Net', 'US-Net+', 'independent', 'independent']
  pooled, _ = plots.series(specs, labels)
  assert list(pooled) == ['MutualNet', 'US-Net', 'US-Net+', 'independent']
  assert pooled['MutualNet'] == TABLE and pooled['US-Net+'] == TABLE[:4]
  assert pooled['US-Net'] == [r for r in TABLE[:4] if r.resolution == 28]
  assert pooled['independent'] == TABLE[5:6] + TABLE[7:]  # two workdirs, one label: one pooled curve
  by_method, _ = plots.series(specs[:1] + specs[3:], None)  # labels default to the tables' methods
  assert list(by_method) == ['mutualnet', 'ind1', 'ind2']
  path = plots.from_workdirs(specs, labels, tmp_path / 'all.png')
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  with pytest.raises(UserError, match='no rows at resolution 20'):
    plots.from_workdirs([str(tmp_path / 'usnet') + '@20'], None, tmp_path / 'x.png')
  with pytest.raises(UserError, match='one label per workdir'):
    plots.from_workdirs([str(tmp_path / 'usnet')], ['a', 'b'], tmp_path / 'x.png')


def test_missing_or_damaged_csv_is_one_clear_error(tmp_path):
  with pytest.raises(UserError, match='not found'):
    query.read_csv(str(tmp_path / 'nope.csv'))
  (tmp_path / 'bad.csv').write_text('width,resolution\n0.5,x\n')
  with pytest.raises(UserError, match='not a readable query table'):
    query.read_csv(str(tmp_path / 'bad.csv'))


def _loaded_after(code: str) -> list[str]:
  """The heavy modules a fresh interpreter holds after running `code`."""
  code += '; import sys; print(sorted(m for m in ("jax", "tensorflow", "matplotlib") if m in sys.modules))'
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1].replace("'", '"'))


def test_query_and_plots_import_neither_jax_nor_tensorflow():
  assert _loaded_after('from mutualnet_jax import commands, plots, query') == ['matplotlib']


def test_the_query_mode_loads_neither_jax_tensorflow_nor_matplotlib(tmp_path):
  query.write_table(TABLE, str(tmp_path), {})
  budget = 'commands.Options(budget_mflops=60, format="json")'
  code = (f'from mutualnet_jax import commands; print(commands.run("query", None, {str(tmp_path)!r}))'
          f'; print(commands.run("query", None, {str(tmp_path)!r}, {budget}))')
  assert _loaded_after(code) == []


def test_the_plot_mode_draws_the_table(tmp_path):
  query.write_table(TABLE, str(tmp_path), {})
  path = commands.run('plot', None, str(tmp_path))
  assert path == str(tmp_path / plots.PLOT_NAME)
  assert (tmp_path / plots.PLOT_NAME).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_the_tflite_latency_column_is_optional_and_queryable(tmp_path):
  timed = [query.Row(r.width, r.resolution, r.macs, r.params, r.top1, r.top5, r.latency_ms, r.latency_batch_ms,
                     tflite_latency_ms=2 * r.latency_ms if r.width < 1.0 else None) for r in TABLE]
  # Within 5.5 ms, JAX runs (0.75, 24) (5 ms, 85 %); TFLite takes 10 ms for it, so its best is (0.75, 16) (5 ms).
  jax_best, tflite_best = query.query(timed, budget_ms=5.5), query.query(timed, budget_ms=5.5, latency='tflite')
  assert (jax_best.width, jax_best.resolution) == (0.75, 24)
  assert (tflite_best.width, tflite_best.resolution) == (0.75, 16)
  assert all(r.tflite_latency_ms is not None for r in query.pareto_frontier(timed, 'tflite_latency_ms'))
  with pytest.raises(UserError, match='sweep with --tflite_latency'):
    query.query(TABLE, budget_ms=5.0, latency='tflite')
  with pytest.raises(UserError, match='--latency must be one of'):
    query.query(timed, budget_ms=5.0, latency='onnx')
  query.write_table(timed, str(tmp_path), {})
  assert query.read_table(str(tmp_path))[0] == timed and query.read_csv(str(tmp_path / 'query_table.csv')) == timed


def test_a_table_written_before_the_tflite_column_still_reads(tmp_path):
  old = {'meta': {}, 'rows': [{k: v for k, v in query.as_dict(r).items() if k != 'tflite_latency_ms'}
                              for r in TABLE]}
  (tmp_path / 'query_table.json').write_text(json.dumps(old))
  rows, _ = query.read_table(str(tmp_path))
  assert rows == TABLE and all(r.tflite_latency_ms is None for r in rows)
