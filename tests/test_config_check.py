"""Every config field is declared once (config_fields) and checked up front: a bad value is one UserError naming the
field and a valid example; every config file passes; the declarations drive resume policy and fingerprints."""
import ast
import dataclasses
import importlib
import inspect
import json
import pkgutil

import ml_collections
import pytest

import configs
from configs import default
from mutualnet_jax import checkpointing, config_check, config_fields, slim
from mutualnet_jax import workdir as workdir_lib
from mutualnet_jax.config_fields import Resume
from mutualnet_jax.errors import UserError
from mutualnet_jax.models import MODELS
from mutualnet_jax.models.base import SlimmableModel
from mutualnet_jax.sampling import METHODS
from tests.util import tiny_config

_MODULES = {m.name: importlib.import_module(f'configs.{m.name}') for m in pkgutil.iter_modules(configs.__path__)}
CONFIGS = {name: module.get_config for name, module in _MODULES.items() if hasattr(module, 'get_config')}


# Every config file with every method argument it takes (`:usnet`, `:independent`; none: the default).
RECIPES = [pytest.param(get_config, method, id=f'{name}:{method or ""}') for name, get_config in sorted(CONFIGS.items())
           for method in ((None,) + METHODS if inspect.signature(get_config).parameters else (None,))]


def test_every_file_in_configs_is_a_config_or_a_shared_helper():
  assert set(_MODULES) - set(CONFIGS) == {'imagenet_common'}  # imported by the ImageNet configs, checked through them


@pytest.mark.parametrize('get_config,method', RECIPES)
def test_every_recipe_passes(get_config, method):
  config_check.check(get_config(method))


def _flat(tree, prefix=''):
  for key, value in tree.items():
    yield from _flat(value, f'{prefix}{key}.') if isinstance(value, dict) else [f'{prefix}{key}']


@pytest.mark.parametrize('get_config,method', RECIPES)
def test_every_field_is_declared_or_is_its_backbones_own_setting(get_config, method):
  config = get_config(method)
  own = {f'model.{f.name}' for f in dataclasses.fields(MODELS[config.model.name])} - {
      f'model.{f.name}' for f in dataclasses.fields(SlimmableModel)}
  assert set(_flat(config.to_dict())) - set(config_fields.FIELDS) <= own


def test_every_declaration_is_a_field_of_the_default_config():
  assert set(config_fields.FIELDS) == set(_flat(default.get_config().to_dict()))


def test_the_declared_choices_are_the_ones_the_kernels_take():
  assert config_fields.CONV_IMPLS == slim.CONV_IMPLS  # slim keeps its own copy for its run-time check


# The bad inputs a new user tried (issue: "nothing lost, ever"), each with the field its message must name.
@pytest.mark.parametrize('overrides,field', [
    (dict(batch_size=0), 'batch_size'),
    (dict(checkpoint_every_steps=0), 'checkpoint_every_steps'),
    (dict(log_every_steps=0), 'log_every_steps'),
    (dict(keep_checkpoints=0), 'keep_checkpoints'),
    (dict(keep_checkpoints=-1), 'keep_checkpoints'),
    (dict(resolutions=()), 'resolutions'),
    (dict(resolutions=(16, 0)), 'resolutions'),
    (dict(width_range=(0.25,)), 'width_range'),
    (dict(width_range=(0.8, 0.5)), 'width_range'),
    (dict(width_sampling='normal'), 'width_sampling'),
    (dict(method='slimmable'), 'method'),
    (dict(seed=-1), 'seed'),
    (dict(shuffle_buffer=0), 'shuffle_buffer'),
    (dict(pad_crop=-3), 'pad_crop'),
    (dict(augmentation='autoaugment'), 'augmentation'),
    (dict(learning_rate=0.0), 'learning_rate'),
    (dict(momentum=1.5), 'momentum'),
    (dict(label_smoothing=1.0), 'label_smoothing'),
    (dict(weight_decay_params='biases'), 'weight_decay_params'),
    (dict(crop_scale=(0.5, 0.25)), 'crop_scale'),
    (dict(image_size=8), 'image_size'),
    (dict(steps_per_run=0), 'steps_per_run'),
    (dict(eval_every_steps=-2), 'eval_every_steps'),
    (dict(calibration_images=10), 'calibration_images'),
    (dict(num_epochs=0.0), 'num_epochs'),
    (dict(color_jitter=1.5), 'color_jitter'),
    (dict(mean=(0.5,), std=(0.5, 0.5)), 'std'),
    (dict(dataset=''), 'dataset'),
    (dict(width_step=-0.1), 'width_step'),
    (dict(capacities=(0.5,)), 'capacities'),
    (dict(capacities=(0.0, 1.0)), 'capacities'),
    (dict(**{'model.num_classes': 0}), 'num_classes'),
    (dict(**{'model.conv_impl': 'cudnn'}), 'conv_impl'),
    (dict(**{'model.dtype': 'float64'}), 'model.dtype'),
    (dict(**{'model.max_width': 0.0}), 'model.max_width'),
])
def test_bad_values_are_one_line_naming_the_field(overrides, field):
  with pytest.raises(UserError) as error:
    config_check.check(tiny_config(**overrides))
  message = str(error.value)
  assert field in message and '\n' not in message, message


