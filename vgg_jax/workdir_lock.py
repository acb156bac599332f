"""One trainer per workdir: a lock file that names its holder.

    with workdir_lock.hold(workdir, enabled=parallel.is_main_process()):
        ...  # train

`hold` creates `<workdir>/vgg_jax.lock`, a JSON record of the holder (host,
pid, the pid's start time, when, command line), and removes it on exit, also
when the body raises. A second trainer on the same workdir gets
`WorkdirInUse` with one line naming the holder.

* Local disks: the lock is created atomically: the record is written to a
  private file first, then hard-linked to the lock's name (`os.link` fails
  when the name exists), so a reader never sees half a record and two
  trainers never both win.
* A lock whose holder ran on this host and is no longer alive (its pid is
  gone, or now belongs to a process started later) is stale: it is taken
  over with a message. Taking over goes through a second, short-lived
  lock, so two trainers that find the same stale lock do not both take it.
* A lock of another host cannot be checked from here: the trainer is
  refused, and the message says how to remove the lock if that host is dead.
* Object stores (`gs://...`) have no atomic create: the lock is best effort.
  An existing lock is honoured as above, but two trainers started at the
  same moment can both write it; a warning says so.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from vgg_jax import fileio

LOCK_FILE = "vgg_jax.lock"
# A takeover lock older than this was left by a process killed while taking over.
TAKEOVER_TIMEOUT_S = 60.0


class WorkdirInUse(RuntimeError):
    """Another live (or unverifiable) trainer holds the workdir."""


def _process_start(pid: int) -> str | None:
    """The start time of `pid` in clock ticks since boot (Linux), telling a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # Field 22; the command name (field 2) may hold spaces, so split after its ')'.
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_alive(pid: int, start: str | None = None) -> bool:
    """True while process `pid` of this host runs (and, given its start time, is that one)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    now = _process_start(pid)
    return start is None or now is None or now == start


def _record() -> dict[str, Any]:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "pid_start": _process_start(pid),
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": shlex.join(sys.argv),
    }


def describe(holder: dict[str, Any]) -> str:
    """'host h, pid 12, started 2026-12-01T20:00:00Z, command: python -m vgg_jax.train ...'."""
    return (
        f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
        f"{holder.get('started', '?')}, command: {holder.get('command', '?')}"
    )


def read_holder(workdir: str) -> dict[str, Any] | None:
    """The record in workdir's lock file; None if there is none; {} if it is unreadable."""
    path = fileio.join(workdir, LOCK_FILE)
    try:
        return json.loads(fileio.read_text(path)) if fileio.exists(path) else None
    except FileNotFoundError:
        return None  # released meanwhile
    except (ValueError, UnicodeDecodeError):
        return {}


def _is_stale(holder: dict[str, Any]) -> bool:
    """True if the holder ran on this host and is gone. Unknown holders are not stale."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    return not process_alive(holder["pid"], holder.get("pid_start"))


def _refusal(workdir: str, holder: dict[str, Any]) -> WorkdirInUse:
    lock = fileio.join(workdir, LOCK_FILE)
    if not holder:
        return WorkdirInUse(
            f"{workdir} is locked by {lock}, which cannot be read; if no trainer is using "
            "this workdir, delete that file and run again."
        )
    if holder.get("host") == socket.gethostname():
        return WorkdirInUse(
            f"{workdir} is in use by another trainer ({describe(holder)}): wait for it to "
            "finish or stop it, or train in another --workdir."
        )
    return WorkdirInUse(
        f"{workdir} is in use by a trainer on another host ({describe(holder)}), whose "
        f"liveness cannot be checked from here: if that host or process is dead, delete "
        f"{lock} and run again; otherwise train in another --workdir."
    )


def _link_create(path: str, record: dict[str, Any]) -> bool:
    """Creates `path` holding `record` atomically; False if it exists."""
    tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def _take_over(workdir: str, stale: dict[str, Any], record: dict[str, Any]) -> bool:
    """Replaces the stale lock `stale` with `record`; False if someone else got there first."""
    path = fileio.join(workdir, LOCK_FILE)
    guard = path + ".takeover"
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        with contextlib.suppress(FileNotFoundError):
            if time.time() - os.path.getmtime(guard) > TAKEOVER_TIMEOUT_S:
                os.unlink(guard)  # left by a process killed mid-takeover
        return False
    os.close(fd)
    try:
        if read_holder(workdir) != stale:  # changed since we looked: not ours to remove
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return _link_create(path, record)
    finally:
        os.unlink(guard)


def _acquire_local(workdir: str, record: dict[str, Any], say: Callable[[str], None]) -> None:
    path = fileio.join(workdir, LOCK_FILE)
    for _ in range(20):  # retries only when the lock changes hands under us
        if _link_create(path, record):
            return
        holder = read_holder(workdir)
        if holder is None:
            continue  # released between our attempt and our look
        if not _is_stale(holder):
            raise _refusal(workdir, holder)
        if _take_over(workdir, holder, record):
            say(
                f"Took over the lock of {workdir} left by a trainer that is no longer running "
                f"({describe(holder)})."
            )
            return
        time.sleep(0.05)
    raise WorkdirInUse(f"Could not lock {workdir}: other trainers keep taking it; try again.")


def _acquire_url(workdir: str, record: dict[str, Any], say: Callable[[str], None]) -> None:
    holder = read_holder(workdir)
    if holder is not None:
        if not _is_stale(holder):
            raise _refusal(workdir, holder)
        say(f"Took over the lock of {workdir} ({describe(holder)} is no longer running).")
    fileio.write_text_atomic(fileio.join(workdir, LOCK_FILE), json.dumps(record))
    say(
        f"Note: {workdir} is on an object store, where a lock cannot be created atomically: "
        "a second trainer is refused, but two started at the same moment are not excluded."
    )


def _release(workdir: str, record: dict[str, Any]) -> None:
    path = fileio.join(workdir, LOCK_FILE)
    if read_holder(workdir) != record:
        return  # not ours any more (deleted by hand, or taken over): leave it
    if fileio.is_url(path):
        import tensorflow as tf

        tf.io.gfile.remove(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _print(line: str) -> None:
    print(line, flush=True)


@contextlib.contextmanager
def hold(
    workdir: str, enabled: bool = True, say: Callable[[str], None] = _print
) -> Iterator[None]:
    """Holds `workdir`'s lock for the body of the `with`; a no-op when not `enabled`.

    Args:
      workdir: the run directory (local path or URL); created if missing.
      enabled: False on the processes of a multi-host run other than process 0.
      say: where the takeover and object-store notes go (default: print).

    Raises:
      WorkdirInUse: another trainer holds it (the message names host, pid, start time and
        command, and what to do). A stale lock of a dead process on this host is taken over.
      OSError: the workdir cannot be created or written (a file, no permission, no space).
    """
    if not enabled:
        yield
        return
    workdir = fileio.absolute(workdir)
    if fileio.exists(workdir) and not fileio.isdir(workdir):
        raise NotADirectoryError(f"The workdir {workdir} is a file; give a directory.")
    fileio.makedirs(workdir)
    record = _record()
    if fileio.is_url(workdir):
        _acquire_url(workdir, record, say)
    else:
        _acquire_local(workdir, record, say)
    try:
        yield
    finally:
        _release(workdir, record)
