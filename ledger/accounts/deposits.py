"""The deposit watcher: ERC-20 transfers to the treasury credit the sender's requester account.

The treasury is the address whose token balance pays contributors: the PayoutSettler contract
itself (it pays from ``token.balanceOf(settler)``, ledger/chain/settlement.py). A requester funds
its account by sending the payout token from its account's `deposit_address` to that address.

Guarantees (asserted in code and tests):
- a transfer is credited only once it is `confirmations` blocks deep (its block and
  ``confirmations - 1`` blocks on top of it), so a reorg shallower than the depth never credits a
  transfer it removed; the replacement chain's transfers are credited when they reach the depth;
- each transfer (`Deposit.id` = ``<chain id>:<tx hash>:<log index>``) is recorded at most once and
  credited at most once (the row's primary key, and `Accounts.credit` is idempotent per
  (``deposit``, deposit id)); re-scanning blocks, a restart, or a restored database credits nothing twice;
- the rows, credits and the scan cursor of one chunk of blocks are written in ONE database
  transaction: a crash leaves either all of a chunk or none of it;
- a transfer from an address no account claims is recorded with `account_id` None and no entry, for
  the operator to resolve; zero-value transfers and mints (from the zero address) are not deposits.

Reorgs deeper than the confirmation depth (policy, as exchanges have it: the depth IS the
protection, so choose it for the chain — e.g. 1 on a local anvil, tens of blocks on an L1):
- each scan first checks that the newest recorded deposit's block is still on the chain. When it is
  not, the watcher walks back through the recorded deposits to the newest one still on the chain,
  logs an ERROR naming every orphaned deposit (once per watcher), and rewinds the cursor to the
  block after that survivor so the replacement blocks are scanned;
- credits are NOT reversed: an orphaned deposit's credit stays (the operator decides; the balance
  may already be spent). A transfer of an orphaned deposit's transaction that the new chain mined
  again (same tx hash, another block) is recorded but its credit is WITHHELD (`entry_id` None, an
  ERROR logged), so one on-chain transfer never funds an account twice;
- a cursor beyond the chain's safe head (the chain was reset or shortened, or `confirmations` was
  raised) is logged and rewound to the safe head.
Which deposits were orphaned is kept in memory only: after a restart the check may report them again
and rewind once more (harmless: re-scanning is idempotent), unless a newer deposit is on the chain.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from eth_utils import is_address, keccak, to_checksum_address
from hexbytes import HexBytes
from sqlalchemy import Engine, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlmodel import Session, col, select
from web3.exceptions import BlockNotFound

from ledger.accounts.accounts import DEPOSIT, Accounts
from ledger.chain.client import ChainClient
from ledger.chain.errors import ChainError
from ledger.chain.settlement import block_number
from ledger.models import Deposit, DepositScan, RequesterAccount
from storage.database import utcnow

log = logging.getLogger(__name__)

TRANSFER_TOPIC = "0x" + keccak(text="Transfer(address,address,uint256)").hex()
ZERO_ADDRESS = "0x" + "00" * 20
BLOCKS_PER_SCAN_MAX = 2000
"""Blocks per ``eth_getLogs`` request and per database transaction (public nodes cap the range)."""
REORG_WALK_DEPOSITS_MAX = 1000
"""Recorded deposits checked, newest first, when looking for the newest one still on the chain."""


class DepositConfigError(ValueError):
    """The watcher's configuration is unusable (names the offending parameter)."""


@dataclass(frozen=True)
class Transfer:
    """A decoded ``Transfer(from, to=treasury, value)`` log."""

    deposit_id: str
    from_address: str
    amount: int
    block_number: int
    block_hash: str
    tx_hash: str


