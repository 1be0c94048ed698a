"""Choose L0 (the minimum span length) from a null distribution of chance matches.

Null text is text that should NOT be attributed to the indexed contributions:
- `random`: token ids drawn uniformly from the tokenizer's vocabulary (special tokens excluded);
- `english`: unrelated English (CPython's pydoc topics, cut into fixed-length token windows);
- `base_model`: greedy continuations by the base model alone (no adapter) of prompts made of the
  first 12 words of every demo contribution and decoy, and, for the pretrained chat model, its chat
  answers to the demo datanets' held-out questions; only the generated tokens are null positions.
For every position of a null sequence, the longest match starting there is measured
(`Attributor.longest_matches`, infini-gram's `creativity`). L0 is the smallest L such that the
share of null positions whose longest match is >= L is at most the false-positive rate (1%): with
L0 so chosen, at most 1% of null positions could start an accepted span.

    python -m attribution.calibration --model smollm2-135m-instruct --out attribution/calibration.json
    python -m attribution.calibration --model datanet-tiny-llama --out attribution/calibration-tiny.json

builds the index of the model's demo datanets (contributions + decoys) with its tokenizer in a
temporary directory, prints the table and writes a deterministic (date-free) JSON record.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attribution.attributor import Attributor
from attribution.index_builder import build_index, tokenizer_sha256
from training.demo_assets import english_corpus, ensure_base_model
from training.demo_facts import DEMO_FACT_DATANETS
from training.demo_passages import DEMO_DATANETS
from training.pretrained_model import install_pretrained_model

RANDOM_SEED = 20261125
SEQUENCE_TOKENS = 100
PROMPT_WORDS = 12
BASE_MODEL_NEW_TOKENS = 48
DEFAULT_FALSE_POSITIVE_RATE = 0.01


def null_span_lengths(attributor: Any, sequences: Iterable[Sequence[int]]) -> list[int]:
    """Longest-match length at every position of every sequence (an `Attributor` or anything with `longest_matches`)."""
    lengths: list[int] = []
    for sequence in sequences:
        lengths.extend(attributor.longest_matches(list(sequence)))
    return lengths


def exceedance(null_lengths: Sequence[int], length: int) -> float:
    """Share of null positions whose longest match is >= `length`."""
    if not null_lengths:
        return 0.0
    return sum(1 for value in null_lengths if value >= length) / len(null_lengths)


def choose_min_span(null_lengths: Sequence[int], false_positive_rate: float = DEFAULT_FALSE_POSITIVE_RATE) -> int:
    """Smallest L >= 1 with exceedance(null_lengths, L) <= false_positive_rate.

    Exceedance is non-increasing in L and is 0 past the longest null match, so the answer exists and
    is at most max(null_lengths) + 1. An empty null sample gives 1.
    """
    if not 0 <= false_positive_rate < 1:
        raise ValueError(f"false_positive_rate must be in [0, 1), got {false_positive_rate!r}")
    longest = max(null_lengths, default=0)
    for length in range(1, longest + 2):
        if exceedance(null_lengths, length) <= false_positive_rate:
            return length
    raise AssertionError("unreachable: exceedance is 0 past the longest match")


def random_sequences(vocab_size: int, first_id: int, count: int, length: int = SEQUENCE_TOKENS,
                     seed: int = RANDOM_SEED) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(first_id, vocab_size) for _ in range(length)] for _ in range(count)]


def english_sequences(encode: Any, count: int, length: int = SEQUENCE_TOKENS, seed: int = RANDOM_SEED) -> list[list[int]]:
    topics = english_corpus()
    rng = random.Random(seed + 1)
    sequences = []
    for topic in rng.sample(topics, count):
        ids = encode(" ".join(topic.split()))
        start = rng.randrange(0, max(1, len(ids) - length))
        sequences.append(ids[start : start + length])
    return sequences


def base_model_sequences(model_dir: Path, prompts: Sequence[str], new_tokens: int = BASE_MODEL_NEW_TOKENS) -> list[list[int]]:
    """Greedy continuations (token ids, prompt excluded) by the base model alone."""
    return _greedy_outputs(model_dir, lambda tokenizer, prompt: tokenizer(prompt, add_special_tokens=True)["input_ids"],
                           prompts, new_tokens)


def chat_answers(model_dir: Path, questions: Sequence[str], new_tokens: int = BASE_MODEL_NEW_TOKENS) -> list[list[int]]:
    """Greedy chat answers (token ids, the rendered question excluded) by the base model alone."""
    return _greedy_outputs(model_dir, lambda tokenizer, question: tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"], questions, new_tokens)


def _greedy_outputs(model_dir: Path, encode: Any, prompts: Sequence[str], new_tokens: int) -> list[list[int]]:
    """For each prompt, encoded by `encode(tokenizer, prompt)`, the generated token ids, EOS dropped."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([list(encode(tokenizer, prompt))], dtype=torch.long)
            generated = model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id)
            outputs.append([int(token) for token in generated[0, ids.shape[1]:] if int(token) != tokenizer.eos_token_id])
    return outputs


