"""The paper's test protocols: dense, multi-crop, fusion, ensembles, exact counting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgg_jax import checkpoints, models
from vgg_jax import evaluate as ev

SIZE = 32
OPTIONS = dict(num_classes=10, width_divisor=16, fc_width=32, image_size=SIZE)


@pytest.fixture(scope="module")
def net():
    model = models.create_model("A", **OPTIONS)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
    # Non-zero biases, so that zero padding is not accidentally harmless.
    rng = np.random.default_rng(0)
    variables = jax.tree.map(
        lambda x: np.asarray(x) + np.float32(0.05) * rng.standard_normal(x.shape, np.float32),
        variables,
    )
    return model, variables


def images(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.random((h, w, 3), dtype=np.float32) for h, w in shapes]


def plain_softmax(model, variables, x, preprocess=lambda x: x):
    apply = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, preprocess(x))))
    return np.asarray(apply(variables, jnp.asarray(x)))


def score_map(model, variables, x):
    """The network's own score map of one unpadded image (1, H', W', classes)."""
    return jax.jit(lambda v, x: model.apply(v, x, method="score_map"))(variables, x)


def unpadded_dense(model, variables, image, scales, flip):
    """The dense protocol written out for one image at its own size: the reference."""
    probs = []
    for q in scales:
        im = ev.resize_image(image, *ev.rescaled_size(*image.shape[:2], q))
        for x in [im, im[:, ::-1]] if flip else [im]:
            scores = score_map(model, variables, jnp.asarray(x[None]))
            probs.append(jax.nn.softmax(scores.mean(axis=(1, 2)))[0])
    return np.mean(probs, axis=0)


def test_dense_at_training_size_equals_plain_network(net):
    model, variables = net
    x = np.stack(images([(SIZE, SIZE)] * 3))
    pre = checkpoints.Preprocessing(mean=(0.4, 0.5, 0.6), value_range=1.0, std=(0.2, 0.3, 0.4))
    dense = ev.DenseEvaluator(model, variables, scales=(SIZE,), flip=False, preprocess=pre)
    np.testing.assert_allclose(
        dense.predict(x), plain_softmax(model, variables, x, pre), rtol=1e-5, atol=1e-6
    )


def test_padding_never_leaks_into_the_average(net, monkeypatch):
    """Bucketed, padded, batched evaluation equals each image run alone at its own size."""
    model, variables = net
    shapes = [(32, 32), (40, 70), (70, 45), (33, 50)]  # 2 share a bucket
    imgs = images(shapes, seed=1)
    dense = ev.DenseEvaluator(model, variables, scales=(32, 40), flip=True, batch_size=2)
    got = dense.predict(imgs)
    want = np.stack([unpadded_dense(model, variables, im, (32, 40), True) for im in imgs])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert {dense.bucket_shape(*im.shape[:2]) for im in imgs} != {(32, 32)}  # padding happened

    # Without the per-layer masks the border activations read the padding: the test has teeth.
    monkeypatch.setattr(ev, "_masking_interceptor", lambda *a: lambda f, a2, k, c: f(*a2, **k))
    ev._dense_fn.cache_clear()  # jitted functions are shared per network: trace again
    try:
        leaky = ev.DenseEvaluator(model, variables, scales=(32, 40), flip=True, batch_size=4)
        assert np.abs(leaky.predict(imgs[1:3]) - want[1:3]).max() > 1e-4
    finally:
        ev._dense_fn.cache_clear()


def test_score_maps_have_the_unpadded_shape(net):
    model, variables = net
    imgs = images([(32, 96), (64, 40)])
    dense = ev.DenseEvaluator(model, variables, scales=(32, 64), flip=False)
    maps = dense.score_maps(imgs)
    for im, per_scale in zip(imgs, maps, strict=True):
        for q, m in per_scale.items():
            x = ev.resize_image(im, *ev.rescaled_size(*im.shape[:2], q))
            want = score_map(model, variables, jnp.asarray(x[None]))[0]
            np.testing.assert_allclose(m, want, rtol=1e-5, atol=1e-5)


