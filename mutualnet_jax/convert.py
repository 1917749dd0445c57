"""Official PyTorch checkpoints of MutualNet (taoyang1122/MutualNet) and US-Net (JiahuiYu/slimmable_networks)
MobileNet v1/v2 as a workdir of this project, ready for `--mode=calibrate/sweep/export/query` and the Python API.

  python -m mutualnet_jax.convert --checkpoint=us_mobilenet_v1_calibrated.pt \\
      --config=configs/mobilenet_v1_imagenet.py:usnet --workdir=runs/usnet_v1_official
  python main.py --mode=sweep --workdir=runs/usnet_v1_official   # BN statistics per configuration, then the table

Both codebases build their slimmable MobileNets from the same layers (`USConv2d`, `USBatchNorm2d`, `USLinear`, whose
channel rule make_divisible(c * w / ratio) * ratio is this project's), so one key map per backbone covers both; it is
generated from this project's model definitions (`models/mobilenet_v1.py` BLOCKS, `mobilenet_v2.py` STAGES):

  features.0.{0,1}                       stem conv, BN
  v1 features.{i+1}.body.{0,1 | 3,4}     block i depthwise conv, BN | pointwise conv, BN
  v2 features.{i+1}.body.{0,1 | 3,4 | 6,7}  block i [expand conv, BN] | depthwise conv, BN | project conv, BN
  v2 features.18.{0,1}                   the last 1x1 conv (1280 channels, not slimmed), BN
  classifier.0                           the linear classifier

Layouts: conv OIHW -> HWIO, depthwise (C, 1, K, K) -> (K, K, C), linear (out, in) -> (in, out), BN weight/bias ->
scale/bias.

BN statistics: a slimmable BN layer (`USBatchNorm2d`) tracks none of its own; its `bn.<i>` children hold running
statistics for the i-th width of the training script's `width_mult_list` ([0.25, 1.0] for MutualNet, 0.025 steps for
US-Net's calibrated models), which the official evaluation uses at exactly those widths. The width of each `bn.<i>`
is read off its channel counts (every width that gives the same counts in every layer is the same sub-network);
non-slimmed BN layers (MobileNet v2's last) keep one set, used at every width as the official code does. Those
statistics go into the workdir's BN-statistics store (`bn_calibration.StatsStore`) for each such width in the trained
range at the recipe's highest resolution (the one the official code evaluates at), so `run.network(w, r)` and the
sweep take them without a dataset; other configurations are calibrated (`--mode=calibrate`, any `--images`). The
smallest `bn.<i>` also tells which width the network was trained down to, which is checked against
`config.width_range`.

The checkpoint is untrusted input: it is read with `torch.load(weights_only=True)`, which unpickles tensors and
plain containers only and never runs code from the file; anything else is a one-line error.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import re
import zipfile
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

from mutualnet_jax import (bn_calibration, checkpointing, parallel, programs, slim, trained_run,
                           workdir as workdir_lib)
from mutualnet_jax.cli import loaded_config, run_cli
from mutualnet_jax.errors import UserError
from mutualnet_jax.models import get_model, init_params
from mutualnet_jax.models.mobilenet_v1 import MobileNetV1
from mutualnet_jax.models.mobilenet_v2 import STAGES, MobileNetV2
from mutualnet_jax.train_state import TrainState, create_optimizer

OFFICIAL = {'mobilenet_v1': MobileNetV1, 'mobilenet_v2': MobileNetV2}  # the backbones with official checkpoints
_BUFFERS = ('running_mean', 'running_var', 'num_batches_tracked')
_WIDTH_BUFFER = re.compile(r'^(?P<layer>.+)\.bn\.(?P<index>\d+)\.running_mean$')  # USBatchNorm2d's per-width stats


@dataclasses.dataclass(frozen=True)
class Entry:
  """Where one official tensor goes: the parameter path in this project's tree and how its layout changes."""
  path: tuple[str, ...]
  layout: str  # 'conv' (OIHW), 'depthwise' (C, 1, K, K), 'dense' (out, in) or 'vector'


@dataclasses.dataclass(frozen=True)
class SlimBN:
  """A slimmable BN layer of the official model: at width w it uses make_divisible(base * w) * ratio channels."""
  base: int
  ratio: int = 1

  def channels(self, width: float) -> int:
    return slim.make_divisible(self.base * width) * self.ratio


@dataclasses.dataclass(frozen=True)
class KeyMap:
  """Official state_dict key -> Entry, plus the slimmable BN layers by official prefix (for the width check)."""
  entries: dict[str, Entry]
  slim_bns: dict[str, SlimBN]


