"""Adapters attributed with "verbatim+influence-v1" by the service: a real tiny adapter, its real influence
features, a real ledger lineage and a local adapter store; unusable features bill the response unattributed."""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from eth_account import Account

from attribution.adapter_method import COMBINED, METHOD_FILE, VERBATIM, read_method, write_method
from attribution.attributor import Attributor
from attribution.index_builder import build_index
from attribution.influence import FEATURES_FILE, InfluenceScorer
from attribution.outbox import Outbox
from attribution.policy import CombinedPolicy, InfluenceWeighting
from attribution.service import FALLBACK_METHOD, METHOD, AttributionService, LedgerLineages, usage_record
from attribution.usage_log import UsageLog
from gateway.adapter_lifecycle import record_attribution, training_contributions, training_texts
from gateway.ledger_access import Registries
from ledger.accounts.access_desk import AccessDesk
from ledger.client.trace import AttributionTrace
from registry.adapters import AdapterRegistry
from registry.contribution_content import content_id, normalize, sign_contribution
from registry.datanets import DatanetRegistry, SignedText
from serving.adapter_store import AdapterStore
from storage.database import open_database
from tests.support.memory_anchor import MemoryAnchor
from training.lora_training import TrainingConfig, train_adapter

ALICE = Account.from_key("0x" + "a1" * 32)
BOB = Account.from_key("0x" + "b2" * 32)
TEXTS = [
    "Bees visit thousands of flowers every day, carrying pollen from one plant to the next while the hive waits.",
    "Old maps drew sea monsters at the edges of the known world, where the sailors had not yet been to look.",
]
QUICK = TrainingConfig(steps=6)


@dataclass
class World:
    model_dir: Path
    registries: Registries
    contributions: list[tuple[str, str]]
    store: AdapterStore
    adapters_dir: Path

    def put(self, name: str, source: Path) -> None:
        """Store the adapter and register it with the datanet's lineage."""
        self.store.put(name, source)
        adapters = self.registries.adapters
        adapters.register(name, uri=f"{self.store.url}/{name}", base_model="tiny", owner=BOB.address,
                          price_per_1k_tokens=1, lineage=adapters.resolve_lineage(["nature"]), source="trained")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """The tiny base model, a published datanet of two texts, and adapter "combo" trained on it with features."""
    from training.demo_assets import ensure_base_model

    root = tmp_path_factory.mktemp("influence-serving")
    model_dir = ensure_base_model(root / "tiny-llama")
    datanets = DatanetRegistry(open_database(f"sqlite:///{root / 'ledger.db'}"))
    datanet = datanets.create("nature")
    items = [SignedText(f"t{i}", text, who.address, sign_contribution(who.key, datanet.id, content_id(normalize(text))))
             for i, (text, who) in enumerate(zip(TEXTS, (ALICE, BOB), strict=True))]
    assert len(datanets.contribute("nature", items).accepted) == 2
    datanets.publish("nature", lambda docs, out: build_index(docs, model_dir, out), MemoryAnchor(), root / "indexes")
    registries = Registries(datanets.engine, datanets, AdapterRegistry(datanets.engine, datanets))
    contributions = training_contributions(registries, registries.adapters.resolve_lineage(["nature"]))
    result = train_adapter(model_dir, [text for _, text in contributions], root / "adapters" / "combo", QUICK)
    record_attribution(model_dir, result.out_dir, contributions, QUICK, result, COMBINED)
    world = World(model_dir, registries, contributions, AdapterStore(str(root / "store"), root / "cache"),
                  root / "adapters")
    world.put("combo", result.out_dir)
    return world


def service_for(world: World, tmp_path: Path, **kwargs: object) -> tuple[AttributionService, Outbox, UsageLog]:
    outbox = Outbox(tmp_path / "outbox")
    usage_log = UsageLog(tmp_path / "outbox" / "usage")
    lineages = LedgerLineages(AccessDesk(world.registries.engine), adapter_dirs=world.store.local_path)
    service = AttributionService(lineages, outbox=outbox, usage_log=usage_log, base_model_dir=world.model_dir,
                                 **kwargs)  # type: ignore[arg-type]
    return service, outbox, usage_log


def token_ids(world: World, text: str) -> list[int]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(world.model_dir / "tokenizer.json"))
    return tokenizer.encode(text, add_special_tokens=False).ids