class DepositWatcher:
    """Credits transfers of `token` to `treasury` on `client`'s chain once they are `confirmations` deep."""

    def __init__(self, engine: Engine, client: ChainClient, token: str, treasury: str, confirmations: int, *,
                 start_block: int = 0, max_blocks_per_scan: int = BLOCKS_PER_SCAN_MAX,
                 report: Callable[[str], None] = lambda _line: None) -> None:
        self.engine = engine
        self.client = client
        self.token = _address(token, "token")
        self.treasury = _address(treasury, "treasury")
        if isinstance(confirmations, bool) or not isinstance(confirmations, int) or confirmations < 1:
            raise DepositConfigError(f"confirmations must be an integer >= 1 (1 = the head block counts), "
                                     f"got {confirmations!r}")
        if isinstance(start_block, bool) or not isinstance(start_block, int) or start_block < 0:
            raise DepositConfigError(f"start_block must be an integer >= 0, got {start_block!r}")
        if isinstance(max_blocks_per_scan, bool) or not isinstance(max_blocks_per_scan, int) \
                or max_blocks_per_scan < 1:
            raise DepositConfigError(f"max_blocks_per_scan must be an integer >= 1, got {max_blocks_per_scan!r}")
        self.confirmations = confirmations
        self.start_block = start_block
        self.max_blocks_per_scan = max_blocks_per_scan
        self.report = report
        self.accounts = Accounts(engine)
        self._orphaned: set[str] = set()  # deposit ids already reported as orphaned by a deep reorg

    def __repr__(self) -> str:
        return (f"DepositWatcher(token={self.token}, treasury={self.treasury}, "
                f"confirmations={self.confirmations}, via {self.client!r})")

    # ---- scanning -------------------------------------------------------------------------
    def scan_once(self) -> list[Deposit]:
        """Record (and credit) the transfers in the blocks that reached the depth since the last scan.

        Returns the deposits recorded by this call, oldest first (credited ones have an `entry_id`).
        """
        chain_id = self.client.chain_id
        next_block = self._cursor(chain_id)
        next_block = self._check_reorg(chain_id, next_block)
        safe = block_number(self.client) - self.confirmations + 1
        if next_block > max(safe + 1, self.start_block):
            self._alarm(f"the deposit cursor is at block {next_block} but only blocks up to {safe} are "
                        f"{self.confirmations} deep: the chain was reset or reorganized deeper than the "
                        "confirmation depth (or confirmations was raised); rewinding to block "
                        f"{max(safe + 1, self.start_block)}")
            next_block = max(safe + 1, self.start_block)
            self._move_cursor(chain_id, next_block)
        recorded: list[Deposit] = []
        while next_block <= safe:
            last = min(safe, next_block + self.max_blocks_per_scan - 1)
            transfers = self._transfers(chain_id, next_block, last)
            chunk = self._record(chain_id, next_block, last, transfers)
            if chunk is None:  # another watcher moved the cursor: the next scan starts from it
                break
            recorded += chunk
            next_block = last + 1
        return recorded

    def run(self, stop: threading.Event, interval_seconds: float) -> None:
        """Scan every `interval_seconds` until `stop` is set; errors are logged and the scan retried."""
        if interval_seconds <= 0:
            raise DepositConfigError(f"interval_seconds must be > 0, got {interval_seconds!r}")
        while not stop.is_set():
            try:
                self.scan_once()
            except (ChainError, OSError, SQLAlchemyError) as error:
                log.warning("deposit scan failed (%s); retrying in %.1f s", error, interval_seconds)
            except Exception:  # a watcher thread that dies silently would stop all credits
                log.exception("deposit scan failed; retrying in %.1f s", interval_seconds)
            stop.wait(interval_seconds)

    # ---- the cursor -----------------------------------------------------------------------
    def _cursor_key(self, chain_id: int) -> tuple[int, str, str]:
        return chain_id, self.token, self.treasury

    def _cursor(self, chain_id: int) -> int:
        """The next block to scan, creating the cursor at `start_block` on the first scan."""
        with Session(self.engine) as session:
            cursor = session.get(DepositScan, self._cursor_key(chain_id))
            if cursor is not None:
                return cursor.next_block
            session.add(DepositScan(chain_id=chain_id, token=self.token, treasury=self.treasury,
                                    next_block=self.start_block, updated_at=utcnow()))
            try:
                session.commit()
            except IntegrityError:  # another watcher created it first
                session.rollback()
                cursor = session.get(DepositScan, self._cursor_key(chain_id))
                assert cursor is not None
                return cursor.next_block
        return self.start_block

    def _lock_cursor(self, session: Session, chain_id: int) -> DepositScan:
        """The cursor row, write-locked until the transaction ends (one watcher per cursor at a time)."""
        table = DepositScan.__table__  # type: ignore[attr-defined]
        session.execute(update(table).where(table.c.chain_id == chain_id, table.c.token == self.token,
                                            table.c.treasury == self.treasury).values(chain_id=chain_id))
        cursor = session.get(DepositScan, self._cursor_key(chain_id), populate_existing=True)
        assert cursor is not None, "the cursor is created before it is locked"
        return cursor

    def _move_cursor(self, chain_id: int, next_block: int) -> None:
        with Session(self.engine) as session:
            cursor = self._lock_cursor(session, chain_id)
            cursor.next_block, cursor.updated_at = next_block, utcnow()
            session.add(cursor)
            session.commit()

    # ---- one chunk ------------------------------------------------------------------------
    def _transfers(self, chain_id: int, first: int, last: int) -> list[Transfer]:
        """The token's transfers to the treasury in blocks [first, last], oldest first."""
        treasury_topic = "0x" + "00" * 12 + self.treasury[2:].lower()
        logs = self.client.rpc(lambda: self.client.w3.eth.get_logs({
            "address": self.token, "fromBlock": first, "toBlock": last,
            "topics": [TRANSFER_TOPIC, None, treasury_topic]}))
        transfers = []
        for entry in sorted(logs, key=lambda e: (int(e["blockNumber"]), int(e["logIndex"]))):
            transfer = _decode(chain_id, entry)
            if transfer is not None and transfer.amount > 0 and transfer.from_address not in (ZERO_ADDRESS,
                                                                                              self.treasury):
                transfers.append(transfer)
        return transfers

    def _record(self, chain_id: int, first: int, last: int, transfers: Sequence[Transfer]) -> list[Deposit] | None:
        """Insert, credit and advance the cursor past `last`, in one transaction (None: the cursor moved)."""
        recorded: list[Deposit] = []
        lines: list[str] = []
        with Session(self.engine, expire_on_commit=False) as session:
            cursor = self._lock_cursor(session, chain_id)
            if cursor.next_block != first:  # another watcher moved it since we read it
                return None
            for transfer in transfers:
                known = session.get(Deposit, transfer.deposit_id)
                if known is not None:  # recorded (and credited) before: a rescan or a restored database
                    if known.block_hash != transfer.block_hash:  # mined again after a deep reorg: same credit
                        known.block_number, known.block_hash = transfer.block_number, transfer.block_hash
                        session.add(known)
                        self._orphaned.discard(known.id)
                        lines.append(f"[deposits] deposit {known.id} is on the chain again (block "
                                     f"{transfer.block_number}); its credit stands")
                    continue
                account = session.exec(select(RequesterAccount).where(
                    RequesterAccount.deposit_address == transfer.from_address)).first()
                deposit = Deposit(id=transfer.deposit_id, account_id=account.id if account else None,
                                  from_address=transfer.from_address, amount=transfer.amount,
                                  block_number=transfer.block_number, block_hash=transfer.block_hash,
                                  tx_hash=transfer.tx_hash, created_at=utcnow())
                moved = _credited_elsewhere(session, transfer)
                session.add(deposit)
                session.flush()  # the entry's ref names the row
                if moved is not None:
                    lines.append(f"ERROR: deposit {deposit.id} repeats transaction {transfer.tx_hash}, already "
                                 f"credited as {moved.id} in a block a deep reorg removed; credit withheld")
                elif account is None:
                    lines.append(f"[deposits] {transfer.amount} base units from {transfer.from_address} "
                                 f"(deposit {deposit.id}): no account has this deposit address; not credited")
                else:
                    credited = self.accounts.credit(account.id, transfer.amount, deposit.id, kind=DEPOSIT,
                                                    session=session)
                    deposit.entry_id = credited.entry_id
                    session.add(deposit)
                    lines.append(f"[deposits] credited {transfer.amount} base units to {account.id} "
                                 f"(deposit {deposit.id}, block {transfer.block_number})")
                recorded.append(deposit)
            cursor.next_block, cursor.updated_at = last + 1, utcnow()
            session.add(cursor)
            session.commit()
        for line in lines:
            if line.startswith("ERROR: "):
                self._alarm(line.removeprefix("ERROR: "))
            else:
                self.report(line)
        return recorded

    # ---- reorgs deeper than the depth -----------------------------------------------------
    def _check_reorg(self, chain_id: int, next_block: int) -> int:
        """The cursor after checking the newest recorded deposits' blocks are still on the chain."""
        prefix = f"{chain_id}:"
        with Session(self.engine) as session:
            deposits = session.exec(select(Deposit).where(col(Deposit.id).startswith(prefix))
                                    .order_by(col(Deposit.block_number).desc(), col(Deposit.id).desc())
                                    .limit(REORG_WALK_DEPOSITS_MAX + len(self._orphaned))).all()
        orphaned: list[Deposit] = []
        hashes: dict[int, str | None] = {}
        survivor: Deposit | None = None
        for deposit in deposits:
            if deposit.id in self._orphaned:
                continue
            if deposit.block_number not in hashes:
                hashes[deposit.block_number] = self._block_hash(deposit.block_number)
            if hashes[deposit.block_number] == deposit.block_hash:
                survivor = deposit
                break
            orphaned.append(deposit)
        if not orphaned:
            return next_block
        rewind = survivor.block_number + 1 if survivor else min(d.block_number for d in orphaned)
        rewind = max(min(rewind, next_block), self.start_block)
        for deposit in orphaned:
            self._orphaned.add(deposit.id)
            state = f"credited to {deposit.account_id} (entry {deposit.entry_id})" if deposit.entry_id \
                else "not credited"
            self._alarm(f"deposit {deposit.id} ({deposit.amount} base units from {deposit.from_address}, block "
                        f"{deposit.block_number} {deposit.block_hash}) is no longer on the chain: a reorg deeper "
                        f"than {self.confirmations} confirmations; {state}; the credit is NOT reversed")
        if rewind < next_block:
            self._alarm(f"rescanning deposits from block {rewind} (the blocks after the newest deposit still on "
                        "the chain)")
            self._move_cursor(chain_id, rewind)
        return rewind

    def _block_hash(self, number: int) -> str | None:
        try:
            block = self.client.rpc(lambda: self.client.w3.eth.get_block(number))
        except BlockNotFound:
            return None
        return HexBytes(block["hash"]).to_0x_hex()

    def _alarm(self, message: str) -> None:
        log.error("deposit watcher (%s on chain %s): %s", self.treasury, self.client.chain_id, message)
        self.report(f"[deposits] ERROR: {message}")


