"""Gas per payee of PayoutSettler.settle on a fresh anvil, next to the storage-write floor.

For each batch size in `--sizes` (default 100 and 400): one batch to fresh addresses (new
holders: the token writes a zero balance slot, 22.1k gas = 20k SSTORE + 2.1k cold SLOAD), then a
second batch to the same addresses (existing holders: 5k = 2.9k SSTORE + 2.1k cold SLOAD). Per
payee: the whole transaction's gas / payees (includes the 21k base and the batch's fixed costs),
and the marginal gas per payee (difference between the two sizes / difference in payees), which is
what the floor is compared with. anvil runs in a temporary state directory on a free port.

    .venv/bin/python loadtests/bench_settlement_gas.py [--sizes 100 400] [--json]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
from pathlib import Path

from eth_utils import keccak, to_checksum_address

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ledger.chain.anvil import ANVIL_DEV_KEYS, AnvilNode  # noqa: E402
from ledger.chain.client import ChainClient  # noqa: E402
from ledger.chain.settlement import ensure_settlement  # noqa: E402

FLOOR_GAS = {"new": 22_100, "existing": 5_000}
AMOUNT = 123_456_789_012_345_678  # 0.12 DPT: 8 significant bytes, as a real reward would have
GOAL_RATIO = 1.25


def free_local_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(sizes: list[int]) -> list[dict[str, object]]:
    with tempfile.TemporaryDirectory(prefix="bench-settlement-") as state_dir, AnvilNode(
        Path(state_dir), port=free_local_port()
    ) as node:
        client = ChainClient(node.rpc_url, ANVIL_DEV_KEYS[0])
        _, settler = ensure_settlement(client, Path(state_dir) / "deployment.json", fund=10**30)
        block_gas_limit = client.w3.eth.get_block("latest")["gasLimit"]
        gas: dict[tuple[str, int], int] = {}
        for n in sizes:
            payees = [to_checksum_address(keccak(text=f"bench payee {n} {i}")[:20]) for i in range(n)]
            for holders in ("new", "existing"):
                batch = keccak(text=f"bench {holders} {n}")
                tx_receipt = settler.settle(batch, keccak(text="manifest"), payees, [AMOUNT] * n)
                gas[holders, n] = tx_receipt["gasUsed"]
    rows: list[dict[str, object]] = []
    small, large = min(sizes), max(sizes)
    for holders in ("new", "existing"):
        marginal = (gas[holders, large] - gas[holders, small]) / (large - small) if large > small else None
        for n in sizes:
            rows.append(
                {
                    "holders": holders,
                    "payees": n,
                    "tx_gas": gas[holders, n],
                    "gas_per_payee": gas[holders, n] / n,
                    "marginal_gas_per_payee": marginal,
                    "floor_gas": FLOOR_GAS[holders],
                    "ratio_marginal": None if marginal is None else marginal / FLOOR_GAS[holders],
                    "ratio_per_payee": gas[holders, n] / n / FLOOR_GAS[holders],
                    "block_gas_limit": block_gas_limit,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 400], help="payees per batch")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    rows = measure(sorted(set(args.sizes)))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"block gas limit {rows[0]['block_gas_limit']:,}; goal: marginal gas per payee <= {GOAL_RATIO} x floor")
    print(f"{'holders':<9} {'payees':>6} {'tx gas':>11} {'gas/payee':>10} {'marginal':>9} {'floor':>7} "
          f"{'marg/floor':>10} {'(gas/payee)/floor':>18}")
    for row in rows:
        marginal = row["marginal_gas_per_payee"]
        print(
            f"{row['holders']:<9} {row['payees']:>6} {row['tx_gas']:>11,} {row['gas_per_payee']:>10,.0f} "
            f"{'-' if marginal is None else f'{marginal:,.0f}':>9} {row['floor_gas']:>7,} "
            f"{'-' if row['ratio_marginal'] is None else format(row['ratio_marginal'], '.2f'):>10} "
            f"{row['ratio_per_payee']:>18.2f}"
        )


if __name__ == "__main__":
    main()
