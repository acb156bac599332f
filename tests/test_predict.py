"""`python -m vgg_jax.predict`: image loading, the central crop, names, end to end."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import skimage.data
from PIL import Image

from vgg_jax import (
    checkpoints,
    cli,
    convert,
    image_io,
    imagenet_classes,
    predict,
    reference_preprocessing,
)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """The same photo as RGB JPEG, greyscale PNG, RGBA PNG and CMYK JPEG."""
    d = tmp_path_factory.mktemp("images")
    cat = Image.fromarray(skimage.data.chelsea())  # 451 x 300
    paths = {
        "rgb": d / "cat.jpg",
        "grey": d / "cat_grey.png",
        "rgba": d / "cat_rgba.png",
        "cmyk": d / "cat_cmyk.jpg",
    }
    cat.save(paths["rgb"], quality=95)
    cat.convert("L").save(paths["grey"])
    cat.convert("RGBA").save(paths["rgba"])
    cat.convert("CMYK").save(paths["cmyk"])
    return {k: str(v) for k, v in paths.items()}


def test_load_image_any_mode(image_files, tmp_path):
    for path in image_files.values():
        img = image_io.load_image(path)
        assert img.shape == (300, 451, 3) and img.dtype == np.float32
        assert 0.0 <= img.min() and img.max() <= 1.0 and img.max() > 0.5
    grey = image_io.load_image(image_files["grey"])
    np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
    junk = tmp_path / "x.jpg"
    junk.write_text("not an image")
    with pytest.raises(ValueError, match="Cannot read image"):
        image_io.load_image(str(junk))


def test_uint8_and_unit_float_invert_each_other():
    every_level = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(image_io.to_uint8(image_io.unit_float(every_level)), every_level)
    # Out-of-range floats are clipped, never wrapped around (256 -> 0).
    np.testing.assert_array_equal(image_io.to_uint8(np.array([-0.1, 0.4, 1.01])), [0, 102, 255])


def test_central_crop_takes_the_centre():
    # A white image with a black centre square of side 100 in a 200 x 400 image.
    img = np.ones((200, 400, 3), np.float32)
    img[50:150, 150:250] = 0
    crop = predict.central_crop(img, 224)  # rescaled by 256/200: the square becomes 128
    assert crop.shape == (224, 224, 3)
    assert crop[112, 112].max() < 0.01  # centre is black
    assert crop[112, 10].min() > 0.99  # 102 px from the centre: outside the 64 px half-side
    assert crop[112, 50].max() < 0.01  # 62 px from the centre: inside
    assert predict.central_crop(img, 32).shape == (32, 32, 3)


def tiny_torchvision_bundle(tmp_path):
    from test_convert import torchvision_state

    state = torchvision_state("vgg11", width_divisor=16, fc_width=32, num_classes=1000, seed=4)
    src = str(tmp_path / "vgg11.safetensors")
    convert.write_torchvision_file(state, src)
    out = str(tmp_path / "bundle")
    assert convert.main([src, "--to", out]) == 0
    return state, out


def test_predict_cli_matches_torch_on_the_same_crop(image_files, tmp_path, capsys):
    pytest.importorskip("torch")
    from test_convert import torch_reference

    state, bundle_dir = tiny_torchvision_bundle(tmp_path)
    assert predict.main([image_files["rgb"], image_files["grey"], "--weights", bundle_dir]) == 0
    printed = capsys.readouterr().out
    bundle = checkpoints.load_bundle(bundle_dir)
    results = predict.predict(bundle, [image_files["rgb"]])[0]
    # Reference: torchvision's transforms (Resize 256, CenterCrop 224, Normalize), torch forward.
    crop = predict.central_crop(predict.open_image(image_files["rgb"]), 224)[None]
    x = (crop - np.float32([0.485, 0.456, 0.406])) / np.float32([0.229, 0.224, 0.225])
    logits = torch_reference("vgg11", state, x.astype(np.float32))[0]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    want = np.argsort(-probs)[:5]
    assert [i for i, _, _ in results] == list(want)
    np.testing.assert_allclose([p for _, _, p in results], probs[want], rtol=1e-4)
    for i, name, p in results:
        assert name == imagenet_classes.class_name(i)
        assert f"{name:<30s} {p:7.4f}" in printed
    assert printed.count("1. ") == 2  # both images


def test_predict_cli_errors(image_files, tmp_path, capsys):
    def fails(*argv):  # as the command: the one line its exit prints (status 1)
        with pytest.raises(SystemExit) as e:
            cli.run(predict.main, [image_files["rgb"], "--weights", *argv])
        assert isinstance(e.value.code, str) and "\n" not in e.value.code
        return e.value.code

    assert "neither a model bundle" in fails(str(tmp_path))
    assert "not a weights name (keras_vgg16, " in fails("vgg17")
    _, bundle_dir = tiny_torchvision_bundle(tmp_path)
    bundle = checkpoints.load_bundle(bundle_dir)
    bundle.metadata["features_only"] = True  # like vgg16_features or a Keras notop file
    checkpoints.save_bundle(tmp_path / "features", bundle)
    assert "Error: vgg11 holds trained features only" in fails(str(tmp_path / "features"))
    # A localisation net's outputs are boxes: printed as "class 2 0.27" before.
    bundle.metadata = {"localization": {"head": "scr", "num_object_classes": 10}}
    checkpoints.save_bundle(tmp_path / "boxes", bundle)
    assert "is a localisation net (its outputs are boxes" in fails(str(tmp_path / "boxes"))
    with pytest.raises(ValueError, match="is a localisation net"):  # --debug: the traceback
        predict.main([image_files["rgb"], "--weights", str(tmp_path / "boxes")])
    from vgg_jax import evaluate, score_map

    for command in (score_map.main, evaluate.main):
        args = [image_files["rgb"]] if command is score_map.main else ["--limit", "1"]
        with pytest.raises(ValueError, match="is a localisation net"):
            command([*args, "--checkpoint", str(tmp_path / "boxes")])


def test_dense_uses_the_evaluation_modules_dense_evaluator(image_files, tmp_path, monkeypatch):
    """--dense hands the bundle's model, variables, preprocessing and scales to DenseEvaluator."""
    _, bundle_dir = tiny_torchvision_bundle(tmp_path)
    bundle = checkpoints.load_bundle(bundle_dir)
    seen = {}

    class FakeDense:
        def __init__(self, model, variables, scales, flip, preprocess):
            seen.update(model=model, scales=scales, flip=flip, preprocess=preprocess)

        def predict(self, images):
            seen["shapes"] = [im.shape for im in images]
            p = np.zeros((len(images), 1000), np.float32)
            p[:, 281] = 1.0
            return p

    fake = types.ModuleType("vgg_jax.protocols")
    fake.DenseEvaluator = FakeDense
    monkeypatch.setitem(sys.modules, "vgg_jax.protocols", fake)
    top = predict.predict(bundle, [image_files["rgb"]], dense=True)[0]
    assert top[0][:2] == (281, "tabby") and top[0][2] == 1.0
    assert seen["scales"] == [256, 384, 512] and seen["flip"] is True
    assert seen["preprocess"] == bundle.preprocessing and seen["shapes"] == [(300, 451, 3)]


