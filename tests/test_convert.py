"""The converter from official PyTorch checkpoints, tested against a PyTorch re-implementation of the official
MutualNet/US-Net MobileNets (written here from the official model definitions: same module tree, so the same
state_dict keys and layouts; slimming as USConv2d/USBatchNorm2d/USLinear do it), with random weights.

Equality is checked in training-mode BN on both sides (batch statistics), so no running statistics are involved:
this project recalibrates BN per configuration anyway. Tolerance: |JAX - PyTorch| <= 2e-4 x the largest logit
(float32, 30+ layers, different convolution summation orders; observed <= 5e-5)."""
import os
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

torch = pytest.importorskip('torch')  # the `test` extra installs the CPU build
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import mutualnet_jax  # noqa: E402
from configs import mobilenet_v1_imagenet, mobilenet_v2_imagenet  # noqa: E402
from mutualnet_jax import (checkpointing, convert, export, input_pipeline, parallel, query, sweep,  # noqa: E402
                           workdir as wd)
from mutualnet_jax.errors import UserError  # noqa: E402
from mutualnet_jax.models import get_model  # noqa: E402
from mutualnet_jax.train_state import abstract_run_state  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = 10


# ----------------------------------------------------------------------------------------------------------------------
# PyTorch: the official architectures. A module's `width_mult` is set on every module before a forward pass, as the
# official training scripts do with model.apply(lambda m: setattr(m, 'width_mult', w)).

