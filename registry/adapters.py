"""The adapter registry: who owns an adapter, what it costs, and which datanet versions it learned from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from registry.contribution_content import checksum_address
from registry.datanets import DatanetRegistry, in_version, parse_version_spec
from registry.errors import AlreadyExists, InvalidInput, NotFound
from registry.models import Adapter, AdapterLineage, Contribution, Datanet, DatanetVersion

# 10^15 base units = 0.001 of an 18-decimal token per 1000 tokens.
DEFAULT_PRICE_PER_1K_TOKENS = 10**15


@dataclass(frozen=True)
class LineageEntry:
    datanet: str
    version: int
    merkle_root: str
    index_path: str  # the version's attribution index (what per-token attribution queries)

    def spec(self) -> str:
        return f"{self.datanet}@{self.version}"


@dataclass(frozen=True)
class AdapterRecord:
    name: str
    base_model: str
    uri: str
    owner: str
    price_per_1k_tokens: int
    source: str
    lineage: list[LineageEntry]

    def to_json(self) -> dict[str, object]:
        return {
            "adapter": self.name, "base_model": self.base_model, "uri": self.uri, "owner": self.owner,
            "price_per_1k_tokens": str(self.price_per_1k_tokens), "source": self.source,
            "lineage": [entry.spec() for entry in self.lineage],
            "lineage_roots": {entry.spec(): entry.merkle_root for entry in self.lineage},
        }


def parse_price(value: str | int) -> int:
    """A price in integer base units; InvalidInput for anything else (floats included)."""
    text = str(value).strip()
    if not text.isdigit():
        raise InvalidInput(f"price '{value}' must be a non-negative integer number of base units")
    return int(text)


@dataclass(frozen=True)
class AdapterLineageContents:
    """What an adapter learned from: its datanet versions' index paths (and digests) and their contributions."""

    index_paths: tuple[str, ...]  # in version id order: local directories or store URLs
    contributions: dict[str, tuple[str, str]]  # contribution id → (contributor address, datanet name)
    index_digests: tuple[str, ...] = ()  # parallel to index_paths; "" = none recorded (not checked)


def lineage_contents(session: Session, adapter_name: str) -> AdapterLineageContents:
    """The lineage of a registered adapter (empty for an unknown one), read in `session`."""
    versions = session.exec(
        select(DatanetVersion, Datanet.name)
        .join(Datanet, col(Datanet.id) == col(DatanetVersion.datanet_id))
        .join(AdapterLineage, col(AdapterLineage.datanet_version_id) == col(DatanetVersion.id))
        .where(AdapterLineage.adapter_name == adapter_name)
        .order_by(DatanetVersion.id)
    ).all()
    contributions: dict[str, tuple[str, str]] = {}
    for version, datanet_name in versions:
        rows = session.exec(select(Contribution.id, Contribution.contributor)
                            .where(in_version(version.datanet_id, version.number))).all()
        contributions.update({cid: (contributor, datanet_name) for cid, contributor in rows})
    return AdapterLineageContents(tuple(v.index_path for v, _ in versions), contributions,
                                  tuple(v.index_digest or "" for v, _ in versions))


class AdapterRegistry:
    """Adapters and their lineage in the ledger's database."""

    def __init__(self, engine: Engine, datanets: DatanetRegistry) -> None:
        self.engine = engine
        self.datanets = datanets

    def resolve_lineage(self, specs: Sequence[str]) -> list[DatanetVersion]:
        """``NAME[@VERSION]`` specs → published versions (the latest when no version is given)."""
        versions = []
        for spec in specs:
            name, number = parse_version_spec(spec)
            versions.append(self.datanets.version(name, number))
        if len({v.id for v in versions}) != len(versions):
            raise InvalidInput("a datanet version is named twice in the lineage")
        return versions

    def register(self, name: str, *, uri: str, base_model: str, owner: str, price_per_1k_tokens: int,
                 lineage: Sequence[DatanetVersion], source: str) -> AdapterRecord:
        try:
            owner_address = checksum_address(owner)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        if price_per_1k_tokens < 0:
            raise InvalidInput("the price must not be negative")
        with Session(self.engine) as session:
            if session.get(Adapter, name) is not None:
                raise AlreadyExists(f"adapter '{name}' is already registered; choose another name")
            session.add(Adapter(name=name, base_model=base_model, uri=uri, owner=owner_address,
                                price_per_1k_tokens=str(price_per_1k_tokens), source=source))
            session.flush()
            session.add_all(AdapterLineage(adapter_name=name, datanet_version_id=v.id) for v in lineage)
            session.commit()
        return self.get(name)

    def is_registered(self, name: str) -> bool:
        with Session(self.engine) as session:
            return session.get(Adapter, name) is not None

    def get(self, name: str) -> AdapterRecord:
        with Session(self.engine) as session:
            adapter = session.get(Adapter, name)
            if adapter is None:
                raise NotFound(f"no registered adapter named '{name}'")
            return self._record(session, adapter)

    def list(self) -> list[AdapterRecord]:
        with Session(self.engine) as session:
            return [self._record(session, a) for a in session.exec(select(Adapter).order_by(Adapter.name)).all()]

    @staticmethod
    def _record(session: Session, adapter: Adapter) -> AdapterRecord:
        rows = session.exec(
            select(Datanet.name, DatanetVersion.number, DatanetVersion.merkle_root, DatanetVersion.index_path)
            .join(DatanetVersion, col(DatanetVersion.datanet_id) == col(Datanet.id))
            .join(AdapterLineage, col(AdapterLineage.datanet_version_id) == col(DatanetVersion.id))
            .where(AdapterLineage.adapter_name == adapter.name)
            .order_by(Datanet.name, DatanetVersion.number)
        ).all()
        return AdapterRecord(
            name=adapter.name, base_model=adapter.base_model, uri=adapter.uri, owner=adapter.owner,
            price_per_1k_tokens=int(adapter.price_per_1k_tokens), source=adapter.source,
            lineage=[LineageEntry(n, v, r, i) for n, v, r, i in rows],
        )
