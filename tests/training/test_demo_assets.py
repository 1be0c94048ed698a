"""Demo assets are built locally, deterministically, in formats the real loaders read."""

from __future__ import annotations

import hashlib
from pathlib import Path

from training.demo_assets import ensure_base_model, ensure_demo_adapters, write_random_adapter


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tokenizer_has_a_real_vocabulary(demo_state: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(demo_state / "models" / "datanet-tiny-llama"))
    assert len(tokenizer) >= 8000
    words = "the function returns a value when the object is called".split()
    assert all(len(tokenizer.tokenize(" " + w)) == 1 for w in words), "ordinary words are single tokens"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered.endswith("<|assistant|>\n")


def test_adapters_are_deterministic_peft_directories(demo_state: Path, tmp_path: Path) -> None:
    from peft import LoraConfig

    model = demo_state / "models" / "datanet-tiny-llama"
    write_random_adapter(model, tmp_path / "again", seed=10_000)
    original = demo_state / "adapters" / "demo-adapter-000"
    assert digest(tmp_path / "again" / "adapter_model.safetensors") == digest(original / "adapter_model.safetensors")
    assert LoraConfig.from_pretrained(str(original)).r == 8


def test_rebuild_is_cached_and_identical(demo_state: Path, tmp_path: Path) -> None:
    model = demo_state / "models" / "datanet-tiny-llama"
    stamp = (model / "model.safetensors").stat().st_mtime_ns
    assert ensure_base_model(model) == model
    assert (model / "model.safetensors").stat().st_mtime_ns == stamp, "a built model is not rebuilt"
    fresh = ensure_base_model(tmp_path / "fresh")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert digest(fresh / name) == digest(model / name), f"{name} differs between builds"
    assert ensure_demo_adapters(model, tmp_path / "store", 3) == [f"demo-adapter-00{i}" for i in range(3)]
