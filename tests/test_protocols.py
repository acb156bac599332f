"""The paper's test protocols: dense, multi-crop, fusion, ensembles (vgg_jax.protocols)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from eval_util import OPTIONS, SIZE, images, plain_softmax, random_net
from weights_util import rbg_key

from vgg_jax import checkpoints, evaluate, image_io, metrics, models
from vgg_jax import protocols as pr


@pytest.fixture(scope="module")
def net():
    return random_net()


def score_map(model, variables, x):
    """The network's own score map of one unpadded image (1, H', W', classes)."""
    return jax.jit(lambda v, x: model.apply(v, x, method="score_map"))(variables, x)


def unpadded_dense(model, variables, image, scales, flip):
    """The dense protocol written out for one image at its own size: the reference."""
    probs = []
    for q in scales:
        im = image_io.resize_image(image, *image_io.rescaled_size(*image.shape[:2], q))
        for x in [im, im[:, ::-1]] if flip else [im]:
            scores = score_map(model, variables, jnp.asarray(x[None]))
            probs.append(jax.nn.softmax(scores.mean(axis=(1, 2)))[0])
    return np.mean(probs, axis=0)


def test_dense_at_training_size_equals_plain_network(net):
    model, variables = net
    x = np.stack(images([(SIZE, SIZE)] * 3))
    pre = checkpoints.Preprocessing(mean=(0.4, 0.5, 0.6), value_range=1.0, std=(0.2, 0.3, 0.4))
    dense = pr.DenseEvaluator(model, variables, scales=(SIZE,), flip=False, preprocess=pre)
    np.testing.assert_allclose(
        dense.predict(x), plain_softmax(model, variables, x, pre), rtol=1e-5, atol=1e-6
    )


def test_padding_never_leaks_into_the_average(net, monkeypatch):
    """Bucketed, padded, batched evaluation equals each image run alone at its own size."""
    model, variables = net
    shapes = [(32, 32), (40, 70), (70, 45), (33, 50)]  # 2 share a bucket
    imgs = images(shapes, seed=1)
    dense = pr.DenseEvaluator(model, variables, scales=(32, 40), flip=True, batch_size=2)
    got = dense.predict(imgs)
    want = np.stack([unpadded_dense(model, variables, im, (32, 40), True) for im in imgs])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert {dense.bucket_shape(*im.shape[:2]) for im in imgs} != {(32, 32)}  # padding happened

    # Without the per-layer masks the border activations read the padding: the test has teeth.
    monkeypatch.setattr(pr, "_masking_interceptor", lambda *a: lambda f, a2, k, c: f(*a2, **k))
    pr._dense_fn.cache_clear()  # jitted functions are shared per network: trace again
    try:
        leaky = pr.DenseEvaluator(model, variables, scales=(32, 40), flip=True, batch_size=4)
        assert np.abs(leaky.predict(imgs[1:3]) - want[1:3]).max() > 1e-4
    finally:
        pr._dense_fn.cache_clear()


def test_score_maps_have_the_unpadded_shape(net):
    model, variables = net
    imgs = images([(32, 96), (64, 40)])
    dense = pr.DenseEvaluator(model, variables, scales=(32, 64), flip=False)
    maps = dense.score_maps(imgs)
    for im, per_scale in zip(imgs, maps, strict=True):
        for q, m in per_scale.items():
            x = image_io.resize_image(im, *image_io.rescaled_size(*im.shape[:2], q))
            want = score_map(model, variables, jnp.asarray(x[None]))[0]
            np.testing.assert_allclose(m, want, rtol=1e-5, atol=1e-5)


def compiled_probs(dense):
    """Compilations of the evaluator's soft-max forward passes (masked and unmasked)."""
    return sum(fn._cache_size() for (kind, _), fn in dense._fns.items() if kind == "probs")


