"""Weight conversion: parity with a torch.nn.functional reference, round trips, adapting.

The reference networks get random weights (no download is possible here); the
layouts (key names, shapes, flatten orders) are the real frameworks'.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from weights_util import logits, photos, rel_err, tiny_bundle, top5

from vgg_jax import checkpoints, convert, models

torch = pytest.importorskip("torch", reason="parity tests need the `torch` extra")
F = torch.nn.functional


# ---------------------------------------------------------------------------
# torchvision: random state dicts with its key names and a functional reference


def torchvision_state(
    name: str,
    width_divisor: int = 1,
    fc_width: int = 4096,
    num_classes: int = 1000,
    seed: int = 0,
    zeros: bool = False,
) -> dict[str, np.ndarray]:
    """A random state dict with torchvision's keys and (for width_divisor=1) exact shapes."""
    rng = np.random.default_rng(seed)
    spec = models.get_spec(name)
    state, cin = {}, 3

    def he(shape, fan_in):
        if zeros:  # shapes only, allocated lazily
            return np.zeros(shape, np.float32)
        return (rng.standard_normal(shape, np.float32) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    layout = iter(convert.torchvision_layout(spec))
    for stage, kernels in enumerate(spec.stages):
        width = models.STAGE_WIDTHS[stage] // width_divisor
        for k in kernels:
            _, conv, bn = next(layout)
            state[f"features.{conv}.weight"] = he((width, cin, k, k), cin * k * k)
            state[f"features.{conv}.bias"] = rng.uniform(-0.1, 0.1, width).astype(np.float32)
            if bn is not None:
                state[f"features.{bn}.weight"] = rng.uniform(0.5, 1.5, width).astype(np.float32)
                state[f"features.{bn}.bias"] = rng.uniform(-0.2, 0.2, width).astype(np.float32)
                state[f"features.{bn}.running_mean"] = rng.normal(0, 0.5, width).astype(np.float32)
                state[f"features.{bn}.running_var"] = rng.uniform(0.5, 2, width).astype(np.float32)
                state[f"features.{bn}.num_batches_tracked"] = np.array(7, np.int64)
            cin = width
    fc_in = cin * 49
    for index, (n_in, n_out) in zip(
        (0, 3, 6), ((fc_in, fc_width), (fc_width, fc_width), (fc_width, num_classes)), strict=True
    ):
        state[f"classifier.{index}.weight"] = he((n_out, n_in), n_in)
        state[f"classifier.{index}.bias"] = rng.uniform(-0.1, 0.1, n_out).astype(np.float32)
    return state


def torch_reference(name: str, state: dict[str, np.ndarray], x_nhwc: np.ndarray) -> np.ndarray:
    """torchvision's VGG forward (eval mode) written with torch.nn.functional."""
    spec = models.get_spec(name)
    t = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
    layout = iter(convert.torchvision_layout(spec))
    with torch.no_grad():
        for kernels in spec.stages:
            for k in kernels:
                _, conv, bn = next(layout)
                x = F.conv2d(
                    x, t[f"features.{conv}.weight"], t[f"features.{conv}.bias"], padding=k // 2
                )
                if bn is not None:
                    p = f"features.{bn}."
                    stats = t[p + "running_mean"], t[p + "running_var"]
                    affine = t[p + "weight"], t[p + "bias"]
                    x = F.batch_norm(x, *stats, *affine, training=False, eps=1e-5)
                x = F.relu(x)
            x = F.max_pool2d(x, 2, 2)
        x = torch.flatten(F.adaptive_avg_pool2d(x, (7, 7)), 1)
        x = F.relu(F.linear(x, t["classifier.0.weight"], t["classifier.0.bias"]))
        x = F.relu(F.linear(x, t["classifier.3.weight"], t["classifier.3.bias"]))
        x = F.linear(x, t["classifier.6.weight"], t["classifier.6.bias"])
    return x.numpy()


@pytest.mark.parametrize("name", ["vgg16_bn"])
def test_torchvision_full_size_parity(name):
    """Exact torchvision shapes; the plain variants are covered at reduced width below."""
    state = torchvision_state(name)
    bundle = convert.from_torchvision(state)
    assert bundle.name == name and bundle.options["image_size"] == 224
    assert bundle.metadata["class_names"][281] == "tabby"  # for score_map, predict, ...
    pixels = photos()[:1]
    x = np.asarray(bundle.preprocessing(pixels.astype(np.float32) / 255.0))
    want = torch_reference(name, state, x)
    got = logits(bundle, pixels)
    assert rel_err(got, want) < 1e-5
    np.testing.assert_array_equal(top5(got), top5(want))
    # The full state dict comes back bit for bit (num_batches_tracked is not kept).
    back = convert.to_torchvision(bundle)
    assert set(back) == set(state)
    for key, value in state.items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(back[key], value, err_msg=key)


@pytest.mark.parametrize("name", convert.TORCHVISION_MODELS)
def test_torchvision_every_variant_small(name):
    """Every torchvision layer list (conv/BN indices), at reduced widths for speed."""
    state = torchvision_state(name, width_divisor=16, fc_width=32, num_classes=10, seed=1)
    bundle = convert.from_torchvision(state, model=name)
    x = np.random.default_rng(0).standard_normal((2, 224, 224, 3)).astype(np.float32)
    got = np.asarray(bundle.model.apply(bundle.variables, jnp.asarray(x)))
    want = torch_reference(name, state, x)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("image_size", [32, 64, 96])
def test_torchvision_adaptive_pool_folded_for_other_sizes(image_size):
    """At image_size != 224, FC1 absorbs torchvision's 7x7 adaptive pool exactly."""
    state = torchvision_state("vgg11_bn", width_divisor=16, fc_width=32, num_classes=10, seed=2)
    bundle = convert.from_torchvision(state, image_size=image_size)
    window = models.feature_map_size(image_size)
    assert bundle.variables["params"]["fc6"]["kernel"].shape[:2] == (window, window)
    x = np.random.default_rng(1).standard_normal((2, image_size, image_size, 3)).astype(np.float32)
    got = np.asarray(bundle.model.apply(bundle.variables, jnp.asarray(x)))
    assert rel_err(got, torch_reference("vgg11_bn", state, x)) < 1e-5


def test_dense_fc1_equals_window_conv_at_224():
    """DESIGN.md: the flattened-dense FC1 and the 7x7 VALID conv give the same numbers."""
    state = torchvision_state("vgg11", width_divisor=16, fc_width=32, num_classes=10, seed=3)
    bundle = convert.from_torchvision(state)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 224, 224, 3)), jnp.float32)
    dense = bundle.model.apply(bundle.variables, x)
    conv = bundle.model.apply(bundle.variables, x, method="score_map")
    assert conv.shape == (1, 1, 1, 10)
    np.testing.assert_allclose(conv[:, 0, 0], dense, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Round trips through files


def assert_same_variables(got: dict, want: dict) -> None:
    got, want = checkpoints._flatten(got), checkpoints._flatten(want)
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize(
    "name,image_size,channels",
    [("vgg13", 32, 3), ("vgg19_bn", 64, 3), ("vgg16", 224, 3), ("vgg11_bn", 32, 1)],
)
def test_export_import_round_trip_is_exact(tmp_path, name, image_size, channels, suffix):
    bundle = tiny_bundle(name, image_size)
    if channels == 1:  # a greyscale network: the file's conv1_1 gives its input channels
        bundle = convert.adapt_bundle(bundle, in_channels=1)
    path = str(tmp_path / f"w{suffix}")
    convert.write_torchvision_file(convert.to_torchvision(bundle), path)
    back = convert.convert_file(path)  # the window gives image_size
    assert back.name == name and back.options == bundle.options
    assert_same_variables(back.variables, bundle.variables)
    if channels == 1:
        assert back.preprocessing == convert.GREYSCALE_PREPROCESSING == bundle.preprocessing


def test_legacy_torch_format_as_torchvision_downloads_it(tmp_path):
    """torchvision's VGG files predate the zip format: torch.save's legacy layout."""
    state = torchvision_state("vgg11_bn", width_divisor=16, fc_width=32, num_classes=10)
    path = str(tmp_path / "vgg11_bn-8a4c8b4a.pth")
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    torch.save(tensors, path, _use_new_zipfile_serialization=False)
    bundle = convert.convert_file(path)
    back = convert.to_torchvision(bundle)
    np.testing.assert_array_equal(back["features.5.running_var"], state["features.5.running_var"])


def test_exported_pth_loads_with_weights_only(tmp_path):
    bundle = tiny_bundle("vgg11_bn", 224)
    path = str(tmp_path / "w.pth")
    convert.write_torchvision_file(convert.to_torchvision(bundle), path)
    state = torch.load(path, weights_only=True, map_location="cpu")
    assert state["features.1.num_batches_tracked"].dtype == torch.int64
    assert tuple(state["classifier.0.weight"].shape) == (32, 32 * 49)


def test_cli_convert_then_load_bundle_and_export(tmp_path):
    state = torchvision_state("vgg11", width_divisor=16, fc_width=32, num_classes=10)
    src = str(tmp_path / "vgg11.safetensors")
    convert.write_torchvision_file(state, src)
    out = str(tmp_path / "bundle")
    assert convert.main([src, "--to", out, "--model", "vgg11"]) == 0
    bundle = checkpoints.load_bundle(out)
    assert bundle.preprocessing == convert.TORCHVISION_PREPROCESSING
    exported = str(tmp_path / "again.safetensors")
    assert convert.main([out, "--export-torchvision", exported]) == 0
    again = convert.read_torchvision_file(exported)
    for key, value in state.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)
    assert convert.main([src, "--to", out, "--model", "vgg11"]) == 0  # a bundle is replaced


