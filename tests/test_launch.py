"""The launch scripts: shellcheck, --help, --dry-run contents, and real local runs.

The TPU and SLURM scripts cannot reach a cluster here, so their --dry-run output
is checked for what makes a multi-host run work (every worker addressed, one
command for all, the workdir on shared storage, coordinator settings), and the
SLURM script's real path runs under a stand-in `srun` that starts the tasks on
this machine. `launch/local.sh` runs for real: two processes train a tiny model
and must end with the parameters of a single-process run.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vgg_jax import metrics

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ["local.sh", "tpu_pod.sh", "gpu_slurm.sbatch"]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def run_script(*args: str, env: dict[str, str] | None = None, timeout: float = 60, **kw):
    return subprocess.run(
        ["bash", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        cwd=ROOT,
        **kw,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------
# Every script.


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck_clean(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck; CI installs it)")
    result = subprocess.run(
        ["shellcheck", "--shell=bash", str(LAUNCH / script)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_strict_mode_help_and_dry_run_documented(script):
    text = (LAUNCH / script).read_text()
    assert "set -euo pipefail" in text
    result = run_script(LAUNCH / script, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout and "--dry-run" in result.stdout


@pytest.mark.parametrize(
    "script,args,message",
    [
        ("tpu_pod.sh", ["up", "--dry-run"], "--bucket is required"),
        ("tpu_pod.sh", ["--bucket", "b", "--bogus"], "unknown argument '--bogus'"),
        ("gpu_slurm.sbatch", ["--dry-run", "--workdir", "w"], "--config is required"),
        ("gpu_slurm.sbatch", ["--config", "c.py", "--workdir", "w"], "not inside a SLURM job"),
        ("local.sh", ["-n", "0", "--", "--workdir", "w"], "--num-processes must be"),
        ("local.sh", ["--dry-run"], "no trainer arguments"),
    ],
)
def test_bad_arguments_are_named(script, args, message):
    env = {k: "" for k in ("SLURM_JOB_ID",)}
    result = run_script(LAUNCH / script, *args, env=env)
    assert result.returncode == 2
    assert message in result.stderr


def config_keys_of(words: list[str]) -> list[str]:
    return [w.split("=", 1)[0][len("--config.") :] for w in words if w.startswith("--config.")]


def assert_known_config_keys(words: list[str]) -> None:
    """Overrides the scripts add themselves must be fields of the shared config."""
    sys.path.insert(0, str(ROOT))
    try:
        from configs import default
    finally:
        sys.path.pop(0)
    fields = default.get_config()
    for key in config_keys_of(words):
        assert key in fields, f"--config.{key} is not a field of configs/default.py"


# ---------------------------------------------------------------------------
# TPU pod.


def tpu_dry_run(*extra: str) -> list[list[str]]:
    result = run_script(
        LAUNCH / "tpu_pod.sh",
        "up",
        "--dry-run",
        "--bucket",
        "gs://my-bucket",
        "--project",
        "my-proj",
        "--zone",
        "us-central2-b",
        "--accelerator-type",
        "v4-64",
        "--config",
        "configs/vgg16.py:384",
        *extra,
        "--",
        "--config.batch_size=512",
    )
    assert result.returncode == 0, result.stderr
    lines = [ln for ln in result.stdout.splitlines() if ln and not ln.startswith("#")]
    return [shlex.split(ln) for ln in lines]


def remote_command(words: list[str]) -> str:
    (command,) = [w[len("--command=") :] for w in words if w.startswith("--command=")]
    return command


def test_tpu_dry_run_creates_or_reuses_the_slice():
    commands = tpu_dry_run("--spot")
    verbs = [c[4] for c in commands if c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]]
    assert verbs[:3] == ["describe", "delete", "create"]  # describe; recreate when preempted
    (create,) = [c for c in commands if c[4:5] == ["create"]]
    for flag in ("--zone=us-central2-b", "--project=my-proj", "--accelerator-type=v4-64", "--spot"):
        assert flag in create
    assert "--version=tpu-ubuntu2204-base" in create
    assert "--spot" not in [w for c in tpu_dry_run() for w in c]


def test_tpu_dry_run_installs_and_trains_on_every_worker_with_one_command():
    commands = tpu_dry_run()
    ssh = [c for c in commands if c[4:5] == ["ssh"]]
    assert len(ssh) == 2  # install, train
    for c in ssh:
        assert "--worker=all" in c
        assert "--zone=us-central2-b" in c and "--project=my-proj" in c
    install, train = (remote_command(c) for c in ssh)
    assert "pip install" in install and "jax[tpu]" in install
    # jax >= 0.10 needs Python >= 3.11 (the TPU images have 3.10): a venv of 3.11 runs it.
    venv_python = "$HOME/vgg_jax_venv/bin/python"
    assert "python3.11 -m venv $HOME/vgg_jax_venv" in install
    assert f"{venv_python} -m pip install" in install and f"nohup {venv_python} -m" in train
    # The training command is a fixed string: nothing in it differs between workers.
    assert not re.search(r"worker|process_id|PROCESS_ID", train)
    (python_part,) = re.findall(r"nohup (\S+/python -m vgg_jax\.train .*?) >>", train)
    words = shlex.split(python_part)
    assert words[words.index("--workdir") + 1] == "gs://my-bucket/vgg_jax/runs/vgg16_384"
    assert words[words.index("--config") + 1] == "configs/vgg16.py:384"
    assert "--config.data_dir=gs://my-bucket/tensorflow_datasets" in words
    assert "--config.distributed=auto" in words  # jax.distributed.initialize() finds the pod
    assert words[-1] == "--config.batch_size=512"
    assert_known_config_keys(words)
    # A rerun does not start a second trainer beside a running one.
    assert "already training" in train


def test_tpu_logs_stop_and_delete_commands():
    common = ["--dry-run", "--bucket", "b", "--name", "pod1"]
    logs = shlex.split(run_script(LAUNCH / "tpu_pod.sh", "logs", *common, "--worker", "3").stdout)
    assert "--worker=3" in logs and "tail" in remote_command(logs)
    stop = shlex.split(run_script(LAUNCH / "tpu_pod.sh", "stop", *common).stdout)
    assert "--worker=all" in stop and "kill -TERM" in remote_command(stop)
    delete = shlex.split(run_script(LAUNCH / "tpu_pod.sh", "delete", *common).stdout)
    assert delete[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "delete"] and "pod1" in delete


def test_tpu_from_local_copies_this_checkout_to_every_worker():
    result = run_script(
        LAUNCH / "tpu_pod.sh", "install", "--dry-run", "--bucket", "b", "--from-local"
    )
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(ln) for ln in result.stdout.splitlines() if not ln.startswith("#")]
    assert commands[0][:4] == ["git", "-C", str(ROOT), "archive"]
    assert commands[1][4:6] == ["scp", commands[0][-2]] and "--worker=all" in commands[1]
    assert "tar -xzf" in remote_command(commands[2]) and "--worker=all" in commands[2]


# ---------------------------------------------------------------------------
# SLURM.


def slurm_dry_run(*args: str, env: dict[str, str] | None = None) -> list[str]:
    base = {"SLURM_JOB_ID": "", "SLURM_JOB_NODELIST": "", "SLURM_JOB_NUM_NODES": ""}
    env = {**base, **(env or {})}
    env = {k: v for k, v in env.items()}
    result = run_script(LAUNCH / "gpu_slurm.sbatch", "--dry-run", *args, env=env)
    assert result.returncode == 0, result.stderr
    (line,) = [ln for ln in result.stdout.splitlines() if ln.startswith("srun")]
    return shlex.split(line)


def test_slurm_dry_run_one_process_per_node_names_the_coordinator():
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-10]", "SLURM_JOB_NUM_NODES": "4"}
    words = slurm_dry_run("--config", "configs/vgg16.py", "--workdir", "/shared/r", env=env)
    assert "--nodes=4" in words and "--ntasks-per-node=1" in words
    coordinator = next(w for w in words if w.startswith("VGG_JAX_COORDINATOR="))
    assert coordinator == "VGG_JAX_COORDINATOR=gpu07:24242"  # first node, port from the job id
    assert "VGG_JAX_NUM_PROCESSES=4" in words
    assert words[words.index("env") + 1 : words.index("env") + 3] == ["-u", "SLURM_LOCALID"]
    assert any("VGG_JAX_PROCESS_ID=$SLURM_PROCID" in w for w in words)
    train = words[words.index("vgg_jax.train") - 2 :]
    assert train[train.index("--workdir") + 1] == "/shared/r"


def test_slurm_dry_run_one_process_per_gpu_uses_jax_slurm_detection():
    words = slurm_dry_run(
        "--per-gpu", "--nodes", "3", "--gpus-per-node", "4", "--config", "c.py", "--workdir", "/w",
        "--", "--config.batch_size=64",
    )  # fmt: skip
    assert "--nodes=3" in words and "--ntasks-per-node=4" in words
    assert not any(w.startswith("VGG_JAX_") for w in words)
    assert "--config.distributed=auto" in words and words[-1] == "--config.batch_size=64"
    assert_known_config_keys(words)


FAKE_SRUN = """\
#!/usr/bin/env python3
# Stand-in for srun: starts --nodes x --ntasks-per-node tasks here with SLURM's task variables.
import os, subprocess, sys
args = sys.argv[1:]
opts = {}
while args[0].startswith("--"):
    key, _, value = args.pop(0)[2:].partition("=")
    opts[key] = value
