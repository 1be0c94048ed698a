"""Wire models of the OpenAI-compatible API. Requests validate themselves and convert to vLLM
sampling parameters; every rejection names the offending parameter."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serving.errors import InvalidRequest

MAX_N = 16
MAX_STOP_SEQUENCES = 4
MAX_TOKENS_LIMIT = 1_000_000


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Parameters common to completions and chat completions (OpenAI's and vLLM's extras)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logprobs: Any = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extra sampling parameters
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=MAX_TOKENS_LIMIT)
    # Datanet Gateway: return the per-token attribution summary with the response
    attribution: bool = False

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if isinstance(value, list) and any(not s for s in value) or value == "":
            raise ValueError("stop sequences must not be empty")
        return value

    def reject_unsupported(self) -> None:
        if self.logprobs not in (None, False, 0):
            raise InvalidRequest("logprobs are not supported by this gateway", param="logprobs")
        if self.logit_bias:
            raise InvalidRequest("logit_bias is not supported by this gateway", param="logit_bias")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def to_sampling_params(self, max_tokens: int) -> Any:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import RequestOutputKind

        if self.min_tokens > max_tokens:
            raise InvalidRequest(f"min_tokens ({self.min_tokens}) exceeds max_tokens ({max_tokens})", param="min_tokens")
        options: dict[str, Any] = {
            "n": self.n,
            "max_tokens": max_tokens,
            "min_tokens": self.min_tokens,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "ignore_eos": self.ignore_eos,
            "seed": self.seed,
            "stop": self.stop,
            "output_kind": RequestOutputKind.DELTA,
        }
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None:
                options[name] = value
        try:
            return SamplingParams(**options)
        except VLLMValidationError as exc:
            raise InvalidRequest(str(exc), param=exc.parameter) from None
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None


class CompletionRequest(SamplingFields):
    prompt: str | list[Annotated[int, Field(ge=0)]] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1, le=MAX_TOKENS_LIMIT)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def single_prompt(self) -> str | list[int]:
        """This gateway serves one prompt per request; batched prompts are rejected clearly."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise InvalidRequest("send one prompt per request (batched prompts are not supported)", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        if self.echo:
            raise InvalidRequest("echo is not supported by this gateway", param="echo")
        if self.best_of not in (None, 1):
            raise InvalidRequest("best_of is not supported by this gateway", param="best_of")
        if self.suffix:
            raise InvalidRequest("suffix is not supported by this gateway", param="suffix")
        return prompt


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def rendered_messages(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


def parse_request(model: type[SamplingFields], body: bytes) -> Any:
    """Validate a JSON body into `model`; any problem becomes a 400 naming the parameter."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            raise InvalidRequest(f"request body is not valid JSON: {first['msg']}") from None
        if first["type"] == "model_type":
            raise InvalidRequest("request body must be a JSON object") from None
        loc = [str(part) for part in first["loc"]]
        param = loc[0] if loc else None
        path = ".".join(loc)
        problem = first["msg"]
        if first["type"] == "missing":
            problem = "this parameter is required"
        raise InvalidRequest(f"'{path}': {problem}", param=param) from None