def test_predict_with_a_greyscale_bundle(image_files, tmp_path):
    """A bundle adapted with --in-channels 1 classifies the image in grey, like its RGB source."""
    _, bundle_dir = tiny_torchvision_bundle(tmp_path)
    rgb = checkpoints.load_bundle(bundle_dir)
    grey = convert.adapt_bundle(rgb, in_channels=1)
    got = predict.predict(grey, [image_files["grey"]], top=3)[0]
    want = predict.predict(rgb, [image_files["grey"]], top=3)[0]
    # Equal up to conv1_1's border (zero padding now means black): same winner, close odds.
    assert got[0][0] == want[0][0]
    np.testing.assert_allclose(got[0][2], want[0][2], rtol=0.15)


# ---------------------------------------------------------------------------
# The source frameworks' preprocessing, to the pixel

# (width, height) -> torchvision Resize(256) size and CenterCrop(224) (left, top), worked by
# hand from the documented arithmetic: short side 256, long side int(256 * long / short)
# (truncated), offsets int(round((side - 224) / 2.0)) with Python's half-to-even round.
TORCHVISION_CASES = {
    (451, 300): ((384, 256), (80, 16)),  # 256 * 451 / 300 = 384.85 -> 384 (rounding gives 385)
    (300, 451): ((256, 384), (16, 80)),
    (257, 999): ((256, 995), (16, 386)),  # 255744 / 257 = 995.1; (995 - 224) / 2 = 385.5 -> 386
    (224, 224): ((256, 256), (16, 16)),
    (225, 225): ((256, 256), (16, 16)),
}