def test_cli_refuses_to_write_a_bundle_into_a_directory_of_other_files(tmp_path, capsys):
    # A bundle written into a training run would hide the run (its bundle.json is read first).
    state = torchvision_state("vgg11", width_divisor=16, fc_width=32, num_classes=10)
    src = str(tmp_path / "vgg11.safetensors")
    convert.write_torchvision_file(state, src)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert convert.main([src, "--to", str(run)]) == 1
    assert "holds other files and is not a vgg_jax bundle" in capsys.readouterr().err
    assert sorted(os.listdir(run)) == ["config.json"]
    (tmp_path / "empty").mkdir()
    assert convert.main([src, "--to", str(tmp_path / "empty")]) == 0


# ---------------------------------------------------------------------------
# Training runs


@pytest.fixture(scope="module")
def grey_run(tmp_path_factory) -> str:
    """A tiny 1-channel run recording Fashion-MNIST (its class names), trained 2 steps."""
    import fake_data

    from vgg_jax import train

    workdir = str(tmp_path_factory.mktemp("grey_run"))
    config = fake_data.tiny_config(
        dataset="fashion_mnist", max_steps=2, value_range=1.0, mean_rgb=(0.286,), std_rgb=(0.353,)
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fake_data, "CHANNELS", 1)
        train.train_and_evaluate(config, workdir, data=fake_data.data())
    return workdir


