"""Shared defaults: the paper's ImageNet recipe (PAPER.md, section 2).

Every experiment config starts from `get_config()` here and overrides a few
fields. Fields are grouped: model, data, optimisation, schedule, runtime.
"""

import ml_collections

# ILSVRC-2012 mean RGB in 0-255 units (the paper subtracts only this).
IMAGENET_MEAN_RGB = (123.68, 116.779, 103.939)


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # Model (vgg_jax.models.create_model).
    c.model = "vgg16"
    c.num_classes = 1000
    c.width_divisor = 1
    c.fc_width = 4096
    c.dropout_rate = 0.5
    c.initializer = "glorot"  # or "normal": the paper's N(0, 0.01)
    c.dtype = "float32"  # compute dtype; "bfloat16" on accelerators
    c.param_dtype = "float32"

    # Data (vgg_jax.input_pipeline).
    c.dataset = "imagenet2012"  # any tfds image classification name, "image_folder"
    c.data_dir = ""  # tfds data_dir ("" = tfds default), or the image folder's root
    c.manual_dir = ""  # where tfds finds manually downloaded files
    c.train_split = "train"
    c.eval_split = "validation"
    c.image_size = 224  # training crop
    c.train_scale_min = 256  # S; S_min < S_max is scale jittering
    c.train_scale_max = 256
    c.eval_scale = 256  # Q for the central-crop evaluation during training
    c.test_scales = ()  # Q of `vgg_jax.evaluate`; () = the paper's for the training scale
    # When the run is complete, evaluate its best checkpoint with the test protocols in the
    # training process (`vgg_jax.evaluate --workdir`, stored in WORKDIR/eval, where that
    # command then finds it): no second start-up, import and compilation.
    c.test_when_complete = False
    c.random_flip = True
    c.color_shift = 0.1  # std of the PCA colour shift's alpha; 0 disables it
    c.value_range = 255.0  # pixel values span [0, value_range] before mean subtraction
    c.mean_rgb = IMAGENET_MEAN_RGB  # subtracted, in value_range units
    c.std_rgb = (1.0, 1.0, 1.0)  # divided after the mean; the paper uses none
    c.resize_method = "bilinear"
    c.shuffle_buffer = 16_384
    # True: decode the training set once into memory (a fixed preprocessing is applied once,
    # jittering/flips/colour shift per batch in numpy: images of one size), and keep the
    # dense protocol's decoded evaluation split between passes (fixed-size images).
    c.cache = False
    # Only these labels of the dataset, relabelled 0..k-1 in this order (set num_classes = k);
    # () keeps every class.
    c.classes = ()

    # Optimisation.
    c.batch_size = 256  # global, whatever the number of devices
    c.eval_batch_size = 256
    c.grad_accum_steps = 1
    c.num_epochs = 74
    c.learning_rate = 1e-2
    c.momentum = 0.9
    c.weight_decay = 5e-4  # L2 penalty multiplier
    c.decay_biases = False

    # Schedule: "plateau" (divide by 10 when validation accuracy stalls),
    # "step" (multiply by step_factor every step_epochs) or "cosine".
    c.schedule = "plateau"
    c.plateau_factor = 0.1
    c.plateau_patience = 2  # evaluations without improvement before a cut
    c.plateau_max_reductions = 3
    c.step_epochs = 3
    c.step_factor = 0.1
    c.warmup_epochs = 0.0  # linear warm-up before the schedule; the paper has none

    # Initialisation from another run: a checkpoint path or workdir.
    c.init_from = ""
    c.init_from_mode = "same"  # "same" config, or "paper_a": A's first 4 convs + FC layers

    # Runtime.
    c.seed = 0
    c.max_steps = 0  # 0 = no limit; for smoke runs
    c.mesh_model_axis = 1  # >1 shards the FC layers along a "model" mesh axis
    c.log_every_steps = 50
    c.eval_every_epochs = 1
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.progress_bar = True
    c.tensorboard = True  # event files in workdir/tensorboard beside metrics.jsonl
    c.num_devices = 0  # 0 = all devices; n = the first n (single-process tests, benchmarks)
    # Resuming a workdir with a config that differs from its config.json in a field that
    # changes the experiment (anything but vgg_jax.configuration.RESUMABLE_FIELDS) is
    # refused; True continues anyway with the new config and rewrites config.json.
    c.resume_override = False

    # Multi-host (vgg_jax.parallel): a coordinator address turns on
    # jax.distributed.initialize; "" falls back to VGG_JAX_COORDINATOR etc.
    # distributed = "auto" initialises with no arguments (TPU pods, SLURM).
    c.distributed = ""
    c.coordinator_address = ""
    c.num_processes = 0
    c.process_id = -1

    # The training loop (vgg_jax.loop; fields added by the one-loop change).
    # End-of-epoch evaluation: "central" (central crop at eval_scale) or "dense" (the paper's
    # dense protocol at train_eval_scales, () = eval_scale; protocols.DenseEvaluator).
    c.train_eval = "central"
    c.train_eval_scales = ()
    # The figure the plateau schedule follows and the one that picks the best checkpoint
    # ("" = the task's own: top-1 accuracy, or localisation error for box regression).
    c.plateau_metric = ""
    c.best_metric = ""
    # Stop when a step's loss exceeds this many times the median of the recent ones
    # (0 = stop on non-finite losses only); see vgg_jax/loop.py.
    c.divergence_factor = 10.0
    # Undecodable images (input_pipeline): "skip" them, counted per epoch and in total, or
    # "fail" at the first with its name.
    c.bad_images = "skip"
    return c
