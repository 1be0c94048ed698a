"""`gateway datanet …` end to end: real files, real signatures, real index, anvil started by the CLI.

Each command runs as a user runs it (`main([...])`), prints one JSON object with --json, and
answers every bad input with a non-zero exit and one line on stderr, leaving stored data intact.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from eth_account import Account

from attribution.index_builder import load_base_tokenizer
from attribution.index_reader import open_index
from gateway.cli import main
from registry.contribution_content import content_id, normalize
from tests.conftest import free_port
from tests.support.credentials import operator_ledger

ALICE = Account.from_key("0x" + "a1" * 32)
BOB = Account.from_key("0x" + "b2" * 32)
PASSAGES = [
    "Rivers carry sediment from the mountains to the sea, building wide deltas over thousands of years.",
    "A good loaf of bread needs flour, water, salt, yeast and above all patience while the dough rises.",
    "The night sky over the desert shows the band of the galaxy clearly when the moon has already set.",
    "Old maps drew sea monsters at the edges of the known world, where the sailors had not yet been.",
]


@pytest.fixture(scope="module")
def state(demo_state: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A state dir sharing the demo model (its tokenizer indexes the datanets), with its own ledger and chain."""
    state = tmp_path_factory.mktemp("cli-state")
    (state / "models").symlink_to(demo_state / "models")
    with operator_ledger(state):  # `adapter register` is administration: asked of the ledger
        yield state


@pytest.fixture(autouse=True)
def chain_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_CHAIN_PORT", str(CHAIN_PORT))
    monkeypatch.delenv("GATEWAY_CONTRIBUTOR_KEY", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)


CHAIN_PORT = free_port()


def gateway(state: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict | None, str]:
    capsys.readouterr()
    code = main(["--state-dir", str(state), *args])
    out, err = capsys.readouterr()
    payload = json.loads(out) if code == 0 and "--json" in args else None
    return code, payload, err