def test_compilations_bounded_by_buckets():
    # A network of its own, so that the jit cache (shared per network) starts empty.
    model = models.create_model("A", **{**OPTIONS, "fc_width": 24})
    variables = jax.jit(model.init)(rbg_key(0), jnp.zeros((1, SIZE, SIZE, 3)))
    rng = np.random.default_rng(2)
    # 12 images of 12 different sizes with smallest side 32: long side 32..63 -> 1 or 2 buckets.
    shapes = [
        (32, int(w)) if i % 2 else (int(w), 32) for i, w in enumerate(rng.integers(32, 64, 12))
    ]
    dense = pr.DenseEvaluator(model, variables, scales=(SIZE,), flip=False, batch_size=4)
    dense.predict(images(shapes))
    buckets = {dense.bucket_shape(h, w) for h, w in shapes}
    assert len(buckets) < len(set(shapes))
    # Per bucket: full batches of 8 rows (4 images, on 8 devices) and a short last chunk.
    assert len(buckets) <= dense.compiled_shapes <= 2 * len(buckets)
    assert compiled_probs(dense) == dense.compiled_shapes
    compiled = dense.compiled_shapes
    dense.predict(images(shapes, seed=3))  # the same sizes again: nothing new is compiled
    assert compiled_probs(dense) == dense.compiled_shapes == compiled


def test_a_short_last_chunk_runs_in_a_batch_already_compiled(net):
    model, variables = net
    imgs = images([(SIZE, SIZE)] * 20, seed=4)
    # 16 rows a call (8 devices): 16 images, then the last 4 padded into the same 16 rows,
    # not a new 8-row shape (the next power of two, rounded up to the devices).
    dense = pr.DenseEvaluator(model, variables, scales=(SIZE,), flip=False, batch_size=16)
    got = dense.predict(imgs)
    assert dense.compiled_shapes == 1
    np.testing.assert_allclose(
        got, plain_softmax(model, variables, np.stack(imgs)), rtol=1e-5, atol=1e-6
    )
    # An evaluator that has run nothing yet still runs a short batch at fewer rows.
    fresh = pr.DenseEvaluator(model, variables, scales=(SIZE,), flip=False, batch_size=16)
    fresh.predict(imgs[:4])
    assert {shape[0] for _, _, shape in fresh._compiled} == {8}


def test_multicrop_1x1_at_training_size_is_the_central_crop(net):
    model, variables = net
    imgs = images([(32, 48), (56, 32), (32, 32)])
    mc = pr.MultiCropEvaluator(model, variables, scales=(SIZE,), grid=1, flip=False)
    centres = []
    for im in imgs:
        y, x = (im.shape[0] - SIZE) // 2, (im.shape[1] - SIZE) // 2
        centres.append(im[y : y + SIZE, x : x + SIZE])
    want = plain_softmax(model, variables, np.stack(centres))
    np.testing.assert_allclose(mc.predict(imgs), want, rtol=1e-5, atol=1e-6)


def test_multicrop_averages_every_crop_of_every_scale(net):
    model, variables = net
    (im,) = images([(32, 40)])
    mc = pr.MultiCropEvaluator(model, variables, scales=(32, 48), grid=2, flip=True, batch_size=3)
    assert mc.crops_per_image == 16
    crops = []
    for q in (32, 48):
        r = image_io.resize_image(im, *image_io.rescaled_size(32, 40, q))
        for y in pr.crop_offsets(r.shape[0], SIZE, 2):
            for x in pr.crop_offsets(r.shape[1], SIZE, 2):
                c = r[y : y + SIZE, x : x + SIZE]
                crops += [c, c[:, ::-1]]
    want = plain_softmax(model, variables, np.stack(crops)).mean(axis=0)
    np.testing.assert_allclose(mc.predict([im])[0], want, rtol=1e-5, atol=1e-6)


