"""Config A-LRN: net A with local response normalisation after conv1_1 (found not to help).

Variants: `configs/vgg11_lrn.py:256` (default), `:384`, `:jitter` (see configs/paper.py).
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "vgg_jax_configs_paper", os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper.py")
)
_paper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_paper)


def get_config(variant=None):
    c = _paper.paper_config("vgg11_lrn", variant)
    if not c.init_from:
        c.initializer = "normal"  # the paper: N(0, 0.01), zero biases
    return c
