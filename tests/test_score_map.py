"""`python -m vgg_jax.score_map`: maps over the whole image, class names, --weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from skimage import data
from weights_util import rbg_key

from vgg_jax import checkpoints, models, score_map

OPTIONS = dict(num_classes=10, width_divisor=16, fc_width=32, image_size=32)


def test_full_image_map_puts_each_cell_at_its_windows_centre_and_covers_the_image():
    maps = np.arange(2 * 3, dtype=np.float32).reshape(2, 3, 1)  # a 70 x 100 image at stride 32
    full = score_map.full_image_map(maps, 70, 100, crop=32, stride=32)
    assert full.shape == (70, 100, 1)
    for i in range(2):
        for j in range(3):  # the centre of cell (i, j)'s window: 32 * (i, j) + 16
            assert full[32 * i + 16, 32 * j + 16, 0] == maps[i, j, 0]
    assert full[0, 0, 0] == maps[0, 0, 0] and full[69, 99, 0] == maps[1, 2, 0]  # the corners
    assert set(np.unique(full)) == set(maps.ravel())
    # Rows 0..31 are nearer the first window's centre (16) than the second's (48).
    assert (full[:32, 16, 0] == maps[0, 0, 0]).all() and (full[32:, 16, 0] == maps[1, 0, 0]).all()


def test_cli_takes_weights_and_prints_the_datasets_class_names(tmp_path, capsys):
    model = models.create_model("A", **OPTIONS)
    variables = jax.jit(model.init)(rbg_key(0), jnp.zeros((1, 32, 32, 1)))
    pre = checkpoints.Preprocessing(value_range=1.0, mean=(0.3,), std=(0.3,))
    bundle = checkpoints.ModelBundle(
        "vgg11", OPTIONS, dict(variables), pre, {"dataset": "fashion_mnist"}
    )
    path = checkpoints.save_bundle(tmp_path / "b", bundle)
    photo = tmp_path / "shoe.png"
    Image.fromarray(data.coffee()).resize((90, 60)).save(photo)
    out = score_map.main([str(photo), "--weights", path, "--scale", "64", "--top", "3",
                          "--output", str(tmp_path / "m.png")])  # fmt: skip
    with Image.open(out) as png:
        assert png.format == "PNG"
    printed = capsys.readouterr().out
    fashion = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt")
    fashion += ("Sneaker", "Bag", "Ankle boot")
    assert sum(line.split(":")[0] in fashion for line in printed.splitlines()) == 3
    assert "class " not in printed
