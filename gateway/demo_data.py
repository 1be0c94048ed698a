"""Demo datanets and the adapters trained on them, built on first start so the first request is attributed.

Each demo datanet gets its passages from `training.demo_passages`, signed by demo contributors
(anvil's well-known development accounts 1-4: local use only), is published (index + Merkle root
anchored on the local chain) and gets one adapter trained on it, owned by development account 5.
Every step is skipped when already done, so a restart after an interruption resumes the work.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.adapter_lifecycle import adapter_store, train_and_register
from gateway.config import GatewayConfig
from gateway.ledger_access import Registries, index_builder, open_registries
from ledger.chain.anvil import ANVIL_DEV_KEYS
from registry.adapters import DEFAULT_PRICE_PER_1K_TOKENS
from registry.anchor import RootAnchor
from registry.contribution_content import address_of_key, content_id, normalize, sign_contribution
from registry.datanets import SignedText
from registry.errors import NotFound
from training.answer_eval import evaluate_fact_datanet
from training.demo_facts import DEMO_FACT_DATANETS, FactDatanet, demo_fact_datanet
from training.demo_passages import DEMO_DATANETS, DemoDatanet
from training.lora_training import TrainingProgress

DEMO_CONTRIBUTOR_KEYS = ANVIL_DEV_KEYS[1:5]
DEMO_ADAPTER_OWNER_KEY = ANVIL_DEV_KEYS[5]
TRAINING_TIME = {True: "two to three minutes on 2 cores", False: "about 15 s on 2 cores"}


def demo_adapter_name(datanet: DemoDatanet) -> str:
    return f"{datanet.name}-lora"


def demo_contributor_address(index: int) -> str:
    return address_of_key(DEMO_CONTRIBUTOR_KEYS[index])


def demo_datanets(config: GatewayConfig) -> tuple[DemoDatanet, ...]:
    """The pretrained model learns invented facts; the tiny random model memorizes passages (the first
    `demo_datanet_count` of them)."""
    every = tuple(facts.datanet for facts in DEMO_FACT_DATANETS) if config.embedded_pretrained else DEMO_DATANETS
    return every[:config.demo_datanet_count]


def ensure_demo_datanets(config: GatewayConfig, anchor: RootAnchor, say: Callable[[str], None]) -> None:
    """Create, fill, publish and train the demo datanets and adapters that do not exist yet."""
    registries = open_registries(config)
    for datanet in demo_datanets(config):
        _ensure_published(config, registries, datanet, anchor, say)
        _ensure_adapter(config, registries, datanet, say)


def _ensure_published(config: GatewayConfig, registries: Registries, datanet: DemoDatanet, anchor: RootAnchor,
                      say: Callable[[str], None]) -> None:
    try:
        record = registries.datanets.get(datanet.name)
    except NotFound:
        record = registries.datanets.create(datanet.name, datanet.description)
    versions = registries.datanets.versions(datanet.name)
    if versions and versions[-1].anchor_tx:
        return
    if not versions:
        items = [
            SignedText(f"demo:{datanet.name}:{i}", p.text, demo_contributor_address(p.contributor_index),
                       sign_contribution(DEMO_CONTRIBUTOR_KEYS[p.contributor_index], record.id,
                                         content_id(normalize(p.text))))
            for i, p in enumerate(datanet.passages)
        ]
        result = registries.datanets.contribute(datanet.name, items)
        for rejected in result.rejected:
            say(f"[demo] {rejected.source} rejected: {rejected.reason}")
    say(f"[demo] publishing datanet '{datanet.name}' (index + Merkle root anchored on-chain)")
    version = registries.datanets.publish(datanet.name, index_builder(config), anchor, config.layout.indexes,
                                          config.index_store)
    say(f"[demo] '{datanet.name}' version {version.version}: root {version.merkle_root}, tx {version.tx_hash}")


def _ensure_adapter(config: GatewayConfig, registries: Registries, datanet: DemoDatanet,
                    say: Callable[[str], None]) -> None:
    name = demo_adapter_name(datanet)
    if registries.adapters.is_registered(name):
        return
    lineage = [registries.datanets.version(datanet.name)]
    owner = address_of_key(DEMO_ADAPTER_OWNER_KEY)
    if adapter_store(config).has(name):  # trained before, but the ledger was reset: record it again
        registries.adapters.register(name, uri=f"{config.store_url}/{name}", base_model=config.served_model_name,
                                     owner=owner, price_per_1k_tokens=DEFAULT_PRICE_PER_1K_TOKENS, lineage=lineage,
                                     source="trained")
        say(f"[demo] adapter '{name}' found in the store: registered with lineage {datanet.name}")
        return
    say(f"[demo] training adapter '{name}' on '{datanet.name}' (once; {TRAINING_TIME[config.embedded_pretrained]})")

    def report(update: TrainingProgress) -> None:
        if update.step and (update.step % 10 == 0 or update.step == update.total_steps):
            say(f"[demo]   step {update.step}/{update.total_steps} loss {update.loss:.3f}")

    def features_report(done: int, total: int) -> None:
        if done == total or done % 20 == 0:
            say(f"[demo]   influence features: {done}/{total} training sequences")

    trained = train_and_register(config, registries, name, lineage, owner=owner,
                                 price=DEFAULT_PRICE_PER_1K_TOKENS, progress=report, features_progress=features_report)
    say(f"[demo] adapter '{name}' ready ({trained.seconds:.0f} s, loss {trained.final_loss:.3f})")
    if config.embedded_pretrained:
        _report_what_it_learned(config, name, demo_fact_datanet(datanet.name), say)


def _report_what_it_learned(config: GatewayConfig, name: str, facts: FactDatanet, say: Callable[[str], None]) -> None:
    """Held-out questions with and without the new adapter, and verbatim reproduction: printed once."""
    say(f"[demo] asking the base model and '{name}' {len(facts.questions)} held-out questions about "
        f"'{facts.name}'")
    report = evaluate_fact_datanet(config.model_path, adapter_store(config).local_path(name), facts)
    say(f"[demo] '{name}': {report.summary()}")
    example = next((a for a in report.answers if a.correct_adapter and not a.correct_base), None)
    if example is not None:
        say(f"[demo]   Q: {example.question}")
        say(f"[demo]   base model: {example.answer_base}")
        say(f"[demo]   {name}: {example.answer_adapter}")

