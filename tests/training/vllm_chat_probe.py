"""Load a base model checkpoint in the gateway's engine (vLLM, LoRA enabled) and answer one chat question.

Run as a script (vLLM starts its engine core in another process, so the work sits under the
``__main__`` guard): ``python vllm_chat_probe.py MODEL_DIR DTYPE MAX_TOKENS QUESTION``. Prints one
JSON line: the answer (greedy, chat template applied by the engine's tokenizer), the prompt's
token count, and the seconds spent loading and answering.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path


async def answer(model_dir: Path, dtype: str, max_tokens: int, question: str) -> dict[str, object]:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from gateway.config import GatewayConfig
    from serving.config import EngineConfig
    from serving.engine import Engine

    with tempfile.TemporaryDirectory(prefix="probe-state-") as state:
        (Path(state) / "adapters").mkdir()
        config = GatewayConfig(state_dir=Path(state), base_model_path=str(model_dir))
        engine_config = EngineConfig(dtype=dtype, max_model_len=512, max_num_seqs=4, max_loras=1, max_cpu_loras=1,
                                     kv_cache_gib=1)
        started = time.perf_counter()
        engine = Engine(config, engine_config, adapters_per_replica=1)
        loaded = time.perf_counter() - started
        try:
            prompt = engine.encode_chat([{"role": "user", "content": question}])
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, output_kind=RequestOutputKind.DELTA)
            started = time.perf_counter()
            text, tokens, finish = "", 0, None
            async for step in engine.generate(prompt, params, None, "probe-0"):
                text += step.deltas[0].text
                tokens += len(step.deltas[0].token_ids)
                finish = step.deltas[0].finish_reason
            answered = time.perf_counter() - started
        finally:
            engine.shutdown()
    return {"answer": text, "finish_reason": finish, "prompt_tokens": len(prompt), "output_tokens": tokens,
            "load_seconds": round(loaded, 2), "answer_seconds": round(answered, 3)}


if __name__ == "__main__":
    model, dtype, max_tokens, question = sys.argv[1:5]
    result = asyncio.run(answer(Path(model), dtype, int(max_tokens), question))
    print("PROBE " + json.dumps(result), flush=True)