def test_compilations_bounded_by_buckets():
    # A network of its own, so that the jit cache (shared per network) starts empty.
    model = models.create_model("A", **{**OPTIONS, "fc_width": 24})
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
    rng = np.random.default_rng(2)
    # 12 images of 12 different sizes with smallest side 32: long side 32..63 -> 1 or 2 buckets.
    shapes = [
        (32, int(w)) if i % 2 else (int(w), 32) for i, w in enumerate(rng.integers(32, 64, 12))
    ]
    dense = ev.DenseEvaluator(model, variables, scales=(SIZE,), flip=False, batch_size=4)
    dense.predict(images(shapes))
    buckets = {dense.bucket_shape(h, w) for h, w in shapes}
    assert len(buckets) < len(set(shapes))
    # Per bucket: full batches of 8 rows (4 images, on 8 devices) and a short last chunk.
    assert len(buckets) <= dense.compiled_shapes <= 2 * len(buckets)
    assert dense._predict_fn._cache_size() == dense.compiled_shapes
    compiled = dense.compiled_shapes
    dense.predict(images(shapes, seed=3))  # the same sizes again: nothing new is compiled
    assert dense._predict_fn._cache_size() == dense.compiled_shapes == compiled


def test_multicrop_1x1_at_training_size_is_the_central_crop(net):
    model, variables = net
    imgs = images([(32, 48), (56, 32), (32, 32)])
    mc = ev.MultiCropEvaluator(model, variables, scales=(SIZE,), grid=1, flip=False)
    centres = []
    for im in imgs:
        y, x = (im.shape[0] - SIZE) // 2, (im.shape[1] - SIZE) // 2
        centres.append(im[y : y + SIZE, x : x + SIZE])
    want = plain_softmax(model, variables, np.stack(centres))
    np.testing.assert_allclose(mc.predict(imgs), want, rtol=1e-5, atol=1e-6)


def test_multicrop_averages_every_crop_of_every_scale(net):
    model, variables = net
    (im,) = images([(32, 40)])
    mc = ev.MultiCropEvaluator(model, variables, scales=(32, 48), grid=2, flip=True, batch_size=3)
    assert mc.crops_per_image == 16
    crops = []
    for q in (32, 48):
        r = ev.resize_image(im, *ev.rescaled_size(32, 40, q))
        for y in ev.crop_offsets(r.shape[0], SIZE, 2):
            for x in ev.crop_offsets(r.shape[1], SIZE, 2):
                c = r[y : y + SIZE, x : x + SIZE]
                crops += [c, c[:, ::-1]]
    want = plain_softmax(model, variables, np.stack(crops)).mean(axis=0)
    np.testing.assert_allclose(mc.predict([im])[0], want, rtol=1e-5, atol=1e-6)


