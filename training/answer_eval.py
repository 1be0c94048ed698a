"""Does an adapter answer held-out questions about its datanet's facts, where the base model cannot?

Each held-out question (`training.demo_facts.HeldOutQuestion`) is rendered with the tokenizer's
chat template and a generation prompt, as a served chat request is, and answered by greedy
decoding (at most `max_new_tokens`), once by the base model alone and once with the adapter. An
answer is correct when it contains every keyword of its question. The same loaded model serves
both (PEFT's ``disable_adapter()`` gives the base model's outputs). The report also holds the
verbatim reproduction of the training contributions from their first words
(`training.lora_training.reproductions`).

Hugging Face transformers + PEFT on CPU in float32, like `reproduction_report`; questions and
continuations are decoded in batches, so 24 questions and 12 contributions take seconds.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.demo_facts import FactDatanet, HeldOutQuestion
from training.lora_training import Reproduction, cpu_threads, greedy_batch, load_adapted_model, reproductions

MAX_NEW_TOKENS = 40


@dataclass(frozen=True)
class Answer:
    """One held-out question answered by the base model and by the base model with the adapter."""

    question: str
    keywords: tuple[str, ...]
    contributor_index: int
    answer_base: str
    answer_adapter: str
    correct_base: bool
    correct_adapter: bool


@dataclass(frozen=True)
class AnswerReport:
    answers: tuple[Answer, ...]
    reproductions: tuple[Reproduction, ...]
    """Verbatim continuation of each training text from its first words, with the adapter."""
    seconds: float
    """Wall time of the evaluation, loading included."""

    @property
    def share_correct_base(self) -> float:
        return _share([a.correct_base for a in self.answers])

    @property
    def share_correct_adapter(self) -> float:
        return _share([a.correct_adapter for a in self.answers])

    @property
    def share_reproduced(self) -> float:
        return _share([r.reproduced for r in self.reproductions])

    def summary(self) -> str:
        """One line: the shares correct without and with the adapter, and the share reproduced."""
        return (f"held-out answers correct: base {self.share_correct_base:.2f}, adapter "
                f"{self.share_correct_adapter:.2f} ({len(self.answers)} questions); reproduced verbatim "
                f"{self.share_reproduced:.2f} ({len(self.reproductions)} texts); {self.seconds:.1f} s")


def _share(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def evaluate_fact_datanet(base_model_dir: Path, adapter_dir: Path, facts: FactDatanet, *,
                          max_new_tokens: int = MAX_NEW_TOKENS, prompt_words: int = 12) -> AnswerReport:
    """`evaluate_answers` on a demo facts datanet's held-out questions and contributions."""
    return evaluate_answers(base_model_dir, adapter_dir, facts.questions, facts.datanet.texts,
                            max_new_tokens=max_new_tokens, prompt_words=prompt_words)


def evaluate_answers(base_model_dir: Path, adapter_dir: Path, questions: Sequence[HeldOutQuestion],
                     texts: Sequence[str], *, max_new_tokens: int = MAX_NEW_TOKENS,
                     prompt_words: int = 12) -> AnswerReport:
    """Answer `questions` greedily without and with the adapter, and check `texts` are reproduced."""
    import torch

    started = time.monotonic()
    if max_new_tokens < 1 or prompt_words < 1:
        raise ValueError("max_new_tokens and prompt_words must be positive")
    model, tokenizer = load_adapted_model(base_model_dir, adapter_dir)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cpu_threads())
    try:
        prompts = [_chat_prompt(tokenizer, q.question) for q in questions]
        budgets = [max_new_tokens] * len(prompts)
        with model.disable_adapter():
            base_answers = greedy_batch(model, tokenizer, prompts, budgets)
        adapter_answers = greedy_batch(model, tokenizer, prompts, budgets)
        reproduced = reproductions(model, tokenizer, texts, prompt_words)
    finally:
        torch.set_num_threads(threads_before)
    answers = tuple(
        Answer(question=q.question, keywords=q.keywords, contributor_index=q.contributor_index,
               answer_base=base.strip(), answer_adapter=adapted.strip(), correct_base=q.is_answered_by(base),
               correct_adapter=q.is_answered_by(adapted))
        for q, base, adapted in zip(questions, base_answers, adapter_answers, strict=True)
    )
    return AnswerReport(answers, tuple(reproduced), time.monotonic() - started)


def _chat_prompt(tokenizer: Any, question: str) -> list[int]:
    """The question as a served chat request renders it: chat template, generation prompt, no added tokens."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
