"""Fine-tuning converted ImageNet VGG16 weights on Fashion-MNIST, with a new 10-class head.

Prepare the weights once (docs/pretrained.md):

    python -m vgg_jax.convert vgg16-397923af.pth --to weights/vgg16_torchvision
    python -m vgg_jax.convert weights/vgg16_torchvision --to weights/vgg16_grey64 \\
        --in-channels 1 --image-size 64

`--in-channels 1` folds the ImageNet preprocessing into conv1_1 so that the
network takes Fashion-MNIST's grey pixels in [0, 1] as they come (a grey image
is the RGB image (g, g, g)); `--image-size 64` refits FC1's 7x7 window to the
2x2 map of a 64x64 input with torchvision's adaptive pool folded in. Then

    python -m vgg_jax.train --config configs/finetune_fashion_mnist.py --workdir runs/ft_fmnist

`init_from` copies every layer of the bundle; fc8 (1000 -> 10 classes) keeps
its fresh initialisation (the trainer's "same" mode re-initialises a head of
another class count). Variants: `:quick` (a few hundred steps, a smoke run on
a laptop CPU), `:224` (the original resolution: prepare the bundle without
--image-size; needs an accelerator).
"""

from configs import default

VARIANTS = ("default", "quick", "224")


def get_config(variant=None):
    variant = (variant or "default").strip()
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r}; choose one of {VARIANTS}.")
    c = default.get_config()
    c.model = "vgg16"
    c.num_classes = 10  # a new head; the ImageNet fc8 is not copied
    c.width_divisor = 1
    c.fc_width = 4096
    c.init_from = "weights/vgg16_grey64"  # written by vgg_jax.convert (see above)
    c.init_from_mode = "same"

    c.dataset = "fashion_mnist"
    c.train_split = "train"
    c.eval_split = "test"
    c.image_size = c.train_scale_min = c.train_scale_max = c.eval_scale = 64
    c.random_flip = True
    c.color_shift = 0.0
    # The bundle's preprocessing after --in-channels 1: grey pixels in [0, 1], nothing else.
    c.value_range = 1.0
    c.mean_rgb = (0.0,)
    c.std_rgb = (1.0,)
    c.shuffle_buffer = 60_000

    # Fine-tuning: ten times below the paper's from-scratch rate, as the paper
    # does when it starts S=384 from the S=256 net.
    c.batch_size = 64
    c.eval_batch_size = 256
    c.num_epochs = 3
    c.learning_rate = 1e-3
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.schedule = "step"
    c.step_epochs = 1
    c.step_factor = 0.5
    c.log_every_steps = 20
    c.checkpoint_every_steps = 500

    if variant == "quick":
        c.max_steps = 300
        c.eval_every_epochs = 1
    elif variant == "224":
        c.init_from = "weights/vgg16_grey"  # convert ... --in-channels 1 (no --image-size)
        c.image_size = c.train_scale_min = c.train_scale_max = c.eval_scale = 224
    return c
