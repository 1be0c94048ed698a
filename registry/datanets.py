"""The datanet registry: create datanets, accept signed contributions, publish versions, prove inclusion.

Publishing a version freezes its contributions (the new ones and every earlier version's), builds
the version's attribution index, computes the Merkle root over the contribution ids and anchors it
on-chain. The version row is committed before the anchor transaction; if anchoring fails, the next
`publish` finishes it (an already anchored, equal root is recorded without a second transaction).

The index is built on local disk (`<index_root>/<datanet id>/v<n>`) and its digest recorded in
`DatanetVersion.index_digest`. With an index store (a directory or an fsspec URL such as
``s3://bucket/indexes``; ``GATEWAY_INDEX_STORE``), it is uploaded to ``<store>/<datanet id>/v<n>``
before the version is committed, `index_path` is that URL, and the local build is removed: nodes copy
the index from the store and check it against the digest (statedir/store_cache.py).

Rejections decided after a submission's signature verified are stored (`ContributionRejection`,
read with `rejections`); see `contribute` for which ones and why the others are not.
"""

from __future__ import annotations

import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

import numpy as np
from sqlalchemy import Engine, func, insert
from sqlmodel import Session, col, select

from registry import near_duplicates
from registry.anchor import RootAnchor, datanet_key
from registry.config import DatanetConfig
from registry.contribution_content import BadSignature, checksum_address, content_id, normalize, recover_contributor
from registry.contribution_files import Rejection
from registry.errors import AlreadyExists, AnchorFailed, IndexStoreFailed, InvalidInput, NothingToPublish, NotFound
from registry.merkle import MerkleTree, verify_proof
from registry.models import Contribution, ContributionBand, ContributionRejection, Datanet, DatanetVersion
from statedir.store_cache import StoreError, check_store_url, directory_digest, is_local_url, local_path_of, upload
from storage.database import utcnow

DATANET_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
ID_CHUNK = 900  # ids per IN (...) clause, below SQLite's variable limit
REJECTIONS_LIMIT_MAX = 1000


class IndexBuilder(Protocol):
    """Builds a version's attribution index from (contribution id, text) pairs into `out_dir`."""

    def __call__(self, documents: Iterable[tuple[str, str]], out_dir: Path) -> object: ...


@dataclass(frozen=True)
class SignedText:
    """A contribution as submitted: text, the contributor it claims, and that contributor's signature."""

    source: str
    text: str
    contributor: str
    signature: str
    license: str | None = None


@dataclass(frozen=True)
class _Candidate:
    """A submitted text that passed the checks that need no database."""

    source: str
    id: str
    text: str
    size: int
    contributor: str
    signature: str
    license: str
    minhash: np.ndarray
    band_keys: list[int]


@dataclass(frozen=True)
class Accepted:
    id: str
    contributor: str
    source: str


@dataclass(frozen=True)
class RejectionRecord:
    """A stored rejection: what was refused (by content id and the submitter's label), whose, why, when."""

    content_id: str
    contributor: str
    source: str
    reason: str
    created_at: datetime


@dataclass
class ContributeResult:
    accepted: list[Accepted] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)


@dataclass(frozen=True)
class PublishedVersion:
    datanet: str
    version: int
    merkle_root: str
    tx_hash: str
    contributions: int
    index_path: str
    index_digest: str | None = None


@dataclass(frozen=True)
class InclusionProof:
    datanet: str
    version: int
    contribution_id: str
    root: str
    proof: list[str]
    anchor_tx: str | None
    root_on_chain: str | None
    verified_on_chain: bool


def parse_version_spec(spec: str) -> tuple[str, int | None]:
    """``NAME`` or ``NAME@VERSION`` → (name, version or None for the latest)."""
    name, _, version = spec.partition("@")
    if not version:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise InvalidInput(f"'{spec}': the version after '@' must be a positive integer")
    return name, int(version)


