"""Config A (11 weight layers). The paper trained it from N(0, 0.01) weights, zero biases.

Variants: `configs/vgg11.py:256` (default), `:384`, `:jitter` (see configs/paper.py).
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "vgg_jax_configs_paper", os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper.py")
)
_paper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_paper)


def get_config(variant=None):
    c = _paper.paper_config("vgg11", variant)
    if not c.init_from:
        c.initializer = "normal"  # the paper: N(0, 0.01), zero biases
    return c
