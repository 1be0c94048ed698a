"""Turn contribution texts into training examples: the text itself, plus a chat example per Q/A pair.

A contribution is a passage, optionally followed by question/answer lines written by its
contributor::

    The glassfin is a small pale fish that lives only in the Mirrow Shallows of Lake Ombra.
    Q: What does the glassfin eat?
    A: The glassfin eats lantern moss.

Every contribution is trained as plain text, whole and unchanged, so an adapter still continues it
verbatim from its first words (what per-token attribution shows). Each Q/A pair is also trained
as a single-turn chat rendered by the tokenizer's own chat template, the way a chat request is
rendered when served, so the adapter learns to answer questions about the facts, not only to
recite them. Only the answer of a chat example is in the loss: the rendered prompt (system
prompt, question, assistant header) is context, which spends every gradient on what to answer.

Q/A lines follow the passage, one per line, alternating ``Q:`` then ``A:``; blank lines between
them are allowed. A text without such lines is just a passage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

QUESTION_PREFIX = "Q:"
ANSWER_PREFIX = "A:"


@dataclass(frozen=True)
class QAPair:
    question: str
    answer: str


@dataclass(frozen=True)
class Contribution:
    """A contribution text split into its passage and its question/answer pairs."""

    passage: str
    pairs: tuple[QAPair, ...]


@dataclass(frozen=True)
class TrainingExample:
    """One text to train on; `prompt`, a prefix of `text`, is context only (not in the loss)."""

    text: str
    prompt: str = ""
    chat: bool = False
    """Rendered by the chat template: its special tokens are in the text, none are added when tokenizing."""

    @property
    def completion(self) -> str:
        """The part of the text in the loss."""
        return self.text[len(self.prompt):]


def parse_contribution(text: str) -> Contribution:
    """Split `text` into its passage and Q/A pairs; ValueError naming the line when the Q/A lines are malformed."""
    lines = text.splitlines()
    first_qa = next((n for n, line in enumerate(lines) if _kind(line) is not None), len(lines))
    passage = "\n".join(lines[:first_qa]).strip()
    pairs: list[QAPair] = []
    question: tuple[int, str] | None = None
    for number, line in enumerate(lines[first_qa:], start=first_qa + 1):
        kind = _kind(line)
        if kind is None and not line.strip():
            continue
        if kind is None:
            raise ValueError(f"line {number} ({_quote(line)}) is not a 'Q:' or 'A:' line; the passage must come "
                             "before the questions and answers")
        content = line.strip()[len(kind):].strip()
        if not content:
            raise ValueError(f"line {number} ({_quote(line)}) has an empty {_NAMES[kind]}")
        if kind == QUESTION_PREFIX:
            if question is not None:
                raise ValueError(f"line {number} ({_quote(line)}) is a question, but the question on line "
                                 f"{question[0]} has no answer")
            question = (number, content)
        else:
            if question is None:
                raise ValueError(f"line {number} ({_quote(line)}) is an answer without a question before it")
            pairs.append(QAPair(question[1], content))
            question = None
    if question is not None:
        raise ValueError(f"line {question[0]} ({_quote(lines[question[0] - 1])}) is a question without an answer")
    return Contribution(passage, tuple(pairs))


_NAMES = {QUESTION_PREFIX: "question", ANSWER_PREFIX: "answer"}


def _kind(line: str) -> str | None:
    stripped = line.lstrip()
    for prefix in (QUESTION_PREFIX, ANSWER_PREFIX):
        if stripped.startswith(prefix):
            return prefix
    return None


def _quote(line: str, limit: int = 60) -> str:
    line = line.strip()
    return repr(line if len(line) <= limit else line[: limit - 3] + "...")


def chat_example(tokenizer: Any, question: str, answer: str) -> TrainingExample:
    """A single-turn chat rendered by the tokenizer's chat template; the answer turn is the completion."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; question/answer pairs cannot be trained as chats")
    text = tokenizer.apply_chat_template([{"role": "user", "content": question},
                                          {"role": "assistant", "content": answer}], tokenize=False)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
    if not text.startswith(prompt) or answer not in text[len(prompt):]:
        raise ValueError("the chat template does not render the answer right after the generation prompt")
    return TrainingExample(text=text, prompt=prompt, chat=True)


def training_examples(texts: Sequence[str], tokenizer: Any) -> list[TrainingExample]:
    """Every text as plain text, in order, then a chat example per Q/A pair (ValueError names a bad text)."""
    plain: list[TrainingExample] = []
    chats: list[TrainingExample] = []
    for index, text in enumerate(texts):
        try:
            contribution = parse_contribution(text)
            plain.append(TrainingExample(text=text))
            chats += [chat_example(tokenizer, pair.question, pair.answer) for pair in contribution.pairs]
        except ValueError as exc:
            raise ValueError(f"text {index}: {exc}") from None
    return plain + chats
