"""The few file operations a workdir needs, for local paths and URLs alike.

TPU pods write their workdir to `gs://...`, where `os.path.abspath` and
`open` do not reach. Local paths go through `os` (fast, no TensorFlow
import); anything with a scheme (`gs://`, `s3://`, `ram://` in tests) goes
through `tf.io.gfile`. Orbax takes both kinds of path as strings itself.
"""

import os
import uuid
from typing import Any


def is_url(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def _gfile() -> Any:
    import tensorflow as tf

    return tf.io.gfile


def absolute(path: str | os.PathLike) -> str:
    """The absolute form of a local path; a URL unchanged."""
    path = os.fspath(path)
    return path if is_url(path) else os.path.abspath(path)


def join(path: str | os.PathLike, *names: str) -> str:
    return os.path.join(os.fspath(path), *names)  # '/'-joins URLs too


def basename(path: str | os.PathLike) -> str:
    return os.path.basename(os.fspath(path).rstrip("/"))


def exists(path: str | os.PathLike) -> bool:
    return _gfile().exists(os.fspath(path)) if is_url(path) else os.path.exists(path)


def isfile(path: str | os.PathLike) -> bool:
    if is_url(path):
        gfile = _gfile()
        return gfile.exists(os.fspath(path)) and not gfile.isdir(os.fspath(path))
    return os.path.isfile(path)


def isdir(path: str | os.PathLike) -> bool:
    return _gfile().isdir(os.fspath(path)) if is_url(path) else os.path.isdir(path)


def makedirs(path: str | os.PathLike) -> None:
    if is_url(path):
        _gfile().makedirs(os.fspath(path))
    else:
        os.makedirs(path, exist_ok=True)


def read_bytes(path: str | os.PathLike) -> bytes:
    if is_url(path):
        with _gfile().GFile(os.fspath(path), "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes to a temporary name, then renames: readers never see half a file.

    The temporary name is the writer's own (pid and a random part), so two processes
    writing the same file at once (two `evaluate` commands storing one result) each
    rename a whole file of theirs: the last rename wins, neither fails.
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        if is_url(path):
            gfile = _gfile()
            with gfile.GFile(tmp, "wb") as f:
                f.write(data)
            gfile.rename(tmp, path, overwrite=True)
        else:
            make_parent_dirs(path)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
    except OSError as e:
        if e.filename == tmp:  # the user named `path`, not our temporary name
            raise type(e)(e.errno, e.strerror, path) from None
        raise
    finally:
        if exists(tmp):  # a failed write (a full disk) leaves nothing behind
            _gfile().remove(tmp) if is_url(tmp) else os.remove(tmp)


def make_parent_dirs(path: str | os.PathLike) -> None:
    """Creates the local directories a file is to be written into (a URL needs none)."""
    parent = os.path.dirname(os.fspath(path))
    if parent and not is_url(parent):
        os.makedirs(parent, exist_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def append_text(path: str | os.PathLike, text: str) -> None:
    """Appends to a text file. Object stores cannot append, so a URL is rewritten whole."""
    if is_url(path):
        old = read_bytes(path) if exists(path) else b""
        write_bytes_atomic(path, old + text.encode("utf-8"))
    else:
        with open(path, "a") as f:
            f.write(text)


def move_tree(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Moves directory `source` to `target` (which must not exist yet).

    Object stores (gs://) have no directory rename: every file is copied, then `source`
    is deleted, so a move cut short leaves `source` whole (and part of a copy at `target`).
    """
    source, target = os.fspath(source), os.fspath(target)
    if not is_url(source):
        os.rename(source, target)
        return
    gfile = _gfile()
    for root, _, files in gfile.walk(source):
        here = join(target, root[len(source) :].strip("/"))
        gfile.makedirs(here)
        for name in files:
            gfile.copy(join(root, name), join(here, name))
    gfile.rmtree(source)
