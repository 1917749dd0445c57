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
scale/bias. BN running statistics (and US-Net's per-width `bn.<i>` buffers) are not used: this project calibrates BN
per (width, resolution) after training, as both papers do; the per-width buffers only tell which widths the network
was trained down to, which is checked against `config.width_range`.

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
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

from mutualnet_jax import checkpointing, parallel, slim, workdir as workdir_lib
from mutualnet_jax.cli import loaded_config, run_cli
from mutualnet_jax.errors import UserError
from mutualnet_jax.models import get_model, init_params
from mutualnet_jax.models.mobilenet_v1 import MobileNetV1
from mutualnet_jax.models.mobilenet_v2 import STAGES, MobileNetV2
from mutualnet_jax.train_state import TrainState, create_optimizer

OFFICIAL = {'mobilenet_v1': MobileNetV1, 'mobilenet_v2': MobileNetV2}  # the backbones with official checkpoints
_BUFFERS = ('running_mean', 'running_var', 'num_batches_tracked')
_WIDTH_BUFFER = re.compile(r'^(?P<layer>.+)\.bn\.\d+\.running_mean$')  # USBatchNorm2d's per-width statistics


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
  fits = [float(w) for w in np.round(np.arange(0.05, 4.0, 0.005), 3)
          if all(mapping.slim_bns[k].channels(w) == c for k, c in smallest.items())]
  if not fits:
    raise UserError(f'{path}: its BN layers track channel counts that no width gives: convert only the official '
                    'MobileNet v1/v2 models.')
  guess = next((w for w in fits if abs(20 * w - round(20 * w)) < slim.WIDTH_TOL), fits[0])  # grids step by 0.05
  raise UserError(f'{path} was trained down to width {guess:g} (the smallest width its BN layers track; '
                  f'{fits[0]:g}-{fits[-1]:g} have the same channels), not config.width_range[0]={min_width:g}: set '
                  f'--config.width_range=({guess:g},{max_width:g}).')


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
  params, channels = convert_state_dict(read_state_dict(checkpoint), config, checkpoint)
  workdir_lib.check_writable(workdir)
  tx = create_optimizer(config, optax.constant_schedule(0.0))
  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  meta = {'step': 0, 'converted_from': os.path.abspath(checkpoint), 'sha256': _file_digest(checkpoint)}
  with workdir_lib.lock(workdir, 'mutualnet_jax.convert'), checkpointing.Checkpoints(
      workdir, keep=config.keep_checkpoints, expected=checkpointing.fingerprint(config, channels)) as ckpt:
    ckpt.save(0, parallel.replicate(state, parallel.make_mesh()), meta)
    workdir_lib.save_config(config, workdir)
  return {**meta, 'workdir': os.fspath(workdir), 'model': config.model.name, 'channels': channels,
          'parameters': int(sum(np.size(x) for x in jax.tree.leaves(params)))}


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
  print(f"Converted {summary['parameters']:,} parameters of {summary['model']} into {summary['workdir']}; next: "
        f"python main.py --mode=sweep --workdir={summary['workdir']}")


if __name__ == '__main__':
  _define_flags()
  run_cli(app, _main)
