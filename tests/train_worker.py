"""Runs train_and_evaluate on fake data in a subprocess: `python train_worker.py WORKDIR JSON`.

JSON holds config overrides. The multi-host test sets VGG_JAX_COORDINATOR etc.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fake_data  # noqa: E402

from vgg_jax import train  # noqa: E402

if __name__ == "__main__":
    workdir, overrides = sys.argv[1], json.loads(sys.argv[2])
    fake_data.install(train)
    train.use_compilation_cache()
    result = train.train_and_evaluate(fake_data.tiny_config(**overrides), workdir)
    print("RESULT", json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float))}))
