"""Adapter checks and the store, on local directories and on an fsspec (in-memory) remote store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsspec
import pytest

from serving.adapter_store import AdapterStore, BaseModelShape, check_adapter_dir, validate_name
from serving.errors import AdapterUnavailable, InvalidRequest
from statedir.store_cache import directory_digest
from tests.support.s3 import S3Server


@pytest.fixture(scope="module")
def base(demo_state: Path) -> BaseModelShape:
    return BaseModelShape.from_model_dir(demo_state / "models" / "datanet-tiny-llama")


def test_demo_adapter_passes_and_reports_its_rank(demo_state: Path, base: BaseModelShape) -> None:
    assert check_adapter_dir(demo_state / "adapters" / "demo-adapter-003", base, max_rank=16) == 8


def test_rank_above_engine_limit_is_rejected(scratch_adapter: Path, base: BaseModelShape) -> None:
    with pytest.raises(AdapterUnavailable, match="max_lora_rank 4"):
        check_adapter_dir(scratch_adapter, base, max_rank=4)


def test_declared_rank_must_match_tensors(scratch_adapter: Path, base: BaseModelShape) -> None:
    config = scratch_adapter / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "r": 4}))
    with pytest.raises(AdapterUnavailable, match="the base model needs"):
        check_adapter_dir(scratch_adapter, base, max_rank=16)


@pytest.mark.parametrize(
    ("config", "phrase"),
    [
        ({"peft_type": "PREFIX_TUNING", "r": 8}, "not a LoRA adapter"),
        ({"peft_type": "LORA", "r": 0}, "positive integer"),
        ({"peft_type": "LORA", "r": "8"}, "positive integer"),
        ([1, 2, 3], "not a LoRA adapter"),
    ],
)
def test_bad_configs(scratch_adapter: Path, base: BaseModelShape, config: object, phrase: str) -> None:
    (scratch_adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterUnavailable, match=phrase):
        check_adapter_dir(scratch_adapter, base, max_rank=16)


def test_unknown_tensor_and_header_lies(scratch_adapter: Path, base: BaseModelShape) -> None:
    weights = scratch_adapter / "adapter_model.safetensors"
    header = b'{"model.embed.weight": {"dtype": "F32", "shape": [8, 8], "data_offsets": [0, 256]}}'
    weights.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 256)
    with pytest.raises(AdapterUnavailable, match="unexpected tensor"):
        check_adapter_dir(scratch_adapter, base, max_rank=16)
    weights.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(AdapterUnavailable, match="out of range"):
        check_adapter_dir(scratch_adapter, base, max_rank=16)


def test_layer_beyond_the_base_is_rejected(scratch_adapter: Path, base: BaseModelShape) -> None:
    weights = scratch_adapter / "adapter_model.safetensors"
    name = "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"
    header = json.dumps({name: {"dtype": "F32", "shape": [8, 256], "data_offsets": [0, 8192]}}).encode()
    weights.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8192)
    with pytest.raises(AdapterUnavailable, match="no matching base layer"):
        check_adapter_dir(scratch_adapter, base, max_rank=16)


@pytest.mark.parametrize("name", ["", "../etc", "a/b", ".hidden", "x" * 200, "sp ace"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidRequest):
        validate_name(name)


def test_local_store_lists_puts_and_replaces(tmp_path: Path, scratch_adapter: Path) -> None:
    store = AdapterStore(str(tmp_path / "store"), tmp_path / "cache", list_ttl_seconds=0)
    assert store.names() == []
    store.put("alpha", scratch_adapter)
    store.put("beta", scratch_adapter)
    assert store.names() == ["alpha", "beta"]
    assert store.has("alpha") and not store.has("gamma")
    assert store.local_path("alpha") == tmp_path / "store" / "alpha"
    store.put("alpha", scratch_adapter)  # replacing keeps one copy
    assert store.names() == ["alpha", "beta"]
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "adapter_config.json").write_text("{}")
    with pytest.raises(InvalidRequest, match="has no adapter_model.safetensors"):
        store.put("gamma", tmp_path / "half")
    assert store.names() == ["alpha", "beta"]


def test_remote_store_downloads_once_and_forgets(tmp_path: Path, scratch_adapter: Path) -> None:
    fs = fsspec.filesystem("memory")
    url = "memory://adapters-test"
    store = AdapterStore(url, tmp_path / "cache", list_ttl_seconds=0)
    assert not store.is_local
    store.put("remote-one", scratch_adapter)
    assert store.names() == ["remote-one"]
    local = store.local_path("remote-one")
    assert local == tmp_path / "cache" / "remote-one"
    assert (local / "adapter_model.safetensors").read_bytes() == (scratch_adapter / "adapter_model.safetensors").read_bytes()
    fs.rm("/adapters-test/remote-one/adapter_config.json")
    assert store.local_path("remote-one") == local, "second use is served from the local copy"
    store.forget_local_copy("remote-one")
    assert not local.exists()
    with pytest.raises(AdapterUnavailable, match="does not match its digest"):
        store.local_path("remote-one")  # a file is missing in the store now
    assert [p for p in (tmp_path / "cache").rglob("*") if not p.is_dir()] == [], "a failed download leaves nothing"
    shutil.rmtree(tmp_path / "cache")


def test_adapters_through_s3_are_checked_by_digest(tmp_path: Path, scratch_adapter: Path, s3: S3Server,
                                                   base: BaseModelShape) -> None:
    (scratch_adapter / "README.md").write_text("not copied")  # only the adapter's two files are stored
    store = AdapterStore(s3.url("adapters"), tmp_path / "cache", list_ttl_seconds=0)
    digest = store.put("alpha", scratch_adapter)
    store.put("beta", scratch_adapter)
    assert store.names() == ["alpha", "beta"], "digest files are not adapters"
    assert store.digest("alpha") == digest
    local = store.local_path("alpha")
    assert local == tmp_path / "cache" / "alpha" and check_adapter_dir(local, base, max_rank=16) == 8
    assert directory_digest(local) == digest
    assert store.local_path("beta").resolve() == local.resolve(), "one copy of the same files"
    store.forget_local_copy("alpha")
    assert not local.exists() and (tmp_path / "cache" / "beta" / "adapter_config.json").is_file()
    store.forget_local_copy("beta")

    weights = f"{s3.bucket}/adapters/alpha/adapter_model.safetensors"
    fs = fsspec.filesystem("s3")
    tampered = bytearray(fs.cat_file(weights))
    tampered[-1] ^= 1
    fs.pipe_file(weights, bytes(tampered))
    with pytest.raises(AdapterUnavailable, match="'alpha' in the store does not match its digest"):
        store.local_path("alpha")
    assert [p for p in (tmp_path / "cache").rglob("*") if not p.is_dir()] == [], "nothing cached"

    fs.rm(f"{s3.bucket}/adapters/.beta.sha256")
    with pytest.raises(AdapterUnavailable, match="'beta' has no digest in the store"):
        store.local_path("beta")
    store.remove("alpha")
    assert store.names() == ["beta"] and not fs.exists(f"{s3.bucket}/adapters/.alpha.sha256")
