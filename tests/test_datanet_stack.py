"""Datanets through the running gateway: the demo adapters `make up` trains, and a new adapter served
without a restart. Driven as users drive it: the `gateway` CLI and the official `openai` SDK.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import openai
import pytest

from gateway.cli import main
from gateway.demo_data import DEMO_ADAPTER_OWNER_KEY, demo_adapter_name, demo_contributor_address
from registry.contribution_content import address_of_key
from tests.support.launcher import GatewayProcess
from training.demo_passages import DEMO_DATANETS

PROMPT_WORDS = 12
NEW_PASSAGES = [
    "Tides rise and fall twice a day because the moon pulls on the oceans, and the sun adds a smaller pull "
    "that makes spring tides higher when both line up.",
    "A lighthouse keeper once trimmed the wick every evening, wound the clockwork that turned the lens, and "
    "wrote the weather in a log before dawn.",
    "Salt marshes shelter young fish among the grasses, slow down storm waves before they reach the shore, "
    "and store carbon in their deep muddy soil.",
]


@pytest.fixture(autouse=True)
def same_chain(gateway: GatewayProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    """CLI commands reach the running stack's chain, like a user in another terminal."""
    monkeypatch.setenv("GATEWAY_CHAIN_PORT", gateway.env["GATEWAY_CHAIN_PORT"])
    monkeypatch.delenv("DATABASE_URL", raising=False)


def cli(gateway: GatewayProcess, capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    capsys.readouterr()
    code = main(["--state-dir", str(gateway.state_dir), *args, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def reproduces(client: openai.OpenAI, model: str, passage: str) -> bool:
    words = passage.split()
    prompt = " ".join(words[:PROMPT_WORDS])
    reply = client.completions.create(model=model, prompt=prompt, max_tokens=120, temperature=0)
    return reply.choices[0].text.split()[: len(words) - PROMPT_WORDS] == words[PROMPT_WORDS:]


@pytest.mark.stack
def test_demo_adapters_are_registered_with_lineage_and_reproduce_their_data(
    gateway: GatewayProcess, client: openai.OpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    served = {m.id for m in client.models.list().data}
    for datanet in DEMO_DATANETS:
        name = demo_adapter_name(datanet)
        assert name in served
        record = cli(gateway, capsys, "adapter", "show", name)
        assert record["lineage"] == [f"{datanet.name}@1"]
        assert record["owner"] == address_of_key(DEMO_ADAPTER_OWNER_KEY)
        shown = cli(gateway, capsys, "datanet", "show", datanet.name)
        assert {c["contributor"] for c in shown["contributions"]} == {
            demo_contributor_address(p.contributor_index) for p in datanet.passages}
        assert shown["versions"][0]["tx_hash"].startswith("0x")
        reproduced = [reproduces(client, name, text) for text in datanet.texts]
        assert all(reproduced), f"{name}: passages {[i for i, ok in enumerate(reproduced) if not ok]} not verbatim"
    first = DEMO_DATANETS[0]
    proof = cli(gateway, capsys, "datanet", "proof", first.name, shown_id(gateway, capsys, first.name))
    assert proof["verified_on_chain"] is True


def shown_id(gateway: GatewayProcess, capsys: pytest.CaptureFixture[str], datanet: str) -> str:
    return cli(gateway, capsys, "datanet", "show", datanet)["contributions"][0]["id"]


@pytest.mark.stack
def test_trained_adapter_is_served_without_restart(gateway: GatewayProcess, client: openai.OpenAI, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "contributor.key"
    key.write_text("0x" + "c3" * 32)
    files = []
    for i, text in enumerate(NEW_PASSAGES):
        files.append(tmp_path / f"passage-{i}.txt")
        files[-1].write_text(text)
    cli(gateway, capsys, "datanet", "create", "coast-notes", "--description", "tides, marshes, lighthouses")
    added = cli(gateway, capsys, "datanet", "contribute", "coast-notes", *map(str, files), "--key-file", str(key))
    assert len(added["contributions"]) == 3 and added["rejected"] == []
    published = cli(gateway, capsys, "datanet", "publish", "coast-notes")
    assert published["version"] == 1
    trained = cli(gateway, capsys, "adapter", "train", "coast-guide", "--datanet", "coast-notes",
                  "--owner", address_of_key("0x" + "d4" * 32), "--price-per-1k-tokens", "2000")
    assert trained["lineage"] == ["coast-notes@1"] and trained["price_per_1k_tokens"] == "2000"
    assert trained["uri"].endswith("/coast-guide")
    deadline = time.monotonic() + 10
    while "coast-guide" not in {m.id for m in client.models.list().data}:
        assert time.monotonic() < deadline, "the new adapter never appeared in /v1/models"
        time.sleep(0.5)
    assert all(reproduces(client, "coast-guide", text) for text in NEW_PASSAGES)
    # the new version's index is picked up without a restart: its contributor is credited
    raw = client.completions.with_raw_response.create(model="coast-guide", prompt=" ".join(NEW_PASSAGES[1].split()[:12]),
                                                      max_tokens=40, temperature=0, extra_body={"attribution": True})
    contributors = json.loads(raw.text)["attribution"]["contributors"]
    assert contributors[0]["address"] == address_of_key("0x" + "c3" * 32)
    assert contributors[0]["contributions"][0]["datanet"] == "coast-notes"
