"""VGG (Simonyan & Zisserman, 2015) in JAX/Flax.

Importing the package appends an XLA:CPU flag to XLA_FLAGS (before JAX creates
its backend) that a probe found to speed up convolution training on CPU; see
`vgg_jax.backend` for when it does, what was measured since, and how to opt
out (VGG_JAX_CPU_FLAGS=0).

It also turns TensorFlow's oneDNN kernels off unless the environment says
otherwise: vgg_jax runs only tf.data's decoding and resizing in TensorFlow,
which oneDNN does not accelerate, and with them on TensorFlow 2.21 prints a
notice at import that no logging setting silences. TensorFlow's C++ INFO lines
(which CPU instructions its build could use) are hidden too; its warnings stay
(TF_CPP_MIN_LOG_LEVEL=1, unless the environment sets it).
"""

import os as _os

from vgg_jax import backend as _backend

_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
_backend.configure_xla_flags()
