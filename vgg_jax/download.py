"""Downloading a weights file once into the cache, verified before anything reads it.

The cache directory is `$VGG_JAX_CACHE` if set, else `$XDG_CACHE_HOME/vgg_jax`,
else `~/.cache/vgg_jax`. Downloads land in `<cache>/downloads/<file name>`:
written to a `.part` name, checked against the publisher's checksum, and only
then renamed, so an interrupted or corrupted transfer never leaves a file that
looks complete. `VGG_JAX_MIRROR=https://host/path` fetches `<mirror>/<file
name>` instead of the publisher's URL (the checksum is checked all the same).
"""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

CACHE_ENV = "VGG_JAX_CACHE"
MIRROR_ENV = "VGG_JAX_MIRROR"
CHUNK = 1 << 20
HASHES = ("sha256", "md5")


class DownloadError(OSError):
    """A file that could not be fetched or did not match its checksum; the message says which."""


def cache_dir() -> str:
    """Where downloads and converted bundles are kept (see the module docstring)."""
    if os.environ.get(CACHE_ENV):
        return os.path.abspath(os.path.expanduser(os.environ[CACHE_ENV]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(base), "vgg_jax")


def file_name(url: str) -> str:
    """The last path component of a URL: the name the file is cached (and mirrored) under."""
    name = os.path.basename(urllib.parse.urlparse(url).path)
    if not name:
        raise DownloadError(f"{url} names no file (the path ends in '/').")
    return name


def source_url(url: str) -> str:
    """`url`, or the same file name under $VGG_JAX_MIRROR when that is set."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    return f"{mirror.rstrip('/')}/{file_name(url)}" if mirror else url


def parse_checksum(checksum: str) -> tuple[str, str]:
    """('sha256' or 'md5', lower-case hex) from 'sha256:HEX', 'md5:HEX' or bare hex (sha256).

    A sha256 of fewer than 64 digits is a prefix (torchvision's file names carry
    the first 8 or more digits, which is what torch.hub checks).
    """
    algo, _, digits = checksum.rpartition(":")
    algo, digits = (algo or "sha256").lower(), digits.strip().lower()
    if algo not in HASHES:
        raise ValueError(f"Unknown checksum kind {algo!r} in {checksum!r}; use sha256: or md5:.")
    full = 64 if algo == "sha256" else 32
    if not digits or any(c not in "0123456789abcdef" for c in digits) or len(digits) > full:
        raise ValueError(f"Checksum {checksum!r} is not a {algo} hex digest (up to {full} digits).")
    if algo == "md5" and len(digits) != full:
        raise ValueError(f"md5 checksum {checksum!r} must have 32 hex digits.")
    return algo, digits


def new_hash(algo: str) -> Any:
    # md5 only checks integrity here (Keras publishes md5), which FIPS builds allow so marked.
    return hashlib.new(algo, usedforsecurity=False)


def file_digest(path: str, algo: str) -> str:
    h = new_hash(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def matches(digest: str, expected: str) -> bool:
    """Full digests must be equal; a published prefix must begin the digest."""
    return digest.startswith(expected)


def offline_hint(url: str, name: str) -> str:
    return (
        f"Fetch {url} elsewhere (file {name}) and run `python -m vgg_jax.convert {name} --to "
        f"DIR`, then pass DIR; or set {MIRROR_ENV} to a server that has {name}."
    )


def fetch(url: str, checksum: str, progress: bool = True) -> str:
    """The cached, verified local copy of `url`: downloaded once, then served from the cache.

    A copy already in the cache is verified again before it is returned; one
    that no longer matches is removed and fetched anew.
    """
    algo, expected = parse_checksum(checksum)
    name = file_name(url)
    directory = os.path.join(cache_dir(), "downloads")
    dest = os.path.join(directory, name)
    if os.path.isfile(dest):
        if matches(file_digest(dest, algo), expected):
            return dest
        os.remove(dest)  # damaged since it was verified: fetch it again
    os.makedirs(directory, exist_ok=True)
    actual_url = source_url(url)
    part = f"{dest}.part-{os.getpid()}"
    try:
        digest = _transfer(actual_url, part, algo, name, progress)
        if not matches(digest, expected):
            raise DownloadError(
                f"{actual_url} does not match its published checksum: {algo} {digest}, expected "
                f"{expected}{'...' if len(expected) < len(digest) else ''}. The transfer was "
                "corrupted or the file was replaced; nothing was kept. Try again, or check the "
                "mirror."
            )
        os.replace(part, dest)
    finally:
        if os.path.exists(part):
            os.remove(part)
    return dest


def _transfer(url: str, part: str, algo: str, name: str, progress: bool) -> str:
    """Streams `url` into `part`, hashing as it goes; returns the digest. Errors name the URL."""
    h = new_hash(algo)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done, shown = 0, -1
            for chunk in iter(lambda: response.read(CHUNK), b""):
                out.write(chunk)
                h.update(chunk)
                done += len(chunk)
                if progress:
                    shown = _show_progress(name, done, total, shown)
    except urllib.error.HTTPError as e:
        raise DownloadError(
            f"Downloading {url} failed: HTTP {e.code} {e.reason}. {offline_hint(url, name)}"
        ) from e
    except (urllib.error.URLError, OSError) as e:  # offline, refused, reset, timed out
        reason = getattr(e, "reason", e)
        raise DownloadError(
            f"Could not download {url} ({reason}). {offline_hint(url, name)}"
        ) from e
    if progress and shown >= 0:
        print(file=sys.stderr)
    if total and done != total:
        raise DownloadError(
            f"Downloading {url} stopped after {done} of {total} bytes; nothing was kept. Try "
            f"again. {offline_hint(url, name)}"
        )
    return h.hexdigest()


def _show_progress(name: str, done: int, total: int, shown: int) -> int:
    """One stderr line, rewritten in place at each whole percent (or each 10 MB if no size)."""
    step = done * 100 // total if total else done // (10 * CHUNK)
    if step != shown:
        size = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB ({step}%)" if total else f"{done >> 20} MB"
        print(f"\rdownloading {name}: {size}", end="", file=sys.stderr, flush=True)
    return step
