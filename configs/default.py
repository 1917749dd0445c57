"""The quickstart recipe: MutualNet on the offline Fashion-MNIST builder, sized for a 2-core CPU.

  python main.py --config=configs/default.py --workdir=runs/fmnist
  python main.py --config=configs/default.py:usnet --workdir=runs/fmnist_usnet   # or :independent

Every other config imports this one and changes a few fields (the Flax ImageNet example's pattern), so a field
exists in exactly one place and `--config.x=y` overrides are type-checked against it. The config argument after
':' selects the method everywhere.
"""
import ml_collections


def get_config(method: str | None = None) -> ml_collections.ConfigDict:
  """`method`: the text after the config file's colon ('' or None: MutualNet); checked with the other fields."""
  config = ml_collections.ConfigDict()

  # Model (mutualnet_jax.models.get_model).
  config.model = ml_collections.ConfigDict()
  config.model.name = 'mobilenet_v1'
  config.model.max_width = 1.0        # parameters are created at this width; 2.0 for the wide recipe
  config.model.num_classes = 10
  config.model.num_downsample = 4     # stride-2 layers kept (5 = ImageNet; 4 keeps 16 px valid: 42 M MACs at 28 px)
  config.model.conv_impl = 'auto'     # 'xla' | 'cpu_fast' | 'auto' (cpu_fast on CPU, xla elsewhere)
  config.model.fused_bn = True        # cpu_fast: BN + ReLU6 in one native kernel each way (False: XLA's kernels)
  config.model.dtype = 'float32'      # activations: 'bfloat16' halves memory on TPU/GPU; 'float16' adds dynamic loss
                                      # scaling; parameters and BN statistics stay float32

  # Method: which sub-networks a step trains (mutualnet_jax.sampling).
  config.method = method or 'mutualnet'  # 'mutualnet' | 'usnet' | 'independent' (the config argument)
  config.width_range = (0.25, 1.0)    # (min, max) trained width; max at most model.max_width
  # Random widths: 'uniform' in width_range, continuous, as the official code; 'grid' draws from the width_step grid.
  config.width_sampling = 'uniform'
  config.width_step = 0.25
  # Compiled programs: a width runs in the program of the smallest capacity that holds it, its real channel counts
  # passed at run time (max and min widths: their own exact programs). Fewer capacities compile less, finer ones pad
  # less; () runs every width exact (one program per width). benchmarks/capacity.py measures the trade.
  config.capacities = (0.5, 0.75, 1.0)
  # Widths the sweep (and calibrate/export) accepts: this grid over width_range, plus the training grid. Every width
  # in the range is a valid sub-network (US-Net); 0.05 is the paper's evaluation grid (16 widths x 4 resolutions).
  config.sweep_width_step = 0.05
  config.num_subnets = 4              # sandwich rule: max + min + (num_subnets - 2) random widths
  config.resolutions = (28, 24, 20, 16)  # any order; the max width always uses the highest
  config.independent_width = 1.0      # method='independent': the one (width, resolution) trained
  config.independent_resolution = 28
  config.inplace_distillation = True  # sub-networks learn from the full network's prediction (KL)
  config.kd_temperature = 1.0
  config.label_smoothing = 0.0
  config.resize_antialias = False     # bilinear on-device resize of the one input batch per sub-network
  config.resize_align_corners = False  # True: corners onto corners, as the official code's F.interpolate

  # Data (mutualnet_jax.input_pipeline).
  config.dataset = 'fashion_mnist_local'
  config.data_dir = ''                # '' = TFDS default (~/tensorflow_datasets)
  config.manual_dir = ''              # where a local builder reads raw files; '' = its own default
  config.train_split = 'train'
  config.eval_split = 'test'
  # 'imagenet': random-resized-crop + flip, eval centre crop; 'random_resized_crop': the same crop + flip, eval the
  # whole image (small images); 'small': pad-crop + flip; 'none'.
  config.augmentation = 'small'
  config.crop_scale = (0.25, 1.0)     # random-resized-crop area range; (0.25, 1) for MobileNets
  config.pad_crop = 4                 # pixels of padding for the 'small' augmentation
  config.color_jitter = 0.0           # ColorJitter(j, j, j) of the official ImageNet recipe (0.4 there); 0 = off
  config.lighting = 0.0               # PCA lighting noise std of the official ImageNet recipe (0.1 there); 0 = off
  config.mean = ()                    # per-channel mean / std in [0, 1] units; () = the known dataset's values
  config.std = ()
  config.shuffle_buffer = 16_384
  config.image_size = -1              # input size the pipeline delivers; -1 = max(resolutions)

  # Optimisation (mutualnet_jax.train).
  config.batch_size = 128             # global batch, split over all devices of all hosts
  config.num_epochs = 0.5             # the 2-core quickstart, a smoke-sized budget (README: its time and accuracy)
  config.num_train_steps = -1         # > 0 overrides num_epochs
  config.steps_per_run = -1           # > 0: save and exit after this many steps; the same command continues
  config.learning_rate = 0.1
  # A short linear warm-up: without it the first steps diverge (this network's first gradients are ill-conditioned;
  # README "Quickstart results" has the runs with and without it).
  config.warmup_epochs = 0.1
  config.momentum = 0.9
  config.nesterov = True
  config.weight_decay = 1e-4
  # Which parameters decay: 'kernels' (conv/dense kernels, not depthwise, BN or biases: the official ImageNet rule)
  # or 'all' (every parameter: the official code's rule for every other dataset).
  config.weight_decay_params = 'kernels'
  config.bn_sync = False              # False: BN statistics per device (as nn.DataParallel replicas in the official code)

  # Fine-tuning (mutualnet_jax.init_from): start a fresh run from another run's backbone. Ignored once the workdir
  # has its own checkpoint (resuming wins).
  config.init_from = ''               # a training workdir, an export (--mode=export) or a .npz parameter file
  config.init_classifier = 'auto'     # 'auto': re-initialise when the class count differs | 'fresh' | 'load'

  # BN calibration and evaluation (mutualnet_jax.bn_calibration, mutualnet_jax.sweep).
  config.calibration_images = 2000
  # 'exact': pooled mean and variance of un-augmented images; 'official': per-batch means and unbiased variances of
  # augmented batches averaged, as the official code's BatchNorm(momentum=None) recalibration.
  config.bn_calibration = 'exact'
  config.calibration_batch_size = 200
  config.eval_batch_size = 500
  config.eval_every_steps = -1        # -1 = once per epoch (and at the end), 0 = never
  config.eval_calibration_images = 1000  # quick recalibration before the in-training evaluation

  # Bookkeeping.
  config.seed = 0
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 3
  config.compilation_cache_dir = '~/.cache/mutualnet_jax/xla'  # '' disables the persistent compilation cache
  config.precompile = True            # compile every bucket in parallel threads before the first step (less wall
                                      # time, and no compilation memory interleaved with the steps' buffers)
  config.profile_steps = 0            # > 0: a profiler trace of this many steps, 10 steps in (clu Profile; TensorBoard)

  return config
