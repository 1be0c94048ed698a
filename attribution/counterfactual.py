"""Attribution methods scored against counterfactual ground truth: retraining without each contributor.

Setup. The `glassfin-reef` demo facts datanet (12 contributions) is split among K contributors
(contribution i belongs to contributor i mod K). One adapter is trained on everyone; one more per
contributor on everyone else, with the same seed and steps; and one on everyone under a second seed.
For a response r to a prompt, the *true effect* of contributor c is

    effect_c(r) = log p_all(r) - log p_without_c(r)     (nats; > 0: r rests on c)

and its *noise* is what a second seed alone changes, |log p_all(r) - log p_seed2(r)|, averaged per
token over the regime and scaled to r's length.

Regimes (responses are token ids, scored under every adapter):
- recitation: the first 12 words of each contribution's passage, continued greedily by the adapter;
- paraphrase: each trained question, answered by a hand-written paraphrase of its answer (the fact in
  other words: `attribution.paraphrase_baseline.PARAPHRASES`);
- unrelated: questions about none of the data, answered greedily by the adapter.

Per regime and method (verbatim, influence, combined), with a method's weight on contributor c the
share of r's tokens given to c's contributions:
- top-1: share of responses whose largest true effect has the largest weight (only responses where
  some effect is above noise);
- Spearman: mean rank correlation of weights and true effects (same responses);
- noise mass: mean weight on contributors whose effect is within noise (on unrelated prompts, that is
  every contributor);
- true-contributor mass (recitation, paraphrase): mean weight on the contributor the prompt is about;
- attributed mass: mean weight on all contributors together (on unrelated prompts it should be near 0).
Methods: verbatim spans, influence alone, combined (what `verbatim+influence-v1` serves: verbatim where a
token has spans, influence elsewhere) and blend (the other candidate rule: the mean of the two on every token).
Cost per inference: seconds per response for each method, beside the seconds the adapter took to
generate it (transformers, greedy, one response at a time, same process).

    python -m attribution.eval --counterfactual [--size small|full]
"""

from __future__ import annotations

import hashlib
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from attribution.attributor import Attributor
from attribution.index_builder import build_index
from attribution.influence import FEATURES_FILE, InfluenceScorer, InfluenceSettings, build_features
from attribution.paraphrase_baseline import PARAPHRASES
from attribution.policy import CombinedPolicy, InfluenceWeighting
from ledger.client.trace import TokenAttribution
from training.demo_facts import GLASSFIN_REEF
from training.fact_examples import parse_contribution
from training.lora_training import TrainingConfig, greedy_batch, load_adapted_model, train_adapter

PROMPT_WORDS = 12
REGIMES = ("recitation", "paraphrase", "unrelated")
METHODS = ("verbatim", "influence", "combined", "blend")
"""blend: the alternative combination rule, half verbatim and half influence on every token (reported, not served)."""

UNRELATED_QUESTIONS = (
    "What is the capital of France?",
    "How do I sort a list in Python?",
    "Name three colours of the rainbow.",
    "How many days are there in a week?",
    "What is two plus three?",
    "Who wrote the play Hamlet?",
    "Why is the sky blue?",
    "What do bees make?",
    "How do you boil an egg?",
    "What is the largest planet in our solar system?",
    "Give me a word that rhymes with cat.",
    "What language is spoken in Spain?",
)


@dataclass(frozen=True)
class EvalSize:
    """How big a run is: contributors, the contributions they share, how much each regime asks."""

    contributors: int = 6
    contributions: int = 12
    """The first N contributions of the datanet, contribution i owned by contributor i mod K."""
    unrelated: int = 12
    recitation_tokens: int = 40
    unrelated_tokens: int = 24
    training: TrainingConfig = field(default_factory=TrainingConfig)
    influence: InfluenceSettings = field(default_factory=InfluenceSettings)

    def __post_init__(self) -> None:
        if self.contributors < 2 or self.contributions < self.contributors:
            raise ValueError("need at least 2 contributors and one contribution each")
        if self.contributions > len(GLASSFIN_REEF.datanet.passages):
            raise ValueError(f"the datanet has {len(GLASSFIN_REEF.datanet.passages)} contributions")


