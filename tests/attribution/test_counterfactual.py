"""The counterfactual evaluation at its small size: real adapters retrained without each contributor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from attribution.counterfactual import SIZES, evaluate, format_report, goals_met, score_regime, spearman


def test_spearman_and_regime_scores_by_hand() -> None:
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([3, 2, 1], [10, 20, 30]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) == 0.0
    weights = np.array([[0.8, 0.1, 0.0], [0.0, 0.0, 0.0]])
    effects = np.array([[5.0, 0.1, -0.2], [0.1, 0.2, 0.0]])
    score = score_regime(weights, effects, noise=np.array([1.0, 1.0]), owners=[0, None])
    assert (score.cases, score.scored, score.top1) == (2, 1, 1.0)
    assert score.noise_mass == pytest.approx(0.05)  # 0.1 on a within-noise contributor, then 0
    assert score.true_mass == pytest.approx(0.8)
    assert score.attributed_mass == pytest.approx(0.45)  # 0.9 of the first response, none of the second


def test_counterfactual_goals_at_small_size(tiny_model_dir: Path, tmp_path: Path) -> None:
    report = evaluate(tmp_path, tiny_model_dir, SIZES["small"], report=lambda line: None)
    print(format_report(report))
    combined = report.scores["combined"]
    met = goals_met(report)
    # The goals this size reaches (docs/attribution.md gives the full-size figures and the ones it misses).
    assert met["recitation true_mass"], combined["recitation"]
    assert met["paraphrase top1"], combined["paraphrase"]
    # On unrelated prompts the tiny adapter recites its passages anyway, and verbatim rightly attributes them
    # (0.27 of the mass): what must stay small is the mass on contributors whose effect is within noise.
    assert combined["unrelated"].noise_mass <= 0.1, combined["unrelated"]
    assert report.scores["influence"]["recitation"].top1 >= 0.5, "influence alone names most recited contributors"
    assert combined["recitation"].scored == combined["recitation"].cases, "reciting a passage rests on its contributor"
    assert report.owner_first["recitation"] == (6, 6), "the truth: a recited passage rests most on its contributor"
    # Combining never does worse than verbatim alone where verbatim sees the copy.
    verbatim = report.scores["verbatim"]
    assert combined["recitation"].true_mass >= verbatim["recitation"].true_mass - 1e-9
    assert combined["paraphrase"].top1 >= verbatim["paraphrase"].top1
    assert set(report.seconds_per_inference) == {"verbatim", "influence", "combined", "blend", "generation"}


@pytest.mark.parametrize("bad", ["abc", "0.3,0.1,2", "0.1,0.25", "0.1,0.25,0"])
def test_a_bad_influence_weighting_is_refused_before_any_work(bad: str, capsys: pytest.CaptureFixture[str],
                                                               tmp_path: Path) -> None:
    from attribution.eval import main

    with pytest.raises(SystemExit) as exited:
        main(["--counterfactual", "--influence", bad, "--work-dir", str(tmp_path / "work")])
    assert exited.value.code == 2
    assert "--influence wants FLOOR,FULL,SHARPNESS" in capsys.readouterr().err
    assert not (tmp_path / "work").exists(), "nothing was trained or written"