def test_a_resolution_below_the_models_minimum_names_both():
  with pytest.raises(UserError, match='resolution 4 is below 8 px'):
    config_check.check(tiny_config(resolutions=(16, 4)))


def test_the_message_gives_a_valid_example():
  with pytest.raises(UserError, match=r'--config.batch_size=128'):
    config_check.check(tiny_config(batch_size=0))
  with pytest.raises(UserError, match=r"config.augmentation='autoaugment' is invalid: it must be 'imagenet', "):
    config_check.check(tiny_config(augmentation='autoaugment'))


def _flag_value(text):
  """What --config.x=`text` sets: a Python literal, else the text itself (strings need no quotes)."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


@pytest.mark.parametrize('name,field', [(n, f) for n, f in config_fields.FIELDS.items() if f.ok is not None])
def test_each_declared_example_is_valid(name, field):
  assert field.ok(_flag_value(field.example)), (name, field.example)


# The fingerprint of checkpoints written before the fields were declared (their metadata holds exactly this).
_FINGERPRINTS = {
    None: {'channels': 1, 'max_width': 1.0, 'method': 'mutualnet', 'name': 'mobilenet_v1', 'num_classes': 10,
           'num_downsample': 4, 'resolutions': [28, 24, 20, 16], 'width_range': [0.25, 1.0]},
    'usnet': {'channels': 1, 'max_width': 1.0, 'method': 'usnet', 'name': 'mobilenet_v1', 'num_classes': 10,
              'num_downsample': 4, 'resolutions': [28, 24, 20, 16], 'width_range': [0.25, 1.0]},
    'independent': {'channels': 1, 'independent_resolution': 28, 'independent_width': 1.0, 'max_width': 1.0,
                    'method': 'independent', 'name': 'mobilenet_v1', 'num_classes': 10, 'num_downsample': 4},
}


@pytest.mark.parametrize('method', _FINGERPRINTS)
def test_the_fingerprint_of_the_default_config_is_unchanged(method):
  found = checkpointing.fingerprint(default.get_config(method), 1)
  assert json.dumps(found, sort_keys=True) == json.dumps(_FINGERPRINTS[method], sort_keys=True)  # types included


def test_the_fingerprint_is_canonical():
  config = tiny_config(resolutions=(8, 16, 16), width_range=(0.25, 1))
  assert checkpointing.fingerprint(config, 1)['resolutions'] == [16, 8]
  assert json.dumps(checkpointing.fingerprint(config, 1)['width_range']) == '[0.25, 1.0]'


def _saved(**fields):
  return ml_collections.ConfigDict(dict(default.get_config().to_dict(), **fields))


def test_the_resume_policy_follows_the_declarations():
  current = default.get_config()
  free = _saved(log_every_steps=1, data_dir='/elsewhere', model=dict(current.model.to_dict(), conv_impl='xla'))
  assert workdir_lib.config_changes(free, current) == {}
  fixed = _saved(batch_size=64, learning_rate=0.5)
  assert workdir_lib.config_changes(fixed, current) == {'batch_size': (64, 128), 'learning_rate': (0.5, 0.1)}
  assert workdir_lib.OPTIMISER_FIELDS == config_fields.resume_fields(Resume.OPTIMISER)
  assert 'learning_rate' in workdir_lib.OPTIMISER_FIELDS and 'batch_size' not in workdir_lib.OPTIMISER_FIELDS


def test_weight_decay_params_is_an_optimiser_field_that_older_runs_had_as_kernels():
  assert 'weight_decay_params' in workdir_lib.OPTIMISER_FIELDS
  older = default.get_config().to_dict()
  del older['weight_decay_params']  # a config.json written before the field existed
  current = default.get_config()
  assert workdir_lib.config_changes(ml_collections.ConfigDict(older), current) == {}
  current.weight_decay_params = 'all'
  assert workdir_lib.config_changes(ml_collections.ConfigDict(older), current) == {
      'weight_decay_params': ('kernels', 'all')}
