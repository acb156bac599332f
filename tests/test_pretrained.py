"""Pretrained weights by name: download once, verify, convert, cache; the one resolver.

A local HTTP server on 127.0.0.1 serves a width-reduced torchvision-layout
file of random weights, registered under a test name with its SHA-256.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
from test_convert import torchvision_state

from vgg_jax import checkpoints, class_names, convert, download, pretrained

FILE = "tiny_vgg11-0123abcd.safetensors"


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the directory; records each path; `truncate` sends half the promised bytes."""

    truncate = False
    seen: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        self.seen.append(self.path)
        if not self.truncate:
            return super().do_GET()
        data = open(self.translate_path(self.path), "rb").read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.close_connection = True

    def translate_path(self, path):  # any folder on the URL: the file of that name
        return os.path.join(self.directory, os.path.basename(path.split("?")[0]))

    def log_message(self, *args):  # quiet
        pass


class Server:
    """http.server in a thread on a random port of 127.0.0.1."""

    def __init__(self, directory: str, truncate: bool = False):
        handler = type("H", (_Handler,), {"truncate": truncate, "seen": []})
        self.handler = handler
        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(handler, directory=directory)
        )
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def seen(self) -> list[str]:
        return self.handler.seen

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(directory, file path, its sha256): the tiny torchvision file to serve."""
    d = tmp_path_factory.mktemp("server")
    path = str(d / FILE)
    state = torchvision_state("vgg11", width_divisor=16, fc_width=32, num_classes=10, seed=3)
    convert.write_torchvision_file(state, path)
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return str(d), path, digest


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(download.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(download.MIRROR_ENV, raising=False)
    registry = dict(pretrained.REGISTRY)
    yield tmp_path / "cache"
    pretrained.REGISTRY.clear()
    pretrained.REGISTRY.update(registry)


def _downloads(cache) -> list[str]:
    d = cache / "downloads"
    return sorted(os.listdir(d)) if d.exists() else []


def test_first_load_downloads_verifies_caches_then_no_network(served, cache, capsys):
    directory, path, digest = served
    server = Server(directory)
    pretrained.register("tiny", f"{server.base}/models/{FILE}", f"sha256:{digest}", "torchvision")
    bundle = pretrained.load("tiny")
    assert "downloading " + FILE in capsys.readouterr().err  # the progress line
    assert server.seen == [f"/models/{FILE}"]
    assert _downloads(cache) == [FILE]
    assert checkpoints.is_bundle(pretrained.bundle_dir("tiny"))
    assert bundle.metadata["source_format"] == "torchvision"
    assert bundle.metadata["checksum"] == f"sha256:{digest}"
    server.stop()
    again = pretrained.resolve("tiny")  # the server is gone: served from the cache
    want = convert.convert_file(path).variables["params"]["fc8"]["kernel"]
    np.testing.assert_array_equal(again.variables["params"]["fc8"]["kernel"], want)
    assert class_names.class_names(again) == [f"class {i}" for i in range(10)]


def test_a_bundle_published_meanwhile_by_another_process_is_kept(served, cache, monkeypatch):
    # Two processes loading one name for the first time: each converts, the first to rename
    # its copy into the cache wins; the other must neither write into nor delete that bundle.
    directory, _, digest = served
    server = Server(directory)
    pretrained.register("tiny", f"{server.base}/models/{FILE}", f"sha256:{digest}", "torchvision")
    cached = pretrained.bundle_dir("tiny")
    save = checkpoints.save_bundle

    def save_while_another_publishes(path, bundle):
        other = dict(bundle.metadata, publisher="the other process")
        save(cached, dataclasses.replace(bundle, metadata=other))
        return save(path, bundle)

    monkeypatch.setattr(checkpoints, "save_bundle", save_while_another_publishes)
    pretrained.load("tiny", progress=False)
    monkeypatch.setattr(checkpoints, "save_bundle", save)
    assert pretrained.load("tiny").metadata["publisher"] == "the other process"
    assert os.listdir(os.path.dirname(cached)) == [os.path.basename(cached)]  # no copy left
    server.stop()


def test_copies_left_by_dead_conversions_are_removed_and_live_ones_kept(served, cache):
    directory, _, digest = served
    server = Server(directory)
    pretrained.register("tiny", f"{server.base}/models/{FILE}", f"sha256:{digest}", "torchvision")
    cached = pretrained.bundle_dir("tiny")
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    kept = [f"{cached}.part-{host}-{os.getppid()}",  # a conversion still running here
            f"{cached}.part-elsewhere-{dead}"]  # another host's: cannot be checked  # fmt: skip
    for path in [f"{cached}.part-{host}-{dead}", *kept]:
        os.makedirs(os.path.join(path, "variables"))
    pretrained.load("tiny", progress=False)
    left = sorted(os.listdir(os.path.dirname(cached)))
    assert left == sorted(os.path.basename(p) for p in [cached, *kept]), left
    server.stop()


def test_half_a_bundle_left_in_the_cache_is_replaced(served, cache):
    directory, _, digest = served
    server = Server(directory)
    pretrained.register("tiny", f"{server.base}/models/{FILE}", f"sha256:{digest}", "torchvision")
    cached = pretrained.bundle_dir("tiny")
    os.makedirs(os.path.join(cached, "variables"))  # an earlier version killed mid-save
    open(os.path.join(cached, "variables", "partial"), "w").close()
    assert pretrained.load("tiny", progress=False).metadata["pretrained_name"] == "tiny"
    assert checkpoints.is_bundle(cached)
    assert not os.path.exists(os.path.join(cached, "variables", "partial"))
    server.stop()


def test_published_prefix_is_enough_like_torch_hub(served, cache):
    directory, _, digest = served
    server = Server(directory)
    try:
        pretrained.register("tiny", f"{server.base}/{FILE}", digest[:8], "torchvision")
        assert pretrained.load("tiny", progress=False).num_classes == 10
    finally:
        server.stop()


def test_wrong_hash_is_refused_and_nothing_is_cached(served, cache):
    directory, _, digest = served
    server = Server(directory)
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    pretrained.register("tiny", f"{server.base}/{FILE}", f"sha256:{wrong}", "torchvision")
    try:
        with pytest.raises(pretrained.PretrainedError, match="does not match its published"):
            pretrained.load("tiny", progress=False)
    finally:
        server.stop()
    assert _downloads(cache) == []
    assert not os.path.exists(pretrained.bundle_dir("tiny"))


def test_interrupted_transfer_leaves_nothing_complete(served, cache):
    directory, _, digest = served
    server = Server(directory, truncate=True)
    pretrained.register("tiny", f"{server.base}/{FILE}", f"sha256:{digest}", "torchvision")
    try:
        with pytest.raises(pretrained.PretrainedError, match="stopped after|Could not download"):
            pretrained.load("tiny", progress=False)
    finally:
        server.stop()
    assert _downloads(cache) == []
    assert not os.path.exists(pretrained.bundle_dir("tiny"))


def test_mirror_replaces_the_publishers_host(served, cache, monkeypatch):
    directory, _, digest = served
    server = Server(directory)
    # The publisher's host does not resolve; the mirror has the same file name.
    url = f"http://publisher.invalid/some/path/{FILE}"
    pretrained.register("tiny", url, f"sha256:{digest}", "torchvision")
    monkeypatch.setenv(download.MIRROR_ENV, f"{server.base}/mirror/")
    try:
        assert pretrained.load("tiny", progress=False).num_classes == 10
    finally:
        server.stop()
    assert server.seen == [f"/mirror/{FILE}"]


def test_offline_error_names_url_file_and_convert_command(cache):
    url = f"http://127.0.0.1:9/{FILE}"  # the discard port: connection refused
    pretrained.register("tiny", url, "sha256:0123abcd", "torchvision")
    with pytest.raises(pretrained.PretrainedError) as e:
        pretrained.load("tiny", progress=False)
    msg = str(e.value)
    assert url in msg and f"python -m vgg_jax.convert {FILE} --to DIR" in msg
    assert _downloads(cache) == []


def test_table_holds_the_publishers_files():
    tv = pretrained.REGISTRY["vgg16"]
    assert tv.url == "https://download.pytorch.org/models/vgg16-397923af.pth"
    assert tv.checksum == "sha256:397923af" and tv.source_format == "torchvision"
    keras = pretrained.REGISTRY["keras_vgg16"]
    assert keras.checksum == "md5:64373286793e3c8b2b4e3219cbf3544b"
    names = {"vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"}
    assert names | {"vgg16_features", "keras_vgg16", "keras_vgg19", "keras_vgg19_notop"} <= set(
        pretrained.names()
    )
    for entry in pretrained.REGISTRY.values():  # every file name carries its checksum's digits
        if entry.source_format == "torchvision":
            assert download.parse_checksum(entry.checksum)[1] in entry.url
    with pytest.raises(pretrained.PretrainedError, match="known names: .*vgg16"):
        pretrained.load("vgg17")


def test_convert_cli_takes_a_url_with_its_sha256(served, cache, tmp_path, capsys):
    directory, _, digest = served
    server = Server(directory)
    url = f"{server.base}/{FILE}"
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    try:
        assert convert.main([url, "--sha256", wrong, "--to", str(tmp_path / "bad")]) == 1
        assert "does not match" in capsys.readouterr().err
        assert not os.path.exists(tmp_path / "bad") and _downloads(cache) == []
        assert convert.main([url, "--sha256", digest, "--to", str(tmp_path / "b1")]) == 0
    finally:
        server.stop()
    assert convert.main([url, "--sha256", digest, "--to", str(tmp_path / "b2")]) == 0  # cached
    assert server.seen == [f"/{FILE}", f"/{FILE}"]
    assert checkpoints.is_bundle(tmp_path / "b2")
    # A registered name adapts (and exports) like a bundle directory.
    pretrained.register("tiny", url, f"sha256:{digest}", "torchvision")
    assert convert.main(["tiny", "--to", str(tmp_path / "b64"), "--image-size", "64"]) == 0
    assert checkpoints.load_bundle(tmp_path / "b64").image_size == 64
    assert convert.main([url, "--to", str(tmp_path / "b3")]) == 1
    assert "--sha256" in capsys.readouterr().err


def test_resolve_takes_a_bundle_a_run_or_a_name(served, tmp_path, monkeypatch):
    _, path, _ = served
    bundle = convert.convert_file(path)
    checkpoints.save_bundle(tmp_path / "bundle", bundle)
    got = pretrained.resolve(str(tmp_path / "bundle"))
    assert got.name == "vgg11" and got.num_classes == 10
    # A training run: its best variables, and its dataset's class names.
    run = tmp_path / "run"
    run.mkdir()
    (run / checkpoints.CONFIG_FILE).write_text(json.dumps({"dataset": "fashion_mnist"}))
    seen = {}

    def fake_load_workdir(workdir, which):
        seen.update(workdir=workdir, which=which)
        return checkpoints.ModelBundle(
            bundle.name, bundle.options, bundle.variables, metadata={"dataset": "fashion_mnist"}
        )

    monkeypatch.setattr(checkpoints, "load_workdir", fake_load_workdir)
    got = pretrained.resolve(str(run))
    assert seen == {"workdir": str(run), "which": "best"}
    assert class_names.class_names(got)[8] == "Bag"
    with pytest.raises(FileNotFoundError, match="not a weights name.*vgg16"):
        pretrained.resolve(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a model bundle"):
        pretrained.resolve(str(tmp_path / "empty"))


def test_every_tool_takes_a_name(served, cache):
    """evaluate's load_network, train's init_from and vgg_jax.features resolve names alike."""
    from vgg_jax import evaluate, features, train

    directory, path, digest = served
    server = Server(directory)
    try:
        pretrained.register("tiny", f"{server.base}/{FILE}", f"sha256:{digest}", "torchvision")
        member, bundle = evaluate.load_network("tiny")
    finally:
        server.stop()
    assert member.model.num_classes == 10 and bundle.metadata["pretrained_name"] == "tiny"
    init = train.load_init_source("tiny")  # from the cache now
    np.testing.assert_array_equal(
        init.variables["params"]["fc8"]["bias"], bundle.variables["params"]["fc8"]["bias"]
    )
    x = np.random.default_rng(0).random((1, 32, 32, 3), np.float32)
    by_name = features.features("tiny", None, x, ("relu1_1",))["relu1_1"]
    direct = features.features(bundle, None, x, ("relu1_1",))["relu1_1"]
    np.testing.assert_array_equal(by_name, direct)
    with pytest.raises(FileNotFoundError, match="init_from='vgg17' does not exist.*vgg16"):
        train.load_init_source("vgg17")
    with pytest.raises(SystemExit, match="not a weights name"):
        evaluate.load_network("vgg17")


def test_class_names_from_the_recorded_dataset(tmp_path):
    for name in ("zebra", "ant", "moth"):
        (tmp_path / "train" / name).mkdir(parents=True)
    names = class_names.dataset_class_names("image_folder", str(tmp_path))
    assert names == ["ant", "moth", "zebra"]
    # config.classes keeps those labels, relabelled 0..k-1 in that order.
    names = class_names.dataset_class_names("fashion_mnist", classes=(8, 0))
    assert names == ["Bag", "T-shirt/top"]
    assert class_names.dataset_class_names("no_such_dataset_here") is None
    bundle = checkpoints.ModelBundle("vgg11", {"num_classes": 3}, {}, metadata={})
    assert class_names.class_names(bundle) == ["class 0", "class 1", "class 2"]
    assert "class_names" not in class_names.with_class_names(bundle).metadata  # not invented
    bundle.metadata = {"dataset": "image_folder", "data_dir": str(tmp_path)}
    assert class_names.with_class_names(bundle).metadata["class_names"][0] == "ant"
