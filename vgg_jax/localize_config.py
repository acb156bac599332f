"""The localisation task's config block, `config.localization` (the paper's Appendix A).

Registered with `vgg_jax.configuration` on import, so that

    configuration.validate_config(config, task="localization")

checks the classification fields, refuses unknown fields inside
`config.localization` (naming the nearest valid one) and runs `validate` below.
Kept apart from `vgg_jax.localize` so that reading a config never imports the
localisation trainer.
"""

from __future__ import annotations

import ml_collections

from vgg_jax import configuration

NAME = "localization"
TASKS = ("localize", "classify")
HEADS = ("scr", "pcr")
FINE_TUNE = ("all", "fc")
# Learning-rate schedules localisation training accepts: all of them; "plateau" follows the
# validation localisation error (or config.plateau_metric), as the one loop feeds it.
SCHEDULES = ("plateau", "step", "cosine", "constant")
EXAMPLE = "configs/localize_fashion_mnist.py"
# Protocol (2)'s settings: read by `localize evaluate` (and recorded in the bundle for it),
# never by a training step, so a resumed run may change them.
RESUMABLE = (
    "classifier",
    "num_dense_eval",
    "test_canvas_size",
    "test_scale_range",
    "dense_scales",
    "merge_iou",
)


def defaults() -> ml_collections.ConfigDict:
    """Every field of config.localization, with the Fashion-MNIST canvas experiment's values."""
    loc = ml_collections.ConfigDict()
    loc.task = "localize"  # or "classify" (the rating classifier)
    loc.head = "scr"  # "scr": one box; "pcr": one box per class
    loc.fine_tune = "all"  # or "fc": only the FC layers
    loc.classifier = ""  # the net rating boxes in protocol (2); "" = init_from
    loc.canvas_size = 32  # training and protocol (1) canvases
    loc.scale_range = (0.4, 1.0)  # item side / canvas side
    loc.epoch_size = 20_000  # canvases per epoch (drawn afresh every step)
    loc.limit = 0  # tfds sets: examples read (0 = all)
    loc.num_eval = 2000  # protocol (1) canvases
    loc.test_canvas_size = 64  # protocol (2) canvases
    loc.test_scale_range = (0.3, 0.8)
    loc.num_dense_eval = 1000
    # Measured best on canvases (RESULTS.md); 64 gives non-overlapping windows.
    loc.dense_scales = (32,)
    loc.merge_iou = 0.5
    return loc


def validate(config: ml_collections.ConfigDict) -> None:
    """The localisation fields' values (the classification fields are checked before)."""
    loc = config.localization
    for key, valid in (("task", TASKS), ("head", HEADS), ("fine_tune", FINE_TUNE)):
        if loc[key] not in valid:
            raise ValueError(f"config.localization.{key}={loc[key]!r}; choose one of {valid}.")
    if config.schedule not in SCHEDULES:
        raise ValueError(
            f"config.schedule={config.schedule!r}: localisation training supports {SCHEDULES}."
        )
    if loc.fine_tune == "fc" and not config.init_from:
        raise ValueError(
            "localization.fine_tune='fc' trains only the FC layers, so the conv layers must "
            "come from a classification net: set config.init_from."
        )
    if config.train_scale_min != config.train_scale_max:
        raise ValueError(
            "Localisation trains at a fixed scale S (the paper's Appendix A): set "
            "train_scale_max = train_scale_min."
        )


SCHEMA = configuration.register_schema(NAME, defaults, validate, EXAMPLE, RESUMABLE)