def test_cli_converts_a_run_to_a_bundle_that_predicts_like_it(grey_run, tmp_path, capsys):
    """--to takes a training run: its best variables, preprocessing, view and class names."""
    from vgg_jax import predict, pretrained

    out = str(tmp_path / "bundle")
    assert convert.main([grey_run, "--to", out]) == 0
    run, bundle = pretrained.resolve(grey_run), checkpoints.load_bundle(out)
    assert_same_variables(bundle.variables, run.variables)
    assert bundle.preprocessing == run.preprocessing
    assert bundle.metadata["class_names"][8] == "Bag"
    image = str(tmp_path / "shoe.png")
    Image.fromarray(photos(40)[0]).convert("L").save(image)
    capsys.readouterr()
    assert predict.main([image, "--weights", grey_run]) == 0
    from_run = capsys.readouterr().out
    assert predict.main([image, "--weights", out]) == 0
    assert capsys.readouterr().out == from_run and "the run's view" in from_run


def test_cli_run_to_bundle_options(grey_run, tmp_path, capsys):
    """--image-size adapts a run as it does a bundle; --which picks its state."""
    from vgg_jax import pretrained

    out = str(tmp_path / "b64")
    assert convert.main([grey_run, "--to", out, "--image-size", "64", "--which", "latest"]) == 0
    run, bundle = pretrained.resolve(grey_run, "latest"), checkpoints.load_bundle(out)
    assert_same_variables(bundle.variables, convert.adapt_bundle(run, image_size=64).variables)
    assert bundle.metadata["which"] == "latest" and bundle.image_size == 64
    assert bundle.metadata["eval_scale"] == 2 * run.metadata["eval_scale"]  # the same view
    assert convert.main([grey_run, "--to", str(tmp_path / "b"), "--in-channels", "1"]) == 1
    err = capsys.readouterr().err
    assert "greyscale already" in err and len(err.strip().splitlines()) == 1
    other = tmp_path / "notes"
    other.mkdir()
    (other / "a.txt").write_text("")
    assert convert.main([str(other), "--to", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert "is neither a model bundle" in err and len(err.strip().splitlines()) == 1


def test_cli_grey_run_exports_and_imports_back(grey_run, tmp_path):
    """run -> --export-torchvision -> --to: the 1-channel conv1_1 is read off the file."""
    from vgg_jax import pretrained

    exported, back = str(tmp_path / "fm.safetensors"), str(tmp_path / "back")
    assert convert.main([grey_run, "--export-torchvision", exported]) == 0
    assert convert.main([exported, "--to", back]) == 0
    bundle = checkpoints.load_bundle(back)
    assert_same_variables(bundle.variables, pretrained.resolve(grey_run).variables)
    assert bundle.preprocessing == convert.GREYSCALE_PREPROCESSING


# ---------------------------------------------------------------------------
# Files that are not what they claim


@pytest.fixture(scope="module")
def small_vgg16_file(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tv") / "vgg16.safetensors")
    convert.write_torchvision_file(
        torchvision_state("vgg16", width_divisor=16, fc_width=32, num_classes=10), path
    )
    return path


def test_wrong_architecture_is_named(small_vgg16_file):
    with pytest.raises(convert.ConversionError, match="holds a vgg16.*not a vgg19"):
        convert.convert_file(small_vgg16_file, model="vgg19")
    with pytest.raises(convert.ConversionError, match="holds a vgg16.*not a vgg16_bn"):
        convert.convert_file(small_vgg16_file, model="vgg16_bn")


def test_missing_key_is_named(tmp_path):
    state = torchvision_state("vgg16", width_divisor=16, fc_width=32, num_classes=10)
    del state["classifier.3.bias"]
    with pytest.raises(convert.ConversionError, match=r"missing.*classifier\.3\.bias"):
        convert.from_torchvision(state)


def test_wrong_shape_is_named_by_the_files_key():
    state = torchvision_state("vgg16", width_divisor=16, fc_width=32, num_classes=10)
    state["features.2.weight"] = state["features.2.weight"][:, :3]  # conv1_2: (4, 4, 3, 3)
    with pytest.raises(convert.ConversionError) as e:
        convert.from_torchvision(state)
    assert r"features.2.weight has shape (4, 3, 3, 3), expected (4, 4, 3, 3)" in str(e.value)
    state = torchvision_state("vgg16", width_divisor=16, fc_width=32, num_classes=10)
    state["classifier.3.bias"] = state["classifier.3.bias"][:7]
    with pytest.raises(convert.ConversionError, match=r"classifier.3.bias has shape \(7,\), exp"):
        convert.from_torchvision(state)


def test_truncated_files_are_named(tmp_path, small_vgg16_file):
    data = open(small_vgg16_file, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(convert.ConversionError, match="damaged or truncated safetensors"):
        convert.convert_file(str(cut))
    pth = tmp_path / "w.pth"
    torch.save({k: torch.zeros(2) for k in ("a", "b")}, str(pth))
    data = pth.read_bytes()
    pth.write_bytes(data[: len(data) // 2])
    with pytest.raises(convert.ConversionError, match="could not be read as a PyTorch"):
        convert.convert_file(str(pth))


def test_not_a_weights_file(tmp_path, small_vgg16_file):
    junk = tmp_path / "notes.pth"
    junk.write_text("these are not weights\n")
    with pytest.raises(convert.ConversionError, match="not a weights file.*Formats read: torch"):
        convert.convert_file(str(junk))
    with pytest.raises(convert.ConversionError, match="is a safetensors file, not a keras file"):
        convert.convert_file(small_vgg16_file, fmt="keras")
    with pytest.raises(FileNotFoundError):
        convert.convert_file(str(tmp_path / "absent.pth"))


class _NotATensor:
    pass


class _RunsAShellCommand:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


@pytest.mark.parametrize("zipped", [True, False])
def test_files_holding_code_are_refused_by_name(tmp_path, zipped):
    """The pickle's globals are read from its opcodes; nothing is unpickled, no unsafe advice."""
    path = tmp_path / "evil.pth"
    torch.save({"w": _RunsAShellCommand()}, str(path), _use_new_zipfile_serialization=zipped)
    with pytest.raises(convert.ConversionError) as e:
        convert.convert_file(str(path))
    assert "holds code, not only tensors (`posix.system`): refused" in str(e.value)
    assert "weights_only" not in str(e.value)
    torch.save({"features.0.weight": _NotATensor()}, str(path))
    with pytest.raises(convert.ConversionError, match=r"\(`test_convert._NotATensor`\): refused"):
        convert.convert_file(str(path))


def test_cli_reports_errors(tmp_path, small_vgg16_file, capsys):
    assert convert.main([small_vgg16_file, "--to", str(tmp_path / "b"), "--model", "vgg19"]) == 1
    assert "not a vgg19" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "b")


# ---------------------------------------------------------------------------
# Adapting converted weights for fine-tuning (greyscale input, another image size)


def test_adapt_to_greyscale_folds_the_preprocessing_into_conv1_1():
    state = torchvision_state("vgg11_bn", width_divisor=16, fc_width=32, num_classes=10)
    rgb = convert.from_torchvision(state)
    grey = convert.adapt_bundle(rgb, in_channels=1)
    assert grey.variables["params"]["features"]["conv1_1"]["kernel"].shape == (3, 3, 1, 4)
    assert grey.preprocessing == checkpoints.Preprocessing("RGB", 1.0, (0.0,), (1.0,))
    g = photos(64)[:1].mean(-1, keepdims=True).astype(np.float32) / 255.0
    from vgg_jax.features import features

    want = features(rgb, None, np.repeat(g, 3, axis=-1), ("conv1_1",))["conv1_1"]
    got = features(grey, None, g, ("conv1_1",))["conv1_1"]
    # Equal away from the one-pixel border, where zero padding now means black.
    np.testing.assert_allclose(got[:, 1:-1, 1:-1], want[:, 1:-1, 1:-1], rtol=1e-4, atol=1e-4)
    assert not np.allclose(got[:, 0], want[:, 0], atol=1e-3)


def test_adapt_image_size_equals_torchvision_at_that_size(tmp_path):
    state = torchvision_state("vgg13", width_divisor=16, fc_width=32, num_classes=10)
    src = str(tmp_path / "w.safetensors")
    convert.write_torchvision_file(state, src)
    assert convert.main([src, "--to", str(tmp_path / "b224")]) == 0
    argv = [str(tmp_path / "b224"), "--to", str(tmp_path / "b64"), "--image-size", "64"]
    assert convert.main(argv + ["--in-channels", "1"]) == 0
    adapted = checkpoints.load_bundle(tmp_path / "b64")
    assert adapted.image_size == 64 and adapted.preprocessing.mean == (0.0,)
    direct = convert.from_torchvision(state, image_size=64)
    np.testing.assert_allclose(
        adapted.variables["params"]["fc6"]["kernel"],
        direct.variables["params"]["fc6"]["kernel"],
        rtol=1e-6,
        atol=1e-7,
    )


def test_finetune_config_fits_an_adapted_bundle():
    """configs/finetune_fashion_mnist.py's model accepts the bundle its docstring makes."""
    from vgg_jax import configuration

    ft = configuration.load_config_module("configs/finetune_fashion_mnist.py")
    default = configuration.default_config()
    bundle = convert.from_torchvision(torchvision_state("vgg16", zeros=True))
    for variant in ft.VARIANTS:
        config = ft.get_config(variant)
        assert set(config.keys()) <= set(default.keys())
        adapted = convert.adapt_bundle(bundle, in_channels=1, image_size=config.image_size)
        model = models.create_model(
            config.model,
            num_classes=1000,  # the bundle's head; the trainer re-initialises fc8
            width_divisor=config.width_divisor,
            fc_width=config.fc_width,
            image_size=config.image_size,
        )
        checkpoints.check_variables(model, adapted.variables, channels=1)
        p = adapted.preprocessing
        assert (p.value_range, p.mean, p.std) == (
            config.value_range,
            tuple(config.mean_rgb),
            tuple(config.std_rgb),
        )
