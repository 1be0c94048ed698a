"""attribution.eval at small size: adapter trained on planted passages, metrics against the goals."""

from __future__ import annotations

from pathlib import Path

import pytest

from attribution.eval import evaluate, format_report


def test_quality_on_planted_passages(tmp_path_factory: pytest.TempPathFactory) -> None:
    from training.demo_assets import ensure_base_model

    model_dir = ensure_base_model(tmp_path_factory.mktemp("models") / "tiny-llama")
    work = tmp_path_factory.mktemp("eval")
    report = evaluate(Path(work), model_dir, passages=4)
    assert report.regurgitated >= 3
    assert report.true_contributor_share >= 0.9
    assert report.decoy_weight <= 0.01
    assert report.base_planted_weight <= 0.01
    assert report.paraphrase_attributed_fraction < 0.5
    assert "true_contributor_share" in format_report(report)