def _photo(width: int, height: int) -> Image.Image:
    return Image.fromarray(skimage.data.astronaut()).resize((width, height), Image.BICUBIC)


@pytest.mark.parametrize("size", sorted(TORCHVISION_CASES))
def test_torchvision_resize_and_centre_crop_arithmetic(size):
    (rw, rh), (left, top) = TORCHVISION_CASES[size]
    assert reference_preprocessing.torchvision_resized_size(*size, 256) == (rw, rh)
    assert reference_preprocessing.torchvision_crop_box(rw, rh, 224) == (
        left, top, left + 224, top + 224
    )  # fmt: skip
    image = _photo(*size)
    # torchvision on a PIL image: Image.resize(BILINEAR) (antialiased), then Image.crop.
    resized = image if (rw, rh) == size else image.resize((rw, rh), Image.BILINEAR)
    want = np.asarray(resized.crop((left, top, left + 224, top + 224)), np.float32) / 255
    np.testing.assert_array_equal(predict.central_crop(image, 224), want)


def test_keras_bundles_get_keras_load_img_squash(tmp_path):
    keras_utils = pytest.importorskip("keras").utils
    path = str(tmp_path / "photo.png")
    _photo(451, 300).save(path)
    bundle = types.SimpleNamespace(image_size=224, metadata={"source_format": "keras"})
    got = reference_preprocessing.reference_crop(image_io.open_image(path), bundle)
    want = keras_utils.img_to_array(keras_utils.load_img(path, target_size=(224, 224))) / 255
    np.testing.assert_array_equal(got * 255, want * 255)
    torchvision_like = types.SimpleNamespace(image_size=224, metadata={})
    other = reference_preprocessing.reference_crop(image_io.open_image(path), torchvision_like)
    assert other.shape == got.shape and np.abs(other - got).max() > 0.1  # a crop, not a squash


def test_predict_names_a_runs_classes(tmp_path, monkeypatch, image_files, capsys):
    """--weights takes a training run; names come from its dataset ("Bag", not "class 8")."""
    _, bundle_dir = tiny_torchvision_bundle(tmp_path)
    bundle = checkpoints.load_bundle(bundle_dir)
    bundle.options = dict(bundle.options)
    head = dict(bundle.variables["params"]["fc8"])
    head["kernel"], head["bias"] = head["kernel"][:, :10], np.eye(10, dtype=np.float32)[8] * 50
    bundle.variables["params"]["fc8"] = head
    bundle.options["num_classes"] = 10
    bundle.metadata = {"dataset": "fashion_mnist"}
    run = tmp_path / "run"
    run.mkdir()
    (run / checkpoints.CONFIG_FILE).write_text('{"dataset": "fashion_mnist"}')
    monkeypatch.setattr(checkpoints, "load_workdir", lambda workdir, which: bundle)
    assert predict.main([image_files["rgb"], "--weights", str(run), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "1. Bag " in out
    assert "the run's view: smallest side 224, central 224 crop" in out


@pytest.mark.parametrize("kind, channels", [("rgba", 3), ("grey", 1)])
def test_a_run_sees_images_as_its_validation_did(image_files, kind, channels):
    """predict's view of an image for a run is the trainer's central-crop validation view."""
    from vgg_jax import input_common

    path = image_files[kind]
    run = types.SimpleNamespace(
        image_size=64, metadata={"eval_scale": 72, "resize_method": "bilinear"}
    )
    image = image_io.open_image(path, channels)
    got = reference_preprocessing.reference_crop(image, run)
    with open(path, "rb") as f:
        want = input_common.eval_preprocess(f.read(), channels, 72, 64, "bilinear")
    assert got.shape == (64, 64, channels)
    np.testing.assert_allclose(got * 255, np.asarray(want), atol=1e-3)
    torchvision_like = types.SimpleNamespace(image_size=64, metadata={})
    other = reference_preprocessing.reference_crop(image, torchvision_like)
    assert np.abs(other - got).max() > 0.05  # not the torchvision crop
