"""The benchmark scripts run end to end at tiny sizes, so they never rot (no timing here)."""

import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the benchmarks package lives beside vgg_jax
    sys.path.insert(0, str(ROOT))

from benchmarks import eval_throughput, train_throughput  # noqa: E402
from vgg_jax import models  # noqa: E402

try:  # the PyTorch peer is the `torch` extra: `make test` installs it, the demo does not
    import torch

    from benchmarks import seed_pytorch, torch_peer
except ImportError:
    torch = None
needs_torch = pytest.mark.skipif(
    torch is None, reason="PyTorch is not installed here (the `torch` extra: pip install .[torch])"
)
# Without PyTorch the throughput benchmarks still run their JAX half.
PEER = "default" if torch is not None else "none"

TINY = ["--models", "A", "--width-divisor", "16", "--fc-width", "32", "--num-classes", "10"]
TINY += ["--channels", "1", "--image-size", "32", "--steps", "1", "--repeats", "2"]


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_throughput_tiny(tmp_path, capsys):
    out = tmp_path / "train.jsonl"
    peer = "auto" if torch is not None else "none"
    argv = TINY + ["--batch", "4", "--warmup", "1", "--formulation", "lax,fast", "--torch", peer]
    records = train_throughput.main(argv + ["--json-out", str(out), "--peak-flops", "1e12"])
    impls = [r["impl"] for r in records]
    peers = ["torch[default]", "torch[channels_last]"] if torch is not None else []
    assert impls == ["vgg_jax[lax]", "vgg_jax[fast]"] + peers
    assert read_lines(out) == json.loads(json.dumps(records))
    for r in records:
        assert r["images_per_s"] > 0 and len(r["step_s_all"]) == 2
        assert r["images_per_s_best"] >= r["images_per_s"]
    torch_ratios = [r["vs_torch_best"] for r in records if r["impl"].startswith("torch")]
    if torch is not None:
        assert max(torch_ratios) == pytest.approx(1.0)
    else:
        assert all(r["vs_torch_best"] is None for r in records)
    cost = models.model_cost("A", 10, 32, 1, 16, 32)
    jax_rec = records[0]
    assert jax_rec["mfu"] == pytest.approx(jax_rec["images_per_s"] * 6 * cost.mult_adds / 1e12)
    assert jax_rec["compile_s"] > 0
    assert "| A /16 fc32 c1 | vgg_jax[fast] | 32 | 4 |" in capsys.readouterr().out


def test_eval_throughput_tiny(tmp_path, capsys):
    out = tmp_path / "eval.jsonl"
    argv = TINY + ["--batch", "2", "--scales", "32,48", "--warmup", "1", "--torch", PEER]
    records = eval_throughput.main(argv + ["--json-out", str(out)])
    modes = [(r["mode"], r["input_size"], r["impl"]) for r in records]
    impls = ("vgg_jax[auto]", "torch[default]") if torch is not None else ("vgg_jax[auto]",)
    assert modes == [
        (m, s, i) for m, s in (("crop", 32), ("dense", 32), ("dense", 48)) for i in impls
    ]
    assert len(read_lines(out)) == len(modes)
    printed = capsys.readouterr().out
    assert "150-crop s/img" in printed and "vgg_jax[auto]" in printed