def _unit(prefix: str, conv: int, bn: int, name: str, layout: str, bn_rule: SlimBN | None) -> KeyMap:
  """One conv + BN unit: `prefix`.`conv`.weight and `prefix`.`bn`.{weight,bias} -> `name`/{conv,bn}."""
  entries = {f'{prefix}.{conv}.weight': Entry((name, 'conv', 'kernel'), layout),
             f'{prefix}.{bn}.weight': Entry((name, 'bn', 'scale'), 'vector'),
             f'{prefix}.{bn}.bias': Entry((name, 'bn', 'bias'), 'vector')}
  return KeyMap(entries, {} if bn_rule is None else {f'{prefix}.{bn}': bn_rule})


def _merge(*maps: KeyMap) -> KeyMap:
  return KeyMap({k: v for m in maps for k, v in m.entries.items()}, {k: v for m in maps for k, v in m.slim_bns.items()})


_CLASSIFIER = KeyMap({'classifier.0.weight': Entry(('classifier', 'kernel'), 'dense'),
                      'classifier.0.bias': Entry(('classifier', 'bias'), 'vector')}, {})


def _mobilenet_v1() -> KeyMap:
  stem, blocks = MobileNetV1.stem, MobileNetV1.blocks
  maps, cin = [_unit('features.0', 0, 1, 'stem', 'conv', SlimBN(stem))], stem
  for i, (c, _) in enumerate(blocks):
    body = f'features.{i + 1}.body'
    maps += [_unit(body, 0, 1, f'block{i}_dw', 'depthwise', SlimBN(cin)),
             _unit(body, 3, 4, f'block{i}_pw', 'conv', SlimBN(c))]
    cin = c
  return _merge(*maps, _CLASSIFIER)


def _mobilenet_v2() -> KeyMap:
  maps, cin = [_unit('features.0', 0, 1, 'stem', 'conv', SlimBN(32))], 32
  blocks = [(t, c) for t, c, n, _ in STAGES for _ in range(n)]
  for i, (t, c) in enumerate(blocks):
    body, at = f'features.{i + 1}.body', 0
    if t != 1:
      maps.append(_unit(body, 0, 1, f'block{i}_expand', 'conv', SlimBN(cin, t)))
      at = 3
    maps += [_unit(body, at, at + 1, f'block{i}_dw', 'depthwise', SlimBN(cin, t)),
             _unit(body, at + 3, at + 4, f'block{i}_project', 'conv', SlimBN(c))]
    cin = c
  return _merge(*maps, _unit(f'features.{len(blocks) + 1}', 0, 1, 'last', 'conv', None), _CLASSIFIER)


KEY_MAPS = {'mobilenet_v1': _mobilenet_v1, 'mobilenet_v2': _mobilenet_v2}


def key_map(name: str) -> KeyMap:
  if name not in KEY_MAPS:
    raise UserError(f'official checkpoints exist for {sorted(KEY_MAPS)} only, not {name!r}: set '
                    '--config.model.name (or use configs/mobilenet_v1_imagenet.py / mobilenet_v2_imagenet.py).')
  return KEY_MAPS[name]()


# ----------------------------------------------------------------------------------------------------------------------
# Reading a checkpoint file safely.

def _torch_load(data: Any, path: str) -> Any:
  try:
    import torch  # noqa: PLC0415  lazy: a heavy optional dependency, only needed to read PyTorch files
  except ImportError:
    raise UserError('reading a PyTorch checkpoint needs torch: pip install torch (the CPU build is enough).') from None
  try:
    return torch.load(data, map_location='cpu', weights_only=True)  # tensors and containers only: runs no code
  except pickle.UnpicklingError as e:
    if 'Unsupported global' in str(e):
      raise UserError(f'{path} holds pickled Python objects besides tensors, which are not loaded (that would run '
                      "code from the file): re-save just {'model': model.state_dict()} where you trust it.") from None
    raise UserError(f'{path} is not a PyTorch checkpoint: pass the .pt file of an official model.') from None
  except (RuntimeError, EOFError, ValueError, OSError, AttributeError, KeyError) as e:
    raise UserError(f'{path} is not a PyTorch checkpoint ({type(e).__name__}): pass the .pt file of an official '
                    'model.') from None


