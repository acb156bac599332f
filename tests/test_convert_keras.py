"""Keras weights: parity with the real keras.applications models in all three file formats.

The models get random weights (no download is possible here); the files are
the ones Keras itself writes (legacy .h5, Keras 3 .weights.h5, .keras).
"""

from __future__ import annotations

import numpy as np
import pytest
from weights_util import logits, photos, rel_err, tiny_bundle, top5

from vgg_jax import checkpoints, convert, convert_keras, models

# Keras's TensorFlow backend converts with np.array(x, copy=False) on every predict.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module", params=["VGG16", "VGG19"])
def keras_files(request, tmp_path_factory):
    """(name, photos, keras logits on them, legacy .h5, Keras 3 .weights.h5, .keras archive)."""
    keras = pytest.importorskip("keras")
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    keras.utils.set_random_seed(0)
    net = getattr(keras.applications, request.param)(weights=None, classifier_activation=None)
    directory = tmp_path_factory.mktemp(request.param)
    v3 = str(directory / "w.weights.h5")
    legacy = str(directory / "w.h5")
    net.save_weights(v3)
    archive = str(directory / "w.keras")
    net.save(archive)  # a zip holding config.json and model.weights.h5
    with h5py.File(legacy, "w") as f:  # the layout keras.applications downloads
        legacy_h5_format.save_weights_to_hdf5_group(f, net)
    preprocess = getattr(keras.applications, request.param.lower()).preprocess_input
    pixels = photos()[:2]
    want = np.asarray(net.predict(preprocess(pixels.astype(np.float32)), verbose=0))
    del net
    keras.backend.clear_session()
    return request.param.lower(), pixels, want, legacy, v3, archive


@pytest.mark.parametrize("file_format", ["legacy", "v3", "keras"])
def test_keras_parity(keras_files, file_format):
    name, pixels, want, legacy, v3, archive = keras_files
    path = {"legacy": legacy, "v3": v3, "keras": archive}[file_format]
    bundle = convert.convert_file(path, model=name)
    assert bundle.name == name and bundle.preprocessing == convert_keras.KERAS_PREPROCESSING
    got = logits(bundle, pixels)
    assert rel_err(got, want) < 1e-5
    np.testing.assert_array_equal(top5(got), top5(want))


def test_keras_wrong_model_and_notop(keras_files, tmp_path):
    name, _, _, legacy, _, _ = keras_files
    other = "vgg19" if name == "vgg16" else "vgg16"
    with pytest.raises(convert.ConversionError, match=f"holds a {name}.*not a {other}"):
        convert.convert_file(legacy, model=other)
    import h5py

    notop = str(tmp_path / "notop.h5")
    with h5py.File(legacy) as src, h5py.File(notop, "w") as dst:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in src.attrs["layer_names"]]
        names = [n for n in names if not n.startswith(("fc", "pred"))]
        dst.attrs["layer_names"] = np.array([n.encode() for n in names])
        for n in names:
            src.copy(src[n], dst, n)
    with pytest.raises(convert.ConversionError, match="include_top=False.*--features-only"):
        convert.convert_file(notop)
    # --features-only: the conv layers as they are, a placeholder head, marked features-only.
    features = convert.convert_file(notop, features_only=True)
    full = convert.convert_file(legacy)
    assert features.metadata["features_only"] and features.num_classes == 1
    for layer, arrays in full.variables["params"]["features"].items():
        got = features.variables["params"]["features"][layer]["kernel"]
        np.testing.assert_array_equal(got, arrays["kernel"])
    data = open(legacy, "rb").read(4096)
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data)
    with pytest.raises(convert.ConversionError, match="truncated"):
        convert.convert_file(str(cut))


@pytest.mark.parametrize("wrapped", [False, True])
def test_keras2_cached_layout_with_tensor_suffixes(tmp_path, wrapped):
    """The file keras.applications downloads was written by Keras 2: 'kernel:0' names.

    `wrapped`: a whole-model .h5 (model.save) keeps the same groups under 'model_weights'.
    """
    import h5py

    source = tiny_bundle("vgg19", 224)
    params = source.variables["params"]
    names = models.conv_layer_names(models.get_spec("vgg19"))
    keras_names = [f"block{n[4]}_conv{n[6]}" for n in names] + ["fc1", "fc2", "predictions"]
    arrays = [params["features"][n] for n in names] + [
        {"kernel": params["fc6"]["kernel"].reshape(-1, 32), "bias": params["fc6"]["bias"]},
        params["fc7"],
        params["fc8"],
    ]
    path = str(tmp_path / "keras2.h5")
    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights") if wrapped else f
        root.attrs["layer_names"] = np.array([b"input_1"] + [n.encode() for n in keras_names])
        root.create_group("input_1").attrs["weight_names"] = np.array([], dtype="S1")
        for name, layer in zip(keras_names, arrays, strict=True):
            g = root.create_group(name)
            g.attrs["weight_names"] = np.array(
                [f"{name}/kernel:0".encode(), f"{name}/bias:0".encode()]
            )
            g.create_dataset(f"{name}/kernel:0", data=layer["kernel"])
            g.create_dataset(f"{name}/bias:0", data=layer["bias"])
    bundle = convert.convert_file(path, model="vgg19")
    want, got = checkpoints._flatten(source.variables), checkpoints._flatten(bundle.variables)
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