@needs_torch
def test_torch_peer_is_the_same_network():
    kwargs = dict(width_divisor=16, fc_width=32, image_size=64)
    net = torch_peer.TorchVGG("D", 10, in_channels=3, **kwargs)
    torch_params = sum(p.numel() for p in net.parameters())
    assert torch_params == models.model_cost("D", 10, 64, 3, 16, 32).params
    model = models.create_model("D", 10, **kwargs)
    x = jnp.zeros((1, 96, 80, 3))
    v = jax.eval_shape(model.init, jax.random.key(0), x[:, :64, :64])
    ours = jax.eval_shape(lambda v, x: model.apply(v, x, method="score_map"), v, x).shape
    with torch.no_grad():
        theirs = net.score_map(torch.zeros(1, 3, 96, 80)).shape
    assert (ours[0], ours[3], ours[1], ours[2]) == tuple(theirs)
    # The dense head reuses the FC weights: at the training size it equals forward().
    net.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        np.testing.assert_allclose(
            net.score_map(x)[:, :, 0, 0].numpy(), net(x).numpy(), rtol=1e-4, atol=1e-5
        )


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@needs_torch
def test_seed_pytorch_tiny(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        images = rng.integers(0, 256, (n, 28, 28))
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images, 2051)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n), 2049)
    argv = ["--data-dir", str(tmp_path), "--resolution", "32", "--epochs", "2"]
    result = seed_pytorch.main(argv + ["--batch-size", "8", "--limit-steps", "3"])
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert result["images_per_s"] > 0 and 0 <= result["test_acc"] <= 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["epochs"] == 2
    # 3 steps of 8 images per epoch were trained.
    assert result["images_per_s"] * result["train_seconds"] == pytest.approx(48)


@needs_torch
def test_seed_pytorch_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        seed_pytorch.load_split(tmp_path, "train")
    write_idx(tmp_path / "bad.gz", np.zeros(4), 2049)
    with pytest.raises(ValueError, match="not an IDX images file"):
        seed_pytorch.read_idx(tmp_path / "bad.gz", "images")


@needs_torch
def test_seed_input_matches_pil_style_resize():
    images = torch.arange(28 * 28, dtype=torch.int64).remainder(256).to(torch.uint8).view(1, 28, 28)
    x = seed_pytorch.to_input(images, 56)
    assert x.shape == (1, 1, 56, 56) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert torch.equal(x * 255, (x * 255).round())  # back to 8 bits, as PIL does


def test_gpu_suite_refuses_without_a_gpu(tmp_path):
    script = ROOT / "benchmarks" / "gpu_suite.sh"
    env = dict(os.environ, OUT=str(tmp_path), PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        ["bash", str(script), sys.executable], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert "cannot see the GPU" in proc.stderr


def test_flag_ab_workers_differ_by_the_flag_alone():
    from benchmarks import flag_ab

    base = {"XLA_FLAGS": "--xla_a=1 --xla_b=2", "OTHER": "x"}
    envs = flag_ab.worker_envs("--xla_b=2", base)
    assert envs["flag"]["XLA_FLAGS"].split() == ["--xla_a=1", "--xla_b=2"]
    assert envs["no_flag"]["XLA_FLAGS"].split() == ["--xla_a=1"]
    assert envs["flag"]["OTHER"] == envs["no_flag"]["OTHER"] == "x"
    assert "VGG_JAX_CPU_FLAGS" not in envs["flag"]  # the CPU flag as configured
    default = flag_ab.worker_envs("", base)
    assert (default["flag"]["VGG_JAX_CPU_FLAGS"], default["no_flag"]["VGG_JAX_CPU_FLAGS"]) == (
        "1",
        "0",
    )


def test_flag_ab_tiny(monkeypatch):
    from benchmarks import flag_ab

    monkeypatch.chdir(ROOT)  # the workers run `python -m benchmarks.flag_ab`
    argv = ["--image-size", "32", "--steps", "1", "--repeats", "2"]
    result = flag_ab.main(argv + ["--width-divisor", "16", "--fc-width", "32", "--batch", "4"])
    # The "flag" worker forces the flag (VGG_JAX_CPU_FLAGS=1) on every jaxlib version.
    assert result["flag_active"] == {"flag": True, "no_flag": False}
    assert set(result["images_per_s"]) == {"flag", "no_flag"}
    assert result["flag_speedup"] == pytest.approx(
        result["images_per_s"]["flag"] / result["images_per_s"]["no_flag"]
    )


def test_compile_cost_worker_times_the_probes_asked_for(capsys):
    from benchmarks import compile_cost

    probe = compile_cost.PROBE_NAMES[2]  # the quickest to compile
    compile_cost.worker([probe])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    import jax

    assert record["partitionable"] == jax.config.jax_threefry_partitionable
    assert list(record["cpu_s"]) == [probe] and record["cpu_s"][probe] > 0
