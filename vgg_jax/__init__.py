"""VGG (Simonyan & Zisserman, 2015) in JAX/Flax.

Importing the package appends an XLA:CPU flag to XLA_FLAGS (before JAX creates
its backend) that a probe found to speed up convolution training on CPU; see
`vgg_jax.backend` for when it does, what was measured since, and how to opt
out (VGG_JAX_CPU_FLAGS=0).
"""

from vgg_jax import backend as _backend

_backend.configure_xla_flags()
