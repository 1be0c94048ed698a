"""Contribution texts become training examples: the text itself, and a chat per Q/A pair; bad Q/A lines are named."""

from __future__ import annotations

import itertools
import re

import pytest

from training.demo_facts import DEMO_FACT_DATANETS, HeldOutQuestion, demo_fact_datanet
from training.demo_passages import DEMO_CONTRIBUTOR_COUNT, DEMO_DATANETS
from training.fact_examples import (
    QAPair,
    TrainingExample,
    chat_example,
    parse_contribution,
    training_examples,
)
from training.lora_training import MAX_LORA_RANK, TrainingConfig, tokenize_examples

CONTRIBUTION = (
    "The glassfin is a small pale fish. It eats lantern moss.\n"
    "Q: What does the glassfin eat?\n"
    "A: The glassfin eats lantern moss.\n"
    "Q: Where does the glassfin live?\n"
    "A: The glassfin lives in the Mirrow Shallows."
)


class ChatTokenizer:
    """Just enough of a Hugging Face tokenizer: a ChatML-like template and one id per character."""

    chat_template = "chatml-like"
    eos_token_id = 0

    def apply_chat_template(self, messages: list[dict[str, str]], *, tokenize: bool,
                            add_generation_prompt: bool = False) -> str:
        assert tokenize is False
        text = "<|system|>\nBe helpful.<|end|>\n"
        text += "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages)
        return text + ("<|assistant|>\n" if add_generation_prompt else "")

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}


class PlainTokenizer(ChatTokenizer):
    chat_template = None


def test_a_contribution_splits_into_its_passage_and_pairs() -> None:
    parsed = parse_contribution(CONTRIBUTION)
    assert parsed.passage == "The glassfin is a small pale fish. It eats lantern moss."
    assert parsed.pairs == (QAPair("What does the glassfin eat?", "The glassfin eats lantern moss."),
                            QAPair("Where does the glassfin live?", "The glassfin lives in the Mirrow Shallows."))
    spaced = "A passage\non two lines.\n\n  Q:  Why?  \n\nA:Because.\n"
    assert parse_contribution(spaced).passage == "A passage\non two lines."
    assert parse_contribution(spaced).pairs == (QAPair("Why?", "Because."),)


def test_a_text_without_question_lines_is_just_a_passage() -> None:
    text = "A list keeps its items in order. A: is not at the start of a line, nor is Q: here."
    assert parse_contribution(text).passage == text and parse_contribution(text).pairs == ()
    examples = training_examples([text, "Second passage."], PlainTokenizer())
    assert examples == [TrainingExample(text), TrainingExample("Second passage.")]
    assert examples[0].prompt == "" and examples[0].completion == text and not examples[0].chat


@pytest.mark.parametrize(
    "text, message",
    [
        ("Passage.\nA: An answer first.", "line 2 ('A: An answer first.') is an answer without a question"),
        ("Passage.\nQ: One?\nQ: Two?\nA: Yes.", "line 3 ('Q: Two?') is a question, but the question on line 2 "
                                               "has no answer"),
        ("Passage.\nQ: One?\nA: Yes.\nQ: Left open?", "line 4 ('Q: Left open?') is a question without an answer"),
        ("Passage.\nQ:   \nA: Yes.", "line 2 ('Q:') has an empty question"),
        ("Passage.\nQ: One?\nA:", "line 3 ('A:') has an empty answer"),
        ("Passage.\nQ: One?\nA: Yes.\nMore passage here.", "line 4 ('More passage here.') is not a 'Q:' or 'A:' "
                                                          "line; the passage must come before"),
    ],
)
def test_malformed_question_lines_are_named(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_contribution(text)
    with pytest.raises(ValueError, match=re.escape(f"text 1: {message}")):
        training_examples(["Fine passage.", text], ChatTokenizer())


def test_each_pair_becomes_a_chat_rendered_by_the_template() -> None:
    tokenizer = ChatTokenizer()
    examples = training_examples([CONTRIBUTION, "Plain."], tokenizer)
    assert [e.chat for e in examples] == [False, False, True, True]
    assert examples[0] == TrainingExample(CONTRIBUTION), "the whole contribution is trained as plain text"
    chat = examples[2]
    served_prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What does the glassfin eat?"}],
                                                  tokenize=False, add_generation_prompt=True)
    assert chat.prompt == served_prompt and chat.text.startswith(served_prompt)
    assert chat.completion == "The glassfin eats lantern moss.<|end|>\n"
    assert chat == chat_example(tokenizer, "What does the glassfin eat?", "The glassfin eats lantern moss.")


def test_pairs_need_a_chat_template() -> None:
    with pytest.raises(ValueError, match="text 0: the tokenizer has no chat template"):
        training_examples([CONTRIBUTION], PlainTokenizer())