def test_crop_grid_is_mirror_symmetric_and_inside():
    for length, grid in [(256, 5), (341, 5), (225, 3), (224, 5), (300, 1)]:
        offsets = ev.crop_offsets(length, 224, grid)
        assert all(0 <= o <= length - 224 for o in offsets)
        assert sorted(length - 224 - o for o in offsets[: grid // 2]) == sorted(
            offsets[grid - grid // 2 :]
        )
    assert ev.crop_offsets(256, 224, 5) == [0, 8, 16, 24, 32]
    with pytest.raises(ValueError, match="crops"):
        ev.crop_offsets(200, 224, 5)


def test_flip_of_symmetric_image_changes_nothing(net):
    model, variables = net
    imgs = images([(32, 48), (40, 40)], seed=4)
    symmetric = [(im + im[:, ::-1]) / 2 for im in imgs]
    for cls, kw in [(ev.DenseEvaluator, {}), (ev.MultiCropEvaluator, {"grid": 3})]:
        with_flip = cls(model, variables, scales=(32, 40), flip=True, **kw).predict(symmetric)
        without = cls(model, variables, scales=(32, 40), flip=False, **kw).predict(symmetric)
        np.testing.assert_allclose(with_flip, without, rtol=1e-5, atol=1e-6)
        # ...while an ordinary image's flip does change the scores.
        assert not np.allclose(
            cls(model, variables, scales=(32,), flip=True, **kw).predict(imgs),
            cls(model, variables, scales=(32,), flip=False, **kw).predict(imgs),
        )


def test_ensemble_of_one_checkpoint_twice_equals_it(net, tmp_path):
    model, variables = net
    pre = checkpoints.Preprocessing(mean=(0.5, 0.5, 0.5), value_range=1.0)
    checkpoints.save_bundle(
        tmp_path / "m", checkpoints.ModelBundle("vgg11", OPTIONS, variables, pre)
    )
    members = [ev.Member.from_bundle(checkpoints.load_bundle(tmp_path / "m")) for _ in range(2)]
    imgs = images([(32, 40), (48, 32)], seed=5)
    for mode in ("dense", "both"):
        kw = dict(scales=(32, 40), grid=2, batch_size=2)
        single = ev.build_evaluator(members[0], mode, **kw).predict(imgs)
        both = ev.Ensemble.from_members(members, mode, **kw).predict(imgs)
        np.testing.assert_array_equal(both, single)
    # And a different second network does change the ensemble.
    other = ev.Member(model, jax.tree.map(lambda x: -x, variables), pre)
    mixed = ev.Ensemble.from_members([members[0], other], "dense", scales=(32,)).predict(imgs)
    assert not np.allclose(mixed, ev.build_evaluator(members[0], "dense", (32,)).predict(imgs))


def test_fusion_is_the_average_of_dense_and_multicrop(net):
    model, variables = net
    imgs = images([(32, 40)], seed=6)
    dense = ev.DenseEvaluator(model, variables, scales=(32, 40))
    mc = ev.MultiCropEvaluator(model, variables, scales=(32, 40), grid=2)
    fused = ev.FusedEvaluator(dense, mc).predict(imgs)
    np.testing.assert_allclose(fused, (dense.predict(imgs) + mc.predict(imgs)) / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="shapes"):
        ev.fuse(np.zeros((2, 10)), np.zeros((2, 5)))


def _batches(imgs, labels, batch, pad_to):
    """(ImageSet, labels, mask) batches with padding entries at the end, as a pipeline gives."""
    n = len(imgs)
    blank = np.zeros_like(imgs[0])
    for start in range(0, pad_to, batch):
        idx = range(start, min(start + batch, pad_to))
        ims = [imgs[i] if i < n else blank for i in idx]
        lab = np.asarray([labels[i] if i < n else 0 for i in idx])
        yield ev.ImageSet(ims), lab, np.asarray([i < n for i in idx])


@pytest.mark.parametrize("num_devices,batch", [(1, 4), (8, 3), (8, 16)])
def test_exact_counting_on_any_device_count(net, num_devices, batch):
    model, variables = net
    n = 13  # not divisible by any batch size used here
    x = np.stack(images([(SIZE, SIZE)] * n, seed=7))
    labels = np.random.default_rng(8).integers(0, 10, n)
    probs = plain_softmax(model, variables, x)
    ranks = np.argsort(-probs, axis=1)
    want_top1 = int((ranks[:, 0] != labels).sum())
    want_top5 = int((~(ranks[:, :5] == labels[:, None]).any(1)).sum())
    assert 0 < want_top1 < n  # the reference itself has both outcomes

    devices = jax.devices()[:num_devices]
    protocols = ev.ProtocolSet.build(
        [ev.Member(model, variables)],
        "dense",
        (SIZE,),
        flip=False,
        batch_size=batch,
        devices=devices,
    )
    assert protocols.dense[0]._devices.count == num_devices
    results = ev.evaluate_batches(protocols, _batches(list(x), labels, batch, n + 5))
    counts = results[ev.Row("dense", (SIZE,))]
    assert (counts.count, counts.top1_wrong, counts.top5_wrong) == (n, want_top1, want_top5)

    limited = ev.evaluate_batches(protocols, _batches(list(x), labels, batch, n), limit=6)
    assert limited[ev.Row("dense", (SIZE,))].count == 6


def test_error_counts_by_hand():
    probs = np.asarray([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5], [0.9, 0.05, 0.05]])
    counts = ev.ErrorCounts()
    counts.update(probs, np.asarray([1, 2, 0, 1]), np.asarray([True, True, True, False]))
    assert (counts.count, counts.top1_wrong, counts.top5_wrong) == (3, 2, 0)
    assert counts.top1_error == pytest.approx(2 / 3)


def test_rows_of_every_mode(net):
    model, variables = net
    protocols = ev.ProtocolSet.build([ev.Member(model, variables)], "both", (32, 40), grid=2)
    rows = protocols.predict_rows(images([(32, 36)]))
    assert list(rows) == protocols.rows()
    assert [r.label for r in rows] == [
        "dense Q=32",
        "dense Q=40",
        "dense Q=32,40",
        "multi-crop Q=32",
        "multi-crop Q=40",
        "multi-crop Q=32,40",
        "multi-crop & dense Q=32,40",
    ]
    for p in rows.values():
        np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=1e-5)


