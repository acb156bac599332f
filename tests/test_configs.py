"""Experiment configs: every file and variant loads and validates; the seed's shapes."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import pytest

from vgg_jax import configuration, train

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
PAPER = ("vgg11", "vgg11_lrn", "vgg13", "vgg16_c", "vgg16", "vgg19")
# Every experiment file: configs/*.py but the package, the defaults and paper.py (a helper).
EXPERIMENTS = sorted(
    name[:-3]
    for name in os.listdir(CONFIGS)
    if name.endswith(".py") and name not in ("__init__.py", "default.py", "paper.py")
)


def load(name: str, variant: str | None = None):
    module = configuration.load_config_module(os.path.join(CONFIGS, name + ".py"))
    return module.get_config(variant)


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_and_scale_variants(name):
    base = load(name)
    assert base.model == name and base.batch_size == 256 and base.learning_rate == 1e-2
    assert base.schedule == "plateau" and base.weight_decay == 5e-4 and base.momentum == 0.9
    assert (base.train_scale_min, base.train_scale_max) == (256, 256)
    s384 = load(name, "384")
    assert (s384.train_scale_min, s384.learning_rate) == (384, 1e-3)
    assert s384.init_from.endswith(f"{name}_256")
    jitter = load(name, "jitter")
    assert (jitter.train_scale_min, jitter.train_scale_max) == (256, 512)
    assert jitter.init_from.endswith(f"{name}_384")
    for config in (base, s384, jitter):
        configuration.validate_config(config)
    with pytest.raises(ValueError, match="Unknown variant"):
        load(name, "512")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_variant_of_every_experiment_file_validates_for_its_task(name):
    module = configuration.load_config_module(os.path.join(CONFIGS, name + ".py"))
    variants = getattr(module, "VARIANTS", (None,))  # vgg*.py: the paper test above
    for variant in variants:
        configuration.check_file(module.get_config(variant))  # localisation: its block too
    with pytest.raises(ValueError, match="Unknown variant"):
        module.get_config("no-such-variant")


def test_fashion_mnist_seed_setup():
    c = load("fashion_mnist")
    assert (c.model, c.width_divisor, c.fc_width, c.num_classes) == ("vgg11", 4, 4096, 10)
    assert (c.image_size, c.batch_size, c.num_epochs, c.learning_rate) == (224, 64, 10, 0.01)
    assert (c.schedule, c.step_epochs, c.step_factor) == ("step", 3, 0.9)
    assert c.value_range == 1.0 and tuple(c.mean_rgb) == (0.0,) and c.initializer == "glorot"
    d2l = load("fashion_mnist", "d2l")
    assert (d2l.learning_rate, d2l.batch_size, d2l.image_size) == (0.05, 128, 224)
    quick = load("fashion_mnist", "quick")
    assert quick.image_size == 32 and quick.fc_width == 4096 and quick.width_divisor == 4
    # Trained at a fixed S = 32, so `vgg_jax.evaluate` tests at that scale only.
    assert (quick.train_scale_min, quick.train_scale_max) == (32, 32) and quick.cache
    assert tuple(quick.test_scales) == (32,)
    for config in (c, d2l, quick):
        configuration.validate_config(config)


def test_seed_model_has_the_seed_scripts_layer_shapes():
    # The seed's PyTorch network prints, for a 1x1x224x224 input, block outputs
    # (1,16,112,112), (1,32,56,56), (1,64,28,28), (1,128,14,14), (1,128,7,7), then
    # Flatten (1,6272), Linear (1,4096), Linear (1,4096), Linear (1,10).
    config = load("fashion_mnist")
    model = train.create_model(config)
    x = jnp.zeros((1, 224, 224, 1))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    pools = jax.eval_shape(
        lambda v: model.apply(v, x, [f"pool{i}" for i in range(1, 6)], method="extract"),
        variables,
    )
    got = [tuple(pools[f"pool{i}"].shape) for i in range(1, 6)]
    assert got == [
        (1, 112, 112, 16),
        (1, 56, 56, 32),
        (1, 28, 28, 64),
        (1, 14, 14, 128),
        (1, 7, 7, 128),
    ]
    p = variables["params"]
    assert p["fc6"]["kernel"].shape == (7, 7, 128, 4096)  # 6272 inputs
    assert p["fc7"]["kernel"].shape == (4096, 4096)
    assert p["fc8"]["kernel"].shape == (4096, 10)
    logits = jax.eval_shape(lambda v: model.apply(v, x), variables)
    assert logits.shape == (1, 10)
