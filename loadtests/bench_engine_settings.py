"""What each of the gateway's engine settings costs against vLLM's own default, one at a time.

The gateway departs from vLLM's defaults in a few engine settings (`EngineConfig`): adapter slots,
batch size, context length, eager mode, KV cache size, and (until auto) precision. This script runs
vLLM's offline engine (`vllm.LLM`, LoRA on, the same engine the replica runs) once with the
gateway's settings and once per setting with only that setting put back to vLLM's default, each in
a fresh subprocess, and prints output tokens/s of each variant next to the gateway's.

Workload per variant: `--requests` prompts of 64 greedy tokens (ignore_eos) submitted at once, every
one on demo-adapter-000 (`--adapters 1`) or spread over the first N demo adapters round-robin.
Variants run in alternating order for `--rounds` rounds; medians are printed.

    .venv/bin/python loadtests/bench_engine_settings.py [--model smollm2-135m-instruct] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.config import GatewayConfig  # noqa: E402
from gateway.supervisor import ensure_demo_assets  # noqa: E402
from serving.config import EngineConfig  # noqa: E402
from serving.precision import resolve_precision  # noqa: E402
from training.demo_assets import demo_adapter_name  # noqa: E402

PROMPT = "Once upon a time, in a small village by the sea, there lived"
MAX_TOKENS = 64


def log(message: str) -> None:
    print(f"[engine-settings {time.strftime('%H:%M:%S')}] {message}", flush=True)


def gateway_settings(engine: EngineConfig) -> dict[str, Any]:
    """The `vllm.LLM` keyword arguments the gateway's replica passes (serving/engine.py)."""
    return {"enable_lora": True, "max_loras": engine.max_loras, "max_cpu_loras": engine.max_cpu_loras,
            "max_lora_rank": engine.max_lora_rank, "max_model_len": engine.max_model_len,
            "max_num_seqs": engine.max_num_seqs, "enforce_eager": engine.enforce_eager, "seed": engine.seed,
            "dtype": resolve_precision(engine.dtype).dtype, "kv_cache_gib": engine.kv_cache_gib}


# Each variant: (name, keyword arguments changed back to vLLM's default; None = drop the argument).
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("gateway settings", {}),
    ("max_loras: vLLM default (1)", {"max_loras": None, "max_cpu_loras": None}),
    ("max_num_seqs: vLLM default", {"max_num_seqs": None}),
    ("max_model_len: the model's", {"max_model_len": None}),
    ("enforce_eager: off (vLLM default)", {"enforce_eager": None}),
    ("dtype: float32", {"dtype": "float32"}),
    ("dtype: vLLM auto", {"dtype": "auto"}),
]

CHILD = """
import json, os, sys, time
settings = json.loads(sys.argv[1])
os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(settings.pop("kv_cache_gib"))
adapters = settings.pop("adapters")
requests = settings.pop("requests")
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest
llm = LLM(model=settings.pop("model"), disable_log_stats=True, **settings)
loras = [LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapters)]
params = SamplingParams(temperature=0.0, max_tokens=%(tokens)d, ignore_eos=True)
prompts = [%(prompt)r] * requests
picks = [loras[i %% len(loras)] for i in range(requests)]
llm.generate(prompts[:8], params, lora_request=picks[:8], use_tqdm=False)
start = time.perf_counter()
outputs = llm.generate(prompts, params, lora_request=picks, use_tqdm=False)
wall = time.perf_counter() - start
tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
print("RESULT " + json.dumps({"tok_s": tokens / wall, "tokens": tokens, "wall_s": wall}), flush=True)
""" % {"tokens": MAX_TOKENS, "prompt": PROMPT}


def run_variant(base: dict[str, Any], changes: dict[str, Any], log_path: Path) -> dict[str, Any]:
    settings = {**base}
    for key, value in changes.items():
        if value is None:
            settings.pop(key, None)
        else:
            settings[key] = value
    with open(log_path, "ab") as out:
        done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(settings)], stdout=subprocess.PIPE,
                              stderr=out, timeout=1800, cwd=ROOT)
    lines = [line for line in done.stdout.decode().splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"variant failed (exit {done.returncode}); see {log_path}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="GATEWAY_BASE_MODEL (default: the gateway's default)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--adapters", type=int, default=1, help="demo adapters the requests are spread over")
    parser.add_argument("--state-dir", type=Path, help="reuse a state directory's model and adapters")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.model:
        os.environ["GATEWAY_BASE_MODEL"] = args.model
    state_dir = (args.state_dir or Path(tempfile.mkdtemp(prefix="bench-engine-", dir="/tmp"))).resolve()
    config = GatewayConfig(state_dir=state_dir, demo_adapters=max(args.adapters, 1), demo_datanets=False)
    log(f"state dir {state_dir}: building/reusing the model and {args.adapters} demo adapters")
    ensure_demo_assets(config)
    engine = EngineConfig()
    base = {"model": str(config.model_path), **gateway_settings(engine), "requests": args.requests,
            "adapters": [(demo_adapter_name(i), str(Path(config.store_url) / demo_adapter_name(i)))
                         for i in range(args.adapters)]}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in VARIANTS}
    for round_index in range(args.rounds):
        order = VARIANTS if round_index % 2 == 0 else list(reversed(VARIANTS))
        for name, changes in order:
            log(f"round {round_index + 1}/{args.rounds}: {name} ...")
            result = run_variant(base, changes, state_dir / "engine-settings.log")
            results[name].append(result)
            log(f"round {round_index + 1}/{args.rounds}: {name}: {result['tok_s']:.1f} tok/s")
    reference = statistics.median(r["tok_s"] for r in results["gateway settings"])
    print(f"\n=== vLLM offline engine, {config.served_model_name}, {args.requests} x {MAX_TOKENS} tokens on "
          f"{args.adapters} adapter(s); gateway settings: {json.dumps(gateway_settings(engine))}; "
          f"medians of {args.rounds} rounds ===")
    print(f"{'variant':40}{'tokens/s':>12}{'vs gateway':>12}")
    for name, _ in VARIANTS:
        tok_s = statistics.median(r["tok_s"] for r in results[name])
        print(f"{name:40}{tok_s:>12.1f}{tok_s / reference:>12.3f}")
    if args.json:
        args.json.write_text(json.dumps({"settings": base, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
