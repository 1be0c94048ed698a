"""L0 follows the tokenizer: each embedded model's calibration applies to indexes built with its tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from attribution.policy import calibrated_min_span

RECORDS = {path.name: json.loads(path.read_text())
           for path in (Path(__file__).resolve().parents[2] / "attribution").glob("calibration*.json")}


def test_each_calibrated_tokenizer_gets_its_own_l0_and_an_unknown_one_the_largest() -> None:
    assert set(RECORDS) == {"calibration.json", "calibration-tiny.json"}
    pretrained, tiny = RECORDS["calibration.json"], RECORDS["calibration-tiny.json"]
    assert (pretrained["model"], tiny["model"]) == ("smollm2-135m-instruct", "datanet-tiny-llama")
    assert calibrated_min_span(pretrained["tokenizer_sha256"]) == pretrained["min_span_tokens"] == 5
    assert calibrated_min_span(tiny["tokenizer_sha256"]) == tiny["min_span_tokens"] == 3
    assert calibrated_min_span("0" * 64) == 5, "a tokenizer nobody calibrated gets the cautious L0"


def test_the_recorded_l0_is_the_smallest_length_within_the_false_positive_rate() -> None:
    for record in RECORDS.values():
        rows = {row["length"]: row["exceedance"] for row in record["table"]}
        chosen = record["min_span_tokens"]
        assert rows[chosen] <= record["false_positive_rate"] < rows[chosen - 1]
