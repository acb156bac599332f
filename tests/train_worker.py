"""Runs a trainer in a subprocess: `python train_worker.py WORKDIR JSON [localize]`.

JSON holds config overrides. Classification trains on fake data; "localize"
trains the tiny localisation config (configs/localize_fashion_mnist.py:tiny).
The multi-host tests set VGG_JAX_COORDINATOR etc.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fake_data  # noqa: E402

from vgg_jax import train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOC_CONFIG = os.path.join(ROOT, "configs", "localize_fashion_mnist.py")

if __name__ == "__main__":
    workdir, overrides = sys.argv[1], json.loads(sys.argv[2])
    train.use_compilation_cache()
    if sys.argv[3:] == ["localize"]:
        # Imported here: it brings TensorFlow (7 of a classification worker's 10 s of imports).
        from vgg_jax import localize

        config = localize.load_config(LOC_CONFIG + ":tiny")
        config.update(overrides)
        result = localize.train_and_evaluate(config, workdir)
    else:
        config = fake_data.tiny_config(**overrides)
        result = train.train_and_evaluate(config, workdir, data=fake_data.data())
    print("RESULT", json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float))}))
