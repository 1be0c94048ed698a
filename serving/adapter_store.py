"""Adapter store: LoRA adapters resolved by name from a directory or any fsspec URL.

Layout: ``<store>/<adapter name>/adapter_config.json`` and ``adapter_model.safetensors`` (with, when the
adapter has them, ``influence.safetensors`` and ``attribution.json``: its influence features and attribution
method, attribution/adapter_method.py), and
``<store>/.<adapter name>.sha256`` holding the adapter directory's digest (``sha256:<hex>``,
statedir/store_cache.py `directory_digest`), written by `put` just before the directory. Names start
with a letter or digit, so the listing never takes a digest file (or a hidden staging directory)
for an adapter. An adapter written into the store is servable at once; listing is cached for
``list_ttl_seconds``.

A local-directory store is used in place. From a remote store (any fsspec URL), an adapter is
downloaded once per node into ``<cache_dir>/.objects/<digest hex>/`` and checked against its digest
file (`StoreCache`); ``<cache_dir>/<name>`` is a symlink to it, so the engine sees the adapter's name.
An adapter without a digest file, or whose files do not match it (tampered, or replaced while being
read), is AdapterUnavailable and nothing is cached.

Adapters are checked against the base model before the engine sees them, because a malformed
adapter handed to vLLM kills the engine process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import fsspec

from attribution.adapter_method import METHOD_FILE
from attribution.influence import FEATURES_FILE
from serving.errors import AdapterUnavailable, InvalidRequest
from statedir.store_cache import StoreCache, StoreDigestMismatch, StoreError, digest_hex, directory_digest

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
OPTIONAL_FILES = (FEATURES_FILE, METHOD_FILE)  # copied (and digested) when the adapter has them
DIGEST_SUFFIX = ".sha256"
OBJECTS_DIR = ".objects"
SAFETENSORS_HEADER_BYTES_MAX = 16 * 1024 * 1024
ADAPTER_BYTES_MAX = 2 * 1024**3


@dataclass(frozen=True)
class BaseModelShape:
    """What an adapter must fit: module input/output sizes of the base model."""

    num_layers: int
    module_io: dict[str, tuple[int, int]]

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> "BaseModelShape":
        config = json.loads((Path(model_dir) / "config.json").read_text())
        hidden, inter = config["hidden_size"], config["intermediate_size"]
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or hidden // heads
        kv = head_dim * config.get("num_key_value_heads", heads)
        return cls(
            num_layers=config["num_hidden_layers"],
            module_io={
                "q_proj": (hidden, head_dim * heads),
                "k_proj": (hidden, kv),
                "v_proj": (hidden, kv),
                "o_proj": (head_dim * heads, hidden),
                "gate_proj": (hidden, inter),
                "up_proj": (hidden, inter),
                "down_proj": (inter, hidden),
            },
        )


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not ADAPTER_NAME.match(name):
        raise InvalidRequest(
            "adapter names are 1-128 characters of letters, digits, '.', '_' or '-', starting with a letter or digit",
            param="model",
        )
    return name


def read_safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header, without loading the tensors."""
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ValueError("file is shorter than a safetensors header")
        (length,) = struct.unpack("<Q", raw)
        if length <= 0 or length > SAFETENSORS_HEADER_BYTES_MAX:
            raise ValueError(f"safetensors header length {length} is out of range")
        header = json.loads(handle.read(length))
    return {name: list(info["shape"]) for name, info in header.items() if name != "__metadata__"}


def check_adapter_dir(path: Path, base: BaseModelShape, max_rank: int) -> int:
    """Raise AdapterUnavailable unless `path` is a LoRA the engine can load; return its rank."""
    name = path.name
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterUnavailable(f"adapter '{name}' has no {CONFIG_FILE}", param="model") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterUnavailable(f"adapter '{name}': {CONFIG_FILE} is not valid JSON ({exc})", param="model") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise AdapterUnavailable(f"adapter '{name}' is not a LoRA adapter", param="model")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise AdapterUnavailable(f"adapter '{name}': 'r' must be a positive integer", param="model")
    if rank > max_rank:
        raise AdapterUnavailable(
            f"adapter '{name}' has rank {rank}, above this engine's max_lora_rank {max_rank}", param="model"
        )
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterUnavailable(f"adapter '{name}' has no {WEIGHTS_FILE}", param="model")
    if weights.stat().st_size > ADAPTER_BYTES_MAX:
        raise AdapterUnavailable(f"adapter '{name}' is larger than {ADAPTER_BYTES_MAX} bytes", param="model")
    try:
        shapes = read_safetensors_shapes(weights)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdapterUnavailable(f"adapter '{name}': unreadable weights ({exc})", param="model") from None
    if not shapes:
        raise AdapterUnavailable(f"adapter '{name}' holds no tensors", param="model")
    pattern = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
    for tensor, shape in shapes.items():
        match = pattern.search(tensor)
        if not match:
            raise AdapterUnavailable(f"adapter '{name}': unexpected tensor '{tensor}'", param="model")
        layer, module, side = int(match[1]), match[2], match[3]
        if layer >= base.num_layers or module not in base.module_io:
            raise AdapterUnavailable(f"adapter '{name}': '{tensor}' has no matching base layer", param="model")
        fan_in, fan_out = base.module_io[module]
        expected = [rank, fan_in] if side == "A" else [fan_out, rank]
        if shape != expected:
            raise AdapterUnavailable(
                f"adapter '{name}': '{tensor}' has shape {shape}, the base model needs {expected}", param="model"
            )
    return rank


