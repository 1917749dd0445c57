"""Where a MutualNet step spends its time: each sub-network program traced with the JAX profiler, the XLA:CPU
thunks attributed to layer types (stem, depthwise, pointwise, BN, classifier, resize, loss) and direction
(forward / backward), plus the optimizer update and the host time between programs, and per pointwise layer of the
teacher its backward matmuls against its forward one. Per program, the process's CPU time over wall x cores says
whether the cores sit idle between kernels (waiting threads spin, so busy is an upper bound).

XLA:CPU runs a `dot` it hands to Eigen asynchronously: its trace event ends when the work is queued, and the work
runs under the events that follow (in a backward pass, the input-gradient matmul of the same layer). One
instruction's time is then not its cost; a layer's backward sum is (two matmuls of the forward's size: ~2x).

  python benchmarks/step_profile.py                      # both settings (benchmarks/step_settings.py)
  python benchmarks/step_profile.py --settings=small --top=20

Run it under the allocator main.py uses (tcmalloc when installed: `MUTUALNET_MALLOC` as in main.py). Needs xprof
(`pip install xprof`) to read the traces; says so and stops without it.
"""
from __future__ import annotations

import collections
import glob
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from benchmarks import common, step_settings  # noqa: E402
from mutualnet_jax import allocator  # noqa: E402
from mutualnet_jax.cli import run_cli  # noqa: E402

flags.DEFINE_list('settings', ['paper', 'small'], f'Which of {sorted(step_settings.SETTINGS)}.')
flags.DEFINE_integer('repeats', 3, 'Traced calls of each program (times are per call).')
flags.DEFINE_integer('top', 12, 'The most expensive XLA instructions to list per setting.')
common.define_common_flags()
FLAGS = flags.FLAGS

_LAYER = re.compile(r'(stem|block\d+_dw|block\d+_pw|classifier)(?:/(conv|bn))?')
_LAYER_NAMES = {'stem': 'stem', 'dw': 'depthwise', 'pw': 'pointwise', 'classifier': 'classifier'}
_POINTWISE_MATMUL = re.compile(r'(block\d+)_pw/conv/')


def _instruction_names(compiled) -> dict[str, str]:
  """XLA instruction name -> the JAX op_name it came from (fusion names carry their root's metadata)."""
  out = {}
  for line in compiled.as_text().splitlines():
    m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = ', line)
    op_name = re.search(r'op_name="([^"]*)"', line)
    if m and op_name:
      out[m.group(1)] = op_name.group(1)
  return out


def classify(op_name: str) -> tuple[str, str]:
  """(layer type, 'fwd' | 'bwd') of one instruction from its JAX op_name (transposes are the backward pass)."""
  direction = 'bwd' if 'transpose(' in op_name else 'fwd'
  m = _LAYER.search(op_name)
  if m:
    base = m.group(1)
    kind = _LAYER_NAMES.get(base.rsplit('_', 1)[-1], _LAYER_NAMES.get(base, base))
    return kind + ('/bn' if m.group(2) == 'bn' else ''), direction
  for word, kind in (('resize', 'resize'), ('softmax', 'loss'), ('kl', 'loss'), ('one_hot', 'loss')):
    if word in op_name:
      return kind, direction
  return 'other', direction


def pointwise_matmuls(per_call: collections.Counter, names: dict[str, str]) -> list[dict]:
  """Per pointwise layer: forward and backward matmul ms (every instruction of its conv, by direction) and their
  ratio, which is ~2 where the backward matmuls (input and weight gradient) run at the forward's rate."""
  layers = collections.defaultdict(lambda: {'fwd': 0.0, 'bwd': 0.0})
  for instruction, ms in per_call.items():
    m = _POINTWISE_MATMUL.search(names.get(instruction, ''))
    if m:
      layers[m.group(1)][classify(names[instruction])[1]] += ms
  return [{'layer': layer, 'fwd_ms': t['fwd'], 'bwd_ms': t['bwd'], 'bwd_over_fwd': t['bwd'] / max(t['fwd'], 1e-9)}
          for layer, t in sorted(layers.items(), key=lambda kv: int(kv[0][5:]))]


def _trace(fn, calls: list[tuple], logdir: str) -> collections.Counter:
  """Milliseconds per call of each XLA instruction of `fn(*args)` over `calls`, from a profiler trace read with
  xprof."""
  from xprof.convert import raw_to_tool_data  # noqa: PLC0415  optional: only this benchmark reads traces
  import jax  # noqa: PLC0415
  with jax.profiler.trace(logdir):
    for args in calls:
      jax.block_until_ready(fn(*args))
  data, _ = raw_to_tool_data.xspace_to_tool_data(glob.glob(f'{logdir}/**/*.xplane.pb', recursive=True), 'trace_viewer',
                                                 {})
  per_call = collections.Counter()
  for event in json.loads(data)['traceEvents']:
    if event.get('ph') == 'X' and 'dur' in event and not event['name'].startswith(
        ('end:', 'Thread', 'Thunk', '$', 'Pjit', 'Slinky')):
      per_call[event['name']] += event['dur'] / len(calls) / 1e3
  return per_call


