"""The store keeps an adapter's influence features and attribution method beside it (and in its digest);
adapters without them are stored exactly as before."""

from __future__ import annotations

import shutil
from pathlib import Path

import fsspec
import pytest

from attribution.adapter_method import COMBINED, METHOD_FILE, VERBATIM, read_method
from attribution.influence import FEATURES_FILE, InfluenceFeatures
from gateway.adapter_lifecycle import record_attribution
from serving.adapter_store import CONFIG_FILE, WEIGHTS_FILE, AdapterStore, BaseModelShape, check_adapter_dir
from serving.errors import AdapterUnavailable
from statedir.store_cache import directory_digest
from training.lora_training import TrainingConfig, train_adapter

TEXTS = ["Owls turn their heads almost all the way round, since their eyes cannot move in their sockets at all."]
QUICK = TrainingConfig(steps=6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(base model dir, a tiny adapter with its influence features and method file)."""
    from training.demo_assets import ensure_base_model

    root = tmp_path_factory.mktemp("store-features")
    model_dir = ensure_base_model(root / "tiny-llama")
    result = train_adapter(model_dir, TEXTS, root / "adapter", QUICK)
    record_attribution(model_dir, result.out_dir, [("c-owls", TEXTS[0])], QUICK, result, COMBINED)
    return model_dir, result.out_dir


def test_local_store_copies_features_and_method(trained: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, adapter = trained
    store = AdapterStore(str(tmp_path / "store"), tmp_path / "cache", list_ttl_seconds=0)
    digest = store.put("owls", adapter)
    local = store.local_path("owls")
    assert sorted(p.name for p in local.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, FEATURES_FILE, METHOD_FILE])
    assert digest == directory_digest(local) == store.digest("owls"), "the digest covers the new files"
    assert read_method(local) == COMBINED
    assert InfluenceFeatures.load(local, ["c-owls"]).contribution_ids == ("c-owls",), "still bound to the weights"
    assert check_adapter_dir(local, BaseModelShape.from_model_dir(model_dir), max_rank=16) == QUICK.rank


def test_an_adapter_without_them_is_stored_as_before(trained: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, adapter = trained
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copy(adapter / name, plain / name)
    store = AdapterStore(str(tmp_path / "store"), tmp_path / "cache", list_ttl_seconds=0)
    digest = store.put("plain", plain)
    assert digest == directory_digest(adapter, files=(CONFIG_FILE, WEIGHTS_FILE)), "the digest it always had"
    local = store.local_path("plain")
    assert sorted(p.name for p in local.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    assert read_method(local) == VERBATIM and store.names() == ["plain"]
    assert check_adapter_dir(local, BaseModelShape.from_model_dir(model_dir), max_rank=16) == QUICK.rank


def test_a_remote_store_checks_the_features_by_digest(trained: tuple[Path, Path], tmp_path: Path) -> None:
    _, adapter = trained
    store = AdapterStore("memory://adapters-features", tmp_path / "cache", list_ttl_seconds=0)
    try:
        store.put("owls", adapter)
        local = store.local_path("owls")
        assert (local / FEATURES_FILE).read_bytes() == (adapter / FEATURES_FILE).read_bytes()
        assert read_method(local) == COMBINED
        store.forget_local_copy("owls")
        fsspec.filesystem("memory").pipe_file(f"/adapters-features/owls/{FEATURES_FILE}", b"altered")
        with pytest.raises(AdapterUnavailable, match="does not match its digest"):
            store.local_path("owls")
    finally:
        store.remove("owls")
