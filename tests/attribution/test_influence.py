"""Influence features: computed from a real trained adapter, bound to its weights, refused when stale or damaged."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from attribution.counterfactual import contribution_id
from attribution.influence import (
    FEATURES_FILE,
    FeaturesCorrupt,
    FeaturesMissing,
    FeaturesStale,
    InfluenceFeatures,
    InfluenceScorer,
    InfluenceSettings,
    build_features,
    features_after_training,
)
from attribution.policy import AttributionMethod, CombinedPolicy, InfluenceWeighting
from ledger.client.trace import TokenAttribution
from training.demo_facts import GLASSFIN_REEF
from training.lora_training import TrainingConfig, snapshot_step, train_adapter

TEXTS = [passage.text for passage in GLASSFIN_REEF.datanet.passages[:3]]
IDS = [contribution_id(text) for text in TEXTS]
TRAINING = TrainingConfig(steps=20, warmup_steps=2)


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny adapter trained on three contributions, with its features."""
    out = tmp_path_factory.mktemp("influence") / "adapter"
    result = train_adapter(tiny_model_dir, TEXTS, out, TRAINING)
    assert result.snapshot, "training keeps an early snapshot of the LoRA weights"
    features_after_training(tiny_model_dir, out, list(zip(IDS, TEXTS, strict=True)), TRAINING, result)
    return out


def test_features_are_bound_to_the_adapter_and_its_contributions(trained: Path) -> None:
    features = InfluenceFeatures.load(trained, lineage_contribution_ids=IDS)
    assert features.contribution_ids == tuple(IDS)
    assert features.features.shape == (3, features.settings.sketch_dim)
    assert features.snapshot, "gradients are taken at the snapshot, which the file carries"
    assert snapshot_step(TRAINING) == 2
    with pytest.raises(FeaturesStale, match="outside the adapter's lineage"):
        InfluenceFeatures.load(trained, lineage_contribution_ids=IDS[:2])


def test_a_recited_contribution_scores_highest(tiny_model_dir: Path, trained: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    scorer = InfluenceScorer.open(tiny_model_dir, trained, IDS)
    for index, text in enumerate(TEXTS):
        words = text.split()
        prompt = tokenizer(" ".join(words[:12]), add_special_tokens=True)["input_ids"]
        response = tokenizer(" " + " ".join(words[12:30]), add_special_tokens=False)["input_ids"]
        scores = scorer.scores(prompt, response)
        assert int(np.argmax(scores.scores)) == index
        assert int(np.argmax(scores.cosines)) == index
        method: AttributionMethod = scorer  # the protocol the attribution service calls
        tokens = method.token_weights(prompt, response)
        again = InfluenceWeighting().token_weights(scores, response)
        assert len(tokens) == len(again) == len(response)
        assert dict(tokens[0].weights) == pytest.approx(dict(again[0].weights), rel=1e-4, abs=1e-6)
        assert max(tokens[0].weights, key=lambda pair: pair[1])[0] == IDS[index]
        for token in tokens:
            assert sum(weight for _, weight in token.weights) + token.unattributed == pytest.approx(1.0)


def test_a_retrained_adapter_never_uses_the_features_of_the_one_before(tiny_model_dir: Path, trained: Path,
                                                                        tmp_path: Path) -> None:
    retrained = tmp_path / "retrained"
    train_adapter(tiny_model_dir, TEXTS, retrained, replace(TRAINING, seed=1, steps=4, warmup_steps=1))
    with pytest.raises(FeaturesMissing, match=FEATURES_FILE):
        InfluenceScorer.open(tiny_model_dir, retrained, IDS)
    shutil.copy(trained / FEATURES_FILE, retrained / FEATURES_FILE)
    with pytest.raises(FeaturesStale, match="trained again"):
        InfluenceScorer.open(tiny_model_dir, retrained, IDS)


def test_damaged_features_are_refused_with_the_file_named(trained: Path, tmp_path: Path) -> None:
    copy = tmp_path / "adapter"
    shutil.copytree(trained, copy)
    data = bytearray((copy / FEATURES_FILE).read_bytes())
    data[-100] ^= 0xFF  # a flipped byte inside the tensors
    (copy / FEATURES_FILE).write_bytes(bytes(data))
    with pytest.raises(FeaturesCorrupt, match="checksum"):
        InfluenceFeatures.load(copy)
    (copy / FEATURES_FILE).write_bytes(bytes(data[:50]))
    with pytest.raises(FeaturesCorrupt, match="cannot be read"):
        InfluenceFeatures.load(copy)
    (copy / FEATURES_FILE).write_text("not a safetensors file")
    with pytest.raises(FeaturesCorrupt, match=str(copy / FEATURES_FILE)):
        InfluenceFeatures.load(copy)


def test_building_features_refuses_bad_input(tiny_model_dir: Path, trained: Path) -> None:
    with pytest.raises(ValueError, match="no contributions"):
        build_features(tiny_model_dir, trained, [])
    for bad in ({"sketch_dim": 3}, {"top_layers": -1}, {"damping": 0}, {"seed": -1}):
        with pytest.raises(ValueError):
            InfluenceSettings(**bad)


def test_influence_weighting_gates_on_the_cosine_and_splits_by_score() -> None:
    policy = InfluenceWeighting(cosine_floor=0.1, cosine_full=0.3, sharpness=1.0)
    assert policy.contribution_weights(["a", "b"], [5.0, 1.0], [0.05, 0.02]) == {}
    half = policy.contribution_weights(["a", "b", "c"], [3.0, 1.0, -2.0], [0.2, 0.1, -0.1])
    assert half == pytest.approx({"a": 0.375, "b": 0.125})
    squared = InfluenceWeighting(cosine_floor=0.1, cosine_full=0.3, sharpness=2.0)
    assert squared.contribution_weights(["a", "b"], [3.0, 1.0], [0.2, 0.1]) == pytest.approx({"a": 0.45, "b": 0.05})
    full = policy.contribution_weights(["a", "b"], [3.0, 1.0], [0.9, 0.1])
    assert sum(full.values()) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        InfluenceWeighting(cosine_floor=0.5, cosine_full=0.2)


def test_combined_keeps_verbatim_tokens_and_fills_the_rest_with_influence() -> None:
    verbatim = [TokenAttribution(1, (("a", 0.9),), 0.1), TokenAttribution.unattributed_token(2)]
    influence = [TokenAttribution(1, (("b", 0.5),), 0.5), TokenAttribution(2, (("b", 0.5),), 0.5)]
    combined = CombinedPolicy().token_weights(verbatim, influence)
    assert combined == [verbatim[0], influence[1]]
    with pytest.raises(ValueError, match="tokens"):
        CombinedPolicy().token_weights(verbatim, influence[:1])
