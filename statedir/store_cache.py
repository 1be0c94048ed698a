"""Artifacts (attribution indexes, adapters) from a store URL, copied into a node-local cache and checked by digest.

A store URL is a local directory (a path, or ``file://``) or any fsspec URL (``s3://bucket/prefix``,
``gs://…``). An artifact is a directory; its digest (`directory_digest`) is ``sha256:<hex>`` over
its sorted relative file paths and each file's size and SHA-256, so it names the content exactly.

`StoreCache.fetch(url, digest)`:
- a local directory is used where it is (no copy); with a digest it is checked once per process per
  (path, digest);
- a remote directory must come with a digest: it is downloaded into a hidden staging directory under
  the cache (``.staging-…``, never taken for a copy), checked, and renamed to ``<cache>/<digest hex>/``.
  The cache is content-addressed: a second fetch of the same digest is a no-op, two processes fetching
  at once both end with the same complete directory (the rename that loses finds the winner's), and
  a mismatch leaves nothing in the cache (`StoreDigestMismatch`).

`upload(local_dir, url)` copies a directory to a store URL (staging + rename on local filesystems;
objects written in place on object stores, where readers check the digest) and returns its digest.
S3 endpoints and credentials come from the environment as botocore reads it (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``…), so Ray workers need nothing but env vars.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import fsspec

DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")
CHUNK_BYTES = 1 << 20
STAGING_PREFIX = ".staging-"
STAGING_MAX_AGE_SECONDS = 24 * 3600  # staging directories older than this were left by a killed process

_verified: set[tuple[str, str]] = set()  # (resolved local path, digest) checked by this process
_verified_lock = threading.Lock()


class StoreError(Exception):
    """An artifact could not be had from its store; str(error) is the one-line reason."""


class StoreUnavailable(StoreError):
    """The store did not answer, or holds nothing at the URL."""


class StoreDigestMismatch(StoreError):
    """What the store holds at `url` is not the artifact that was recorded (tampered, or half written)."""

    def __init__(self, url: str, expected: str, got: str) -> None:
        super().__init__(f"{url} has digest {got}, expected {expected}: the store's copy was changed or is "
                         "incomplete, so it is not used")
        self.url, self.expected, self.got = url, expected, got


def is_local_url(url: str) -> bool:
    """A path or a ``file://`` URL (anything else names an fsspec filesystem)."""
    return "://" not in url or url.startswith("file://")