def in_version(datanet_id: str, number: int):  # type: ignore[no-untyped-def]
    """The contributions that make up version `number` of a datanet (versions are cumulative)."""
    return (
        (col(Contribution.datanet_id) == datanet_id)
        & (col(Contribution.status) == "published")
        & (col(Contribution.version) <= number)
    )


class DatanetRegistry:
    """Datanets, versions and contributions in the ledger's database."""

    def __init__(self, engine: Engine, config: DatanetConfig | None = None,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self.config = config or DatanetConfig()
        self.clock = clock

    # -- datanets -------------------------------------------------------------------------------

    def create(self, name: str, description: str = "", owner: str | None = None) -> Datanet:
        if not isinstance(name, str) or not DATANET_NAME.match(name):
            raise InvalidInput(
                f"'{name}' is not a datanet name: 1-64 lower-case letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        owner_address = self._address(owner) if owner else None
        with Session(self.engine) as session:
            if session.exec(select(Datanet).where(Datanet.name == name)).first():
                raise AlreadyExists(f"datanet '{name}' already exists")
            datanet = Datanet(id=uuid.uuid4().hex, name=name, description=description, owner=owner_address)
            session.add(datanet)
            session.commit()
            session.refresh(datanet)
            return datanet

    def get(self, name: str) -> Datanet:
        with Session(self.engine) as session:
            datanet = session.exec(select(Datanet).where(Datanet.name == name)).first()
            if datanet is None:
                raise NotFound(f"no datanet named '{name}'")
            return datanet

    def list(self) -> list[dict[str, object]]:
        with Session(self.engine) as session:
            datanets = session.exec(select(Datanet).order_by(Datanet.name)).all()
            counts = dict(
                session.exec(select(Contribution.datanet_id, func.count()).group_by(Contribution.datanet_id)).all()
            )
            latest = dict(
                session.exec(
                    select(DatanetVersion.datanet_id, func.max(DatanetVersion.number)).group_by(
                        DatanetVersion.datanet_id
                    )
                ).all()
            )
        return [
            {"name": d.name, "id": d.id, "description": d.description,
             "contributions": counts.get(d.id, 0), "latest_version": latest.get(d.id)}
            for d in datanets
        ]

    def versions(self, name: str) -> list[DatanetVersion]:
        datanet = self.get(name)
        with Session(self.engine) as session:
            return list(
                session.exec(
                    select(DatanetVersion).where(DatanetVersion.datanet_id == datanet.id).order_by(DatanetVersion.number)
                ).all()
            )

    def version(self, name: str, number: int | None = None) -> DatanetVersion:
        """A published version (the latest when `number` is None)."""
        versions = self.versions(name)
        if not versions:
            raise NotFound(f"datanet '{name}' has no published version yet")
        if number is None:
            return versions[-1]
        for version in versions:
            if version.number == number:
                return version
        raise NotFound(f"datanet '{name}' has no version {number} (latest is {versions[-1].number})")

    def contributions(self, name: str, version: int | None = None) -> list[Contribution]:
        """All contributions of a datanet (pending ones too), or exactly those of a published version."""
        datanet = self.get(name)
        query = select(Contribution).where(
            in_version(datanet.id, version) if version is not None else Contribution.datanet_id == datanet.id
        )
        with Session(self.engine) as session:
            return list(session.exec(query.order_by(Contribution.created_at, Contribution.id)).all())

    # -- contributions --------------------------------------------------------------------------

    def contribute(self, name: str, items: Sequence[SignedText]) -> ContributeResult:
        """Validate and store signed texts; each rejected item gets a reason, the rest are stored together.

        Checks run in this order: empty, size, address, signature, daily limit, exact duplicate,
        near-duplicate (against the ledger and against earlier items of the same call).

        Every rejection is returned. Those decided after the signature verified (daily limit, exact
        and near duplicate) are also stored, in the transaction that stores the accepted items, with
        the recovered contributor, the content id and the reason, never the text. Those decided
        before (empty, too large, bad address, bad or mismatched signature) are not stored: their
        submitter is not proven, and storing them would let anyone attach refusals to another's address.
        """
        datanet = self.get(name)
        result = ContributeResult()
        candidates: list[_Candidate] = []
        for item in items:
            checked = self._check_alone(datanet, item)
            if isinstance(checked, str):
                result.rejected.append(Rejection(item.source, checked))
            else:
                candidates.append(checked)
        with Session(self.engine) as session:
            known = self._existing(session, [c.id for c in candidates])
            neighbours = self._band_neighbours(session, {k for c in candidates for k in c.band_keys})
            day_start = self.clock().replace(hour=0, minute=0, second=0, microsecond=0)
            used_today = dict(
                session.exec(
                    select(Contribution.contributor, func.sum(Contribution.bytes))
                    .where(col(Contribution.contributor).in_({c.contributor for c in candidates}))
                    .where(Contribution.created_at >= day_start)
                    .group_by(Contribution.contributor)
                ).all()
            ) if candidates else {}
            accepted: list[_Candidate] = []
            refused: list[tuple[_Candidate, str]] = []
            for candidate in candidates:
                reason = self._check_against(candidate, known, neighbours, used_today)
                if reason:
                    result.rejected.append(Rejection(candidate.source, reason))
                    refused.append((candidate, reason))
                    continue
                accepted.append(candidate)
                known[candidate.id] = datanet.name
                for key in candidate.band_keys:
                    neighbours.setdefault(key, []).append((candidate.id, candidate.minhash))
                used_today[candidate.contributor] = used_today.get(candidate.contributor, 0) + candidate.size
                result.accepted.append(Accepted(candidate.id, candidate.contributor, candidate.source))
            now = self.clock()
            self._insert(session, datanet, accepted, now)
            self._insert_rejections(session, datanet, refused, now)
            session.commit()
        return result

    def rejections(self, name: str, *, contributor: str | None = None, limit: int = 100) -> list[RejectionRecord]:
        """The stored rejections of a datanet, newest first, optionally of one contributor only.

        NotFound for an unknown datanet; InvalidInput for a malformed address or a limit outside
        1..1000."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= REJECTIONS_LIMIT_MAX:
            raise InvalidInput(f"limit must be an integer from 1 to {REJECTIONS_LIMIT_MAX}, not {limit!r}")
        address = self._address(contributor) if contributor is not None else None
        datanet = self.get(name)
        query = select(ContributionRejection).where(ContributionRejection.datanet_id == datanet.id)
        if address is not None:
            query = query.where(ContributionRejection.contributor == address)
        query = query.order_by(col(ContributionRejection.created_at).desc(), col(ContributionRejection.id).desc())
        with Session(self.engine) as session:
            rows = session.exec(query.limit(limit)).all()
        return [RejectionRecord(r.content_id, r.contributor, r.source, r.reason, r.created_at) for r in rows]

    def _check_alone(self, datanet: Datanet, item: SignedText) -> _Candidate | str:
        """What can be checked without the database: content, size, address, signature."""
        text = normalize(item.text)
        if not text:
            return "empty contribution (nothing left after trimming whitespace)"
        size = len(text.encode("utf-8"))
        if size > self.config.max_contribution_bytes:
            return f"too large: {size} bytes, the limit is {self.config.max_contribution_bytes}"
        try:
            claimed = checksum_address(item.contributor)
        except ValueError as exc:
            return str(exc)
        cid = content_id(text)
        try:
            signer = recover_contributor(datanet.id, cid, item.signature)
        except BadSignature as exc:
            return str(exc)
        if signer != claimed:
            return f"signature is not {claimed}'s signature over this datanet and content"
        minhash = near_duplicates.signature(text)
        return _Candidate(item.source, cid, text, size, claimed, item.signature.lower(),
                          item.license or self.config.default_license, minhash, near_duplicates.band_keys(minhash))

    def _check_against(self, candidate: _Candidate, known: dict[str, str],
                       neighbours: dict[int, list[tuple[str, np.ndarray]]], used_today: dict[str, int]) -> str | None:
        used = used_today.get(candidate.contributor, 0)
        if used + candidate.size > self.config.max_bytes_per_contributor_per_day:
            return (
                f"daily limit reached: {candidate.contributor} has contributed {used} bytes today, "
                f"the limit is {self.config.max_bytes_per_contributor_per_day}"
            )
        if candidate.id in known:
            return f"exact duplicate of contribution {candidate.id} in datanet '{known[candidate.id]}'"
        best: tuple[str, float] | None = None
        seen: set[str] = set()
        for key in candidate.band_keys:
            for other_id, other_hash in neighbours.get(key, ()):
                if other_id in seen:
                    continue
                seen.add(other_id)
                score = near_duplicates.similarity(candidate.minhash, other_hash)
                if score >= self.config.near_duplicate_threshold and (best is None or score > best[1]):
                    best = (other_id, score)
        if best is not None:
            return (
                f"near-duplicate of contribution {best[0]} (similarity {best[1]:.2f} >= "
                f"{self.config.near_duplicate_threshold:.2f})"
            )
        return None

    @staticmethod
    def _existing(session: Session, ids: list[str]) -> dict[str, str]:
        """Contribution id → datanet name, for the ids already in the ledger."""
        found: dict[str, str] = {}
        for start in range(0, len(ids), ID_CHUNK):
            found.update(
                session.exec(
                    select(Contribution.id, Datanet.name)
                    .join(Datanet, col(Datanet.id) == col(Contribution.datanet_id))
                    .where(col(Contribution.id).in_(ids[start : start + ID_CHUNK]))
                ).all()
            )
        return found

    @staticmethod
    def _band_neighbours(session: Session, keys: set[int]) -> dict[int, list[tuple[str, np.ndarray]]]:
        """Bucket key → (contribution id, MinHash) of stored contributions sharing that bucket."""
        ordered = sorted(keys)
        neighbours: dict[int, list[tuple[str, np.ndarray]]] = {}
        for start in range(0, len(ordered), ID_CHUNK):
            rows = session.exec(
                select(ContributionBand.key, Contribution.id, Contribution.minhash)
                .join(Contribution, col(Contribution.id) == col(ContributionBand.contribution_id))
                .where(col(ContributionBand.key).in_(ordered[start : start + ID_CHUNK]))
            ).all()
            for key, cid, minhash in rows:
                neighbours.setdefault(key, []).append((cid, near_duplicates.from_bytes(minhash)))
        return neighbours

    def _insert(self, session: Session, datanet: Datanet, accepted: list[_Candidate], now: datetime) -> None:
        if not accepted:
            return
        connection = session.connection()  # Core executemany: no ORM objects for bulk rows
        connection.execute(
            insert(Contribution.__table__),
            [
                {"id": c.id, "datanet_id": datanet.id, "contributor": c.contributor, "signature": c.signature,
                 "license": c.license, "bytes": c.size, "text": c.text, "minhash": near_duplicates.to_bytes(c.minhash),
                 "status": "pending", "version": None, "source": c.source[-255:], "created_at": now}
                for c in accepted
            ],
        )
        connection.execute(
            insert(ContributionBand.__table__),
            [{"key": key, "contribution_id": c.id} for c in accepted for key in sorted(set(c.band_keys))],
        )

    @staticmethod
    def _insert_rejections(session: Session, datanet: Datanet, refused: list[tuple[_Candidate, str]],
                           now: datetime) -> None:
        """Rows for refusals of signature-verified candidates: contributor, content id, reason; not the text.

        A signature proves its signer signed that text for this datanet, not who submitted it: a copy can be
        replayed. So a refusal is recorded once per contributor and content, and never for a text that is
        already that contributor's own contribution (a replay of it tells its signer nothing)."""
        ids = sorted({c.id for c, _ in refused})
        if not ids:
            return
        seen = set(session.exec(select(ContributionRejection.contributor, ContributionRejection.content_id)
                                .where(ContributionRejection.datanet_id == datanet.id)
                                .where(col(ContributionRejection.content_id).in_(ids))).all())
        seen |= set(session.exec(select(Contribution.contributor, Contribution.id)
                                 .where(col(Contribution.id).in_(ids))).all())
        fresh: list[tuple[_Candidate, str]] = []
        for candidate, reason in refused:
            if (candidate.contributor, candidate.id) not in seen:
                seen.add((candidate.contributor, candidate.id))
                fresh.append((candidate, reason))
        if not fresh:
            return
        refused = fresh
        session.connection().execute(
            insert(ContributionRejection.__table__),
            [
                {"datanet_id": datanet.id, "contributor": c.contributor, "content_id": c.id,
                 "source": c.source[-255:], "reason": reason, "created_at": now}
                for c, reason in refused
            ],
        )

    # -- publishing -----------------------------------------------------------------------------

    def publish(self, name: str, build_index: IndexBuilder, anchor: RootAnchor, index_root: Path,
                index_store: str = "") -> PublishedVersion:
        """Freeze pending contributions into a new version, index it, and anchor its root on-chain.

        With `index_store` (a directory or an fsspec URL), the index is uploaded there; IndexStoreFailed
        when the store refuses it (nothing is published then)."""
        datanet = self.get(name)
        if index_store:
            try:
                check_store_url(index_store)
            except ValueError as exc:
                raise InvalidInput(f"index store: {exc}") from None
        unanchored = [v for v in self.versions(name) if v.anchor_tx is None]
        version = unanchored[0] if unanchored else self._freeze(datanet, build_index, index_root, index_store)
        return self._anchor(datanet, version, anchor)

    def _freeze(self, datanet: Datanet, build_index: IndexBuilder, index_root: Path,
                index_store: str = "") -> DatanetVersion:
        with Session(self.engine) as session:
            last = session.exec(
                select(func.max(DatanetVersion.number)).where(DatanetVersion.datanet_id == datanet.id)
            ).one()
            number = (last or 0) + 1
            rows = session.exec(
                select(Contribution.id, Contribution.text, Contribution.status)
                .where(Contribution.datanet_id == datanet.id)
                .order_by(Contribution.id)
            ).all()
        pending = [cid for cid, _, status in rows if status == "pending"]
        if not pending:
            raise NothingToPublish(
                f"datanet '{datanet.name}' has no new contributions since "
                + (f"version {last}" if last else "it was created")
            )
        documents = [(cid, text) for cid, text, _ in rows]
        index_dir = Path(index_root) / datanet.id / f"v{number}"
        for leftover in [index_dir, *index_dir.parent.glob(f".{index_dir.name}.*")]:
            shutil.rmtree(leftover, ignore_errors=True)  # left by an attempt that died before its commit
        build_index(documents, index_dir)
        index_path, digest = self._store_index(index_dir, index_store, f"{datanet.id}/v{number}")
        tree = MerkleTree.from_ids([bytes.fromhex(cid) for cid, _ in documents])
        with Session(self.engine) as session:
            version = DatanetVersion(
                datanet_id=datanet.id, number=number, merkle_root="0x" + tree.root.hex(),
                contribution_count=len(documents), index_path=index_path, index_digest=digest,
                published_at=self.clock(),
            )
            session.add(version)
            for start in range(0, len(pending), ID_CHUNK):
                chunk = pending[start : start + ID_CHUNK]
                for contribution in session.exec(select(Contribution).where(col(Contribution.id).in_(chunk))).all():
                    contribution.status, contribution.version = "published", number
                    session.add(contribution)
            session.commit()
            session.refresh(version)
        if index_path != str(index_dir) and not (
            is_local_url(index_path) and local_path_of(index_path).resolve() == index_dir.resolve()
        ):
            shutil.rmtree(index_dir, ignore_errors=True)  # the store's copy is the index now
        return version

    @staticmethod
    def _store_index(index_dir: Path, index_store: str, relative: str) -> tuple[str, str]:
        """(index_path, digest): the local build, or its copy uploaded to `<index_store>/<relative>`."""
        if not index_store:
            return str(index_dir), directory_digest(index_dir)
        url = f"{index_store.rstrip('/')}/{relative}"
        try:
            return url, upload(index_dir, url)
        except StoreError as exc:
            raise IndexStoreFailed(f"the index could not be written to the index store, nothing was published: "
                                   f"{exc}") from None

    def _anchor(self, datanet: Datanet, version: DatanetVersion, anchor: RootAnchor) -> PublishedVersion:
        root = bytes.fromhex(version.merkle_root.removeprefix("0x"))
        key = datanet_key(datanet.id)
        try:
            on_chain = anchor.root_of(key, version.number)
            if on_chain is None:
                tx_hash = anchor.anchor(key, version.number, root, version.contribution_count)
            elif on_chain == root:
                tx_hash = version.anchor_tx or "already-anchored"
            else:
                raise AnchorFailed(
                    f"the registry at {anchor.address} holds a different root for '{datanet.name}' "
                    f"version {version.number}: 0x{on_chain.hex()}"
                )
        except AnchorFailed:
            raise
        except Exception as exc:  # the chain client's errors: unreachable node, revert, timeout
            raise AnchorFailed(
                f"version {version.number} of '{datanet.name}' is published but its root is not anchored yet "
                f"({exc}); run publish again to retry"
            ) from None
        with Session(self.engine) as session:
            stored = session.get(DatanetVersion, version.id)
            stored.anchor_tx, stored.anchor_chain_id, stored.anchor_contract = tx_hash, anchor.chain_id, anchor.address
            session.add(stored)
            session.commit()
        return PublishedVersion(datanet.name, version.number, version.merkle_root, tx_hash,
                                version.contribution_count, version.index_path, version.index_digest)

    # -- proofs ---------------------------------------------------------------------------------

    def proof(self, name: str, contribution_id: str, anchor: RootAnchor | None,
              version: int | None = None) -> InclusionProof:
        """An inclusion proof of a contribution in a published version, checked against the on-chain root."""
        datanet = self.get(name)
        cid = contribution_id.lower().removeprefix("0x")
        with Session(self.engine) as session:
            contribution = session.get(Contribution, cid)
        if contribution is None or contribution.datanet_id != datanet.id:
            raise NotFound(f"contribution {cid} is not in datanet '{name}'")
        if contribution.status != "published":
            raise NotFound(f"contribution {cid} is not published yet: publish '{name}' first")
        chosen = self.version(name, version)
        if contribution.version > chosen.number:
            raise NotFound(f"contribution {cid} was published in version {contribution.version}, after {chosen.number}")
        with Session(self.engine) as session:
            ids = session.exec(select(Contribution.id).where(in_version(datanet.id, chosen.number))).all()
        tree = MerkleTree.from_ids([bytes.fromhex(i) for i in ids])
        path = tree.proof(bytes.fromhex(cid))
        root_on_chain = anchor.root_of(datanet_key(datanet.id), chosen.number) if anchor else None
        verified = bool(
            root_on_chain is not None
            and verify_proof(root_on_chain, bytes.fromhex(cid), path)
            and anchor.verify(datanet_key(datanet.id), chosen.number, bytes.fromhex(cid), path)
        )
        return InclusionProof(
            datanet=name, version=chosen.number, contribution_id=cid, root="0x" + tree.root.hex(),
            proof=["0x" + node.hex() for node in path], anchor_tx=chosen.anchor_tx,
            root_on_chain="0x" + root_on_chain.hex() if root_on_chain else None, verified_on_chain=verified,
        )

    @staticmethod
    def _address(address: str) -> str:
        try:
            return checksum_address(address)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None

