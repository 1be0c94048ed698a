"""Fixtures: the demo tokenizer (built once per session) and a small indexed datanet version."""

from __future__ import annotations

from pathlib import Path

import pytest

from attribution.index_builder import IndexManifest, build_index
from attribution.index_reader import VersionIndex, open_index
from tests.attribution.passages import DOCUMENTS


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.demo_assets import build_tokenizer

    directory = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def tokenize(tokenizer_dir: Path):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    return lambda text: tokenizer.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="session")
def built(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, IndexManifest]:
    out_dir = tmp_path_factory.mktemp("indexes") / "datanet-1" / "v1"
    return out_dir, build_index(iter(DOCUMENTS), tokenizer_dir, out_dir)


@pytest.fixture(scope="session")
def index(built: tuple[Path, IndexManifest]) -> VersionIndex:
    return open_index(built[0])


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's tiny random base model (built once per session)."""
    from training.demo_assets import ensure_base_model

    return ensure_base_model(tmp_path_factory.mktemp("models") / "tiny-llama")
