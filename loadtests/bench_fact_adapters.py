"""Adapter training on the pretrained model: time per demo adapter, held-out answers, verbatim reproduction.

For each demo facts datanet (`training.demo_facts`), trains the adapter `gateway up` trains on first
start, with the same settings (`gateway.adapter_lifecycle.training_preset` and `training_config`),
then asks the base model and the adapter the datanet's held-out questions and has the adapter
continue each contribution from its first words (`training.answer_eval`). Prints one line per
adapter and a table; `--json` writes the figures. Nothing else should run on the cores meanwhile.

Run from the repository root (about 3 minutes per adapter on 2 quiet cores, plus a first install):

    .venv/bin/python loadtests/bench_fact_adapters.py [--state-dir DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gateway.adapter_lifecycle import training_config, training_preset  # noqa: E402
from gateway.config import GatewayConfig  # noqa: E402
from gateway.supervisor import install_embedded_model  # noqa: E402
from serving.config import PRETRAINED_MODEL  # noqa: E402
from training.answer_eval import evaluate_fact_datanet  # noqa: E402
from training.demo_facts import DEMO_FACT_DATANETS  # noqa: E402
from training.lora_training import TrainingProgress, train_adapter  # noqa: E402


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def bench_datanet(config: GatewayConfig, facts: Any, work: Path) -> dict[str, Any]:
    """Train one demo adapter as the gateway does, time it, and evaluate what it learned."""
    texts = facts.datanet.texts
    settings = training_config(texts, None, training_preset(config))

    def progress(update: TrainingProgress) -> None:
        if update.step and (update.step % 10 == 0 or update.step == update.total_steps):
            log(f"  {facts.name}: step {update.step}/{update.total_steps} loss {update.loss:.3f}")

    result = train_adapter(config.model_path, texts, work / facts.name, settings, progress=progress,
                           base_model_name=config.served_model_name)
    started = time.monotonic()
    report = evaluate_fact_datanet(config.model_path, result.out_dir, facts)
    return {
        "datanet": facts.name, "contributions": len(texts), "sequences": result.sequences,
        "tokens": result.tokens, "steps": result.steps, "final_loss": round(result.final_loss, 4),
        "training_seconds": round(result.seconds, 1), "seconds_per_step": round(result.seconds / result.steps, 2),
        "evaluation_seconds": round(time.monotonic() - started, 1),
        "held_out_questions": len(report.answers),
        "answered_base": round(report.share_correct_base, 3),
        "answered_adapter": round(report.share_correct_adapter, 3),
        "reproduced_verbatim": round(report.share_reproduced, 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, help="state dir holding (or to receive) the model; default a new temp dir")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="bench-facts-"))
    config = GatewayConfig(state_dir=state_dir, base_model=PRETRAINED_MODEL)
    log(f"state dir {state_dir}")
    install_embedded_model(config)  # prints [model] progress on first use
    rows = []
    with tempfile.TemporaryDirectory(prefix="adapters-", dir=state_dir) as work:
        for facts in DEMO_FACT_DATANETS:
            log(f"training the adapter of '{facts.name}'")
            row = bench_datanet(config, facts, Path(work))
            log(f"  {json.dumps(row)}")
            rows.append(row)
    print(f"{'datanet':<18} {'seqs':>5} {'steps':>5} {'train s':>8} {'s/step':>7} {'base':>6} {'adapter':>8} "
          f"{'verbatim':>9}")
    for row in rows:
        print(f"{row['datanet']:<18} {row['sequences']:>5} {row['steps']:>5} {row['training_seconds']:>8.1f} "
              f"{row['seconds_per_step']:>7.2f} {row['answered_base']:>6.2f} {row['answered_adapter']:>8.2f} "
              f"{row['reproduced_verbatim']:>9.2f}")
    if args.json:
        args.json.write_text(json.dumps({"model": PRETRAINED_MODEL, "adapters": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
