"""Store URLs → node-local copies checked by digest (statedir/store_cache.py), against a real S3 (moto)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import fsspec
import pytest

from statedir.store_cache import StoreCache, StoreDigestMismatch, StoreUnavailable, directory_digest, upload
from tests.support.s3 import S3Server


def artifact(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


FILES = {"manifest.json": b'{"a": 1}', "shard/data.bin": bytes(range(256)) * 4000, "empty": b""}


def test_digest_is_deterministic_and_sees_every_change(tmp_path: Path) -> None:
    first = artifact(tmp_path / "one", FILES)
    second = artifact(tmp_path / "two", dict(reversed(list(FILES.items()))))
    digest = directory_digest(first)
    assert digest.startswith("sha256:") and len(digest) == 71
    assert directory_digest(second) == digest  # same content, written in another order, elsewhere
    (second / "shard" / "data.bin").write_bytes(bytes(range(256)) * 3999 + bytes(range(255)) + b"\1")
    assert directory_digest(second) != digest  # one byte
    changed = [artifact(tmp_path / "renamed", {**{k: v for k, v in FILES.items() if k != "empty"}, "empty2": b""}),
               artifact(tmp_path / "extra", {**FILES, "more": b""})]
    assert all(directory_digest(path) != digest for path in changed)  # a renamed or an added (empty) file
    with pytest.raises(FileNotFoundError):
        directory_digest(tmp_path / "missing")


def test_local_directories_are_used_in_place_and_checked_when_a_digest_is_given(tmp_path: Path) -> None:
    source = artifact(tmp_path / "index", FILES)
    cache = StoreCache(tmp_path / "cache")
    digest = directory_digest(source)
    assert cache.fetch(str(source), None) == source
    assert cache.fetch(f"file://{source}", digest) == source
    other = artifact(tmp_path / "other", {"x": b"1"})
    with pytest.raises(StoreDigestMismatch, match="expected " + digest):
        cache.fetch(str(other), digest)
    with pytest.raises(StoreUnavailable, match="is not a directory"):
        cache.fetch(str(tmp_path / "missing"), None)
    with pytest.raises(ValueError, match="is not a digest"):
        cache.fetch(str(source), "md5:abc")
    assert not (tmp_path / "cache").exists()  # nothing copied


def test_fetch_from_s3_downloads_once_into_the_content_addressed_cache(tmp_path: Path, s3: S3Server) -> None:
    source = artifact(tmp_path / "index", FILES)
    url = s3.url("indexes", "d1", "v1")
    digest = upload(source, url)
    assert digest == directory_digest(source)
    cache = StoreCache(tmp_path / "cache")
    local = cache.fetch(url, digest)
    assert local == tmp_path / "cache" / digest.removeprefix("sha256:")
    assert directory_digest(local) == digest and (local / "shard" / "data.bin").read_bytes() == FILES["shard/data.bin"]
    fs, root = fsspec.core.url_to_fs(url)
    fs.rm(root, recursive=True)  # the store forgets it: the cached copy is enough
    assert StoreCache(tmp_path / "cache").fetch(url, digest) == local
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [local.name]  # no staging left


def test_remote_fetches_need_a_digest_and_a_reachable_store(tmp_path: Path, s3: S3Server) -> None:
    cache = StoreCache(tmp_path / "cache")
    with pytest.raises(ValueError, match="a digest is required"):
        cache.fetch(s3.url("x"), None)
    with pytest.raises(StoreUnavailable, match="holds nothing at"):
        cache.fetch(s3.url("nothing-here"), "sha256:" + "0" * 64)
    with pytest.raises(StoreUnavailable, match="could not upload"):
        upload(artifact(tmp_path / "a", FILES), "s3://no-such-bucket-here/x")
    assert list((tmp_path / "cache").glob("*")) == []


def test_a_tampered_object_is_refused_and_nothing_is_cached(tmp_path: Path, s3: S3Server) -> None:
    url = s3.url("indexes", "d1", "v1")
    digest = upload(artifact(tmp_path / "index", FILES), url)
    fs, root = fsspec.core.url_to_fs(url)
    fs.pipe(f"{root}/manifest.json", b'{"a": 2}')
    cache = StoreCache(tmp_path / "cache")
    with pytest.raises(StoreDigestMismatch) as raised:
        cache.fetch(url, digest)
    assert raised.value.url == url and raised.value.expected == digest and raised.value.got != digest
    assert list((tmp_path / "cache").iterdir()) == []


def _fetch(args: tuple[str, str, str]) -> str:
    cache_dir, url, digest = args
    return str(StoreCache(Path(cache_dir)).fetch(url, digest))


def test_processes_fetching_at_once_end_with_one_complete_copy(tmp_path: Path, s3: S3Server) -> None:
    url = s3.url("indexes", "d1", "v1")
    digest = upload(artifact(tmp_path / "index", FILES), url)
    leftover = tmp_path / "cache" / ".staging-0123456789abcdef-dead"  # a killed process's half copy
    artifact(leftover, {"manifest.json": b"half"})
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        paths = pool.map(_fetch, [(str(tmp_path / "cache"), url, digest)] * 3)
    assert len(set(paths)) == 1 and directory_digest(Path(paths[0])) == digest
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [leftover.name, Path(paths[0]).name]


def test_upload_to_a_local_store_replaces_what_was_there(tmp_path: Path) -> None:
    target = tmp_path / "store" / "d1" / "v1"
    upload(artifact(tmp_path / "old", {"stale": b"x"}), str(target))
    digest = upload(artifact(tmp_path / "new", FILES), str(target))
    assert directory_digest(target) == digest
    assert sorted(p.name for p in target.parent.iterdir()) == ["v1"]