def check_store_url(url: str) -> str:
    """`url` if it names a directory or a filesystem fsspec knows (its driver installed); ValueError otherwise."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError("a store URL must not be empty")
    if is_local_url(url):
        return url
    protocol = url.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as exc:
        raise ValueError(f"{url}: no filesystem for '{protocol}://' ({exc})") from None
    return url


def local_path_of(url: str) -> Path:
    return Path(url.removeprefix("file://"))


def digest_hex(digest: str) -> str:
    """The hex part of ``sha256:<hex>``; ValueError for anything else."""
    match = DIGEST.match(digest) if isinstance(digest, str) else None
    if not match:
        raise ValueError(f"'{digest}' is not a digest: expected 'sha256:' followed by 64 lower-case hex digits")
    return match[1]


def _relative_files(root: Path) -> list[str]:
    files = []
    for directory, _, names in os.walk(root):
        for name in names:
            files.append((Path(directory) / name).relative_to(root).as_posix())
    return sorted(files)


def directory_digest(path: Path, files: Sequence[str] | None = None) -> str:
    """``sha256:<hex>`` over the sorted relative paths of the files under `path`, their sizes and contents.

    With `files` (relative paths), only those: the digest the directory will have once only they are copied."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    outer = hashlib.sha256()
    for relative in sorted(files) if files is not None else _relative_files(root):
        inner = hashlib.sha256()
        size = 0
        with open(root / relative, "rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                inner.update(chunk)
                size += len(chunk)
        outer.update(f"{relative}\0{size}\0{inner.hexdigest()}\n".encode())
    return "sha256:" + outer.hexdigest()


def _filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise StoreUnavailable(f"cannot open store URL {url}: {exc}") from None


def _remote_files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Paths relative to `root` of the files under it (sorted)."""
    found = fs.find(root, detail=False)
    prefix = root.rstrip("/") + "/"
    return sorted(path[len(prefix):] for path in found if path.startswith(prefix))


class StoreCache:
    """Store URLs → local directories, downloads checked by digest and kept under `cache_dir`."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = Path(cache_dir)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def fetch(self, url: str, digest: str | None) -> Path:
        """A local directory holding the artifact at `url` (remote ones only with a `digest`).

        StoreDigestMismatch when the content is not `digest`; StoreUnavailable when the store does
        not answer or holds nothing there; ValueError for a malformed digest or a remote URL without one.
        """
        if is_local_url(url):
            return self._local(url, digest)
        if not digest:
            raise ValueError(f"{url} is remote: a digest is required to fetch it (remote artifacts are always checked)")
        hex_digest = digest_hex(digest)
        target = self.cache_dir / hex_digest
        if target.is_dir():
            return target
        with self._lock_for(hex_digest):
            if target.is_dir():
                return target
            return self._download(url, digest, target)

    def _lock_for(self, key: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(key, threading.Lock())

    @staticmethod
    def _local(url: str, digest: str | None) -> Path:
        path = local_path_of(url)
        if not path.is_dir():
            raise StoreUnavailable(f"{path} is not a directory")
        if not digest:
            return path
        digest_hex(digest)
        key = (str(path.resolve()), digest)
        with _verified_lock:
            if key in _verified:
                return path
        got = directory_digest(path)
        if got != digest:
            raise StoreDigestMismatch(url, digest, got)
        with _verified_lock:
            _verified.add(key)
        return path

    def _download(self, url: str, digest: str, target: Path) -> Path:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._remove_abandoned_staging()
        staging = self.cache_dir / f"{STAGING_PREFIX}{target.name[:16]}-{uuid.uuid4().hex}"
        try:
            fs, root = _filesystem(url)
            root = root.rstrip("/")
            try:
                files = _remote_files(fs, root)
            except FileNotFoundError:
                files = []
            if not files:
                raise StoreUnavailable(f"the store holds nothing at {url}")
            for relative in files:
                (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            fs.get([f"{root}/{relative}" for relative in files], [str(staging / relative) for relative in files])
            got = directory_digest(staging)
            if got != digest:
                raise StoreDigestMismatch(url, digest, got)
            try:
                staging.rename(target)
            except OSError:
                if not target.is_dir():  # not a lost race: the rename itself failed
                    raise
            return target
        except StoreError:
            raise
        except Exception as exc:  # the filesystem's errors: unreachable endpoint, denied, timeout
            raise StoreUnavailable(f"could not fetch {url}: {type(exc).__name__}: {exc}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _remove_abandoned_staging(self) -> None:
        cutoff = time.time() - STAGING_MAX_AGE_SECONDS
        for leftover in self.cache_dir.glob(f"{STAGING_PREFIX}*"):
            try:
                if leftover.stat().st_mtime < cutoff:
                    shutil.rmtree(leftover, ignore_errors=True)
            except OSError:
                continue


def upload(local_dir: Path, url: str) -> str:
    """Copy the directory `local_dir` to `url` (replacing what was there) and return its digest.

    StoreUnavailable when the store refuses or does not answer (a local target is then left as it was).
    """
    source = Path(local_dir)
    digest = directory_digest(source)
    files = _relative_files(source)
    if is_local_url(url):
        _upload_local(source, local_path_of(url))
        return digest
    fs, root = _filesystem(url)
    root = root.rstrip("/")
    try:
        if fs.exists(root):
            fs.rm(root, recursive=True)
        fs.put([str(source / relative) for relative in files], [f"{root}/{relative}" for relative in files])
    except Exception as exc:  # the filesystem's errors: no such bucket, denied, unreachable endpoint
        raise StoreUnavailable(f"could not upload {source} to {url}: {type(exc).__name__}: {exc}") from None
    return digest


def _upload_local(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    displaced = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
    try:
        shutil.copytree(source, staging)
        if target.exists():
            target.rename(displaced)
        staging.rename(target)
    except OSError as exc:
        if displaced.exists() and not target.exists():
            displaced.rename(target)  # put back what was there
        raise StoreUnavailable(f"could not copy {source} to {target}: {exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(displaced, ignore_errors=True)
