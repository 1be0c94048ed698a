"""The engine: one vLLM AsyncLLM with LoRA enabled, plus the adapter cache that feeds it.

`Engine` is what every front door (HTTP, gRPC) talks to. It tokenizes, resolves the model name to
the base model or an adapter, and streams delta outputs; a consumer that stops iterating (client
gone, deadline passed) aborts the request so its engine slot is freed.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.adapter_cache import AdapterCache, ResolvedAdapter
from serving.adapter_store import AdapterStore, BaseModelShape, check_adapter_dir
from serving.config import EngineConfig, ServingConfig
from serving.errors import EngineUnavailable, InvalidRequest, ModelNotFound
from serving.metrics import adapter_metrics
from serving.precision import resolve_precision

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelCard:
    id: str
    parent: str | None


@dataclass(frozen=True)
class Delta:
    """New output of one completion choice since the previous step."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None


@dataclass(frozen=True)
class StepOutput:
    """One engine step of one request: deltas per choice and the running token counts."""

    deltas: list[Delta]
    prompt_tokens: int
    finished: bool


class StoreSource:
    """Binds the store to the base model's shape and the engine's rank limit (AdapterSource)."""

    def __init__(self, store: AdapterStore, base: BaseModelShape, max_rank: int) -> None:
        self.store, self.base, self.max_rank = store, base, max_rank

    def has(self, name: str) -> bool:
        return self.store.has(name)

    def local_path(self, name: str) -> Path:
        return self.store.local_path(name)

    def check(self, path: Path) -> None:
        check_adapter_dir(path, self.base, self.max_rank)

    def forget_local_copy(self, name: str) -> None:
        self.store.forget_local_copy(name)


def engine_args(config: ServingConfig, engine: EngineConfig) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(engine.kv_cache_gib))
    precision = resolve_precision(engine.dtype)
    log.info("engine precision: %s", precision.reason)
    return AsyncEngineArgs(
        model=str(config.model_path),
        served_model_name=config.served_model_name,
        enable_lora=True,
        max_loras=engine.max_loras,
        max_cpu_loras=engine.max_cpu_loras,
        max_lora_rank=engine.max_lora_rank,
        max_model_len=engine.max_model_len,
        max_num_seqs=engine.max_num_seqs,
        enforce_eager=engine.enforce_eager,
        seed=engine.seed,
        dtype=precision.dtype,
        disable_log_stats=True,
    )


class Engine:
    """vLLM AsyncLLM + tokenizer + adapter cache, shared by every front door of one replica."""

    def __init__(self, config: ServingConfig, engine: EngineConfig, adapters_per_replica: int) -> None:
        from transformers import AutoTokenizer
        from vllm.v1.engine.async_llm import AsyncLLM

        self.config = config
        self.engine_config = engine
        self.base_model = config.served_model_name
        self.max_model_len = engine.max_model_len
        self.tokenizer = AutoTokenizer.from_pretrained(str(config.model_path))
        self.store = AdapterStore(config.store_url, config.cache_dir)
        source = StoreSource(self.store, BaseModelShape.from_model_dir(config.model_path), engine.max_lora_rank)
        self.adapters = AdapterCache(source, adapters_per_replica, self._unload, adapter_metrics())
        # vLLM's Prometheus metrics (`vllm:*`) join ours in this process's registry; its periodic
        # stats log line stays off.
        from vllm.v1.metrics.loggers import PrometheusStatLogger

        self.llm = AsyncLLM.from_engine_args(engine_args(config, engine), stat_loggers=[PrometheusStatLogger])

    async def _unload(self, adapter: ResolvedAdapter) -> None:
        await self.llm.remove_lora(adapter.lora_id)

    # ---- models -------------------------------------------------------------------------
    def models(self) -> list[ModelCard]:
        return [ModelCard(self.base_model, None)] + [ModelCard(n, self.base_model) for n in self.store.names()]

    def is_known(self, model: str) -> bool:
        return model == self.base_model or self.store.has(model)

    async def lora_request(self, model: str) -> Any:
        """None for the base model, a LoRARequest for an adapter; ModelNotFound otherwise."""
        from vllm.lora.request import LoRARequest

        if model == self.base_model:
            return None
        if not self.store.has(model):
            raise ModelNotFound(model)
        adapter = await self.adapters.get(model)
        return LoRARequest(adapter.name, adapter.lora_id, str(adapter.path))

    # ---- tokens -------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        vocab = len(self.tokenizer)
        if any(not 0 <= t < vocab for t in prompt):
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab})", param="prompt")
        return list(prompt)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def check_length(self, prompt_ids: list[int], max_tokens: int | None, prompt_param: str) -> int:
        """The max_tokens to use; InvalidRequest if prompt + output cannot fit the context."""
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise InvalidRequest(
                f"This model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{len(prompt_ids)} tokens. Shorten the prompt.",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise InvalidRequest(
                f"max_tokens is {max_tokens}, but the prompt has {len(prompt_ids)} tokens and this model's "
                f"maximum context length is {self.max_model_len}: at most {room} tokens can be generated.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return max_tokens

    # ---- generation ---------------------------------------------------------------------
    async def generate(
        self, prompt_ids: list[int], params: Any, lora: Any, request_id: str
    ) -> AsyncIterator[StepOutput]:
        """Stream deltas; stopping iteration early aborts the request in the engine."""
        from vllm.v1.engine.exceptions import EngineDeadError

        if self.llm.errored:
            raise EngineUnavailable("the engine is restarting; retry shortly")
        finished = False
        try:
            stream = self.llm.generate({"prompt_token_ids": prompt_ids}, params, request_id, lora_request=lora)
            async for out in stream:
                finished = out.finished
                yield StepOutput(
                    deltas=[
                        Delta(c.index, c.text, list(c.token_ids), c.finish_reason, c.stop_reason)
                        for c in out.outputs
                    ],
                    prompt_tokens=len(prompt_ids),
                    finished=out.finished,
                )
        except EngineDeadError:
            raise EngineUnavailable("the engine stopped; the replica is being restarted") from None
        finally:
            if not finished:
                await asyncio.shield(self.llm.abort(request_id))

    def unfinished_requests(self) -> int:
        return self.llm.output_processor.get_num_unfinished_requests()

    async def check_health(self) -> None:
        if self.llm.errored:
            raise RuntimeError("vLLM engine is dead")
        await self.llm.check_health()

    def shutdown(self) -> None:
        self.llm.shutdown()