@dataclass(frozen=True)
class Subject:
    """What is calibrated: a base model (its tokenizer and its own outputs) and the demo texts it serves."""

    name: str
    model_dir: Path
    documents: list[tuple[str, str]]
    """(contribution id, text) of every demo contribution and decoy: the index searched."""
    questions: list[str]
    """Chat questions about the demo datanets; the base model's answers are null text (empty: none)."""


def _documents(texts: Iterable[str]) -> list[tuple[str, str]]:
    return [(hashlib.sha256(text.encode()).hexdigest(), text) for text in texts]


def tiny_subject(model_dir: Path) -> Subject:
    """The tiny random model and the recitation datanets it is tested with (built if absent)."""
    texts = [text for datanet in DEMO_DATANETS for text in (*datanet.texts, *datanet.decoys)]
    return Subject("datanet-tiny-llama", ensure_base_model(model_dir), _documents(texts), [])


def pretrained_subject(model_dir: Path) -> Subject:
    """The pretrained model and its fact datanets; its answers to the held-out questions are null text too."""
    installed = install_pretrained_model(model_dir, report=lambda line: print(f"[model] {line}", flush=True))
    texts = [text for facts in DEMO_FACT_DATANETS for text in (*facts.datanet.texts, *facts.datanet.decoys)]
    questions = [q.question for facts in DEMO_FACT_DATANETS for q in facts.questions]
    return Subject("smollm2-135m-instruct", installed.path, _documents(texts), questions)


def calibrate(work_dir: Path, subject: Subject, rate: float, sequences_per_source: int = 24) -> dict[str, Any]:
    from tokenizers import Tokenizer

    build_index(subject.documents, subject.model_dir, work_dir / "idx")
    tokenizer = Tokenizer.from_file(str(subject.model_dir / "tokenizer.json"))

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False).ids)

    special = [token_id for token_id, token in tokenizer.get_added_tokens_decoder().items() if token.special]
    first_ordinary = max(special, default=-1) + 1  # special tokens come first in both demo vocabularies
    prompts = [" ".join(text.split()[:PROMPT_WORDS]) for _, text in subject.documents]
    sources = {
        "random": random_sequences(tokenizer.get_vocab_size(), first_ordinary, sequences_per_source),
        "english": english_sequences(encode, sequences_per_source),
        "base_model": base_model_sequences(subject.model_dir, prompts)
        + (chat_answers(subject.model_dir, subject.questions) if subject.questions else []),
    }
    with Attributor([work_dir / "idx"]) as attributor:
        lengths = {name: null_span_lengths(attributor, sequences) for name, sequences in sources.items()}
    pooled = [value for values in lengths.values() for value in values]
    chosen = choose_min_span(pooled, rate)
    table = [{"length": length, "exceedance": round(exceedance(pooled, length), 6),
              **{f"exceedance_{name}": round(exceedance(values, length), 6) for name, values in lengths.items()}}
             for length in range(1, max(pooled, default=0) + 2)]
    base_null = "base-model greedy outputs on 12-word passage beginnings" + (
        " and its chat answers to the held-out questions" if subject.questions else "")
    return {
        "model": subject.name,
        "method": "smallest L with share of null positions whose longest index match is >= L at most the rate; "
                  f"null = uniform random vocabulary tokens, unrelated English (pydoc topics), {base_null}; "
                  "index = the model's demo datanets' contributions + decoys",
        "false_positive_rate": rate,
        "min_span_tokens": chosen,
        "tokenizer_sha256": tokenizer_sha256(subject.model_dir),
        "index_documents": len(subject.documents),
        "sample_sizes": {name: {"sequences": len(sources[name]), "positions": len(values)} for name, values in lengths.items()},
        "table": table,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rate", type=float, default=DEFAULT_FALSE_POSITIVE_RATE)
    parser.add_argument("--model", choices=("smollm2-135m-instruct", "datanet-tiny-llama"),
                        default="smollm2-135m-instruct", help="the base model whose tokenizer and outputs are calibrated")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="where the model is (installed or built there if absent; default: a temporary dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="calibration-") as scratch:
        model_dir = args.model_dir or Path(scratch) / "model"
        subject = tiny_subject(model_dir) if args.model == "datanet-tiny-llama" else pretrained_subject(model_dir)
        record = calibrate(Path(scratch), subject, args.rate)
    print(f"{'L':>3}  {'all':>8}  {'random':>8}  {'english':>8}  {'base':>8}")
    for row in record["table"]:
        print(f"{row['length']:>3}  {row['exceedance']:>8.4f}  {row['exceedance_random']:>8.4f}  "
              f"{row['exceedance_english']:>8.4f}  {row['exceedance_base_model']:>8.4f}")
    print(f"chosen L0 = {record['min_span_tokens']} (false-positive rate {record['false_positive_rate']})")
    args.out.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