nodes, per_node = int(opts["nodes"]), int(opts["ntasks-per-node"])
procs = []
for rank in range(nodes * per_node):
    env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank % per_node),
               SLURM_NTASKS=str(nodes * per_node),
               SLURM_STEP_NODELIST=os.environ["SLURM_JOB_NODELIST"])
    procs.append(subprocess.Popen(args, env=env))
sys.exit(max(p.wait() for p in procs))
"""

FAKE_PYTHON = """\
#!/usr/bin/env python3
# Stand-in for the trainer's interpreter: records what each task would start with.
import json, os, sys
keys = [k for k in os.environ if k.startswith(("VGG_JAX_", "SLURM_"))]
record = {"argv": sys.argv[1:], "env": {k: os.environ[k] for k in keys}}
with open(os.path.join(os.environ["RECORD_DIR"], os.environ["SLURM_PROCID"] + ".json"), "w") as f:
    json.dump(record, f)
"""


def write_executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_slurm_job_starts_one_distinct_process_per_node(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_executable(bin_dir / "srun", FAKE_SRUN)
    fake_python = write_executable(tmp_path / "python", FAKE_PYTHON)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHON": str(fake_python),
        "RECORD_DIR": str(tmp_path),
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NODELIST": "node[3-5]",
        "SLURM_JOB_NUM_NODES": "3",
        "SLURM_LOCALID": "0",
    }
    result = run_script(
        LAUNCH / "gpu_slurm.sbatch",
        "--config",
        "configs/vgg16.py",
        "--workdir",
        "/shared/x",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(3)]
    assert [r["env"]["VGG_JAX_PROCESS_ID"] for r in records] == ["0", "1", "2"]
    for r in records:
        assert r["env"]["VGG_JAX_COORDINATOR"] == "node3:20077"
        assert r["env"]["VGG_JAX_NUM_PROCESSES"] == "3"
        # Hidden so that JAX does not pin each process to one GPU.
        assert "SLURM_LOCALID" not in r["env"]
        assert r["argv"] == records[0]["argv"]
    assert records[0]["argv"][:2] == ["-m", "vgg_jax.train"]


# ---------------------------------------------------------------------------
# Local multi-process.

FAKE_MODULE = """\
import os, sys, time
pid = int(os.environ["VGG_JAX_PROCESS_ID"])
print("process", pid, "of", os.environ["VGG_JAX_NUM_PROCESSES"], os.environ["VGG_JAX_COORDINATOR"],
      os.environ["JAX_PLATFORMS"], os.environ["XLA_FLAGS"], *sys.argv[1:])