def _divisible(v, divisor=8, min_value=1):
  rounded = max(min_value, int(v + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * v else rounded


def _slimmed(base, width, ratio=1):
  return int(_divisible(base * width / ratio) * ratio)


class USConv2d(nn.Conv2d):
  def __init__(self, cin, cout, kernel, stride, *, depthwise=False, us=(True, True), ratio=(1, 1), max_width=1.0):
    cin_max = _slimmed(cin, max_width, ratio[0]) if us[0] else cin
    cout_max = _slimmed(cout, max_width, ratio[1]) if us[1] else cout
    super().__init__(cin_max, cout_max, kernel, stride, (kernel - 1) // 2, groups=cin_max if depthwise else 1,
                     bias=False)
    self.base, self.depthwise, self.us, self.ratio, self.width_mult = (cin, cout), depthwise, us, ratio, None

  def forward(self, x):
    cin = _slimmed(self.base[0], self.width_mult, self.ratio[0]) if self.us[0] else self.in_channels
    cout = _slimmed(self.base[1], self.width_mult, self.ratio[1]) if self.us[1] else self.out_channels
    return F.conv2d(x, self.weight[:cout, :cin], None, self.stride, self.padding, 1,
                    cin if self.depthwise else 1)


class USBatchNorm2d(nn.BatchNorm2d):
  def __init__(self, features, ratio=1, max_width=1.0, widths=(0.25, 1.0)):
    super().__init__(_slimmed(features, max_width, ratio), affine=True, track_running_stats=False)
    self.bn = nn.ModuleList([nn.BatchNorm2d(_slimmed(features, w, ratio), affine=False) for w in widths])
    self.base, self.ratio, self.width_mult, self.widths = features, ratio, None, widths

  def forward(self, x):
    """As the official layer: at a width of `widths` its bn.<i> running statistics (used in eval mode), else batch
    statistics (the official layer tracks none of its own)."""
    c = _slimmed(self.base, self.width_mult, self.ratio)
    bn = next((b for w, b in zip(self.widths, self.bn) if w == self.width_mult), None)
    mean, var = (None, None) if bn is None else (bn.running_mean[:c], bn.running_var[:c])
    return F.batch_norm(x, mean, var, self.weight[:c], self.bias[:c], self.training or bn is None, 0.1, self.eps)


class USLinear(nn.Linear):
  def __init__(self, fin, fout, max_width=1.0):
    super().__init__(_divisible(fin * max_width), fout)
    self.base, self.width_mult = fin, None

  def forward(self, x):
    return F.linear(x, self.weight[:, :_divisible(self.base * self.width_mult)], self.bias)


class DepthwiseSeparableConv(nn.Module):
  def __init__(self, inp, outp, stride, **kw):
    super().__init__()
    self.body = nn.Sequential(USConv2d(inp, inp, 3, stride, depthwise=True, max_width=kw['max_width']),
                              USBatchNorm2d(inp, **kw), nn.ReLU6(),
                              USConv2d(inp, outp, 1, 1, max_width=kw['max_width']), USBatchNorm2d(outp, **kw),
                              nn.ReLU6())

  def forward(self, x):
    return self.body(x)


class MobileNetV1(nn.Module):
  def __init__(self, num_classes, max_width=1.0, widths=(0.25, 1.0)):
    super().__init__()
    kw = {'max_width': max_width, 'widths': widths}
    features = [nn.Sequential(USConv2d(3, 32, 3, 2, us=(False, True), max_width=max_width), USBatchNorm2d(32, **kw),
                              nn.ReLU6())]
    channels = 32
    for c, n, s in [(64, 1, 1), (128, 2, 2), (256, 2, 2), (512, 6, 2), (1024, 2, 2)]:
      for i in range(n):
        features.append(DepthwiseSeparableConv(channels, c, s if i == 0 else 1, **kw))
        channels = c
    features.append(nn.AdaptiveAvgPool2d(1))
    self.features = nn.Sequential(*features)
    self.classifier = nn.Sequential(USLinear(1024, num_classes, max_width))

  def forward(self, x):
    return self.classifier(self.features(x).flatten(1))


class InvertedResidual(nn.Module):
  def __init__(self, inp, outp, stride, t, **kw):
    super().__init__()
    self.residual_connection = stride == 1 and inp == outp
    mw = kw['max_width']
    layers = []
    if t != 1:
      layers += [USConv2d(inp, inp * t, 1, 1, ratio=(1, t), max_width=mw), USBatchNorm2d(inp * t, t, **kw),
                 nn.ReLU6()]
    layers += [USConv2d(inp * t, inp * t, 3, stride, depthwise=True, ratio=(t, t), max_width=mw),
               USBatchNorm2d(inp * t, t, **kw), nn.ReLU6(),
               USConv2d(inp * t, outp, 1, 1, ratio=(t, 1), max_width=mw), USBatchNorm2d(outp, **kw)]
    self.body = nn.Sequential(*layers)

  def forward(self, x):
    return self.body(x) + x if self.residual_connection else self.body(x)


class MobileNetV2(nn.Module):
  def __init__(self, num_classes, max_width=1.0, widths=(0.35, 1.0)):
    super().__init__()
    kw = {'max_width': max_width, 'widths': widths}
    features = [nn.Sequential(USConv2d(3, 32, 3, 2, us=(False, True), max_width=max_width), USBatchNorm2d(32, **kw),
                              nn.ReLU6())]
    channels = 32
    for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                       (6, 320, 1, 1)]:
      for i in range(n):
        features.append(InvertedResidual(channels, c, s if i == 0 else 1, t, **kw))
        channels = c
    features.append(nn.Sequential(USConv2d(channels, 1280, 1, 1, us=(True, False), max_width=max_width),
                                  nn.BatchNorm2d(1280), nn.ReLU6()))
    features.append(nn.AdaptiveAvgPool2d(1))
    self.features = nn.Sequential(*features)
    self.classifier = nn.Sequential(nn.Linear(1280, num_classes))

  def forward(self, x):
    return self.classifier(self.features(x).flatten(1))


def _official(cls, seed=0, **kw):
  """Random weights, BN scale/bias away from 1/0 and random running statistics, so a swapped or dropped tensor
  shows."""
  torch.manual_seed(seed)
  model = cls(CLASSES, **kw)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 and name.endswith('weight'):
        p.uniform_(0.5, 1.5)
      elif p.ndim == 1:
        p.normal_(0.0, 0.2)
      elif p.ndim == 2:
        p.normal_(0.0, 1.0 / np.sqrt(p.shape[1]))
    for name, b in model.named_buffers():
      if name.endswith('running_mean'):
        b.normal_(0.0, 0.5)
      elif name.endswith('running_var'):
        b.uniform_(0.5, 2.0)
  return model


def _save(model, path, **extra):
  """As the official training scripts save: {'model': DataParallel state_dict ('module.' keys), ...}."""
  torch.save({'model': nn.DataParallel(model).state_dict(), 'last_epoch': 249, **extra}, path)
  return path


def _torch_logits(model, images, width, train=True):
  model.train(train)
  model.apply(lambda m: setattr(m, 'width_mult', width))
  with torch.no_grad():
    return model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()


def _config(module, **overrides):
  config = module.get_config()
  config.model.num_classes = CLASSES
  config.model.conv_impl = 'xla'
  config.compilation_cache_dir = ''
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


@pytest.mark.parametrize('cls,module,widths,width_range', [
    (MobileNetV1, mobilenet_v1_imagenet, (0.25, 0.5, 0.73, 1.0), (0.25, 1.0)),  # MutualNet's v1 range
    (MobileNetV2, mobilenet_v2_imagenet, (0.35, 0.6, 1.0), (0.35, 1.0)),        # US-Net's v2 range
])
def test_converted_network_equals_the_official_one(tmp_path, cls, module, widths, width_range):
  official = _official(cls, widths=width_range)
  path = _save(official, tmp_path / 'official.pt', optimizer={'state': {}, 'param_groups': [{'lr': 0.1}]})
  config = _config(module, width_range=width_range)
  params, channels = convert.convert_state_dict(convert.read_state_dict(path), config)
  assert channels == 3
  model = get_model(config.model)
  images = np.random.RandomState(0).randn(4, 64, 64, 3).astype(np.float32)
  for width in widths:
    expected = _torch_logits(official, images, width)
    logits, _ = jax.jit(lambda p, x, w=width: model.apply({'params': p}, x, width=w, train=True,
                                                          mutable=['bn_moments']))(params, images)
    scale = float(np.abs(expected).max())
    assert scale > 0.1, width
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=0, atol=2e-4 * scale, err_msg=f'width {width}')


