"""Config A (11 weight layers). The paper trained it from N(0, 0.01) weights, zero biases.

Variants: `configs/vgg11.py:256` (default), `:384`, `:jitter` (see configs/paper.py).
"""

from configs import paper


def get_config(variant=None):
    c = paper.paper_config("vgg11", variant)
    if not c.init_from:
        c.initializer = "normal"  # the paper: N(0, 0.01), zero biases
    return c