class AdapterStore:
    """Names → adapter directories, in a local directory or behind an fsspec URL."""

    def __init__(self, url: str, cache_dir: Path, list_ttl_seconds: float = 2.0) -> None:
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.is_local = "file" in protocols
        self.cache_dir = Path(cache_dir)
        self._objects = StoreCache(self.cache_dir / OBJECTS_DIR)  # one per store: one download per digest at a time
        self.list_ttl_seconds = list_ttl_seconds
        self._listing: tuple[float, list[str], frozenset[str]] = (0.0, [], frozenset())
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """Registered adapter names, sorted; re-read from the store at most every TTL."""
        return self._refresh()[1]

    def _refresh(self) -> tuple[float, list[str], frozenset[str]]:
        now = time.monotonic()
        with self._lock:
            if now - self._listing[0] < self.list_ttl_seconds:
                return self._listing
        try:
            entries = self.fs.ls(self.root, detail=False) if self.fs.exists(self.root) else []
        except FileNotFoundError:
            entries = []
        found = sorted(
            base for base in (entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries) if ADAPTER_NAME.match(base)
        )
        with self._lock:
            self._listing = (now, found, frozenset(found))
            return self._listing

    def has(self, name: str) -> bool:
        """Whether `name` is in the store (the cached listing first, then the store itself)."""
        if name in self._refresh()[2]:
            return True
        return bool(ADAPTER_NAME.match(name)) and self.fs.isdir(f"{self.root}/{name}")

    def digest_path(self, name: str) -> str:
        """Where the store keeps the digest of adapter `name` (beside it, hidden from the listing)."""
        return f"{self.root}/.{name}{DIGEST_SUFFIX}"

    def digest(self, name: str) -> str:
        """The adapter's recorded digest; AdapterUnavailable when the store has none (or a malformed one)."""
        try:
            recorded = self.fs.cat_file(self.digest_path(name)).decode("ascii", "replace").strip()
            digest_hex(recorded)
        except FileNotFoundError:
            raise AdapterUnavailable(f"adapter '{name}' has no digest in the store ({self.digest_path(name)}); "
                                     "put it into the store again", param="model") from None
        except ValueError as exc:
            raise AdapterUnavailable(f"adapter '{name}': {exc}", param="model") from None
        return recorded

    def local_path(self, name: str) -> Path:
        """A local directory holding the adapter's files (downloaded once and checked for remote stores)."""
        if self.is_local:
            return Path(self.root) / name
        validate_name(name)
        digest = self.digest(name)
        try:
            fetched = self._objects.fetch(f"{self.url}/{name}", digest)
        except StoreDigestMismatch as exc:
            raise AdapterUnavailable(f"adapter '{name}' in the store does not match its digest, so it is not used "
                                     f"({exc.got}, expected {exc.expected})", param="model") from None
        except StoreError as exc:
            raise AdapterUnavailable(f"adapter '{name}' could not be fetched from the store ({exc})",
                                     param="model") from None
        link = self.cache_dir / name
        if os.path.islink(link) and Path(os.readlink(link)) == fetched:
            return link
        staging = self.cache_dir / f".{name}.{uuid.uuid4().hex}"
        staging.symlink_to(fetched, target_is_directory=True)
        os.replace(staging, link)  # atomic: a reader sees the old copy or the new one
        return link

    def forget_local_copy(self, name: str) -> None:
        """Drop the node's copy of `name` (its files too, unless another adapter name uses the same ones)."""
        if self.is_local:
            return
        link = self.cache_dir / name
        if not os.path.islink(link):
            shutil.rmtree(link, ignore_errors=True)  # a copy made before copies were checked by digest
            return
        target = Path(os.readlink(link))
        link.unlink(missing_ok=True)
        others = [entry for entry in self.cache_dir.iterdir()
                  if entry.name != name and os.path.islink(entry) and Path(os.readlink(entry)) == target]
        if not others:
            shutil.rmtree(target, ignore_errors=True)

    def put(self, name: str, source: Path) -> str:
        """Register an adapter by copying its directory into the store, with its digest; return the digest.

        Its config and weights are required; its influence features and method file are copied when present."""
        validate_name(name)
        for file in (CONFIG_FILE, WEIGHTS_FILE):
            if not (Path(source) / file).is_file():
                raise InvalidRequest(f"{source} has no {file}")
        files = (CONFIG_FILE, WEIGHTS_FILE, *(f for f in OPTIONAL_FILES if (Path(source) / f).is_file()))
        digest = directory_digest(Path(source), files=files)  # what is copied, only
        staging = f"{self.root}/.{name}.{uuid.uuid4().hex}"
        self.fs.makedirs(staging, exist_ok=True)
        for file in files:
            self.fs.put(str(Path(source) / file), f"{staging}/{file}")
        self.fs.pipe_file(self.digest_path(name), f"{digest}\n".encode())
        target = f"{self.root}/{name}"
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)
        if self.is_local:
            self.fs.mv(staging, target, recursive=True)
        else:  # object stores rename no directory: move the objects (readers check the digest)
            for file in files:
                self.fs.mv(f"{staging}/{file}", f"{target}/{file}")
            if self.fs.exists(staging):
                self.fs.rm(staging, recursive=True)
        with self._lock:
            self._listing = (0.0, [], frozenset())
        return digest

    def remove(self, name: str) -> None:
        """Delete an adapter from the store (used to undo a registration that could not be recorded)."""
        validate_name(name)
        if self.fs.exists(f"{self.root}/{name}"):
            self.fs.rm(f"{self.root}/{name}", recursive=True)
        if self.fs.exists(self.digest_path(name)):
            self.fs.rm(self.digest_path(name))
        self.forget_local_copy(name)
        with self._lock:
            self._listing = (0.0, [], frozenset())