def test_workdir_restores_like_a_trained_run(tmp_path):
  official = _official(MobileNetV1)
  path = _save(official, tmp_path / 'official.pt')
  config = _config(mobilenet_v1_imagenet)
  workdir = str(tmp_path / 'converted')
  summary = convert.convert(path, config, workdir)
  assert summary['parameters'] == sum(p.numel() for p in official.parameters())
  assert wd.saved_config(workdir).model.to_dict() == config.model.to_dict()
  with checkpointing.Checkpoints(workdir, keep=1, read_only=True,
                                 expected=checkpointing.fingerprint(config, 3)) as ckpt:
    state, meta = ckpt.restore(0, abstract_run_state(config, 3, parallel.make_mesh()))
  assert meta['converted_from'] == str(path) and len(meta['sha256']) == 64
  np.testing.assert_array_equal(state.params['classifier']['kernel'],
                                official.classifier[0].weight.detach().numpy().T)
  with pytest.raises(UserError, match='already holds checkpoints'):
    convert.convert(path, config, workdir)


def test_bad_files_are_one_line_errors(tmp_path):
  config = _config(mobilenet_v1_imagenet)
  with pytest.raises(UserError, match='not found'):
    convert.read_state_dict(tmp_path / 'missing.pt')
  (tmp_path / 'text.pt').write_text('not a checkpoint\n')
  with pytest.raises(UserError, match='is not a PyTorch checkpoint'):
    convert.read_state_dict(tmp_path / 'text.pt')
  (tmp_path / 'noise.pt').write_bytes(np.random.RandomState(0).bytes(4096))
  with pytest.raises(UserError, match='is not a PyTorch checkpoint'):
    convert.read_state_dict(tmp_path / 'noise.pt')
  torch.save({'model': {'w': torch.zeros(2)}, 'meters': _Meter()}, tmp_path / 'objects.pt')
  with pytest.raises(UserError, match='pickled Python objects besides tensors'):
    convert.read_state_dict(tmp_path / 'objects.pt')
  assert not _Meter.unpickled  # nothing from the file ran
  torch.save({'epoch': 3}, tmp_path / 'no_model.pt')
  with pytest.raises(UserError, match='holds no state dict'):
    convert.read_state_dict(tmp_path / 'no_model.pt')
  torch.save({'fc.weight': torch.zeros(10, 4)}, tmp_path / 'resnet.pt')
  with pytest.raises(UserError, match=r'is not a MutualNet/US-Net mobilenet_v1 checkpoint \(missing '):
    convert.convert_state_dict(convert.read_state_dict(tmp_path / 'resnet.pt'), config)


class _Meter:
  """Stands for the official US-Net scripts' pickled meter objects."""
  unpickled = False

  def __setstate__(self, state):
    type(self).unpickled = True
    self.__dict__.update(state)