async def billed(service: AttributionService, trace_id: str, adapter: str, prompt: list[int],
                 completion: list[int]) -> AttributionTrace:
    record = usage_record(trace_id, adapter, adapter, "key_1", prompt, [completion])
    written = service.record_usage(record)
    assert written is not None
    written.result(timeout=10)
    return await service.submit(record)


def assert_sums_to_one(trace: AttributionTrace) -> None:
    for token in trace.tokens:
        assert math.isclose(sum(w for _, w in token.weights) + token.unattributed, 1.0, abs_tol=1e-9)


def test_training_contributions_follow_the_training_texts(world: World) -> None:
    lineage = world.registries.adapters.resolve_lineage(["nature"])
    assert [text for _, text in world.contributions] == training_texts(world.registries, lineage)
    assert {cid for cid, _ in world.contributions} == {content_id(normalize(text)) for text in TEXTS}


def test_record_attribution_writes_features_and_method(world: World, tmp_path: Path) -> None:
    combo = world.adapters_dir / "combo"
    assert (combo / FEATURES_FILE).is_file() and read_method(combo) == COMBINED
    verbatim = tmp_path / "verbatim"
    shutil.copytree(combo, verbatim)
    (verbatim / FEATURES_FILE).unlink()
    record_attribution(world.model_dir, verbatim, world.contributions, QUICK, None, VERBATIM)
    assert read_method(verbatim) == VERBATIM and not (verbatim / FEATURES_FILE).exists()
    with pytest.raises(ValueError, match="unknown attribution method"):
        record_attribution(world.model_dir, verbatim, world.contributions, QUICK, None, "best-guess-v0")


def test_adapter_method_file_is_checked(tmp_path: Path) -> None:
    assert read_method(tmp_path) == VERBATIM, "no file: verbatim"
    write_method(tmp_path, COMBINED)
    assert read_method(tmp_path) == COMBINED == CombinedPolicy().name
    with pytest.raises(ValueError, match="unknown attribution method"):
        write_method(tmp_path, "nope")
    for bad, phrase in (("{", "not valid JSON"), ("[1]", "must be an object"), ('{"method": "x"}', "unknown")):
        (tmp_path / METHOD_FILE).write_text(bad)
        with pytest.raises(ValueError, match=phrase):
            read_method(tmp_path)


@pytest.mark.parametrize("processes", [False, True], ids=["in-process", "worker-process"])
async def test_a_combined_adapter_is_attributed_with_influence(world: World, tmp_path: Path,
                                                               processes: bool) -> None:
    service, outbox, usage_log = service_for(world, tmp_path, processes=processes)
    try:
        ids = token_ids(world, TEXTS[0])
        prompt, completion = ids[:6], ids[6:]
        trace = await billed(service, "cmpl-combo", "combo", prompt, completion)
        assert trace.method == "verbatim+influence-v1" == COMBINED
        assert trace.token_ids == completion and trace.attributed_fraction > 0.5
        assert_sums_to_one(trace)
        local = world.store.local_path("combo")
        scorer = InfluenceScorer.open(world.model_dir, local, [cid for cid, _ in world.contributions])
        influence = InfluenceWeighting().token_weights(scorer.scores(prompt, completion), completion)
        verbatim = Attributor([Path(d) for d in service.lineages.lineage("combo").index_dirs]).attribute(
            prompt, completion)
        expected = CombinedPolicy().token_weights(verbatim, influence)
        for got, want in zip(trace.tokens, expected, strict=True):
            assert got.token_id == want.token_id
            assert got.unattributed == pytest.approx(want.unattributed, abs=1e-6)
            assert dict(got.weights) == pytest.approx(dict(want.weights), abs=1e-6)
        [(trace_id, _)] = outbox.pending(10)
        assert trace_id == "cmpl-combo" and usage_log.unsettled() == 0
    finally:
        service.close()


async def test_influence_off_attributes_verbatim_only(world: World, tmp_path: Path) -> None:
    service, _, _ = service_for(world, tmp_path, processes=False, influence=False)
    try:
        ids = token_ids(world, TEXTS[0])
        trace = await billed(service, "cmpl-off", "combo", ids[:6], ids[6:])
        assert trace.method == METHOD == VERBATIM and trace.attributed_fraction > 0.5
    finally:
        service.close()