def profile_setting(setting: str) -> dict:
  """The step's wall time, then each of its programs on its own (wall and traced), then the update."""
  import jax  # noqa: PLC0415
  trainer, plan, batch = step_settings.fixed_step(setting)
  holder = {'state': trainer.init_state(0)}

  def step():
    holder['state'], _ = trainer.step(holder['state'], batch, plan)  # the step donates the state
    return holder['state'].params
  step_ms = common.time_call(step, repeats=5, warmup=2)['median'] * 1e3
  params = holder['state'].params
  by_layer, top, programs, teacher_pointwise = collections.Counter(), [], [], []
  grads, teacher_logits = None, None
  for i, subnet in enumerate((plan.teacher, *plan.students)):
    compiled = trainer.steps.programs(trainer.sampler.bucket(subnet), i == 0)
    target = batch['label'] if subnet.loss == 'ce' else teacher_logits

    def calls(n, summed=grads, target=target):  # fresh gradient buffers per call: the program donates them
      return [(params, batch['image'], target, None, None,
               None if summed is None else jax.tree.map(jax.numpy.copy, summed)) for _ in range(n)]
    _, out_grads, logits = jax.block_until_ready(compiled(*calls(1)[0]))
    teacher_logits = logits if i == 0 else teacher_logits
    timed = calls(FLAGS.repeats)
    jax.block_until_ready(timed)
    t0, cpu0 = time.perf_counter(), os.times()
    for args in timed:
      jax.block_until_ready(compiled(*args))
    wall, cpu1 = time.perf_counter() - t0, os.times()
    wall_ms = wall / FLAGS.repeats * 1e3
    busy = (cpu1.user - cpu0.user + cpu1.system - cpu0.system) / (wall * (os.cpu_count() or 1))
    traced = calls(FLAGS.repeats)
    jax.block_until_ready(traced)
    per_call = _trace(compiled, traced, tempfile.mkdtemp(prefix='step_profile_'))
    names = _instruction_names(compiled)
    if i == 0:
      teacher_pointwise = pointwise_matmuls(per_call, names)
    for instruction, ms in per_call.items():
      by_layer[classify(names.get(instruction, ''))] += ms
      top.append((ms, f'{subnet.width:g}@{subnet.resolution}', instruction, names.get(instruction, '')[-80:]))
    programs.append({'program': f'{subnet.width:g}@{subnet.resolution} {subnet.loss}', 'wall_ms': wall_ms,
                     'thunk_ms': sum(per_call.values()), 'cpu_busy': busy})
    grads = out_grads

  def update():
    holder['state'], _ = trainer._update(holder['state'], grads)  # noqa: SLF001  the step's own jitted update
    return holder['state'].params
  update_ms = common.time_call(update, repeats=3)['median'] * 1e3
  thunk_total = sum(by_layer.values())
  return {'setting': setting, 'step_ms': step_ms,
          'img_per_s': step_settings.SETTINGS[setting]['batch'] / step_ms * 1e3, 'programs': programs,
          'update_ms': update_ms, 'host_gap_ms': step_ms - sum(p['wall_ms'] for p in programs) - update_ms,
          'by_layer': [{'layer': layer, 'direction': d, 'ms': ms, 'share': ms / thunk_total}
                       for (layer, d), ms in by_layer.most_common()],
          'teacher_pointwise': teacher_pointwise,
          'top': [{'ms': ms, 'program': prog, 'instruction': inst, 'op_name': name}
                  for ms, prog, inst, name in sorted(top, reverse=True)[:FLAGS.top]]}


def main(argv):
  del argv
  try:
    import xprof  # noqa: F401, PLC0415
  except ImportError:
    print('step_profile needs xprof to read the traces: pip install xprof')
    return
  allocator.use()
  results = []
  for setting in FLAGS.settings:
    r = profile_setting(setting)
    results.append(r)
    print(f"\n{setting}: step {r['step_ms']:.1f} ms ({r['img_per_s']:.1f} img/s); optimizer update "
          f"{r['update_ms']:.1f} ms; step minus its programs run one by one {r['host_gap_ms']:.1f} ms (host time "
          'between programs; negative when asynchronous dispatch overlaps them)')
    print(common.format_table(r['programs'], [('program', 'program', 's'), ('wall_ms', 'wall ms', '.1f'),
                                              ('thunk_ms', 'XLA thunks ms', '.1f'),
                                              ('cpu_busy', 'CPU time / (wall x cores)', '.0%')]))
    print(common.format_table(r['by_layer'], [('layer', 'layer type', 's'), ('direction', 'pass', 's'),
                                              ('ms', 'ms per step', '.1f'), ('share', 'share', '.0%')]))
    print(common.format_table(r['teacher_pointwise'], [
        ('layer', 'teacher layer', 's'), ('fwd_ms', 'pointwise fwd ms', '.2f'), ('bwd_ms', 'bwd ms', '.2f'),
        ('bwd_over_fwd', 'bwd / fwd', '.2f')]))
    print(common.format_table(r['top'], [('ms', 'ms', '.2f'), ('program', 'program', 's'),
                                         ('instruction', 'instruction', 's'), ('op_name', 'from', 's')]))
  print('wrote', common.write_result('step_profile', {'settings': results}, FLAGS.out))


if __name__ == '__main__':
  run_cli(app, main)
