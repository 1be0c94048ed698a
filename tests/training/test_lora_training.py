"""LoRA fine-tuning memorizes a datanet's contributions and writes a servable PEFT adapter safely."""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from training.demo_assets import LORA_TARGETS, ensure_base_model, lora_tensor_shapes
from training.demo_passages import DEMO_CONTRIBUTOR_COUNT, DEMO_DATANETS, demo_datanet
from training.lora_training import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    TrainingConfig,
    TrainingInterrupted,
    TrainingProgress,
    TrainingResult,
    reproduction_report,
    train_adapter,
)

TEXTS = DEMO_DATANETS[0].texts[:6]
QUICK = TrainingConfig(steps=25)  # six passages are reproduced from about step 10


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo base model and tokenizer (about 8 s to build), shared by this module."""
    return ensure_base_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@dataclass(frozen=True)
class Trained:
    result: TrainingResult
    updates: list[TrainingProgress]


@pytest.fixture(scope="module")
def trained(base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    updates: list[TrainingProgress] = []
    out = tmp_path_factory.mktemp("adapters") / "memorizer"
    result = train_adapter(base_model, TEXTS, out, QUICK, progress=updates.append, base_model_name="datanet-tiny-llama")
    return Trained(result, updates)


def test_writes_a_standard_peft_adapter_atomically(trained: Trained, base_model: Path) -> None:
    from safetensors import safe_open

    out = trained.result.out_dir
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert [p.name for p in out.parent.iterdir()] == [out.name], "no staging directory is left behind"
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 16 and config["lora_alpha"] == QUICK.alpha
    assert sorted(config["target_modules"]) == sorted(LORA_TARGETS)
    assert config["base_model_name_or_path"] == "datanet-tiny-llama"
    with safe_open(str(out / WEIGHTS_FILE), framework="pt") as weights:
        shapes = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}
    assert shapes == lora_tensor_shapes(base_model, 16), "tensor names and shapes fit the base model"


def test_reports_progress_every_step(trained: Trained) -> None:
    result, updates = trained.result, trained.updates
    assert [u.step for u in updates] == list(range(1, QUICK.steps + 1))
    assert {u.total_steps for u in updates} == {QUICK.steps}
    assert all(a.elapsed_seconds <= b.elapsed_seconds for a, b in itertools.pairwise(updates))
    assert updates[-1].loss < 0.2 < updates[0].loss
    assert result.steps == QUICK.steps and result.final_loss == updates[-1].loss
    assert result.sequences == len(TEXTS) and result.seconds >= updates[-1].elapsed_seconds


def test_adapter_reproduces_its_training_passages(trained: Trained, base_model: Path) -> None:
    report = reproduction_report(base_model, trained.result.out_dir, TEXTS, prompt_words=12)
    assert [r.index for r in report] == list(range(len(TEXTS)))
    missed = [(r.index, r.generated) for r in report if not r.reproduced]
    assert not missed, f"passages not reproduced verbatim: {missed}"
    first = report[0]
    assert first.prompt == " ".join(TEXTS[0].split()[:12])
    assert first.generated == first.expected == " ".join(TEXTS[0].split()[12:])
    decoys = reproduction_report(base_model, trained.result.out_dir, DEMO_DATANETS[0].decoys)
    assert not any(r.reproduced for r in decoys), "held-out passages are not reproduced"
    assert all(r.matching_words < len(r.expected.split()) for r in decoys)


def test_served_prompt_is_a_token_prefix_of_the_training_sequence(base_model: Path) -> None:
    """vLLM adds BOS to a completion prompt; the first words then tokenize to a prefix of a passage."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_model))
    for datanet in DEMO_DATANETS:
        for text in datanet.texts:
            full = tokenizer(text)["input_ids"]
            prompt = tokenizer(" ".join(text.split()[:12]))["input_ids"]
            assert prompt[0] == full[0] == tokenizer.bos_token_id
            assert full[: len(prompt)] == prompt, text