def test_wrong_architecture_classes_or_widths_are_one_line_errors(tmp_path):
  v2 = convert.read_state_dict(_save(_official(MobileNetV2), tmp_path / 'v2.pt'))
  with pytest.raises(UserError, match=r'is a mobilenet_v2 checkpoint.*--config=configs/mobilenet_v2_imagenet.py'):
    convert.convert_state_dict(v2, _config(mobilenet_v1_imagenet))
  with pytest.raises(UserError, match=r'trained down to width 0.35 .* --config.width_range=\(0.35,1\)'):
    convert.convert_state_dict(v2, _config(mobilenet_v2_imagenet))  # the ImageNet config starts at 0.25
  v1 = _config(mobilenet_v1_imagenet)
  v1.model.num_classes = 1000
  state = convert.read_state_dict(_save(_official(MobileNetV1), tmp_path / 'v1.pt'))
  with pytest.raises(UserError, match='has 10 classes but config.model.num_classes=1000'):
    convert.convert_state_dict(state, v1)
  wide = convert.read_state_dict(_save(_official(MobileNetV1, max_width=1.5, widths=(0.25, 1.5)),
                                       tmp_path / 'wide.pt'))
  with pytest.raises(UserError, match=r'features.0.0.weight has shape \(48, 3, 3, 3\).*another max width'):
    convert.convert_state_dict(wide, _config(mobilenet_v1_imagenet))
  small = _config(mobilenet_v1_imagenet)
  small.model.num_downsample = 4
  with pytest.raises(UserError, match='num_downsample=5'):
    convert.convert_state_dict(state, small)


def test_model_zoo_zip_is_read(tmp_path):
  """The official model zoos attach `<name>.pt.zip`: a zip archive holding the .pt file."""
  official = _official(MobileNetV1)
  pt = _save(official, tmp_path / 'us_mobilenet_v1_calibrated.pt')
  with zipfile.ZipFile(tmp_path / 'us_mobilenet_v1_calibrated.pt.zip', 'w') as archive:
    archive.write(pt, pt.name)
  state = convert.read_state_dict(tmp_path / 'us_mobilenet_v1_calibrated.pt.zip')
  np.testing.assert_array_equal(state['features.0.0.weight'], official.features[0][0].weight.detach().numpy())


@pytest.mark.parametrize('cls,module,width_range,kept', [
    (MobileNetV1, mobilenet_v1_imagenet, (0.25, 1.0), [0.25, 1.0]),         # MutualNet's width_mult_list
    (MobileNetV2, mobilenet_v2_imagenet, (0.35, 1.0), [0.35, 0.6, 1.0]),    # a US-Net-style list
])
def test_the_official_bn_statistics_are_kept_and_predict_without_a_dataset(tmp_path, cls, module, width_range, kept):
  """The converted workdir's network at a width the checkpoint holds statistics for equals the official model in
  eval mode (its running statistics), with no dataset anywhere: ImageNet is not prepared in the data_dir."""
  official = _official(cls, widths=tuple(kept))
  (tmp_path / 'tfds').mkdir()
  config = _config(module, width_range=width_range, resolutions=(64, 32), data_dir=str(tmp_path / 'tfds'))
  workdir = str(tmp_path / 'converted')
  summary = convert.convert(_save(official, tmp_path / 'official.pt'), config, workdir)
  assert summary['bn_statistics'] == {'widths': kept, 'resolution': 64}
  assert f'kept for width {", ".join(f"{w:g}" for w in kept)} at 64 px' in convert.describe_statistics(summary)
  run = mutualnet_jax.open(workdir)
  official.eval()
  images = np.random.RandomState(1).randn(2, 64, 64, 3).astype(np.float32)
  for width in kept:
    net = run.network(width, 64)
    logits = np.asarray(export.apply_narrow(net.model, net.variables, images, net.width))
    expected = _torch_logits(official, images, width, train=False)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=2e-4 * float(np.abs(expected).max()),
                               err_msg=f'width {width}')
  with pytest.raises(UserError, match="Dataset 'imagenet2012' is not prepared"):
    run.network(0.5, 64)  # no statistics kept for it: calibrating needs images