def _inner_pt(path: str) -> bytes | None:
  """The one .pt/.pth file inside a plain zip archive (the official model zoos ship `model.pt.zip`); None for
  anything else, including PyTorch's own zip format (which holds a data.pkl)."""
  if not zipfile.is_zipfile(path):
    return None
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    inner = [n for n in names if n.endswith(('.pt', '.pth', '.pth.tar')) and not n.startswith('__MACOSX')]
    if any(n.endswith('data.pkl') for n in names) or len(inner) != 1:
      return None
    return archive.read(inner[0])


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The model's tensors by official key (a DataParallel 'module.' prefix removed), as float32 NumPy arrays."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise UserError(f'checkpoint {path} not found: pass the downloaded .pt file with --checkpoint.')
  inner = _inner_pt(path)
  loaded = _torch_load(path if inner is None else io.BytesIO(inner), path)
  if isinstance(loaded, Mapping):
    for key in ('model', 'state_dict'):  # both training scripts save {'model': state_dict, ...}
      if isinstance(loaded.get(key), Mapping):
        loaded = loaded[key]
        break
  if not isinstance(loaded, Mapping) or not loaded or not all(hasattr(v, 'numpy') for v in loaded.values()):
    raise UserError(f'{path} holds no state dict (a mapping of names to tensors): pass the .pt file of an official '
                    'model.')
  return {k.removeprefix('module.'): v.detach().cpu().float().numpy() for k, v in loaded.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Official tensors -> this project's parameter tree.

def _to_layout(array: np.ndarray, layout: str) -> np.ndarray:
  if layout == 'conv' and array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  if layout == 'depthwise' and array.ndim == 4 and array.shape[1] == 1:
    return array[:, 0].transpose(1, 2, 0)
  if layout == 'dense' and array.ndim == 2:
    return array.T
  return array  # vectors, and wrong ranks (reported as a shape mismatch)


def _check_keys(state: Mapping[str, np.ndarray], name: str, path: str) -> KeyMap:
  """The key map of `name`; a UserError naming the right backbone, or what is missing/extra, when keys differ."""
  keys = {k for k in state if not k.endswith(_BUFFERS)}
  mapping = key_map(name)
  missing, extra = sorted(mapping.entries.keys() - keys), sorted(keys - mapping.entries.keys())
  if not missing and not extra:
    return mapping
  other = [n for n in KEY_MAPS if n != name and KEY_MAPS[n]().entries.keys() == keys]
  if other:
    raise UserError(f'{path} is a {other[0]} checkpoint, but the config builds {name}: pass '
                    f'--config=configs/{other[0]}_imagenet.py (or set --config.model.name={other[0]}).')
  detail = '; '.join(f'{what} {", ".join(ks[:3])}{" ..." if len(ks) > 3 else ""}' for what, ks in
                     (('missing', missing), ('unexpected', extra)) if ks)
  raise UserError(f'{path} is not a MutualNet/US-Net {name} checkpoint ({detail}): convert only the official '
                  'MobileNet v1/v2 models.')


def _check_width_range(state: Mapping[str, np.ndarray], mapping: KeyMap, min_width: float, max_width: float,
                       path: str) -> None:
  """The official BN layers keep running statistics per evaluated width (`bn.<i>`), the smallest of which is the
  smallest trained width: it must have this config's min width's channel counts (US-Net's MobileNet v2 starts at
  0.35, the MutualNet and US-Net v1 models at 0.25). Checkpoints without those buffers are not checked."""
  smallest = {}
  for key, value in state.items():
    match = _WIDTH_BUFFER.match(key)
    if match and match['layer'] in mapping.slim_bns:
      smallest[match['layer']] = min(smallest.get(match['layer'], value.size), value.size)
  if not smallest or all(mapping.slim_bns[k].channels(min_width) == c for k, c in smallest.items()):
    return
  fits = _widths_giving(mapping, smallest)
  if not fits:
    raise UserError(f'{path}: its BN layers track channel counts that no width gives: convert only the official '
                    'MobileNet v1/v2 models.')
  guess = _roundest(fits)
  raise UserError(f'{path} was trained down to width {guess:g} (the smallest width its BN layers track; '
                  f'{fits[0]:g}-{fits[-1]:g} have the same channels), not config.width_range[0]={min_width:g}: set '
                  f'--config.width_range=({guess:g},{max_width:g}).')


def _widths_giving(mapping: KeyMap, channels: Mapping[str, int]) -> list[float]:
  """The widths (0.005 steps) at which each slimmable BN layer named in `channels` has that many channels."""
  return [float(w) for w in np.round(np.arange(0.05, 4.0, 0.005), 3)
          if all(mapping.slim_bns[k].channels(w) == c for k, c in channels.items())]


def _roundest(widths: Sequence[float]) -> float:
  """The width a training script most likely named among `widths` (the same sub-network): the first multiple of
  0.05 (the evaluation grids), else of 0.025 (US-Net's list), else of 0.01, else the smallest."""
  for step in (0.05, 0.025, 0.01):
    for w in widths:
      if abs(w / step - round(w / step)) < slim.WIDTH_TOL:
        return w
  return widths[0]


def _bn_layers(mapping: KeyMap) -> dict[str, str]:
  """Official BN prefix -> this project's layer name, for every BN layer."""
  return {key.removesuffix('.weight'): entry.path[0] for key, entry in mapping.entries.items()
          if entry.path[1:] == ('bn', 'scale')}


def official_statistics(state: Mapping[str, np.ndarray], config: ml_collections.ConfigDict,
                        channels: int) -> dict[float, Any]:
  """{width: BN statistics in the store's form} for every width of the trained range whose statistics the
  checkpoint holds (see the module docstring): per-width `bn.<i>` buffers, a layer's own running statistics where
  they have that width's channel count (a non-slimmed layer: at every width). Empty when it holds none."""
  mapping = key_map(config.model.name)
  layers = _bn_layers(mapping)
  indices = sorted({int(m['index']) for k in state if (m := _WIDTH_BUFFER.match(k))})
  named = []
  for i in indices:
    fits = _widths_giving(mapping, {p: state[f'{p}.bn.{i}.running_mean'].size for p in mapping.slim_bns
                                    if f'{p}.bn.{i}.running_mean' in state})
    if fits:
      named.append(_roundest(fits))
  lo, hi = trained_run.trained_width_range(config)
  grid = trained_run.sweep_widths(config)
  counts = lambda w: {p: rule.channels(w) for p, rule in mapping.slim_bns.items()}  # noqa: E731
  widths = sorted({w for n in named for w in (n, *grid) if counts(w) == counts(n) and lo - slim.WIDTH_TOL <= w
                   <= hi + slim.WIDTH_TOL} | ({hi} if all(f'{p}.running_mean' in state for p in layers) else set()))
  model = get_model(config.model)
  params = jax.eval_shape(lambda: init_params(model, jax.random.key(0), model.min_resolution, channels))
  shapes = programs.BNShapes(model, channels)
  found = {}
  for width in widths:
    stats = {}
    for prefix, name in layers.items():
      size = shapes(params, width)[name]['bn'][0]
      keys = [f'{prefix}.bn.{i}' for i in indices] + [prefix]
      key = next((k for k in keys if f'{k}.running_mean' in state and state[f'{k}.running_mean'].size == size), None)
      if key is None:
        break
      stats[name] = {'bn': {'mean': state[f'{key}.running_mean'], 'var': state[f'{key}.running_var']}}
    else:
      found[slim.canonical_width(width)] = stats
  return found


def convert_state_dict(state: Mapping[str, np.ndarray], config: ml_collections.ConfigDict,
                       path: str = 'the checkpoint') -> tuple[Any, int]:
  """This project's full-width parameter tree for `config.model` from an official state dict, and the number of
  image channels; a one-line UserError for another backbone, class count, width range or stride layout."""
  name = config.model.name
  mapping = _check_keys(state, name, path)
  if config.model.num_downsample != 5:
    raise UserError('official checkpoints use the ImageNet stride layout: set --config.model.num_downsample=5.')
  classes = state['classifier.0.weight'].shape[0]
  if classes != config.model.num_classes:
    raise UserError(f'{path} has {classes} classes but config.model.num_classes={config.model.num_classes}: set '
                    f'--config.model.num_classes={classes}.')
  min_width, max_width = (float(w) for w in config.width_range)
  _check_width_range(state, mapping, min_width, max_width, path)
  channels = state['features.0.0.weight'].shape[1]
  model = get_model(config.model)
  shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0), model.min_resolution, channels))
  expected = {tuple(p.key for p in kp): leaf.shape for kp, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}
  if set(expected) != {e.path for e in mapping.entries.values()}:
    raise ValueError(f'the {name} key map is out of date with models/{name}.py.')  # a bug, not a user mistake
  params: dict[str, Any] = {}
  for key, entry in mapping.entries.items():
    array = _to_layout(state[key], entry.layout)
    if array.shape != expected[entry.path]:
      raise UserError(f'{path}: {key} has shape {state[key].shape}, but {name} at model.max_width='
                      f'{config.model.max_width:g} holds {expected[entry.path]} there ({"/".join(entry.path)}): '
                      'the checkpoint has another max width (set --config.model.max_width and '
                      '--config.width_range to its range) or is not an official model.')
    node = params
    for part in entry.path[:-1]:
      node = node.setdefault(part, {})
    node[entry.path[-1]] = array
  return params, int(channels)