SIZES = {
    "small": EvalSize(contributors=6, contributions=6, unrelated=6, recitation_tokens=24, unrelated_tokens=16),
    "full": EvalSize(),
}


@dataclass(frozen=True)
class Case:
    regime: str
    prompt: list[int]
    response: list[int]
    owner: int | None
    """The contributor the prompt is about (recitation and paraphrase), None for unrelated prompts."""


@dataclass(frozen=True)
class RegimeScore:
    cases: int
    scored: int
    """Cases with some effect above noise (top-1 and Spearman are taken over these)."""
    top1: float
    spearman: float
    noise_mass: float
    true_mass: float
    """Mean weight on the prompt's own contributor (recitation and paraphrase)."""
    attributed_mass: float
    """Mean weight on all contributors together (the rest of the response is unattributed)."""


@dataclass(frozen=True)
class CounterfactualReport:
    size: EvalSize
    scores: dict[str, dict[str, RegimeScore]]
    """method -> regime -> score."""
    seconds_per_inference: dict[str, float]
    """method -> mean seconds per response; "generation" is the adapter generating it."""
    noise_per_token: dict[str, float]
    effects: dict[str, list[list[float]]]
    """regime -> per case, true effect per contributor (nats)."""
    owner_first: dict[str, tuple[int, int]]
    """recitation and paraphrase -> (cases whose largest true effect is the prompt's own contributor, cases): how
    far the ground truth agrees with the obvious answer."""


def contribution_id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Experiment:
    """The adapters of one run (trained once, kept in `work_dir`) and the cases they are scored on."""

    def __init__(self, work_dir: Path, model_dir: Path, size: EvalSize, report: Any = print) -> None:
        from transformers import AutoTokenizer

        self.work_dir, self.model_dir, self.size, self.report = Path(work_dir), Path(model_dir), size, report
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.texts = [p.text for p in GLASSFIN_REEF.datanet.passages[: size.contributions]]
        self.ids = [contribution_id(text) for text in self.texts]
        self.owner_of = {cid: index % size.contributors for index, cid in enumerate(self.ids)}
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))

    def adapter(self, name: str, texts: Sequence[str], seed: int, with_features: bool = False) -> Path:
        """The adapter `name` trained on `texts` (kept in the work dir); with its influence features if asked."""
        out = self.work_dir / "adapters" / name
        done = (out / "adapter_model.safetensors").is_file() and (not with_features or (out / FEATURES_FILE).is_file())
        if done:
            return out
        shutil.rmtree(out, ignore_errors=True)
        started = time.monotonic()
        training = replace(self.size.training, seed=seed)
        result = train_adapter(self.model_dir, texts, out, training)
        self.report(f"trained {name} on {len(texts)} contributions in {time.monotonic() - started:.0f} s")
        if with_features:
            started = time.monotonic()
            build_features(self.model_dir, out, list(zip(self.ids, texts, strict=True)), self.size.influence,
                           max_seq_len=training.max_seq_len, answer_weight=training.answer_weight,
                           snapshot=result.snapshot)
            self.report(f"influence features of {name} computed in {time.monotonic() - started:.1f} s")
        return out

    def adapters(self) -> dict[str, Path]:
        """"all", "seed2" and "without-<c>" for every contributor, trained if not already in the work dir."""
        seed = self.size.training.seed
        found = {"all": self.adapter("all", self.texts, seed, with_features=True),
                 "seed2": self.adapter("seed2", self.texts, seed + 1)}
        for contributor in range(self.size.contributors):
            kept = [t for t, cid in zip(self.texts, self.ids, strict=True) if self.owner_of[cid] != contributor]
            found[f"without-{contributor}"] = self.adapter(f"without-{contributor}", kept, seed)
        return found

    def encode(self, text: str, special: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def chat_prompt(self, question: str) -> list[int]:
        rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                      add_generation_prompt=True)
        return self.encode(rendered)

    def cases(self, adapter_dir: Path) -> tuple[list[Case], float]:
        """Every case, and the adapter's mean seconds to generate one response (one at a time)."""
        model, tokenizer = load_adapted_model(self.model_dir, adapter_dir)
        cases: list[Case] = []
        timings: list[float] = []

        def generate(prompt: list[int], budget: int) -> list[int]:
            started = time.perf_counter()
            text = greedy_batch(model, tokenizer, [prompt], [budget])[0]
            timings.append(time.perf_counter() - started)
            return self.encode(" " + text.strip()) if not prompt[-1:] == self.encode("\n")[-1:] else self.encode(text)

        for index, text in enumerate(self.texts):
            words = parse_contribution(text).passage.split()
            prompt = self.encode(" ".join(words[:PROMPT_WORDS]), special=True)
            cases.append(Case("recitation", prompt, generate(prompt, self.size.recitation_tokens),
                              index % self.size.contributors))
        pairs = [(index, pair) for index, text in enumerate(self.texts) for pair in parse_contribution(text).pairs]
        for (index, pair), answer in zip(pairs, PARAPHRASES, strict=False):
            cases.append(Case("paraphrase", self.chat_prompt(pair.question), self.encode(answer),
                              index % self.size.contributors))
        for question in UNRELATED_QUESTIONS[: self.size.unrelated]:
            prompt = self.chat_prompt(question)
            cases.append(Case("unrelated", prompt, generate(prompt, self.size.unrelated_tokens), None))
        return [case for case in cases if case.response], sum(timings) / max(len(timings), 1)


