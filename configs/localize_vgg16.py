"""Localisation at the paper's scale (Appendix A): VGG16 (config D) fine-tuned to regress boxes.

The localisation net starts from a classification net (`init_from`: a converted
pretrained bundle, `python -m vgg_jax.convert`, or a training workdir), whose
last FC layer is replaced by the box head, and is fine-tuned with the Euclidean
loss at learning rate 1e-3 (the paper's), all layers, at fixed S = 256 with
central 224 crops. Variants: `:384` (S = 384), `:pcr` (one box per class),
`:fc` (FC layers only), `:classifier` (the single-label classifier on the same
crops that rates boxes in the dense protocol, when `init_from` predicts other
classes than the boxes', as ImageNet nets do for VOC).

Data: any tfds dataset with `objects/bbox` and `objects/label`; VOC 2007 by
default (20 classes). For ILSVRC localisation data prepared as a tfds dataset,
set `--config.dataset=NAME --config.num_classes=1000`.

    python -m vgg_jax.localize train --config configs/localize_vgg16.py --workdir runs/loc_vgg16 \\
        --config.init_from=weights/vgg16 --config.localization.classifier=runs/voc_classifier

The remaining fields are those of configs/localize_fashion_mnist.py (the
measured offline experiment) and the trainer's (configs/default.py).
"""

from configs import default, localize_fashion_mnist

VARIANTS = ("256", "384", "pcr", "fc", "classifier")


def get_config(variant=None):
    variant = (variant or "256").strip()
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r}; choose one of {VARIANTS}.")
    c = localize_fashion_mnist.get_config()
    c.model = "vgg16"
    c.num_classes = 20  # object classes (VOC); the net's outputs follow the head
    c.width_divisor = 1
    c.fc_width = 4096
    c.dropout_rate = 0.5

    c.dataset = "voc/2007"
    c.train_split = "train+validation"
    c.eval_split = "test"
    c.image_size = 224
    c.train_scale_min = c.train_scale_max = c.eval_scale = 384 if variant == "384" else 256
    c.value_range = 255.0
    c.mean_rgb = default.IMAGENET_MEAN_RGB
    c.std_rgb = (1.0, 1.0, 1.0)

    c.batch_size = 256
    c.eval_batch_size = 256
    c.num_epochs = 30
    c.learning_rate = 1e-3  # the paper's fine-tuning rate
    c.schedule = "step"
    c.step_epochs = 10
    c.step_factor = 0.1
    c.log_every_steps = 20
    c.num_devices = 0  # all accelerators
    c.init_from = "weights/vgg16"

    loc = c.localization
    loc.limit = 0
    loc.num_eval = 0  # protocol (1): the whole evaluation split
    loc.num_dense_eval = 0
    loc.dense_scales = (256, 384)
    if variant == "pcr":
        loc.head = "pcr"
    elif variant == "fc":
        loc.fine_tune = "fc"
    elif variant == "classifier":
        loc.task = "classify"
    return c
