"""Attribution quality on planted passages, measured honestly.

Setup: index = one demo datanet's passages (each owned by a demo contributor) + its held-out decoys;
a LoRA adapter trained on the passages only (`train_adapter`, default config); greedy continuations
from each passage's first 12 words (`reproduction_report`). Metrics:

- `true_contributor_share`: over completion tokens of *regurgitated* passages (continuation equals
  the passage), the share of attributed weight on contributions of the passage's true contributor
  (goal >= 0.9);
- `decoy_weight`: weight on decoy contributions (in the index, never trained on) as a fraction of
  all adapter completion tokens (goal <= 0.01);
- `base_attributed_fraction` / `base_planted_weight`: the same prompts continued by the base model
  alone (no adapter): attributed fraction and weight on the planted contributions (expected ~0);
- `paraphrase_attributed_fraction`: hand-written paraphrases of three passages, continued text
  attributed with the paraphrase's first 12 words as context (expected low; reported, not a goal).

Completions are re-tokenized from decoded text (the report gives words), so token boundaries can
differ slightly from the model's own ids. Verbatim matching measures overlap, not causal influence.

    python -m attribution.eval [--passages N] [--model-dir DIR]

With ``--counterfactual``, it runs the evaluation against retraining without each contributor instead
(attribution/counterfactual.py): ``--size small`` on the tiny demo model, ``--size full`` (default) on the
pretrained model.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from attribution.attributor import Attributor
from attribution.calibration import base_model_sequences
from attribution.index_builder import build_index
from ledger.client.trace import TokenAttribution
from training.demo_assets import ensure_base_model
from training.demo_passages import DEMO_DATANETS
from training.lora_training import reproduction_report, train_adapter

PROMPT_WORDS = 12

# Paraphrases of DEMO_DATANETS[0] passages 0, 1 and 2 (same meaning, different wording).
PARAPHRASES = (
    (0, "Items in a list stay in the sequence in which they were added, and the list may be modified once it "
        "exists. Call append to add a single element to the tail, or use insert if the location is important. "
        "A slice gives back a fresh list and leaves the first one untouched."),
    (1, "A dictionary associates every key with a value and finds entries fast. Only hashable objects can be "
        "keys, so text, integers and tuples are good choices. Rather than failing when a key is absent, the get "
        "method hands back a fallback value."),
    (2, "If an error happens while the program runs, Python signals it with an exception. Put the dangerous "
        "operation inside a try block and catch just the failures you anticipate. Code in a finally section "
        "is executed every time, so it suits cleanup work."),
)


@dataclass(frozen=True)
class EvalReport:
    passages: int
    regurgitated: int
    true_contributor_share: float
    decoy_weight: float
    adapter_attributed_fraction: float
    base_attributed_fraction: float
    base_planted_weight: float
    paraphrase_attributed_fraction: float


def _cid(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else 0.0


def evaluate(work_dir: Path, model_dir: Path | None = None, passages: int | None = None,
             datanet_index: int = 0) -> EvalReport:
    from tokenizers import Tokenizer

    datanet = DEMO_DATANETS[datanet_index]
    model_dir = ensure_base_model(model_dir or work_dir / "model")
    chosen = datanet.passages[:passages] if passages else datanet.passages
    owner = {_cid(p.text): p.contributor_index for p in chosen}
    decoys = {_cid(text) for text in datanet.decoys}
    build_index([(_cid(p.text), p.text) for p in chosen] + [(_cid(t), t) for t in datanet.decoys],
                model_dir, work_dir / "idx")
    train_adapter(model_dir, [p.text for p in chosen], work_dir / "adapter")
    report = reproduction_report(model_dir, work_dir / "adapter", [p.text for p in chosen], prompt_words=PROMPT_WORDS)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False).ids)

    true_shares: list[float] = []
    decoy_weights: list[float] = []
    adapter_attributed: list[float] = []
    base_attributed: list[float] = []
    base_planted: list[float] = []
    paraphrase_attributed: list[float] = []
    with Attributor([work_dir / "idx"], tokenizer_dir=model_dir) as attributor:
        for passage, reproduction in zip(chosen, report, strict=True):
            tokens = attributor.attribute(encode(reproduction.prompt), encode(" " + reproduction.generated))
            adapter_attributed.extend(t.attributed for t in tokens)
            decoy_weights.extend(_weight_on(t, decoys) for t in tokens)
            if reproduction.reproduced:
                truth = {cid for cid, who in owner.items() if who == passage.contributor_index}
                true_shares.extend(_weight_on(t, truth) / t.attributed for t in tokens if t.attributed > 0)
        prompts = [reproduction.prompt for reproduction in report]
        for prompt, completion in zip(prompts, base_model_sequences(model_dir, prompts), strict=True):
            tokens = attributor.attribute(encode(prompt), completion)
            base_attributed.extend(t.attributed for t in tokens)
            base_planted.extend(_weight_on(t, set(owner)) for t in tokens)
        for _, paraphrase in PARAPHRASES:
            words = paraphrase.split()
            tokens = attributor.attribute(encode(" ".join(words[:PROMPT_WORDS])),
                                          encode(" " + " ".join(words[PROMPT_WORDS:])))
            paraphrase_attributed.extend(t.attributed for t in tokens)
    return EvalReport(
        passages=len(chosen), regurgitated=sum(r.reproduced for r in report),
        true_contributor_share=_mean(true_shares), decoy_weight=_mean(decoy_weights),
        adapter_attributed_fraction=_mean(adapter_attributed),
        base_attributed_fraction=_mean(base_attributed), base_planted_weight=_mean(base_planted),
        paraphrase_attributed_fraction=_mean(paraphrase_attributed),
    )


def _weight_on(token: TokenAttribution, contribution_ids: set[str]) -> float:
    return math.fsum(weight for cid, weight in token.weights if cid in contribution_ids)


GOALS = {"true_contributor_share": ">= 0.9", "decoy_weight": "<= 0.01"}


def format_report(report: EvalReport) -> str:
    lines = [f"{'metric':<34} {'value':>8}  goal"]
    for name, value in asdict(report).items():
        shown = f"{value:>8.4f}" if isinstance(value, float) else f"{value:>8}"
        lines.append(f"{name:<34} {shown}  {GOALS.get(name, '')}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="attribution quality on planted demo passages")
    parser.add_argument("--passages", type=int, default=None, help="use only the first N passages")
    parser.add_argument("--model-dir", type=Path, default=None, help="base model directory (built or installed "
                        "if absent)")
    parser.add_argument("--counterfactual", action="store_true",
                        help="score verbatim, influence and combined attribution against retraining without each "
                             "contributor")
    parser.add_argument("--size", choices=("small", "full"), default="full",
                        help="--counterfactual: small = tiny demo model, 6 contributions; full = pretrained model, "
                             "12 contributions (default)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="--counterfactual: keep the trained adapters here and reuse them on the next run")
    parser.add_argument("--influence", type=str, default=None, metavar="FLOOR,FULL,SHARPNESS",
                        help="--counterfactual: try another influence weighting (default: the served one, "
                             "attribution/policy.py InfluenceWeighting), e.g. 0.1,0.25,2")
    args = parser.parse_args(argv)
    if args.counterfactual:
        from attribution.counterfactual import run_counterfactual
        from attribution.policy import InfluenceWeighting

        weighting = None
        if args.influence is not None:
            try:
                floor, full, sharpness = (float(part) for part in args.influence.split(","))
                weighting = InfluenceWeighting(cosine_floor=floor, cosine_full=full, sharpness=sharpness)
            except ValueError as exc:
                parser.error(f"--influence wants FLOOR,FULL,SHARPNESS with -1 <= FLOOR < FULL <= 1 and "
                             f"SHARPNESS > 0 ({exc})")
        print(run_counterfactual(args.size, args.model_dir, args.work_dir, weighting))
        return
    with tempfile.TemporaryDirectory(prefix="attribution-eval-") as scratch:
        print(format_report(evaluate(Path(scratch), args.model_dir, args.passages)))


if __name__ == "__main__":
    main()