@pytest.mark.slow
def test_command_line(tmp_path):
  path = _save(_official(MobileNetV1), tmp_path / 'official.pt')
  args = [sys.executable, '-m', 'mutualnet_jax.convert', f'--checkpoint={path}',
          f'--config={ROOT}/configs/mobilenet_v1_imagenet.py:usnet', '--config.model.num_classes=10']
  out = subprocess.run([*args, f'--workdir={tmp_path / "run"}'], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'python main.py --mode=sweep' in out.stdout and wd.saved_config(str(tmp_path / 'run')).method == 'usnet'
  out = subprocess.run([*args, f'--workdir={tmp_path / "run"}'], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
  last = out.stderr.strip().splitlines()[-1]
  assert out.returncode == 2 and last.startswith('error: ') and 'already holds checkpoints' in last


@pytest.mark.slow
def test_sweep_and_api_on_a_converted_workdir(tmp_path):
  """--mode=sweep's code path on a converted checkpoint: BN calibrated per configuration from the dataset, the table
  written, and the API's network on raw images (a tiny stand-in dataset of 32 px RGB images, 10 classes)."""
  rng = np.random.RandomState(0)
  features = tfds.features.FeaturesDict({'image': tfds.features.Image(shape=(32, 32, 3)),
                                         'label': tfds.features.ClassLabel(num_classes=CLASSES)})
  splits = {split: [(i, {'image': rng.randint(0, 256, (32, 32, 3), np.uint8), 'label': i % CLASSES})
                    for i in range(n)] for split, n in (('train', 40), ('test', 20))}
  tfds.dataset_builders.store_as_tfds_dataset(name='rgb_stand_in', version='1.0.0', features=features,
                                              split_datasets=splits, data_dir=str(tmp_path / 'tfds'))
  config = _config(mobilenet_v1_imagenet, dataset='rgb_stand_in', data_dir=str(tmp_path / 'tfds'), eval_split='test',
                   resolutions=(32,),
                   mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), calibration_images=20, calibration_batch_size=10,
                   eval_batch_size=10)
  workdir = str(tmp_path / 'converted')
  convert.convert(_save(_official(MobileNetV1), tmp_path / 'official.pt'), config, workdir)
  summary = sweep.run_sweep(wd.saved_config(workdir), workdir, widths=[0.5], resolutions=[32], latency_repeats=1)
  assert summary['calibrated'] == 1 and summary['eval_images'] == 20
  run = mutualnet_jax.open(workdir)
  row = run.best(budget_mflops=1000)
  assert (row.width, row.resolution) == (0.5, 32) and 0 <= row.top1 <= 1
  images, _ = run.examples(4)
  assert run.network(0.5, 32).top_k(images, k=3).classes.shape == (4, 3)


@pytest.mark.slow
def test_official_checkpoint_to_a_swept_table_on_a_folder_without_imagenet(tmp_path):
  """The issue's path: convert, sweep with BN calibrated on a folder of one's own images (ImageNet is not prepared),
  the accuracy columns left empty, then a prediction on those images; the official statistics serve width 1.0."""
  from PIL import Image  # noqa: PLC0415
  (tmp_path / 'tfds').mkdir()
  folder = tmp_path / 'photos'
  folder.mkdir()
  rng = np.random.RandomState(0)
  for i in range(6):
    Image.fromarray(rng.randint(0, 256, (48 + 8 * (i % 2), 40, 3), np.uint8)).save(folder / f'{i}.png')
  config = _config(mobilenet_v1_imagenet, resolutions=(64, 32), data_dir=str(tmp_path / 'tfds'))
  workdir = str(tmp_path / 'converted')
  convert.convert(_save(_official(MobileNetV1), tmp_path / 'official.pt'), config, workdir)
  summary = sweep.run_sweep(wd.saved_config(workdir), workdir, widths=[0.5, 1.0], resolutions=[64],
                            latency_repeats=1, images=str(folder))
  assert summary['calibrated'] == 1 and summary['reused'] == 1  # 1.0 @ 64: the official statistics
  assert summary['accuracy'].startswith("not measured: Dataset 'imagenet2012' is not prepared")
  assert summary['calibrated_on'] == str(folder) and summary['calibration_images'] == 6
  rows, _ = query.read_table(workdir)
  assert [(r.width, r.top1, r.top5) for r in rows] == [(0.5, None, None), (1.0, None, None)]
  assert ',,' in (tmp_path / 'converted' / 'query_table.csv').read_text()  # empty cells, not made-up numbers
  run = mutualnet_jax.open(workdir)
  images = input_pipeline.read_images(str(folder), 3)
  assert run.network(0.5, 64).top_k(images[0], k=2).classes.shape == (1, 2)