def test_bad_input_is_refused_clearly(net):
    model, variables = net
    with pytest.raises(ValueError, match="smaller than the model's image_size"):
        ev.DenseEvaluator(model, variables, scales=(16, 32))
    with pytest.raises(ValueError, match="batch axis"):
        ev.DenseEvaluator(model, variables, scales=(32,)).predict(np.zeros((32, 32, 3)))
    with pytest.raises(ValueError, match="multiple of 32"):
        ev.DenseEvaluator(model, variables, bucket_multiple=48)
    with pytest.raises(ValueError, match="mode"):
        ev.build_evaluator(ev.Member(model, variables), "tencrop")


def test_paper_scales():
    import ml_collections

    c = ml_collections.ConfigDict(dict(train_scale_min=256, train_scale_max=512, image_size=224))
    assert ev.paper_scales(c) == (256, 384, 512)
    c.train_scale_max = 256
    assert ev.paper_scales(c) == (224, 256, 288)


# ---------------------------------------------------------------------------
# Command-line tools.


def save_bundle(path, channels, seed=0, **metadata):
    model = models.create_model("A", **OPTIONS)
    variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, SIZE, SIZE, channels)))
    pre = checkpoints.Preprocessing(mean=(0.3,) * channels, value_range=1.0, std=(0.3,) * channels)
    bundle = checkpoints.ModelBundle("vgg11", OPTIONS, dict(variables), pre, metadata)
    return checkpoints.save_bundle(path, bundle)


def test_score_map_cli_writes_heat_maps(tmp_path, capsys):
    from PIL import Image
    from skimage import data

    from vgg_jax import image_io, score_map

    photo = tmp_path / "cat.jpg"
    Image.fromarray(data.chelsea()).resize((90, 60)).save(photo)
    names = [f"thing{i}" for i in range(10)]
    bundle = save_bundle(tmp_path / "grey", channels=1, class_names=names)
    out = score_map.main([str(photo), "--checkpoint", bundle, "--scale", "64", "--top", "2",
                          "--output", str(tmp_path / "maps.png")])  # fmt: skip
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size[0] > png.size[1]
    printed = capsys.readouterr().out
    assert sum(name in printed for name in names) == 2

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(photo.read_bytes()[:300])
    with pytest.raises(ValueError, match="broken.jpg"):
        image_io.load_image(broken)
    assert image_io.load_image(photo, channels=1).shape == (60, 90, 1)


def test_evaluate_cli_on_fashion_mnist(tmp_path, capsys):
    pytest.importorskip(
        "vgg_jax.input_pipeline", reason="the input pipeline (issue 3) is not merged yet"
    )
    import json

    a = save_bundle(tmp_path / "a", channels=1, seed=0)
    output = tmp_path / "results.json"
    argv = "--dataset fashion_mnist --split test --limit 10 --batch-size 4 --scales 32,40"
    argv = [*argv.split(), "--mode", "both", "--grid", "2", "--output", str(output)]
    single = ev.main(["--checkpoint", a, *argv])
    table = capsys.readouterr().out
    assert "| multi-crop & dense | 32,40 |" in table
    result = json.loads(output.read_text())
    assert [r["count"] for r in result["rows"]] == [10] * 7
    assert result["compiled_shapes"] >= 1
    twice = ev.main(["--checkpoint", a, "--checkpoint", a, *argv])
    assert twice["rows"] == single["rows"]