if "--fail" in sys.argv and pid == 1:
    sys.exit(7)
time.sleep(120 if "--fail" in sys.argv else 0)
"""


def test_local_dry_run_lists_every_process():
    result = run_script(
        LAUNCH / "local.sh", "--dry-run", "-n", "3", "-p", "9999", "--",
        "--config", "configs/fashion_mnist.py:quick", "--workdir", "runs/x",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [shlex.split(ln) for ln in result.stdout.splitlines() if ln.startswith("env ")]
    assert len(lines) == 3
    for i, words in enumerate(lines):
        assert f"VGG_JAX_PROCESS_ID={i}" in words
        assert "VGG_JAX_COORDINATOR=127.0.0.1:9999" in words and "VGG_JAX_NUM_PROCESSES=3" in words
        assert "JAX_PLATFORMS=cpu" in words
        assert words[-3:] == [f">runs/x/logs/process_{i}.log", "2>&1", "&"]
    tails = [ln[ln.index("-m") : -3] for ln in lines]
    assert tails[0] == tails[1] == tails[2]


def test_local_runs_every_process_and_logs_each(tmp_path):
    (tmp_path / "fake_trainer.py").write_text(FAKE_MODULE)
    env = {"PYTHONPATH": str(tmp_path), "PYTHON": sys.executable, "XLA_FLAGS": "--xla_a=1"}
    result = run_script(
        LAUNCH / "local.sh", "-q", "-n", "3", "-d", "2", "-m", "fake_trainer", "--",
        "--workdir", str(tmp_path / "wd"), "--x=1", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for i in range(3):
        log = (tmp_path / "wd" / "logs" / f"process_{i}.log").read_text().split()
        assert log[:4] == ["process", str(i), "of", "3"]
        assert log[5] == "cpu"
        assert log[6:8] == ["--xla_a=1", "--xla_force_host_platform_device_count=2"]
        assert log[-1] == "--x=1"


def test_local_propagates_a_failure_and_stops_the_others(tmp_path):
    (tmp_path / "fake_trainer.py").write_text(FAKE_MODULE)
    env = {"PYTHONPATH": str(tmp_path), "PYTHON": sys.executable}
    result = run_script(
        LAUNCH / "local.sh", "-q", "-n", "2", "-m", "fake_trainer", "-l", str(tmp_path / "logs"),
        "--", "--fail", env=env, timeout=30,
    )  # fmt: skip
    assert result.returncode == 7
    assert "process 1 exited with status 7" in result.stderr
    # Process 0 (sleeping 120 s) was stopped: the script returned within the timeout.


# ---------------------------------------------------------------------------
# Real training through local.sh.
#
# Parity: the real input pipeline shards the training set by process (each host
# reads its own files, in an order that depends on the process index), so one
# and two processes see different batches. tests/fake_data.py (the trainer's
# test data) gives every process its rows of the same global batch, so with it
# two processes must end where one does.

TINY_REAL = [
    "--config=configs/fashion_mnist.py:quick",
    "--config.max_steps=2",
    "--config.width_divisor=16",
    "--config.fc_width=32",
    "--config.image_size=32",
    "--config.batch_size=32",
    "--config.progress_bar=False",
    # Two steps: stream them rather than cache each process's 30,000 images, through a small
    # shuffle buffer (the config's 60,000 decodes the whole split first); evaluate a slice.
    "--config.cache=False",
    "--config.shuffle_buffer=1024",
    "--config.eval_split=test[:256]",
]


def final_params(workdir: Path) -> dict[str, np.ndarray]:
    from flax import traverse_util

    from vgg_jax import checkpoints

    bundle = checkpoints.load_workdir(str(workdir), which="latest")
    flat = traverse_util.flatten_dict(dict(bundle.variables["params"]), sep="/")
    return {k: np.asarray(v) for k, v in flat.items()}


def single_process_env(devices: int) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }
    for key in ("VGG_JAX_COORDINATOR", "VGG_JAX_NUM_PROCESSES", "VGG_JAX_PROCESS_ID"):
        env.pop(key, None)
    return env


def run_local(
    workdir: Path,
    *args: str,
    module: str = "vgg_jax.train",
    devices: int = 1,
    timeout: int = 600,
    **env: str,
):
    env = {
        "PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        **env,
    }
    result = run_script(
        LAUNCH / "local.sh", "-q", "-n", "2", "-d", str(devices), "-p", str(free_port()),
        "-m", module, "-l", str(workdir / "logs"), "--", *args, env=env, timeout=timeout,
    )  # fmt: skip
    logs = "".join(p.read_text()[-3000:] for p in sorted((workdir / "logs").glob("*.log")))
    assert result.returncode == 0, result.stderr + logs
    return logs


def test_a_second_two_process_run_does_not_hang_on_the_compilation_cache(tmp_path):
    # jaxlib 0.12.1: a step read back from the persistent compilation cache waited forever in
    # its first gloo collective, so the second run of the same command hung (7 December).
    overrides = json.dumps({"num_devices": 0, "max_steps": 2})
    cache = str(tmp_path / "jax_cache")
    for run in ("first", "second"):
        logs = run_local(tmp_path / run, str(tmp_path / run), overrides, module="train_worker",
                         timeout=240, VGG_JAX_COMPILATION_CACHE=cache)  # fmt: skip
        assert logs.count("RESULT") == 2, logs


def test_local_two_processes_train_like_one(tmp_path):
    overrides = json.dumps({"num_devices": 0, "max_steps": 4})
    # One process with 4 devices, started first so that both runs share the CPU time.
    single = subprocess.Popen(
        [sys.executable, "-m", "train_worker", str(tmp_path / "one"), overrides],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=single_process_env(4), cwd=ROOT,
    )  # fmt: skip
    try:
        # Process i reports i + 1 undecodable images per batch (tests/fake_data.py).
        run_local(tmp_path / "two", str(tmp_path / "two"), overrides, module="train_worker",
                  devices=2, FAKE_DATA_BAD_PER_STEP="1")  # fmt: skip
    finally:
        out = single.communicate(timeout=600)[0]
    assert single.returncode == 0, out[-3000:]

    records = {run: metrics.read_metrics(str(tmp_path / run)) for run in ("two", "one")}
    trained = {run: [r for r in rs if "train_loss" in r] for run, rs in records.items()}
    for run, rows in trained.items():  # both trained the 4 steps (not two equal initialisations)
        assert max(r["step"] for r in rows) == 4, run
    np.testing.assert_allclose([r["train_loss"] for r in trained["two"]],
                               [r["train_loss"] for r in trained["one"]], rtol=1e-5)  # fmt: skip
    two, one = final_params(tmp_path / "two"), final_params(tmp_path / "one")
    assert two.keys() == one.keys() and len(two) > 0
    for name in two:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # Skipped images: summed over the processes in metrics.jsonl (1 + 2 per step), and each
    # process's share kept in the checkpoint (each resumes its own: test_bad_images.py).
    assert {r["bad_images_total"] for r in records["one"] if "bad_images_total" in r} == {0}
    assert [r for r in records["two"] if "bad_images_total" in r][-1]["bad_images_total"] == 12
    meta = tmp_path / "two" / "checkpoints" / "4" / "meta" / "metadata"
    saved = json.loads(meta.read_text())["bad_images"]
    assert saved["processes"] == [[4, 4], [8, 8]] and saved["total"] == 12, saved


@pytest.mark.skipif(
    not FASHION_MNIST.exists(), reason="needs Debian's dataset-fashion-mnist (CI installs it)"
)
def test_local_two_processes_train_on_fashion_mnist(tmp_path):
    """The command users run: `python -m vgg_jax.train` on real data, as two hosts."""
    workdir = tmp_path / "run"
    logs = run_local(workdir, *TINY_REAL, f"--workdir={workdir}")
    assert "Rank 1 is connected to 1 peer" in logs  # gloo joined the two processes
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train_loss" in r]
    evals = [r for r in records if "eval_top1_accuracy" in r]
    assert train and train[-1]["step"] == 2 and np.isfinite(train[-1]["train_loss"])
    assert evals and 0.0 <= evals[-1]["eval_top1_accuracy"] <= 1.0
    assert final_params(workdir)  # every process took part in writing the checkpoint


@pytest.mark.parametrize(
    "accelerator,version",
    [("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-32", "v2-alpha-tpuv5"),
     ("v6e-64", "v2-alpha-tpuv6e"), ("v3-32", "tpu-ubuntu2204-base")],
)  # fmt: skip
def test_tpu_software_version_follows_the_accelerator(accelerator, version):
    result = run_script(
        LAUNCH / "tpu_pod.sh", "create", "--dry-run", "--bucket", "b",
        "--accelerator-type", accelerator,
    )  # fmt: skip
    assert f"--version={version}" in result.stdout