def _credited_elsewhere(session: Session, transfer: Transfer) -> Deposit | None:
    """A credited deposit of the same transaction in another block (the transaction was mined again)."""
    return session.exec(select(Deposit).where(Deposit.tx_hash == transfer.tx_hash,
                                              Deposit.block_hash != transfer.block_hash,
                                              col(Deposit.entry_id).is_not(None))).first()


def _decode(chain_id: int, entry: Any) -> Transfer | None:
    """A standard ERC-20 Transfer log (3 topics, a 32-byte value), else None."""
    topics, data = entry["topics"], HexBytes(entry["data"])
    if entry.get("removed") or len(topics) != 3 or len(data) != 32:
        return None
    tx_hash = HexBytes(entry["transactionHash"]).to_0x_hex()
    return Transfer(deposit_id=f"{chain_id}:{tx_hash}:{int(entry['logIndex'])}",
                    from_address=to_checksum_address(HexBytes(topics[1])[-20:]),
                    amount=int.from_bytes(data, "big"), block_number=int(entry["blockNumber"]),
                    block_hash=HexBytes(entry["blockHash"]).to_0x_hex(), tx_hash=tx_hash)


def _address(value: object, what: str) -> str:
    if not isinstance(value, str) or not is_address(value):
        raise DepositConfigError(f"{what} must be a 20-byte hex address, got {value!r}")
    if int(value, 16) == 0:
        raise DepositConfigError(f"{what} must not be the zero address")
    return to_checksum_address(value)
