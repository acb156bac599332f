"""The workdir lock: a second trainer refused naming the holder, stale locks taken over."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from vgg_jax import workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Holds the lock of argv[1] until the file argv[2] appears; prints HELD once it holds it.
HOLDER = """
import os, sys, time
from vgg_jax import workdir_lock
with workdir_lock.hold(sys.argv[1]):
    print("HELD", flush=True)
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.05)
"""


def _python(*args, **kwargs):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.Popen([sys.executable, "-c", *args], env=env, text=True, **kwargs)


def test_second_process_is_refused_naming_the_holder_until_it_releases(tmp_path):
    workdir, stop = str(tmp_path / "run"), str(tmp_path / "stop")
    first = _python(HOLDER, workdir, stop, stdout=subprocess.PIPE)
    try:
        assert first.stdout.readline().strip() == "HELD"
        second = _python(HOLDER, workdir, stop, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = second.communicate(timeout=60)
        assert second.returncode != 0 and "HELD" not in out
        last = err.strip().splitlines()[-1]
        assert f"{workdir} is in use by another trainer (host {socket.gethostname()}, " in last
        assert f"pid {first.pid}, started 20" in last and "command: -c " in last
        assert "another --workdir" in last
    finally:
        open(stop, "w").close()
        first.wait(timeout=60)
    assert first.returncode == 0
    assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))  # released
    with workdir_lock.hold(workdir):  # and free for the next trainer
        pass


def _dead_pid():
    proc = _python("pass")
    proc.wait()
    return proc.pid


def _write_lock(workdir, **record):
    os.makedirs(workdir, exist_ok=True)
    holder = {"host": socket.gethostname(), "pid": _dead_pid(), "pid_start": None,
              "started": "2026-01-01T00:00:00Z", "command": "python -m vgg_jax.train", **record}
    with open(os.path.join(workdir, workdir_lock.LOCK_FILE), "w") as f:
        json.dump(holder, f)
    return holder  # fmt: skip


def test_lock_of_a_killed_process_is_taken_over_with_a_message(tmp_path):
    workdir = str(tmp_path)
    stale = _write_lock(workdir)
    lines = []
    with workdir_lock.hold(workdir, say=lines.append):
        holder = workdir_lock.read_holder(workdir)
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    assert len(lines) == 1
    assert "Took over the lock" in lines[0] and f"pid {stale['pid']}," in lines[0]
    assert workdir_lock.read_holder(workdir) is None


def test_reused_pid_counts_as_dead(tmp_path):
    # Our own pid, but recorded with another start time: the pid was reused by a later process.
    _write_lock(str(tmp_path), pid=os.getpid(), pid_start="1")
    lines = []
    with workdir_lock.hold(str(tmp_path), say=lines.append):
        pass
    assert "Took over" in lines[0]


def test_lock_of_another_host_is_refused_with_how_to_remove_it(tmp_path):
    _write_lock(str(tmp_path), host="elsewhere-7")
    with pytest.raises(workdir_lock.WorkdirInUse, match=r"another host \(host elsewhere-7.*"
                       r"if that host or process is dead, delete .*vgg_jax.lock"):  # fmt: skip
        with workdir_lock.hold(str(tmp_path)):
            pass
    assert workdir_lock.read_holder(str(tmp_path))["host"] == "elsewhere-7"  # left alone


def test_released_on_an_exception_and_a_no_op_when_disabled(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with workdir_lock.hold(str(tmp_path)):
            raise RuntimeError("boom")
    assert workdir_lock.read_holder(str(tmp_path)) is None
    with workdir_lock.hold(str(tmp_path / "other"), enabled=False):
        assert not os.path.exists(tmp_path / "other")


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file; give a directory"):
        with workdir_lock.hold(str(tmp_path / "f")):
            pass


def test_object_store_lock_is_best_effort_and_says_so():
    workdir = f"ram://lock_test_{time.time_ns()}"
    lines = []
    with workdir_lock.hold(workdir, say=lines.append):
        assert workdir_lock.read_holder(workdir)["pid"] == os.getpid()
        with pytest.raises(workdir_lock.WorkdirInUse, match="in use by another trainer"):
            with workdir_lock.hold(workdir):
                pass
    assert "not excluded" in lines[-1]
    assert workdir_lock.read_holder(workdir) is None