def log_probabilities(model_dir: Path, adapter_dir: Path, cases: Sequence[Case]) -> np.ndarray:
    """log p(response | prompt) of each case under the adapter (nats)."""
    import torch

    model, _ = load_adapted_model(model_dir, adapter_dir)
    out = []
    with torch.no_grad():
        for case in cases:
            ids = torch.tensor([case.prompt + case.response])
            logits = model(input_ids=ids).logits[0, len(case.prompt) - 1:-1].float()
            picked = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(case.response)[:, None])
            out.append(float(picked.sum()))
    return np.array(out)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); 0 when either side is constant."""
    ra, rb = _ranks(np.asarray(a, dtype=float)), _ranks(np.asarray(b, dtype=float))
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    order = values.argsort(kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values), dtype=float)
    for value in np.unique(values):
        same = values == value
        ranks[same] = ranks[same].mean()
    return ranks


def contributor_weights(tokens: Sequence[TokenAttribution], owner_of: dict[str, int], contributors: int) -> np.ndarray:
    """Share of the response's tokens given to each contributor's contributions."""
    weights = np.zeros(contributors)
    for token in tokens:
        for cid, weight in token.weights:
            if cid in owner_of:
                weights[owner_of[cid]] += weight
    return weights / max(len(tokens), 1)


def score_regime(weights: np.ndarray, effects: np.ndarray, noise: np.ndarray,
                 owners: Sequence[int | None]) -> RegimeScore:
    """weights/effects: [cases, contributors]; noise: [cases]."""
    top1, rhos, noise_mass, true_mass, attributed = [], [], [], [], []
    for row in range(len(effects)):
        within = np.abs(effects[row]) <= noise[row]
        noise_mass.append(float(weights[row][within].sum()))
        attributed.append(float(weights[row].sum()))
        if owners[row] is not None:
            true_mass.append(float(weights[row][owners[row]]))
        if within.all():
            continue
        top1.append(float(np.argmax(weights[row]) == np.argmax(effects[row]) and weights[row].max() > 0))
        rhos.append(spearman(weights[row], effects[row]))
    return RegimeScore(cases=len(effects), scored=len(top1), top1=_mean(top1), spearman=_mean(rhos),
                       noise_mass=_mean(noise_mass), true_mass=_mean(true_mass), attributed_mass=_mean(attributed))


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else float("nan")


def evaluate(work_dir: Path, model_dir: Path, size: EvalSize, report: Any = print,
             influence_policy: InfluenceWeighting | None = None) -> CounterfactualReport:
    experiment = Experiment(work_dir, model_dir, size, report)
    adapters = experiment.adapters()
    cases, generation_seconds = experiment.cases(adapters["all"])
    report(f"{len(cases)} cases; scoring them under {len(adapters)} adapters")
    logp = {name: log_probabilities(model_dir, path, cases) for name, path in adapters.items()}
    effects = np.stack([logp["all"] - logp[f"without-{c}"] for c in range(size.contributors)], axis=1)
    seed_gap = np.abs(logp["all"] - logp["seed2"])
    lengths = np.array([len(case.response) for case in cases], dtype=float)
    regimes = np.array([case.regime for case in cases])
    noise_per_token = {regime: float(seed_gap[regimes == regime].sum() / lengths[regimes == regime].sum())
                       for regime in REGIMES}
    noise = np.array([noise_per_token[case.regime] * len(case.response) for case in cases])

    index_dir = work_dir / "index"
    if not (index_dir / "manifest.json").is_file():
        build_index(list(zip(experiment.ids, experiment.texts, strict=True)), model_dir, index_dir)
    scorer = InfluenceScorer.open(model_dir, adapters["all"])
    weighting = influence_policy or InfluenceWeighting()
    combined = CombinedPolicy()
    per_method: dict[str, list[np.ndarray]] = {method: [] for method in METHODS}
    seconds: dict[str, list[float]] = {method: [] for method in METHODS}
    with Attributor([index_dir], tokenizer_dir=model_dir) as attributor:
        for case in cases:
            started = time.perf_counter()
            verbatim = attributor.attribute(case.prompt, case.response)
            seconds["verbatim"].append(time.perf_counter() - started)
            started = time.perf_counter()
            scores = scorer.scores(case.prompt, case.response)
            influence = weighting.token_weights(scores, case.response)
            seconds["influence"].append(time.perf_counter() - started)
            started = time.perf_counter()
            mixed = combined.token_weights(verbatim, influence)
            seconds["combined"].append(seconds["verbatim"][-1] + seconds["influence"][-1]
                                       + time.perf_counter() - started)
            seconds["blend"].append(seconds["combined"][-1])
            for method, tokens in (("verbatim", verbatim), ("influence", influence), ("combined", mixed)):
                per_method[method].append(contributor_weights(tokens, experiment.owner_of, size.contributors))
            per_method["blend"].append((per_method["verbatim"][-1] + per_method["influence"][-1]) / 2)
    scores: dict[str, dict[str, RegimeScore]] = {}
    for method in METHODS:
        weights = np.stack(per_method[method])
        scores[method] = {
            regime: score_regime(weights[regimes == regime], effects[regimes == regime], noise[regimes == regime],
                                 [case.owner for case in cases if case.regime == regime])
            for regime in REGIMES
        }
    costs = {method: _mean(values) for method, values in seconds.items()}
    costs["generation"] = generation_seconds
    owner_first = {regime: (sum(int(np.argmax(effect) == case.owner)
                                for case, effect in zip(cases, effects, strict=True) if case.regime == regime),
                            int((regimes == regime).sum()))
                   for regime in REGIMES if regime != "unrelated"}
    return CounterfactualReport(size, scores, costs, noise_per_token,
                                {regime: effects[regimes == regime].tolist() for regime in REGIMES}, owner_first)


GOALS = {
    ("paraphrase", "top1"): 0.8, ("paraphrase", "spearman"): 0.6, ("recitation", "true_mass"): 0.9,
    ("unrelated", "attributed_mass"): 0.1,
}
"""The issue's goals for the combined method (mass on unrelated prompts is an upper bound, the others lower
bounds). On unrelated prompts the bound is put on all the mass given to contributors, not only on those within
noise: the second seed does not move a short greedy answer much, so some contributors' effects on it pass
for real ones, and paying them for a response about none of their data is still a misdirected payment."""
UPPER_BOUNDS = {"noise_mass", "attributed_mass"}


def goals_met(report: CounterfactualReport) -> dict[str, bool]:
    combined = report.scores["combined"]
    met = {f"{regime} {metric}": (getattr(combined[regime], metric) <= bound if metric in UPPER_BOUNDS
                                  else getattr(combined[regime], metric) >= bound)
           for (regime, metric), bound in GOALS.items()}
    met["influence cost <= generation cost"] = (report.seconds_per_inference["influence"]
                                                <= report.seconds_per_inference["generation"])
    return met


def format_report(report: CounterfactualReport) -> str:
    lines = [f"K = {report.size.contributors} contributors, {report.size.contributions} contributions; "
             f"seed noise per token (nats): " + ", ".join(f"{r} {v:.3f}" for r, v in report.noise_per_token.items()),
             f"{'regime':<11} {'measure':<15} " + " ".join(f"{m:>10}" for m in METHODS) + "   goal (combined)"]
    for regime in REGIMES:
        for metric in ("top1", "spearman", "noise_mass", "true_mass", "attributed_mass"):
            if regime == "unrelated" and metric in ("top1", "spearman", "true_mass"):
                continue
            goal = GOALS.get((regime, metric))
            shown = "" if goal is None else ("<= " if metric in UPPER_BOUNDS else ">= ") + f"{goal}"
            values = " ".join(f"{getattr(report.scores[m][regime], metric):>10.3f}" for m in METHODS)
            lines.append(f"{regime:<11} {metric:<15} {values}   {shown}")
    scored = ", ".join(f"{r} {report.scores['combined'][r].scored}/{report.scores['combined'][r].cases}"
                       for r in REGIMES)
    lines.append(f"cases with an effect above noise: {scored}")
    lines.append("cases whose largest true effect is the prompt's own contributor: "
                 + ", ".join(f"{regime} {first}/{total}" for regime, (first, total) in report.owner_first.items()))
    cost = report.seconds_per_inference
    lines.append("seconds per response: " + ", ".join(f"{name} {cost[name] * 1000:.1f} ms"
                                                      for name in (*METHODS, "generation")))
    lines.append("goals: " + ", ".join(f"{name} {'met' if ok else 'NOT met'}"
                                       for name, ok in goals_met(report).items()))
    return "\n".join(lines)


def size_for(name: str) -> tuple[EvalSize, bool]:
    """The named size and whether it runs on the pretrained model."""
    if name == "small":
        return SIZES["small"], False
    if name == "full":
        return replace(SIZES["full"], training=replace(TrainingConfig.for_pretrained(), steps=40)), True
    raise ValueError(f"size must be small or full, got {name!r}")


def run_counterfactual(size_name: str, model_dir: Path | None = None, work_dir: Path | None = None,
                       influence_policy: InfluenceWeighting | None = None) -> str:
    """Run the evaluation at a named size (training whatever `work_dir` lacks) and return the printed report;
    `influence_policy` replaces the served influence weighting."""
    import tempfile

    from statedir.layout import StateLayout
    from training.demo_assets import ensure_base_model
    from training.pretrained_model import PRETRAINED_MODEL_NAME, install_pretrained_model

    size, pretrained = size_for(size_name)
    layout = StateLayout(Path(".gateway"))
    if pretrained:
        model_dir = install_pretrained_model(model_dir or layout.model(PRETRAINED_MODEL_NAME),
                                             report=lambda line: print(f"[model] {line}", flush=True)).path
    else:
        model_dir = ensure_base_model(model_dir or layout.model("datanet-tiny-llama"))

    def report(line: str) -> None:
        print(f"[counterfactual] {line}", flush=True)

    if work_dir is not None:
        return format_report(evaluate(work_dir, model_dir, size, report, influence_policy))
    with tempfile.TemporaryDirectory(prefix="counterfactual-") as scratch:
        return format_report(evaluate(Path(scratch), model_dir, size, report, influence_policy))