def test_crop_grid_is_mirror_symmetric_and_inside():
    for length, grid in [(256, 5), (341, 5), (225, 3), (224, 5), (300, 1)]:
        offsets = pr.crop_offsets(length, 224, grid)
        assert all(0 <= o <= length - 224 for o in offsets)
        assert sorted(length - 224 - o for o in offsets[: grid // 2]) == sorted(
            offsets[grid - grid // 2 :]
        )
    assert pr.crop_offsets(256, 224, 5) == [0, 8, 16, 24, 32]
    with pytest.raises(ValueError, match="crops"):
        pr.crop_offsets(200, 224, 5)


def test_flip_of_symmetric_image_changes_nothing(net):
    model, variables = net
    imgs = images([(32, 48), (40, 40)], seed=4)
    symmetric = [(im + im[:, ::-1]) / 2 for im in imgs]
    for cls, kw in [(pr.DenseEvaluator, {}), (pr.MultiCropEvaluator, {"grid": 3})]:
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
    members = [pr.Member.from_bundle(checkpoints.load_bundle(tmp_path / "m")) for _ in range(2)]
    imgs = images([(32, 40), (48, 32)], seed=5)
    for mode in ("dense", "both"):
        kw = dict(scales=(32, 40), grid=2, batch_size=2)
        single = pr.build_evaluator(members[0], mode, **kw).predict(imgs)
        both = pr.Ensemble.from_members(members, mode, **kw).predict(imgs)
        np.testing.assert_array_equal(both, single)
    # And a different second network does change the ensemble.
    other = pr.Member(model, jax.tree.map(lambda x: -x, variables), pre)
    mixed = pr.Ensemble.from_members([members[0], other], "dense", scales=(32,)).predict(imgs)
    assert not np.allclose(mixed, pr.build_evaluator(members[0], "dense", (32,)).predict(imgs))


def test_fusion_is_the_average_of_dense_and_multicrop(net):
    model, variables = net
    imgs = images([(32, 40)], seed=6)
    dense = pr.DenseEvaluator(model, variables, scales=(32, 40))
    mc = pr.MultiCropEvaluator(model, variables, scales=(32, 40), grid=2)
    fused = pr.FusedEvaluator(dense, mc).predict(imgs)
    np.testing.assert_allclose(fused, (dense.predict(imgs) + mc.predict(imgs)) / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="shapes"):
        pr.fuse(np.zeros((2, 10)), np.zeros((2, 5)))


def test_rows_of_every_mode(net):
    model, variables = net
    protocols = pr.ProtocolSet.build([pr.Member(model, variables)], "both", (32, 40), grid=2)
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
        pr.DenseEvaluator(model, variables, scales=(16, 32))
    with pytest.raises(ValueError, match="batch axis"):
        pr.DenseEvaluator(model, variables, scales=(32,)).predict(np.zeros((32, 32, 3)))
    with pytest.raises(ValueError, match="multiple of 32"):
        pr.DenseEvaluator(model, variables, bucket_multiple=48)
    with pytest.raises(ValueError, match="mode"):
        pr.build_evaluator(pr.Member(model, variables), "tencrop")


def test_spatial_average_of_scores_or_of_softmax(net):
    """Default: average the score map, then soft-max (the paper); optionally the reverse."""
    model, variables = net
    (im,) = images([(64, 96)], seed=9)
    scores = score_map(model, variables, jnp.asarray(im[None]))[0]
    kw = dict(scales=(64,), flip=False)
    np.testing.assert_allclose(
        pr.DenseEvaluator(model, variables, **kw).predict([im])[0],
        jax.nn.softmax(scores.mean(axis=(0, 1))),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        pr.DenseEvaluator(model, variables, spatial_average="softmax", **kw).predict([im])[0],
        jax.nn.softmax(scores).mean(axis=(0, 1)),
        rtol=1e-5,
    )


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
    return pr.Member(model, {"params": params}, pre)


def test_trained_network_in_every_mode():
    member = train_small_vgg()
    x, y = fashion_mnist("t10k", 200)
    single = pr.MultiCropEvaluator(
        member.model, member.variables, (SIZE,), grid=1, flip=False, preprocess=member.preprocess
    )
    baseline = metrics.ErrorCounts()
    baseline.update(single.predict(list(x)), y)
    protocols = pr.ProtocolSet.build([member], "both", (32, 64), grid=3, batch_size=32)
    batches = [(image_io.ImageSet(list(x)), y, np.ones(len(y), bool))]
    results = evaluate.evaluate_batches(protocols, batches)
    print(evaluate.format_table(results, f"single crop top-1 error {baseline.top1_error:.3f}"))

    assert baseline.top1_error < 0.45  # it learned something (chance: 0.9)
    noise = 3 * np.sqrt(baseline.top1_error * (1 - baseline.top1_error) / len(y))
    for row in [("dense", (32, 64)), ("multi-crop", (32, 64)), ("multi-crop & dense", (32, 64))]:
        counts = results[pr.Row(*row)]
        assert counts.count == len(y)
        assert counts.top1_error <= baseline.top1_error + noise, row
        assert counts.top5_error <= counts.top1_error
    # At Q = image_size without flips dense and single crop are one computation.
    dense32 = pr.DenseEvaluator(member.model, member.variables, (SIZE,), flip=False,
                                preprocess=member.preprocess)  # fmt: skip
    np.testing.assert_allclose(dense32.predict(list(x[:20])), single.predict(list(x[:20])),
                               rtol=1e-4, atol=1e-6)  # fmt: skip


