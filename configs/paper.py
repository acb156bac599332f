"""The paper's ImageNet recipe for one configuration and training scale (PAPER.md, section 2).

Not a config itself: `vgg11.py` ... `vgg19.py` call `paper_config(model, variant)`.
Variants (the training scale S):

* `256` (default): S = 256, learning rate 1e-2, from scratch.
* `384`: S = 384, initialised from the S = 256 run (`runs/<model>_256`) with
  learning rate 1e-3, as the paper did.
* `jitter`: S uniform in [256, 512] per image, fine-tuned from the S = 384 run
  (`runs/<model>_384`); validation at Q = 384 (the paper's single-scale test).

Train the stages in order, each in its own workdir, e.g.
`python -m vgg_jax.train --config configs/vgg16.py:384 --workdir runs/vgg16_384`;
`--config.init_from=...` points a stage elsewhere.
"""

import ml_collections

from configs import default

VARIANTS = ("256", "384", "jitter")


def paper_config(model: str, variant: str | None) -> ml_collections.ConfigDict:
    variant = (variant or "256").strip()
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r} for {model}; choose one of {VARIANTS}.")
    c = default.get_config()
    c.model = model
    c.dataset = "imagenet2012"
    c.batch_size = 256
    c.learning_rate = 1e-2
    c.schedule = "plateau"
    c.num_epochs = 74  # 370K iterations at batch 256
    if variant == "256":
        c.train_scale_min = c.train_scale_max = c.eval_scale = 256
    elif variant == "384":
        c.train_scale_min = c.train_scale_max = c.eval_scale = 384
        c.learning_rate = 1e-3
        c.init_from = f"runs/{model}_256"
        c.init_from_mode = "same"
    else:
        c.train_scale_min, c.train_scale_max, c.eval_scale = 256, 512, 384
        c.learning_rate = 1e-3
        c.init_from = f"runs/{model}_384"
        c.init_from_mode = "same"
    return c
