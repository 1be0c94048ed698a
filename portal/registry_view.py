"""What the portal shows of the registry: datanets, versions, contributions, lineage and inclusion proofs.

Read-only: the portal never writes the registry (its one writer is `gateway datanet|adapter …`). Every
list a page shows is bounded (pages of `page_size` rows), so a datanet of 100k contributions renders
as fast as a small one; the one full scan, a version's Merkle tree, is built once per version (versions
are frozen), kept in a small cache and saved by its root in `<state>/cache/merkle/`, so a restarted portal
reads it back instead of hashing 100k leaves again.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import Engine, case, func
from sqlmodel import Session, col, select

from registry.anchor import datanet_key
from registry.datanets import in_version
from registry.merkle import MerkleTree
from registry.models import Adapter, AdapterLineage, Contribution, ContributionRejection, Datanet, DatanetVersion

log = logging.getLogger(__name__)

TREES_KEPT = 8
EXCERPT_CHARS = 160


@dataclass(frozen=True)
class VersionView:
    number: int
    merkle_root: str
    contribution_count: int
    anchor_tx: str | None
    anchor_chain_id: int | None
    anchor_contract: str | None
    published_at: datetime
    adapters: tuple[str, ...]  # trained on this version (lineage)


@dataclass(frozen=True)
class DatanetSummary:
    name: str
    id: str
    description: str
    owner: str | None
    contributions: int
    contributors: int
    versions: tuple[VersionView, ...]


@dataclass(frozen=True)
class ContributorRow:
    address: str
    contributions: int
    published: int


@dataclass(frozen=True)
class ContributionView:
    id: str
    datanet: str
    datanet_id: str
    contributor: str
    status: str
    version: int | None
    bytes: int
    license: str
    text: str
    created_at: datetime

    @property
    def excerpt(self) -> str:
        flat = " ".join(self.text.split())
        return flat if len(flat) <= EXCERPT_CHARS else flat[: EXCERPT_CHARS - 1] + "…"


@dataclass(frozen=True)
class Page:
    number: int  # from 1
    size: int
    total: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.size))

    @property
    def offset(self) -> int:
        return (self.number - 1) * self.size


@dataclass(frozen=True)
class DatanetDetail:
    summary: DatanetSummary
    contributors: tuple[ContributorRow, ...]
    contributors_page: Page
    contributions: tuple[ContributionView, ...]
    contributions_page: Page


@dataclass(frozen=True)
class ProofView:
    """An inclusion proof of a contribution in a version, with what the browser needs to check it on-chain."""

    datanet_id: str
    datanet_key: str  # bytes32 the registry contract knows the datanet by: keccak256(utf8(id))
    version: int
    contribution_id: str
    root: str  # the root this database holds (the browser compares the chain's, not this one)
    proof: tuple[str, ...]
    anchor_tx: str | None
    anchor_contract: str | None


def _view(contribution: Contribution, datanet: str) -> ContributionView:
    return ContributionView(
        id=contribution.id, datanet=datanet, datanet_id=contribution.datanet_id, contributor=contribution.contributor,
        status=contribution.status, version=contribution.version, bytes=contribution.bytes,
        license=contribution.license, text=contribution.text, created_at=contribution.created_at,
    )


class RegistryView:
    """Read-only queries of the registry for the portal's pages (thread-safe)."""

    def __init__(self, engine: Engine, *, page_size: int = 50, tree_dir: Path | None = None) -> None:
        self.engine = engine
        self.page_size = page_size
        self.tree_dir = tree_dir  # where built trees are kept across restarts (by root); None: memory only
        self._trees: OrderedDict[tuple[str, int], MerkleTree] = OrderedDict()
        self._tree_lock = threading.Lock()  # guards _trees and _building
        self._building: dict[tuple[str, int], threading.Lock] = {}  # a lock per version whose tree is being built

    # -- datanets ----------------------------------------------------------------------------------

    def datanets(self) -> list[DatanetSummary]:
        with Session(self.engine) as session:
            datanets = session.exec(select(Datanet).order_by(Datanet.name)).all()
            counts = dict(session.exec(select(Contribution.datanet_id, func.count())
                                       .group_by(Contribution.datanet_id)).all())
            people = dict(session.exec(select(Contribution.datanet_id,
                                              func.count(func.distinct(Contribution.contributor)))
                                       .group_by(Contribution.datanet_id)).all())
            versions = self._versions(session, None)
        return [self._summary(d, counts.get(d.id, 0), people.get(d.id, 0), versions.get(d.id, ())) for d in datanets]

    def datanet(self, name: str, *, contributors_page: int = 1, contributions_page: int = 1) -> DatanetDetail | None:
        """One datanet with a page of its contributors (most contributions first) and of its contributions
        (oldest first); None when no datanet has that name."""
        with Session(self.engine) as session:
            datanet = session.exec(select(Datanet).where(Datanet.name == name)).first()
            if datanet is None:
                return None
            in_datanet = col(Contribution.datanet_id) == datanet.id
            total = session.exec(select(func.count()).select_from(Contribution).where(in_datanet)).one()
            people = session.exec(select(func.count(func.distinct(Contribution.contributor))).where(in_datanet)).one()
            versions = self._versions(session, datanet.id).get(datanet.id, ())
            people_page = self._page(contributors_page, people)
            published = func.sum(case((col(Contribution.status) == "published", 1), else_=0))
            rows = session.exec(
                select(Contribution.contributor, func.count(), published).where(in_datanet)
                .group_by(Contribution.contributor).order_by(func.count().desc(), Contribution.contributor)
                .offset(people_page.offset).limit(people_page.size)
            ).all()
            contributors = tuple(ContributorRow(address, count, int(done or 0)) for address, count, done in rows)
            items_page = self._page(contributions_page, total)
            items = session.exec(
                select(Contribution).where(in_datanet).order_by(Contribution.created_at, Contribution.id)
                .offset(items_page.offset).limit(items_page.size)
            ).all()
            contributions = tuple(_view(c, datanet.name) for c in items)
        return DatanetDetail(self._summary(datanet, total, people, versions), contributors, people_page,
                             contributions, items_page)

    # -- contributors and contributions -----------------------------------------------------------

    def contributions_of(self, address: str) -> list[ContributionView]:
        """Every contribution of an address (checksummed), newest first."""
        with Session(self.engine) as session:
            rows = session.exec(
                select(Contribution, Datanet.name).join(Datanet, col(Datanet.id) == col(Contribution.datanet_id))
                .where(Contribution.contributor == address).order_by(col(Contribution.created_at).desc())
            ).all()
        return [_view(contribution, name) for contribution, name in rows]

    def contribution(self, contribution_id: str) -> ContributionView | None:
        with Session(self.engine) as session:
            row = session.exec(
                select(Contribution, Datanet.name).join(Datanet, col(Datanet.id) == col(Contribution.datanet_id))
                .where(Contribution.id == contribution_id)
            ).first()
        return _view(*row) if row else None

    def contributions(self, ids: set[str]) -> dict[str, ContributionView]:
        """The contributions of a trace, by id (ids the registry does not hold are left out)."""
        if not ids:
            return {}
        with Session(self.engine) as session:
            rows = session.exec(
                select(Contribution, Datanet.name).join(Datanet, col(Datanet.id) == col(Contribution.datanet_id))
                .where(col(Contribution.id).in_(sorted(ids)))
            ).all()
        return {c.id: _view(c, name) for c, name in rows}

    def adapters_on(self, contributions: list[ContributionView]) -> dict[str, tuple[str, int]]:
        """Adapters trained on a version that holds any of `contributions` → (datanet name, version number).
        Versions are cumulative: a contribution first published in v is in every version from v on."""
        first: dict[str, int] = {}
        names: dict[str, str] = {}
        for c in contributions:
            if c.version is not None:
                first[c.datanet_id] = min(first.get(c.datanet_id, c.version), c.version)
                names[c.datanet_id] = c.datanet
        if not first:
            return {}
        with Session(self.engine) as session:
            rows = session.exec(
                select(AdapterLineage.adapter_name, DatanetVersion.datanet_id, DatanetVersion.number)
                .join(DatanetVersion, col(DatanetVersion.id) == col(AdapterLineage.datanet_version_id))
                .where(col(DatanetVersion.datanet_id).in_(sorted(first)))
                .order_by(AdapterLineage.adapter_name)
            ).all()
        return {adapter: (names[datanet_id], number) for adapter, datanet_id, number in rows
                if number >= first[datanet_id]}

    def rejections(self, datanet_id: str, contributor: str | None = None,
                   limit: int = 50) -> list[ContributionRejection]:
        """Recorded refusals of a datanet's submissions (all, or one contributor's), newest first."""
        query = select(ContributionRejection).where(ContributionRejection.datanet_id == datanet_id)
        if contributor is not None:
            query = query.where(ContributionRejection.contributor == contributor)
        with Session(self.engine) as session:
            return list(session.exec(query.order_by(col(ContributionRejection.created_at).desc(),
                                                    col(ContributionRejection.id).desc()).limit(limit)).all())

    def adapter_owner(self, name: str) -> str | None:
        with Session(self.engine) as session:
            adapter = session.get(Adapter, name)
        return adapter.owner if adapter else None

    # -- proofs -------------------------------------------------------------------------------------

    def proof(self, contribution: ContributionView) -> ProofView | None:
        """The inclusion proof of a published contribution in its datanet's latest version (None: not published)."""
        return self.proofs([contribution])[contribution.id]

    def proofs(self, contributions: list[ContributionView]) -> dict[str, ProofView | None]:
        """`proof` of each contribution, by id, reading each datanet's latest version once."""
        published = [c for c in contributions if c.status == "published" and c.version is not None]
        latest: dict[str, DatanetVersion] = {}
        if published:
            with Session(self.engine) as session:
                for version in session.exec(select(DatanetVersion).where(
                        col(DatanetVersion.datanet_id).in_(sorted({c.datanet_id for c in published})))).all():
                    if version.number > getattr(latest.get(version.datanet_id), "number", 0):
                        latest[version.datanet_id] = version
        out: dict[str, ProofView | None] = {c.id: None for c in contributions}
        for contribution in published:
            version = latest.get(contribution.datanet_id)
            if version is None:
                continue
            tree = self._tree(contribution.datanet_id, version.number)
            path = tree.proof(bytes.fromhex(contribution.id))
            out[contribution.id] = ProofView(
                datanet_id=contribution.datanet_id, datanet_key="0x" + datanet_key(contribution.datanet_id).hex(),
                version=version.number, contribution_id=contribution.id, root="0x" + tree.root.hex(),
                proof=tuple("0x" + node.hex() for node in path), anchor_tx=version.anchor_tx,
                anchor_contract=version.anchor_contract,
            )
        return out

    def _tree(self, datanet_id: str, number: int) -> MerkleTree:
        key = (datanet_id, number)
        with self._tree_lock:
            tree = self._cached(key)
            if tree is not None:
                return tree
            building = self._building.setdefault(key, threading.Lock())
        # One build per version, however many pages ask at once; a page of another version does not wait
        # for it (a 12-leaf tree is not queued behind a 100k-leaf one).
        with building:
            with self._tree_lock:
                tree = self._cached(key)
            if tree is not None:
                return tree
            try:
                tree = self._load_or_build(datanet_id, number)
                with self._tree_lock:
                    self._trees[key] = tree
                    while len(self._trees) > TREES_KEPT:
                        self._trees.popitem(last=False)
            finally:
                with self._tree_lock:
                    self._building.pop(key, None)
            return tree

    def _load_or_build(self, datanet_id: str, number: int) -> MerkleTree:
        """The version's tree from `tree_dir` when a saved one has the version's root, else built (and saved)."""
        saved = None
        if self.tree_dir is not None:
            with Session(self.engine) as session:
                root = session.exec(select(DatanetVersion.merkle_root).where(DatanetVersion.datanet_id == datanet_id)
                                    .where(DatanetVersion.number == number)).first()
            if root is not None:
                saved = self.tree_dir / f"{root.lower().removeprefix('0x')}.bin"
                try:
                    tree = MerkleTree.from_bytes(saved.read_bytes())
                    if "0x" + tree.root.hex() == root.lower():
                        return tree
                except (OSError, ValueError):
                    pass  # none yet, or unreadable: build it again
        with self.engine.connect() as connection:  # plain rows: a third of the ORM's time for 100k ids
            ids = connection.execute(select(Contribution.id).where(in_version(datanet_id, number))).scalars().all()
        tree = MerkleTree.from_ids([bytes.fromhex(i) for i in ids])
        if saved is not None and tree.root.hex() == saved.stem:  # only a tree of the version's recorded root
            try:
                saved.parent.mkdir(parents=True, exist_ok=True)
                partial = saved.with_name(f"{saved.name}.{threading.get_ident()}.partial")
                partial.write_bytes(tree.to_bytes())
                os.replace(partial, saved)
            except OSError as error:
                log.warning("portal: cannot keep the Merkle tree of %s v%d in %s: %s", datanet_id, number,
                            self.tree_dir, error)
        return tree

    def _cached(self, key: tuple[str, int]) -> MerkleTree | None:
        tree = self._trees.get(key)  # the caller holds _tree_lock
        if tree is not None:
            self._trees.move_to_end(key)
        return tree

    def warm(self) -> None:
        """Build the trees of every datanet's latest version ahead of the first page that needs one."""
        with Session(self.engine) as session:
            latest = session.exec(select(DatanetVersion.datanet_id, func.max(DatanetVersion.number))
                                  .group_by(DatanetVersion.datanet_id)).all()
        for datanet_id, number in latest[:TREES_KEPT]:
            self._tree(datanet_id, number)

    # -- helpers ------------------------------------------------------------------------------------

    def _page(self, number: int, total: int) -> Page:
        page = Page(1, self.page_size, total)
        return Page(min(max(1, number), page.pages), self.page_size, total)

    @staticmethod
    def _versions(session: Session, datanet_id: str | None) -> dict[str, tuple[VersionView, ...]]:
        query = select(DatanetVersion)
        if datanet_id is not None:
            query = query.where(DatanetVersion.datanet_id == datanet_id)
        versions = session.exec(query.order_by(DatanetVersion.datanet_id, DatanetVersion.number)).all()
        adapters: dict[int, list[str]] = {}
        lineage = select(AdapterLineage.datanet_version_id, AdapterLineage.adapter_name)
        if datanet_id is not None:
            lineage = lineage.where(col(AdapterLineage.datanet_version_id).in_([v.id for v in versions]))
        for version_id, adapter in session.exec(lineage.order_by(AdapterLineage.adapter_name)).all():
            adapters.setdefault(version_id, []).append(adapter)
        out: dict[str, list[VersionView]] = {}
        for v in versions:
            out.setdefault(v.datanet_id, []).append(VersionView(
                number=v.number, merkle_root=v.merkle_root, contribution_count=v.contribution_count,
                anchor_tx=v.anchor_tx, anchor_chain_id=v.anchor_chain_id, anchor_contract=v.anchor_contract,
                published_at=v.published_at, adapters=tuple(adapters.get(v.id or 0, ())),
            ))
        return {key: tuple(value) for key, value in out.items()}

    @staticmethod
    def _summary(datanet: Datanet, contributions: int, contributors: int,
                 versions: tuple[VersionView, ...]) -> DatanetSummary:
        return DatanetSummary(datanet.name, datanet.id, datanet.description, datanet.owner, contributions,
                              contributors, versions)