# ---------------------------------------------------------------------------
# A small trained network evaluated with every protocol.

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def fashion_mnist(split, n):
    """The first n examples of real Fashion-MNIST (Debian's IDX files), pixels in [0, 1]."""
    import gzip
    import os

    path = os.path.join(FASHION_DIR, f"{split}-images-idx3-ubyte.gz")
    if not os.path.isfile(path):
        pytest.skip(f"needs Debian's dataset-fashion-mnist ({FASHION_DIR}); .ci/run installs it")
    with gzip.open(path) as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)[:n]
    with gzip.open(os.path.join(FASHION_DIR, f"{split}-labels-idx1-ubyte.gz")) as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)[:n]
    return x.astype(np.float32) / 255, y.astype(np.int32)


def train_small_vgg(steps=400, batch=64, seed=0):
    """VGG-A (widths / 8, FC 64, 32 px) trained briefly with scale jitter S in {32, 48, 64}."""
    import optax
    import tensorflow as tf

    x, y = fashion_mnist("train", 6000)
    model = models.create_model(
        "A", num_classes=10, width_divisor=8, fc_width=64, image_size=SIZE, dropout_rate=0.0
    )
    params = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, SIZE, SIZE, 1)))["params"]
    pre = checkpoints.Preprocessing(mean=(0.3,), value_range=1.0, std=(0.3,))
    tx = optax.adam(2e-3)

    @jax.jit
    def step(params, opt, xb, yb):
        def loss(p):
            logits = model.apply({"params": p}, pre(xb))
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        grads = jax.grad(loss)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    rescaled = {s: tf.image.resize(x, (s, s)).numpy() for s in (32, 48, 64)}
    rng, opt = np.random.default_rng(seed), tx.init(params)
    for _ in range(steps):
        s = int(rng.choice(list(rescaled), p=[0.5, 0.25, 0.25]))
        oy, ox = rng.integers(0, s - SIZE + 1, 2)
        idx = rng.integers(0, len(x), batch)
        xb = rescaled[s][idx, oy : oy + SIZE, ox : ox + SIZE]
        params, opt = step(params, opt, xb[:, :, ::-1] if rng.random() < 0.5 else xb, y[idx])
    return ev.Member(model, {"params": params}, pre)


def test_trained_network_in_every_mode():
    member = train_small_vgg()
    x, y = fashion_mnist("t10k", 200)
    single = ev.MultiCropEvaluator(
        member.model, member.variables, (SIZE,), grid=1, flip=False, preprocess=member.preprocess
    )
    baseline = ev.ErrorCounts()
    baseline.update(single.predict(list(x)), y)
    protocols = ev.ProtocolSet.build([member], "both", (32, 64), grid=3, batch_size=32)
    results = ev.evaluate_batches(protocols, [(ev.ImageSet(list(x)), y, np.ones(len(y), bool))])
    print(ev.format_table(results, f"single crop top-1 error {baseline.top1_error:.3f}"))

    assert baseline.top1_error < 0.45  # it learned something (chance: 0.9)
    noise = 3 * np.sqrt(baseline.top1_error * (1 - baseline.top1_error) / len(y))
    for row in [("dense", (32, 64)), ("multi-crop", (32, 64)), ("multi-crop & dense", (32, 64))]:
        counts = results[ev.Row(*row)]
        assert counts.count == len(y)
        assert counts.top1_error <= baseline.top1_error + noise, row
        assert counts.top5_error <= counts.top1_error
    # At Q = image_size without flips dense and single crop are one computation.
    dense32 = ev.DenseEvaluator(member.model, member.variables, (SIZE,), flip=False,
                                preprocess=member.preprocess)  # fmt: skip
    np.testing.assert_allclose(dense32.predict(list(x[:20])), single.predict(list(x[:20])),
                               rtol=1e-4, atol=1e-6)  # fmt: skip


