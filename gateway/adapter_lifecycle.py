"""Putting adapters into service: train or take a LoRA directory, store it, record owner/price/lineage.

Shared by `gateway adapter train|register` and the demo data built at first start. The store and
the ledger agree: an adapter is copied into the store only after it passed the base-model checks,
and removed again if the ledger refuses to record it.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from sqlmodel import Session, select

from attribution.adapter_method import COMBINED, METHODS, VERBATIM, write_method
from gateway.config import GatewayConfig
from gateway.ledger_access import Registries
from registry.adapters import AdapterRecord
from registry.contribution_content import checksum_address
from registry.datanets import in_version
from registry.errors import AlreadyExists, InvalidInput
from registry.models import Contribution, Datanet, DatanetVersion
from serving.adapter_store import AdapterStore, BaseModelShape, check_adapter_dir, validate_name
from serving.config import EngineConfig
from serving.errors import ApiError
from training.lora_training import TrainingConfig, TrainingProgress, TrainingResult, train_adapter


def adapter_store(config: GatewayConfig) -> AdapterStore:
    return AdapterStore(config.store_url, config.cache_dir)


def check_new_name(config: GatewayConfig, registries: Registries, name: str) -> None:
    try:
        validate_name(name)
    except ApiError as exc:
        raise InvalidInput(exc.message) from None
    if registries.adapters.is_registered(name) or adapter_store(config).has(name):
        raise AlreadyExists(f"adapter '{name}' already exists; choose another name")


def store_and_register(config: GatewayConfig, registries: Registries, name: str, source_dir: Path, *,
                       owner: str, price: int, lineage: list[DatanetVersion], source: str) -> AdapterRecord:
    """Check the adapter against the base model, copy it into the store, then record it in the ledger."""
    store = adapter_store(config)
    try:
        check_adapter_dir(source_dir, BaseModelShape.from_model_dir(config.model_path), EngineConfig().max_lora_rank)
        store.put(name, source_dir)
    except ApiError as exc:
        raise InvalidInput(f"cannot register '{name}': {exc.message}") from None
    try:
        return registries.adapters.register(
            name, uri=f"{config.store_url}/{name}", base_model=config.served_model_name, owner=owner,
            price_per_1k_tokens=price, lineage=lineage, source=source,
        )
    except Exception:
        store.remove(name)
        raise


def lineage_label(registries: Registries, version: DatanetVersion) -> str:
    with Session(registries.engine) as session:
        return f"{session.get(Datanet, version.datanet_id).name}@{version.number}"


def training_contributions(registries: Registries, lineage: list[DatanetVersion]) -> list[tuple[str, str]]:
    """(contribution id, text) of every contribution in the lineage's versions, in a stable order."""
    with Session(registries.engine) as session:
        return [
            (cid, text)
            for version in lineage
            for cid, text in session.exec(
                select(Contribution.id, Contribution.text)
                .where(in_version(version.datanet_id, version.number))
                .order_by(Contribution.created_at, Contribution.id)
            ).all()
        ]


def training_texts(registries: Registries, lineage: list[DatanetVersion]) -> list[str]:
    """The texts of every contribution in the lineage's versions, in a stable order."""
    return [text for _, text in training_contributions(registries, lineage)]


def record_attribution(base_model_dir: Path, adapter_dir: Path, contributions: list[tuple[str, str]],
                       training: TrainingConfig, result: TrainingResult | None, method: str,
                       progress: Callable[[int, int], None] | None = None) -> None:
    """Make the adapter just trained in `adapter_dir` attributable with `method`: for the combined method its
    influence features first (`progress(done, total)` per training sequence), then the method file."""
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; known: {', '.join(METHODS)}")
    if method == COMBINED:
        from attribution.influence import features_after_training

        features_after_training(base_model_dir, adapter_dir, contributions, training, result, progress=progress)
    write_method(adapter_dir, method)


@dataclass(frozen=True)
class TrainedAdapter:
    record: AdapterRecord
    steps: int
    final_loss: float
    seconds: float


def training_preset(config: GatewayConfig) -> TrainingConfig:
    """Memorize on the tiny random model; on a pretrained one (embedded or the operator's), learn to answer."""
    return TrainingConfig() if config.base_model_path == "" and not config.embedded_pretrained \
        else TrainingConfig.for_pretrained()


def training_config(texts: list[str], steps: int | None, default: TrainingConfig = TrainingConfig()) -> TrainingConfig:
    """Training settings for these texts: the preset's steps per mini-batch unless `steps` is given."""
    if steps is None:
        steps = default.steps * max(1, math.ceil(len(texts) / default.batch_size))
    return replace(default, steps=steps)


def train_and_register(config: GatewayConfig, registries: Registries, name: str, lineage: list[DatanetVersion], *,
                       owner: str, price: int, steps: int | None = None,
                       progress: Callable[[TrainingProgress], None] | None = None,
                       should_stop: Callable[[], bool] | None = None, attribution: str = COMBINED,
                       features_progress: Callable[[int, int], None] | None = None) -> TrainedAdapter:
    """Fine-tune a LoRA adapter on the lineage's contributions, record its attribution method (with influence
    features for the combined one: `features_progress(done, total)`), then store and register it.

    Raises TrainingInterrupted (nothing written) when `should_stop` fires, ValueError for bad steps or method.
    """
    if attribution not in METHODS:
        raise ValueError(f"unknown attribution method {attribution!r}; known: {COMBINED}, {VERBATIM}")
    check_new_name(config, registries, name)
    try:
        checksum_address(owner)  # refuse a bad owner before minutes of training, not after
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    contributions = training_contributions(registries, lineage)
    texts = [text for _, text in contributions]
    training = training_config(texts, steps, training_preset(config))
    if progress is not None:
        progress(TrainingProgress(0, training.steps, float("nan"), 0.0))
    scratch = config.layout.tmp
    scratch.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="train-", dir=scratch))
    try:
        result = train_adapter(config.model_path, texts, workdir / name, training, progress=progress,
                               should_stop=should_stop, base_model_name=config.served_model_name)
        record_attribution(config.model_path, result.out_dir, contributions, training, result, attribution,
                           features_progress)
        record = store_and_register(config, registries, name, result.out_dir, owner=owner, price=price,
                                    lineage=lineage, source="trained")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return TrainedAdapter(record, result.steps, result.final_loss, result.seconds)
