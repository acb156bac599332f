"""Experiment configs, a package so that one experiment builds on another.

    from configs import default, paper   # in an experiment file

Each experiment file defines `get_config(variant=None)` (ml_collections'
convention: `--config configs/vgg16.py:384`). vgg_jax.configuration puts this
directory's parent on sys.path before it executes a config file, so the
imports work from any working directory.
"""
