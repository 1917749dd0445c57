"""One declaration per config field: its check, what a resumed run may do with it, whether a checkpoint's fingerprint
records it, and what an older config.json without it meant.

Validation (config_check), the resume policy (workdir.config_changes) and fingerprints (checkpointing.fingerprint) all
read `FIELDS`, so a field is added or changed in one place. Relations between fields are config_check's; what only
the sampler (method names, capacities) or the model registry (model names, a backbone's own settings such as vgg16's
model.head) knows stays there. Free of JAX: workdir reads it, and --mode=query must start fast.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

Predicate = Callable[[Any], bool]

DTYPES = ('float32', 'bfloat16', 'float16')
CONV_IMPLS = ('xla', 'cpu_fast', 'auto')  # slim.CONV_IMPLS (JAX) is kept equal by tests/test_config_check.py
WIDTH_SAMPLING = ('uniform', 'grid')
AUGMENTATIONS = ('imagenet', 'random_resized_crop', 'small', 'none')
BN_CALIBRATIONS = ('exact', 'official')


class Resume(enum.Enum):
  """What resuming a run under a changed value means."""
  FIXED = 'fixed'          # another run (data order, schedule, sub-networks, function): needs --resume_with_changes
  FREE = 'free'            # the same run: where the data is, how often to log/save/evaluate, post-training settings
  OPTIMISER = 'optimiser'  # fixed, except after a divergence: changing it is the fix, so no flag is needed


@dataclasses.dataclass(frozen=True)
class Fingerprint:
  """A field's entry in a checkpoint's fingerprint (keyed by its last name part): `canonical` gives the JSON form the
  metadata stores; `applies` says for which configs it describes the weights."""
  canonical: Callable[[Any], Any] = lambda value: value
  applies: Callable[[Any], bool] = lambda config: True


NO_LEGACY = object()  # no legacy value: a field missing from an older config.json counts as unchanged


@dataclasses.dataclass(frozen=True)
class Field:
  """`ok(value)`, else the one-line error says the value `must` be ... (e.g. --config.<field>=`example`); `ok` is
  None where the owner of the choices checks it (the sampler: methods; the model registry: model names)."""
  ok: Predicate | None
  must: str = ''
  example: str = ''
  resume: Resume = Resume.FIXED
  fingerprint: Fingerprint | None = None
  legacy: Any = NO_LEGACY  # what a config.json written before the field existed meant


def _int(lo: int | None = None) -> Predicate:
  return lambda v: isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo)


def _num(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Predicate:
  def ok(v: Any) -> bool:
    if not isinstance(v, numbers.Real) or isinstance(v, bool) or math.isnan(v):
      return False
    return (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi))
  return ok


def _tuple_of(item: Predicate, length: int | None = None, nonempty: bool = False) -> Predicate:
  return lambda v: (isinstance(v, tuple) and all(item(x) for x in v) and (length is None or len(v) == length)
                    and (not nonempty or len(v) > 0))


def _pair(item: Predicate) -> Predicate:
  """(min, max) with min <= max."""
  return lambda v: _tuple_of(item, 2)(v) and v[0] <= v[1]


def _choice(*choices: str) -> tuple[Predicate, str]:
  """The check and its words ("'a', 'b' or 'c'"), so the choices are written once."""
  quoted = [repr(c) for c in choices]
  return (lambda v: v in choices), ' or '.join(filter(None, (', '.join(quoted[:-1]), quoted[-1])))


def _sandwich(config: Any) -> bool:
  return config.method != 'independent'


def _independent(config: Any) -> bool:
  return config.method == 'independent'


_STR = lambda v: isinstance(v, str)
_NAME = lambda v: isinstance(v, str) and bool(v)
_BOOL = lambda v: isinstance(v, bool)
_STEPS = lambda v: _int()(v) and (v == -1 or v >= 1)  # -1 = off / derived, else a positive count
_POSITIVE = _num(0, lo_open=True)
_FREE, _OPTIMISER = Resume.FREE, Resume.OPTIMISER

FIELDS: dict[str, Field] = {
    # Model (mutualnet_jax.models): name, max_width, classes and strides fix the parameter tree.
    'model.name': Field(None, fingerprint=Fingerprint()),
    'model.max_width': Field(_POSITIVE, 'a width > 0', '1.0', fingerprint=Fingerprint()),
    'model.num_classes': Field(_int(1), 'an integer >= 1', '10', fingerprint=Fingerprint()),
    'model.num_downsample': Field(_int(0), 'an integer >= 0', '5', fingerprint=Fingerprint()),
    'model.conv_impl': Field(*_choice(*CONV_IMPLS), 'auto', resume=_FREE),
    'model.fused_bn': Field(_BOOL, 'True or False', 'True', resume=_FREE, legacy=False),
    'model.dtype': Field(*_choice(*DTYPES), 'float32'),
    # Method (mutualnet_jax.sampling): what the weights were trained for.
    'method': Field(None, fingerprint=Fingerprint()),
    'width_range': Field(_pair(_POSITIVE), '(min, max) widths > 0 with min <= max', '(0.25,1.0)',
                         fingerprint=Fingerprint(lambda v: [float(w) for w in v], _sandwich)),
    'width_sampling': Field(*_choice(*WIDTH_SAMPLING), 'uniform', legacy='grid'),
    'width_step': Field(_POSITIVE, 'a width step > 0', '0.25'),
    'capacities': Field(_tuple_of(_POSITIVE), 'a tuple of widths > 0 (or empty)', '(0.5,0.75,1.0)', legacy=()),
    'sweep_width_step': Field(_POSITIVE, 'a width step > 0', '0.05', resume=_FREE),
    'num_subnets': Field(_int(1), 'an integer >= 1 (>= 2 for the sandwich rule)', '4'),
    'resolutions': Field(_tuple_of(_int(1), nonempty=True), 'a non-empty tuple of resolutions', '(224,192,160,128)',
                         fingerprint=Fingerprint(lambda v: sorted({int(r) for r in v}, reverse=True), _sandwich)),
    'independent_width': Field(_POSITIVE, 'a width > 0', '1.0', fingerprint=Fingerprint(float, _independent)),
    'independent_resolution': Field(_int(1), 'a resolution >= 1', '224', fingerprint=Fingerprint(int, _independent)),
    'inplace_distillation': Field(_BOOL, 'True or False', 'True'),
    'kd_temperature': Field(_POSITIVE, 'a temperature > 0', '1.0'),
    'label_smoothing': Field(_num(0, 1, hi_open=True), 'in [0, 1)', '0.1', resume=_OPTIMISER),
    'resize_antialias': Field(_BOOL, 'True or False', 'False'),
    'resize_align_corners': Field(_BOOL, 'True or False', 'False', legacy=False),
    # Data (mutualnet_jax.input_pipeline).
    'dataset': Field(_NAME, 'a TFDS dataset name', 'fashion_mnist_local'),
    'data_dir': Field(_STR, 'a directory (or empty)', "''", resume=_FREE),
    'manual_dir': Field(_STR, 'a directory (or empty)', "''", resume=_FREE),
    'train_split': Field(_NAME, 'a TFDS split', 'train'),
    'eval_split': Field(_NAME, 'a TFDS split', 'test', resume=_FREE),
    'augmentation': Field(*_choice(*AUGMENTATIONS), 'small'),
    'crop_scale': Field(_pair(_num(0, 1, lo_open=True)), '(min, max) area fractions in (0, 1] with min <= max',
                        '(0.25,1.0)'),
    'pad_crop': Field(_int(0), 'an integer >= 0', '4'),
    'color_jitter': Field(_num(0, 1, hi_open=True), 'in [0, 1)', '0.4', legacy=0.0),
    'lighting': Field(_num(0), 'a std >= 0', '0.1', legacy=0.0),
    'mean': Field(_tuple_of(_num()), 'a tuple of per-channel means (or empty)', '(0.5,0.5,0.5)', legacy=()),
    'std': Field(_tuple_of(_POSITIVE), 'a tuple of per-channel stds > 0 (or empty)', '(0.25,0.25,0.25)', legacy=()),
    'shuffle_buffer': Field(_int(1), 'an integer >= 1', '16384'),
    'image_size': Field(lambda v: _int()(v) and (v == -1 or v >= 1), '-1 (the highest resolution) or a size', '-1'),
    # Optimisation (mutualnet_jax.train).
    'batch_size': Field(_int(1), 'an integer >= 1 (the global batch)', '128'),
    'num_epochs': Field(_num(0), 'a number of epochs >= 0', '2'),
    'num_train_steps': Field(_STEPS, '-1 (use num_epochs) or a step count >= 1', '1000'),
    'steps_per_run': Field(_STEPS, '-1 (run to the end) or a step count >= 1', '500', resume=_FREE),
    'learning_rate': Field(_POSITIVE, 'a learning rate > 0', '0.1', resume=_OPTIMISER),
    'warmup_epochs': Field(_num(0), 'a number of epochs >= 0', '0.1', resume=_OPTIMISER),
    'momentum': Field(_num(0, 1, hi_open=True), 'in [0, 1)', '0.9', resume=_OPTIMISER),
    'nesterov': Field(_BOOL, 'True or False', 'True', resume=_OPTIMISER),
    'weight_decay': Field(_num(0), 'a weight decay >= 0', '1e-4', resume=_OPTIMISER),
    'weight_decay_params': Field(*_choice('kernels', 'all'), 'kernels', resume=_OPTIMISER, legacy='kernels'),
    'bn_sync': Field(_BOOL, 'True or False', 'False'),
    # Fine-tuning (mutualnet_jax.init_from): a resumed run never reads init_from, its own checkpoint wins.
    'init_from': Field(_STR, 'a training workdir, an export or a .npz parameter file (or empty)', "''", resume=_FREE,
                       legacy=''),
    'init_classifier': Field(*_choice('auto', 'fresh', 'load'), 'auto', resume=_FREE),
    # BN calibration and evaluation (mutualnet_jax.bn_calibration, mutualnet_jax.sweep).
    'calibration_images': Field(_int(1), 'an integer >= 1', '2000', resume=_FREE),
    'bn_calibration': Field(*_choice(*BN_CALIBRATIONS), 'exact', resume=_FREE, legacy='exact'),
    'calibration_batch_size': Field(_int(1), 'an integer >= 1', '200', resume=_FREE),
    'eval_batch_size': Field(_int(1), 'an integer >= 1', '500', resume=_FREE),
    'eval_every_steps': Field(lambda v: _int()(v) and v >= -1, '-1 (each epoch), 0 (never) or a step count', '-1',
                              resume=_FREE),
    'eval_calibration_images': Field(_int(1), 'an integer >= 1', '1000', resume=_FREE),
    # Bookkeeping.
    'seed': Field(_int(0), 'an integer >= 0', '0'),
    'log_every_steps': Field(_int(1), 'an integer >= 1', '50', resume=_FREE),
    'checkpoint_every_steps': Field(_int(1), 'an integer >= 1', '500', resume=_FREE),
    'keep_checkpoints': Field(_int(1), 'an integer >= 1 (the latest finite checkpoint is always kept)', '3',
                              resume=_FREE),
    'compilation_cache_dir': Field(_STR, 'a directory (or empty: no persistent cache)', "''", resume=_FREE),
    'precompile': Field(_BOOL, 'True or False', 'False', resume=_FREE),
    'profile_steps': Field(_int(0), 'an integer >= 0 (0: no profile)', '5', resume=_FREE, legacy=0),
}


def value(config: Mapping[str, Any], name: str) -> Any:
  """The value of dotted field `name` ('model.dtype'); KeyError or AttributeError when the config lacks it."""
  found: Any = config
  for part in name.split('.'):
    found = found[part]
  return found


def resume_policy(name: str) -> Resume:
  """FIXED for an undeclared field: a backbone's own setting (vgg16's model.head) shapes the network."""
  field = FIELDS.get(name)
  return field.resume if field else Resume.FIXED


def resume_fields(policy: Resume) -> frozenset[str]:
  return frozenset(name for name, field in FIELDS.items() if field.resume is policy)


def read(config: Mapping[str, Any], name: str) -> Any:
  """`config[name]`, or its legacy value when the config (an older config.json) predates the field."""
  return config[name] if name in config else FIELDS[name].legacy


def legacy_value(name: str, otherwise: Any) -> Any:
  """What `name` meant in a config.json written before it existed; `otherwise` when it has no such meaning."""
  field = FIELDS.get(name)
  return otherwise if field is None or field.legacy is NO_LEGACY else field.legacy
