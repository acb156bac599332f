"""Config D (16 weight layers): the VGG16 of the literature.

Variants: `configs/vgg16.py:256` (default), `:384`, `:jitter` (see configs/paper.py).
"""

from configs import paper


def get_config(variant=None):
    c = paper.paper_config("vgg16", variant)
    if not c.init_from:
        c.initializer = "glorot"  # the authors later found Glorot init trains deep nets directly
        # The paper instead copied net A's first four convs and FC layers at S=256:
        # --config.init_from=runs/vgg11_256 --config.init_from_mode=paper_a
    return c
