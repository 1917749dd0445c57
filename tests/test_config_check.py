"""Every config field is checked up front: a bad value is one UserError naming the field and a valid example."""
import pytest

from configs import default, mobilenet_v1_imagenet, mobilenet_v1_wide_imagenet, mobilenet_v2_imagenet
from mutualnet_jax import config_check
from mutualnet_jax.errors import UserError
from tests.util import tiny_config


@pytest.mark.parametrize('get_config', [default.get_config, mobilenet_v1_imagenet.get_config,
                                        mobilenet_v2_imagenet.get_config, mobilenet_v1_wide_imagenet.get_config])
@pytest.mark.parametrize('method', [None, 'usnet', 'independent'])
def test_every_recipe_passes(get_config, method):
  config_check.check(get_config(method))


# The bad inputs a new user tried (issue: "nothing lost, ever"), each with the field its message must name.
@pytest.mark.parametrize('overrides,field', [
    (dict(batch_size=0), 'batch_size'),
    (dict(checkpoint_every_steps=0), 'checkpoint_every_steps'),
    (dict(log_every_steps=0), 'log_every_steps'),
    (dict(keep_checkpoints=0), 'keep_checkpoints'),
    (dict(keep_checkpoints=-1), 'keep_checkpoints'),
    (dict(resolutions=()), 'resolutions'),
    (dict(width_range=(0.25,)), 'width_range'),
    (dict(seed=-1), 'seed'),
    (dict(shuffle_buffer=0), 'shuffle_buffer'),
    (dict(pad_crop=-3), 'pad_crop'),
    (dict(learning_rate=0.0), 'learning_rate'),
    (dict(momentum=1.5), 'momentum'),
    (dict(label_smoothing=1.0), 'label_smoothing'),
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
    (dict(**{'model.num_classes': 0}), 'num_classes'),
    (dict(**{'model.conv_impl': 'cudnn'}), 'conv_impl'),
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