def missing(world: World, target: Path) -> None:
    (target / FEATURES_FILE).unlink()


def corrupt(world: World, target: Path) -> None:
    path = target / FEATURES_FILE
    data = bytearray(path.read_bytes())
    for offset in range(len(data) - 64, len(data) - 32):  # tensor bytes: the checksum no longer matches
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def stale(world: World, target: Path) -> None:
    """Adapter B trained again (another seed) into `target`, with adapter A's features beside it."""
    features = (target / FEATURES_FILE).read_bytes()
    shutil.rmtree(target)
    train_adapter(world.model_dir, [text for _, text in world.contributions], target, TrainingConfig(steps=6, seed=7))
    (target / FEATURES_FILE).write_bytes(features)
    write_method(target, COMBINED)


@pytest.mark.parametrize(("damage", "error"), [(missing, "FeaturesMissing"), (corrupt, "FeaturesCorrupt"),
                                               (stale, "FeaturesStale")])
@pytest.mark.parametrize("processes", [False, True], ids=["in-process", "worker-process"])
async def test_unusable_features_bill_the_response_unattributed(world: World, tmp_path: Path,
                                                                damage: Callable[[World, Path], None], error: str,
                                                                processes: bool,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    name = f"{damage.__name__}-{'p' if processes else 'l'}"
    source = tmp_path / name
    shutil.copytree(world.adapters_dir / "combo", source)
    damage(world, source)
    world.put(name, source)
    service, outbox, usage_log = service_for(world, tmp_path, processes=processes)
    try:
        ids = token_ids(world, TEXTS[0])
        with caplog.at_level(logging.WARNING, logger="attribution.service"):
            traces = [await billed(service, f"cmpl-{name}-{i}", name, ids[:6], ids[6:]) for i in range(3)]
        for trace in traces:
            assert trace.method == FALLBACK_METHOD and trace.attributed_fraction == 0
            assert all(token.weights == () and token.unattributed == 1.0 for token in trace.tokens)
            assert trace.token_ids == ids[6:] and trace.requester == "key_1"
        assert sorted(trace_id for trace_id, _ in outbox.pending(10)) == [t.trace_id for t in traces], "billed once"
        assert usage_log.unsettled() == 0
        warnings = [r for r in caplog.records if r.name == "attribution.service" and r.levelno >= logging.WARNING]
        assert len(warnings) == 1, "logged once per adapter, not per trace; no retries"
        message = warnings[0].getMessage()
        assert error in message and str(world.store.local_path(name) / FEATURES_FILE) in message
        assert service.stats()["attribution_failures_total"] == 3
    finally:
        service.close()


def test_the_train_command_records_combined_unless_told() -> None:
    import argparse

    from gateway.adapter_commands import ATTRIBUTION_CHOICES, add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["adapter", "train", "x", "--datanet", "nature"])
    assert ATTRIBUTION_CHOICES[args.attribution] == COMBINED
    args = parser.parse_args(["adapter", "train", "x", "--datanet", "nature", "--attribution", "verbatim"])
    assert ATTRIBUTION_CHOICES[args.attribution] == VERBATIM
    with pytest.raises(SystemExit):
        parser.parse_args(["adapter", "train", "x", "--datanet", "nature", "--attribution", "influence"])


def test_a_worker_keeps_at_most_two_scorers_open(world: World, tmp_path: Path) -> None:
    from attribution.search_pool import SCORERS_MAX, LocalAttributors

    ids = token_ids(world, TEXTS[1])
    lineage = tuple(cid for cid, _ in world.contributions)
    adapters = [world.adapters_dir / "combo"] + [tmp_path / f"copy-{i}" for i in range(2)]
    for copy in adapters[1:]:
        shutil.copytree(adapters[0], copy)
    attributors = LocalAttributors()
    try:
        for adapter in adapters + adapters[:1]:
            tokens = attributors.attribute((), ids[:4], ids[4:], (str(world.model_dir), str(adapter), lineage))
            assert [t.token_id for t in tokens] == ids[4:]
            assert attributors.scorers_open() <= SCORERS_MAX == 2
        assert attributors.scorers_open() == 2
    finally:
        attributors.close()
    assert attributors.scorers_open() == 0