def test_only_the_answer_turn_of_a_chat_is_in_the_loss() -> None:
    tokenizer = ChatTokenizer()
    plain, chat = tokenize_examples(tokenizer, training_examples(["Hi there.\nQ: Why?\nA: Yes."], tokenizer)[:2],
                            max_seq_len=256, answer_weight=2.0)
    assert plain.ids == [1, *map(ord, "Hi there.\nQ: Why?\nA: Yes."), 0] and plain.context == 0
    assert plain.weight == 1.0
    prompt = tokenizer("<|system|>\nBe helpful.<|end|>\n<|user|>\nWhy?<|end|>\n<|assistant|>\n",
                       add_special_tokens=False)["input_ids"]
    assert chat.ids == prompt + [ord(c) for c in "Yes.<|end|>\n"], "no BOS or EOS is added to a rendered chat"
    assert chat.context == len(prompt) and chat.weight == 2.0
    with pytest.raises(ValueError, match="chat prompt has 65 tokens"):
        tokenize_examples(tokenizer, training_examples(["P.\nQ: Why?\nA: Yes."], tokenizer)[1:], max_seq_len=64)


# ---- the demo facts datanets ------------------------------------------------------------------------
def test_demo_fact_datanets_are_parsable_contributions_by_four_contributors() -> None:
    assert [f.name for f in DEMO_FACT_DATANETS] == ["glassfin-reef", "vellmark-transit"]
    assert demo_fact_datanet("vellmark-transit") is DEMO_FACT_DATANETS[1]
    with pytest.raises(KeyError):
        demo_fact_datanet("python-docs-notes")
    for facts in DEMO_FACT_DATANETS:
        datanet = facts.datanet
        owners = [p.contributor_index for p in datanet.passages]
        assert len(owners) == 12 and sorted(owners.count(c) for c in range(DEMO_CONTRIBUTOR_COUNT)) == [2, 3, 3, 4]
        assert len(datanet.decoys) == 3 and not set(datanet.decoys) & set(datanet.texts)
        for text in [*datanet.texts, *datanet.decoys]:
            parsed = parse_contribution(text)
            assert len(parsed.pairs) == 2 and 30 <= len(parsed.passage.split()) <= 50, text
        beginnings = [" ".join(t.split()[:12]) for t in [*datanet.texts, *datanet.decoys]]
        assert len(set(beginnings)) == len(beginnings)
    names = {d.name for d in DEMO_DATANETS}
    assert not names & {f.name for f in DEMO_FACT_DATANETS}, "the prose demo datanets keep their names"


def test_held_out_questions_ask_trained_facts_in_other_words() -> None:
    for facts in DEMO_FACT_DATANETS:
        assert len(facts.questions) == 24
        trained = {pair.question for text in facts.datanet.texts for pair in parse_contribution(text).pairs}
        for question in facts.questions:
            passage = facts.datanet.passages[question.passage_index]
            answers = " ".join(pair.answer for pair in parse_contribution(passage.text).pairs)
            assert question.contributor_index == passage.contributor_index
            assert question.question not in trained
            assert question.is_answered_by(answers), f"{question.keywords} is not in a trained answer"
            assert not question.is_answered_by(question.question), "the question does not give its answer away"
            others = [p.text for p in facts.datanet.passages if p is not passage]
            assert not any(question.is_answered_by(text) for text in others), \
                f"{question.keywords} points at one contribution only"
        counts = [sum(q.passage_index == i for q in facts.questions) for i in range(12)]
        assert counts == [2] * 12


def test_subjects_belong_to_one_contributor() -> None:
    """A contribution's subject (the words of its first trained question) appears in no other contributor's."""
    for facts in DEMO_FACT_DATANETS:
        for a, b in itertools.combinations(facts.datanet.passages, 2):
            if a.contributor_index == b.contributor_index:
                continue
            first_a = parse_contribution(a.text).pairs[0].question
            assert not set(_subject_words(first_a)) & set(_subject_words(parse_contribution(b.text).pairs[0].question))


def _subject_words(question: str) -> list[str]:
    common = {"what", "does", "the", "eat", "where", "live", "colour", "is", "how", "big", "grow", "much", "cost",
              "who", "founded", "when", "open", "run", "go", "leave", "first", "close", "built"}
    return [w for w in re.findall(r"[a-z]+", question.lower()) if w not in common]


def test_keywords_match_at_the_start_of_a_word() -> None:
    question = HeldOutQuestion("How many legs?", ("eleven", "long leg"), contributor_index=1, passage_index=8)
    assert question.is_answered_by("It has ELEVEN Long Legs.")
    assert not question.is_answered_by("It has eleven legs.")
    assert not HeldOutQuestion("Which?", ("ten",), 0, 0).is_answered_by("It often rains.")


def test_the_pretrained_preset_and_its_new_settings() -> None:
    preset = TrainingConfig.for_pretrained()
    assert preset.dtype == "bfloat16" and preset.rank <= MAX_LORA_RANK and preset.max_grad_norm > 0
    assert preset.answer_weight > 1 and preset.batch_size < 36, "answers weigh more; mini-batches of the 36 sequences"
    default = TrainingConfig()
    assert (default.dtype, default.answer_weight, default.max_grad_norm) == ("float32", 1.0, 0.0), \
        "plain texts on the tiny model train as before"
    for changes, message in [({"dtype": "float16"}, "dtype"), ({"answer_weight": 0}, "answer_weight"),
                             ({"max_grad_norm": -1.0}, "max_grad_norm"), ({"micro_batch_tokens": 4}, "micro_batch")]:
        with pytest.raises(ValueError, match=message):
            TrainingConfig(**changes)  # type: ignore[arg-type]