def test_every_example_counted_once_from_an_image_folder(tmp_path):
    """Odd-sized photos through the input pipeline, 1 and 2 (simulated) processes."""
    import json

    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    for split, count in (("train", 2), ("val", 7)):
        for i in range(count):
            folder = tmp_path / "photos" / split / f"class{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            w, h = [(60, 40), (40, 64), (50, 50), (90, 45)][i % 4]
            Image.fromarray(photos[i % 4]).resize((w, h)).save(folder / f"{i}.jpg")
    bundle = save_bundle(tmp_path / "m", channels=3)
    output = tmp_path / "r.json"
    argv = f"--checkpoint {bundle} --dataset image_folder --data-dir {tmp_path / 'photos'}"
    ev.main([*argv.split(), "--split", "val", "--batch-size", "2", "--scales", "32,40",
             "--output", str(output)])  # fmt: skip
    rows = json.loads(output.read_text())["rows"]
    assert [r["count"] for r in rows] == [7, 7, 7]

    args = ev.parse_args([*argv.split()])
    members = ev.load_members(args)
    config = ev._data_config(args, members)
    protocols = ev.ProtocolSet.build(members, "dense", (32,), flip=False, batch_size=2)
    shares = [
        ev.evaluate_batches(
            protocols, ev.dataset_batches(config, "val", (32,), 3, process_index=i, process_count=2)
        )[ev.Row("dense", (32,))]
        for i in range(2)
    ]
    assert sorted(s.count for s in shares) == [3, 4]  # disjoint shares, padding masked
    total = shares[0].merge(shares[1])
    assert total.top1_wrong == round(rows[0]["top1_error"] * 7)


def test_spatial_average_of_scores_or_of_softmax(net):
    """Default: average the score map, then soft-max (the paper); optionally the reverse."""
    model, variables = net
    (im,) = images([(64, 96)], seed=9)
    scores = score_map(model, variables, jnp.asarray(im[None]))[0]
    kw = dict(scales=(64,), flip=False)
    np.testing.assert_allclose(
        ev.DenseEvaluator(model, variables, **kw).predict([im])[0],
        jax.nn.softmax(scores.mean(axis=(0, 1))),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        ev.DenseEvaluator(model, variables, spatial_average="softmax", **kw).predict([im])[0],
        jax.nn.softmax(scores).mean(axis=(0, 1)),
        rtol=1e-5,
    )


def test_evaluate_and_score_map_on_a_training_workdir(tmp_path, capsys):
    """The seed's quick config (tiny widths) trained a few steps, then both tools on its workdir."""
    import importlib.util
    import json
    import os

    from PIL import Image
    from skimage import data

    from vgg_jax import score_map, train

    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    spec = importlib.util.spec_from_file_location("fm", os.path.join(configs, "fashion_mnist.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("quick")
    config.update(dict(width_divisor=16, fc_width=32, max_steps=3, cache=False, progress_bar=False))
    config.update(dict(tensorboard=False) if "tensorboard" in config else {})
    run = str(tmp_path / "run")
    train.train_and_evaluate(config, run)

    output = tmp_path / "results.json"
    summary = ev.main(["--workdir", run, "--limit", "12", "--mode", "both", "--grid", "2",
                       "--output", str(output)])  # fmt: skip
    assert summary == json.loads(output.read_text())
    assert {tuple(r["scales"]) for r in summary["rows"]} == {(32,), (64,), (32, 64)}  # paper's
    assert all(r["count"] == 12 for r in summary["rows"]) and len(summary["rows"]) == 7
    assert "| multi-crop & dense | 32,64 |" in capsys.readouterr().out

    photo = tmp_path / "coffee.png"
    Image.fromarray(data.coffee()).resize((80, 60)).save(photo)
    png = score_map.main([str(photo), "--workdir", run, "--output", str(tmp_path / "m.png")])
    with Image.open(png) as image:
        assert image.format == "PNG"