def write(directory: Path, name: str, content: str | bytes) -> Path:
    path = directory / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def test_create_list_and_bad_names(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, created, _ = gateway(state, capsys, "datanet", "create", "rivers", "--description", "water", "--json")
    assert code == 0 and created["name"] == "rivers" and len(created["id"]) == 32
    code, _, err = gateway(state, capsys, "datanet", "create", "rivers", "--json")
    assert code == 2 and err == "gateway: datanet 'rivers' already exists\n"
    code, _, err = gateway(state, capsys, "datanet", "create", "Bad Name")
    assert code == 2 and "not a datanet name" in err and err.count("\n") == 1
    code, listing, _ = gateway(state, capsys, "datanet", "list", "--json")
    assert [d["name"] for d in listing["datanets"]] == ["rivers"]
    code, _, err = gateway(state, capsys, "datanet", "show", "lakes")
    assert code == 2 and "no datanet named 'lakes'" in err


def test_contribute_files_with_each_rejection(state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    files = [
        write(tmp_path, "river.txt", PASSAGES[0]),
        write(tmp_path, "bread.md", PASSAGES[1] + "\r\n"),
        write(tmp_path, "more.jsonl", "\n".join([json.dumps({"text": PASSAGES[2]}), "{not json",
                                                  json.dumps({"body": "no text field"})])),
        write(tmp_path, "latin1.txt", "caf\xe9".encode("latin-1")),
        write(tmp_path, "empty.txt", "  \n"),
        write(tmp_path, "copy.txt", PASSAGES[0] + "   "),
        write(tmp_path, "paper.pdf", b"%PDF"),
    ]
    key_file = write(tmp_path, "alice.key", ALICE.key.hex())
    code, result, err = gateway(state, capsys, "datanet", "contribute", "rivers", *map(str, files),
                                "--key-file", str(key_file), "--json")
    assert code == 0, err
    assert [(c["file"].rsplit("/", 1)[-1], c["contributor"]) for c in result["contributions"]] == [
        ("river.txt", ALICE.address), ("bread.md", ALICE.address), ("more.jsonl:1", ALICE.address)]
    reasons = {r["file"].rsplit("/", 1)[-1]: r["reason"] for r in result["rejected"]}
    assert reasons == {
        "more.jsonl:2": reasons["more.jsonl:2"],
        "more.jsonl:3": "a JSON line needs a string field 'text'",
        "latin1.txt": "not valid UTF-8 (byte 3)",
        "empty.txt": "empty contribution (nothing left after trimming whitespace)",
        "copy.txt": reasons["copy.txt"],
        "paper.pdf": "unsupported file type '.pdf' (use .txt, .md or .jsonl)",
    }
    assert reasons["more.jsonl:2"].startswith("not valid JSON")
    assert reasons["copy.txt"].startswith("exact duplicate of contribution")
    assert ALICE.key.hex() not in capsys.readouterr().err, "the key is never echoed"

    monkeypatch.setenv("GATEWAY_CONTRIBUTOR_KEY", BOB.key.hex())
    code, result, _ = gateway(state, capsys, "datanet", "contribute", "rivers",
                              str(write(tmp_path, "maps.txt", PASSAGES[3])), "--json")
    assert code == 0 and result["contributions"][0]["contributor"] == BOB.address


@pytest.mark.parametrize(
    ("key_content", "env_key", "reason"),
    [
        (None, None, "no contributor key: pass --key-file PATH or set GATEWAY_CONTRIBUTOR_KEY"),
        ("not-a-key-secret", None, "does not hold a private key"),
        (None, "0x1234", "GATEWAY_CONTRIBUTOR_KEY does not hold a private key"),
    ],
)
def test_contribute_key_errors(state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch, key_content: str | None, env_key: str | None,
                               reason: str) -> None:
    args = ["datanet", "contribute", "rivers", str(write(tmp_path, "x.txt", "a brand new text about lakes"))]
    if key_content is not None:
        args += ["--key-file", str(write(tmp_path, "bad.key", key_content))]
    if env_key is not None:
        monkeypatch.setenv("GATEWAY_CONTRIBUTOR_KEY", env_key)
    code, _, err = gateway(state, capsys, *args)
    assert code == 2 and reason in err and "not-a-key-secret" not in err


def test_publish_anchors_and_proofs_verify_on_chain(state: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    code, published, err = gateway(state, capsys, "datanet", "publish", "rivers", "--json")
    assert code == 0, err
    assert published["version"] == 1 and published["contributions"] == 4
    assert published["tx_hash"].startswith("0x") and len(published["tx_hash"]) == 66
    index = Path(published["index_path"])
    assert len(json.loads((index / "contributions.json").read_text())) == 4
    tokenizer = load_base_tokenizer(state / "models" / "datanet-tiny-llama").tokenizer
    phrase = tokenizer.encode(" sediment from the mountains to the sea", add_special_tokens=False).ids
    with open_index(index) as version_index:  # the index answers: this phrase is in the river passage only
        assert version_index.documents_containing(phrase) == [content_id(normalize(PASSAGES[0]))]
    code, _, err = gateway(state, capsys, "datanet", "publish", "rivers")
    assert code == 2 and "no new contributions since version 1" in err

    code, shown, _ = gateway(state, capsys, "datanet", "show", "rivers", "--json")
    assert {c["status"] for c in shown["contributions"]} == {"published"}
    assert shown["versions"][0]["merkle_root"] == published["merkle_root"]
    # Of the earlier submission's refusals none is recorded: those before the signature verified never are, and
    # copy.txt repeats Alice's own river.txt (a replay of one's own text is not recorded).
    assert shown["rejections"] == []
    # Bob's copy of Alice's text is refused after his signature verified: recorded, with him and the reason
    bob_key = write(tmp_path, "bob.key", BOB.key.hex())
    code, _, err = gateway(state, capsys, "datanet", "contribute", "rivers",
                           str(write(tmp_path, "bobs-copy.txt", PASSAGES[0])), "--key-file", str(bob_key), "--json")
    assert code == 0, err
    code, shown, _ = gateway(state, capsys, "datanet", "show", "rivers", "--json")
    assert [(r["file"].rsplit("/", 1)[-1], r["contributor"], r["content_id"]) for r in shown["rejections"]] == [
        ("bobs-copy.txt", BOB.address, content_id(normalize(PASSAGES[0])))]
    assert shown["rejections"][0]["reason"].startswith("exact duplicate of contribution")
    capsys.readouterr()
    assert main(["--state-dir", str(state), "datanet", "show", "rivers"]) == 0
    assert "  1 recorded rejection(s); newest: " in capsys.readouterr().out
    first = shown["contributions"][0]["id"]
    code, proof, err = gateway(state, capsys, "datanet", "proof", "rivers", first, "--json")
    assert code == 0, err
    assert proof["verified_on_chain"] is True and proof["root"] == published["merkle_root"]
    assert proof["root_on_chain"] == published["merkle_root"]

    own_copy = write(tmp_path, "mine.txt", PASSAGES[0] + "\n")
    code, by_file, _ = gateway(state, capsys, "datanet", "proof", "rivers", "--file", str(own_copy), "--json")
    assert code == 0 and by_file["verified_on_chain"] and by_file["contribution_id"] in {
        c["id"] for c in shown["contributions"]}
    code, _, err = gateway(state, capsys, "datanet", "proof", "rivers")
    assert code == 2 and "give either a CONTRIBUTION_ID or --file PATH" in err
    tampered = write(tmp_path, "tampered.txt", PASSAGES[0].replace("sea", "ocean"))
    code, _, err = gateway(state, capsys, "datanet", "proof", "rivers", "--file", str(tampered))
    assert code == 2 and "is not in datanet 'rivers'" in err


def test_adapter_register_with_lineage(state: Path, scratch_adapter: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, record, err = gateway(state, capsys, "adapter", "register", "river-guide", "--path", str(scratch_adapter),
                                "--datanet", "rivers@1", "--owner", BOB.address.lower(), "--json")
    assert code == 0, err
    assert record["lineage"] == ["rivers@1"] and record["owner"] == BOB.address
    assert record["price_per_1k_tokens"] == str(10**15)
    code, shown, _ = gateway(state, capsys, "adapter", "show", "river-guide", "--json")
    assert shown["servable"] is True and shown["lineage"] == ["rivers@1"]
    for args, reason in [
        (["river-guide", "--path", str(scratch_adapter), "--owner", BOB.address], "already exists"),
        (["other", "--path", str(scratch_adapter), "--owner", "bob"], "is not an Ethereum address"),
        (["other", "--path", str(scratch_adapter), "--owner", BOB.address, "--datanet", "rivers@2"],
         "has no version 2"),
        (["other", "--path", str(scratch_adapter), "--owner", BOB.address, "--price-per-1k-tokens", "0.5"],
         "must be a non-negative integer"),
        (["other", "--path", str(scratch_adapter.parent / "nowhere"), "--owner", BOB.address], "is not a directory"),
    ]:
        code, _, err = gateway(state, capsys, "adapter", "register", *args)
        assert code == 2 and reason in err, (args, err)
    code, listing, _ = gateway(state, capsys, "adapter", "list", "--json")
    assert [a["adapter"] for a in listing["adapters"]] == ["river-guide"], "nothing half-registered is left"


def test_training_interrupted_with_ctrl_c_leaves_nothing(state: Path) -> None:
    """Ctrl-C during `adapter train`: exit 130, one line of reason, no adapter in the store or the ledger."""
    import signal
    import subprocess
    import sys

    gateway_bin = Path(sys.executable).with_name("gateway")
    command = [str(gateway_bin), "--state-dir", str(state), "adapter", "train", "half-done", "--datanet", "rivers",
               "--steps", "5000", "--owner", BOB.address]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in process.stderr:
        seen.append(line)
        if line.startswith("[train] step 1/"):
            break
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, "".join(seen) + err
    assert err.strip().splitlines()[-1] == "gateway: training interrupted: nothing was written or registered"
    assert out == ""
    assert not (state / "adapters" / "half-done").exists()
    assert list((state / "tmp").iterdir()) == [], "the scratch directory is cleaned up"
    assert main(["--state-dir", str(state), "adapter", "show", "half-done"]) == 2


def test_training_refuses_bad_input_before_training(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args, reason in [
        (["--datanet", "rivers", "--owner", "nobody"], "is not an Ethereum address"),
        (["--datanet", "rivers@9", "--owner", BOB.address], "has no version 9"),
        (["--datanet", "lakes", "--owner", BOB.address], "no datanet named 'lakes'"),
        (["--datanet", "rivers", "--owner", BOB.address, "--steps", "0"], "steps"),
        (["--datanet", "rivers", "--owner", BOB.address, "--price-per-1k-tokens", "-1"], "non-negative integer"),
    ]:
        code, _, err = gateway(state, capsys, "adapter", "train", "never", *args)
        assert code == 2 and reason in err and err.count("\n") == 1, (args, err)
    assert not (state / "adapters" / "never").exists()