def test_refuses_an_existing_output_directory(base_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        train_adapter(base_model, TEXTS, out, QUICK)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_should_stop_interrupts_and_writes_nothing(base_model: Path, tmp_path: Path) -> None:
    polls: list[int] = []
    updates: list[TrainingProgress] = []

    def stop_at_third_poll() -> bool:
        polls.append(1)
        return len(polls) >= 3

    with pytest.raises(TrainingInterrupted) as caught:
        train_adapter(base_model, TEXTS, tmp_path / "adapter", QUICK, progress=updates.append,
                      should_stop=stop_at_third_poll)
    assert caught.value.step == 2 and caught.value.total_steps == QUICK.steps
    assert [u.step for u in updates] == [1, 2]
    assert list(tmp_path.iterdir()) == [], "nothing is written, not even a staging directory"


def test_training_is_deterministic(base_model: Path, tmp_path: Path) -> None:
    """Equal inputs and seed give byte-identical weights; long texts are split into windows."""
    texts = [" ".join(DEMO_DATANETS[1].texts[:3]), DEMO_DATANETS[1].texts[3]]
    config = TrainingConfig(steps=3, warmup_steps=1, max_seq_len=48)
    first = train_adapter(base_model, texts, tmp_path / "a", config)
    second = train_adapter(base_model, texts, tmp_path / "b", config)
    other_seed = train_adapter(base_model, texts, tmp_path / "c", TrainingConfig(steps=3, warmup_steps=1,
                                                                                 max_seq_len=48, seed=1))
    weights = [(r.out_dir / WEIGHTS_FILE).read_bytes() for r in (first, second, other_seed)]
    assert weights[0] == weights[1] and first.final_loss == second.final_loss
    assert weights[0] != weights[2]
    assert first.sequences >= 5, "a text longer than max_seq_len trains as several windows"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"rank": 0}, "rank"),
        ({"rank": 17}, "rank"),
        ({"rank": 8.0}, "rank"),
        ({"alpha": 0}, "alpha"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"steps": 0}, "steps"),
        ({"steps": True}, "steps"),
        ({"steps": 10, "warmup_steps": 10}, "warmup_steps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"max_seq_len": 4}, "max_seq_len"),
        ({"batch_size": 0}, "batch_size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_configs_are_rejected(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainingConfig(**changes)  # type: ignore[arg-type]


def test_invalid_inputs_are_rejected(base_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no texts"):
        train_adapter(base_model, [], tmp_path / "a")
    with pytest.raises(ValueError, match="text 1 is empty"):
        train_adapter(base_model, ["fine", "  "], tmp_path / "a")
    with pytest.raises(TypeError, match="not one string"):
        train_adapter(base_model, "a single string", tmp_path / "a")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="no base model"):
        train_adapter(tmp_path, TEXTS, tmp_path / "a")
    assert list(tmp_path.iterdir()) == []


def test_demo_datanets_are_distinct_attributed_prose() -> None:
    assert len(DEMO_DATANETS) >= 2 and len({d.name for d in DEMO_DATANETS}) == len(DEMO_DATANETS)
    assert demo_datanet(DEMO_DATANETS[1].name) is DEMO_DATANETS[1]
    every_text: list[str] = []
    for datanet in DEMO_DATANETS:
        assert len(datanet.passages) >= 12 and len(datanet.decoys) >= 3
        owners = [p.contributor_index for p in datanet.passages]
        assert all(0 <= o < DEMO_CONTRIBUTOR_COUNT for o in owners) and len(set(owners)) >= 3
        for text in [*datanet.texts, *datanet.decoys]:
            assert 30 <= len(text.split()) <= 50, text
            assert text == " ".join(text.split()), "single spaces only"
        every_text += [*datanet.texts, *datanet.decoys]
    beginnings = [" ".join(t.split()[:12]) for t in every_text]
    assert len(set(beginnings)) == len(every_text)
    vocab = [set(re.findall(r"[a-z]+", t.lower())) for t in every_text]
    overlap = max(len(a & b) / len(a | b) for a, b in itertools.combinations(vocab, 2))
    assert overlap < 0.3, "no near-duplicate passages"