def _file_digest(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def convert(checkpoint: str | os.PathLike, config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Writes `workdir`: an orbax checkpoint at step 0 (the converted parameters, fresh optimizer state) with the
  model fingerprint, and config.json, so post-training modes and `mutualnet_jax.open` take it like a trained run.
  Refuses a workdir that already holds checkpoints (nothing there is touched)."""
  checkpoint = os.fspath(checkpoint)
  if config.method == 'independent':
    raise UserError('official checkpoints are slimmable networks: use the mutualnet or usnet config '
                    '(e.g. --config=configs/mobilenet_v1_imagenet.py:usnet).')
  if (workdir_lib.absolute(workdir) / workdir_lib.CHECKPOINT_DIR).exists():
    raise UserError(f'{workdir} already holds checkpoints: pass a fresh --workdir for the converted model.')
  state_dict = read_state_dict(checkpoint)
  params, channels = convert_state_dict(state_dict, config, checkpoint)
  statistics = official_statistics(state_dict, config, channels)
  workdir_lib.check_writable(workdir)
  tx = create_optimizer(config, optax.constant_schedule(0.0))
  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  meta = {'step': 0, 'converted_from': os.path.abspath(checkpoint), 'sha256': _file_digest(checkpoint)}
  resolution = trained_run.trained_resolutions(config)[0]
  provenance = {'params_digest': bn_calibration.tree_digest(params), 'checkpoint_step': 0,
                'images': f'the official checkpoint {os.path.basename(checkpoint)}', 'images_digest': meta['sha256'],
                'official': True}
  with workdir_lib.lock(workdir, 'mutualnet_jax.convert'), checkpointing.Checkpoints(
      workdir, keep=config.keep_checkpoints, expected=checkpointing.fingerprint(config, channels)) as ckpt:
    ckpt.save(0, parallel.replicate(state, parallel.make_mesh()), meta)
    workdir_lib.save_config(config, workdir)
    store = bn_calibration.StatsStore(workdir)
    for width, stats in statistics.items():
      store.save(width, resolution, stats, provenance)
  return {**meta, 'workdir': os.fspath(workdir), 'model': config.model.name, 'channels': channels,
          'parameters': int(sum(np.size(x) for x in jax.tree.leaves(params))),
          'bn_statistics': {'widths': sorted(statistics), 'resolution': resolution}}


# ----------------------------------------------------------------------------------------------------------------------
# Command line.

def _define_flags() -> None:
  """Flags of the command line only (defined when run as a program, so importing this module defines none)."""
  flags.DEFINE_string('checkpoint', None, 'The official .pt file (or the .pt.zip of the model zoo).')
  flags.DEFINE_string('workdir', None, 'A fresh directory for the converted run.')
  config_flags.DEFINE_config_file('config', None, 'The recipe the checkpoint was trained with: '
                                  'configs/mobilenet_v{1,2}_imagenet.py, :usnet for US-Net checkpoints.',
                                  lock_config=True)
  flags.mark_flags_as_required(['checkpoint', 'workdir', 'config'])


def _main(argv: Any) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  summary = convert(f.checkpoint, loaded_config(f.config), f.workdir)
  print(f"Converted {summary['parameters']:,} parameters of {summary['model']} into {summary['workdir']}.")
  print(describe_statistics(summary))
  print(f"Next: python main.py --mode=sweep --workdir={summary['workdir']} [--images=DIR_OR_NPY_OR_tfds:NAME]")


def describe_statistics(summary: Mapping[str, Any]) -> str:
  """Which configurations run without a dataset after `convert`, in a line."""
  widths, resolution = summary['bn_statistics']['widths'], summary['bn_statistics']['resolution']
  if not widths:
    return ('The checkpoint holds no BN statistics: calibrate before use (--mode=calibrate, or --images=... for '
            'images other than the recipe\'s dataset).')
  return (f"BN statistics of the official checkpoint kept for width {', '.join(f'{w:g}' for w in widths)} at "
          f"{resolution} px: run.network(width, {resolution}) needs no dataset for these; other configurations are "
          'calibrated on first use (the recipe\'s dataset, or --images=... / run.calibrate(images)).')


if __name__ == '__main__':
  _define_flags()
  run_cli(app, _main)
