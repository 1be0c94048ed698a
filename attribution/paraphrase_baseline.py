"""What verbatim span matching attributes when an answer says a contributed fact in other words.

On the pretrained model's tokenizer: the index holds the `glassfin-reef` demo datanet's
contributions and decoys. Each of its 24 trained questions is answered twice: with the
contribution's own answer line (what the adapter learned to say, so *verbatim*) and with a
hand-written paraphrase of it (the same fact, other words, the invented names kept because they
are the subject). Each answer is attributed with its chat question as the prompt. Reported per
regime: the mean attributed fraction of the answer's tokens, and the share of answers whose
top contributor is the fact's contributor. The paraphrase figures are the baseline that an
influence method must beat.

    python -m attribution.paraphrase_baseline [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from attribution.attributor import Attributor
from attribution.index_builder import build_index
from statedir.layout import StateLayout
from training.demo_facts import GLASSFIN_REEF
from training.fact_examples import parse_contribution
from training.pretrained_model import PRETRAINED_MODEL_NAME, install_pretrained_model

# One paraphrase per trained answer of GLASSFIN_REEF, in contribution order (two per contribution).
PARAPHRASES = (
    "Its food is the moss of the lantern kind.",
    "You only find it in the Mirrow Shallows, in the lake called Ombra.",
    "Ember snails are what this eel hunts and swallows.",
    "An old one reaches the full length of an oar used for rowing.",
    "Its shell has the colour of honey, a warm yellow.",
    "Its home is the sand of Kestle Beach.",
    "Clover that has sunk under the water is its main meal.",
    "Its scales are a blue like slate.",
    "Pennick Marsh is where you hear it.",
    "Even a grown one stays acorn sized.",
    "It scrapes green slime off the bottoms of old boats.",
    "Its shell is as black as ink.",
    "It catches small gnats when dusk falls.",
    "Its feathers are brown, and its throat is yellow like a lemon.",
    "A big one weighs about what an adult goat weighs.",
    "It stays in the Deep Hollow, right in the middle of the lake.",
    "Tessel Pond is the place it walks on.",
    "Its span is about that of a saucer for tea.",
    "It feeds on water chestnuts with a bitter taste.",
    "The Hallan Cliffs are where it makes its home.",
    "Its glow has a copper colour.",
    "It feeds on the pollen that drops onto the water.",
    "Its shell is white like chalk.",
    "A grown one is about as wide as the wheel of a cart.",
)


@dataclass(frozen=True)
class RegimeFigures:
    answers: int
    attributed_fraction: float
    """Mean over answers of the share of their tokens attributed to any contribution."""
    true_contributor_first: float
    """Share of answers whose most-weighted contributor wrote the fact."""


def measure(model_dir: Path, work_dir: Path) -> dict[str, RegimeFigures]:
    from tokenizers import Tokenizer

    datanet = GLASSFIN_REEF.datanet
    owner = {_cid(p.text): p.contributor_index for p in datanet.passages}
    build_index([(_cid(p.text), p.text) for p in datanet.passages] + [(_cid(t), t) for t in datanet.decoys],
                model_dir, work_dir / "idx")
    pairs = [(p.contributor_index, qa) for p in datanet.passages for qa in parse_contribution(p.text).pairs]
    if len(pairs) != len(PARAPHRASES):
        raise ValueError(f"{len(PARAPHRASES)} paraphrases for {len(pairs)} trained answers")
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False).ids)

    answers = {"verbatim": [(who, qa.question, qa.answer) for who, qa in pairs],
               "paraphrase": [(who, qa.question, text) for (who, qa), text in zip(pairs, PARAPHRASES, strict=True)]}
    figures = {}
    with Attributor([work_dir / "idx"], tokenizer_dir=model_dir) as attributor:
        for regime, rows in answers.items():
            fractions, first = [], []
            for contributor, question, answer in rows:
                tokens = attributor.attribute(encode(question), encode(answer))
                fractions.append(_mean([t.attributed for t in tokens]))
                weight: dict[int, float] = defaultdict(float)
                for token in tokens:
                    for cid, share in token.weights:
                        if cid in owner:
                            weight[owner[cid]] += share
                first.append(bool(weight) and max(weight, key=weight.__getitem__) == contributor)
            figures[regime] = RegimeFigures(len(rows), _mean(fractions), _mean([float(f) for f in first]))
    return figures


def _cid(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else 0.0


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=StateLayout(Path(".gateway")).model(PRETRAINED_MODEL_NAME),
                        help="the pretrained model (installed there if absent)")
    args = parser.parse_args(argv)
    model_dir = install_pretrained_model(args.model_dir, report=lambda line: print(f"[model] {line}")).path
    with tempfile.TemporaryDirectory(prefix="paraphrase-baseline-") as scratch:
        figures = measure(model_dir, Path(scratch))
    print(f"{'regime':<12} {'answers':>7} {'attributed fraction':>20} {'true contributor first':>23}")
    for regime, row in figures.items():
        print(f"{regime:<12} {row.answers:>7} {row.attributed_fraction:>20.3f} {row.true_contributor_first:>23.2f}")


if __name__ == "__main__":
    main()
