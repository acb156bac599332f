"""Config A-LRN: net A with local response normalisation after conv1_1 (found not to help).

Variants: `configs/vgg11_lrn.py:256` (default), `:384`, `:jitter` (see configs/paper.py).
"""

from configs import paper


def get_config(variant=None):
    c = paper.paper_config("vgg11_lrn", variant)
    if not c.init_from:
        c.initializer = "normal"  # the paper: N(0, 0.01), zero biases
    return c
