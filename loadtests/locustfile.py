"""Locust load test of a running Datanet Gateway: OpenAI HTTP (completions streamed and not, chat streamed)
and gRPC streaming.

Run against `make up` with `make loadtest` (headless, ramp shape, CSV + HTML reports), or by hand:

    .venv/bin/locust -f loadtests/locustfile.py --host http://127.0.0.1:8000            # web UI
    .venv/bin/locust -f loadtests/locustfile.py,loadtests/ramp_shape.py --headless      # the ramp

Users (weights below):

* `OpenAIStreamingUser`: streamed `/v1/completions` through the official `openai` SDK;
* `OpenAIUser`:          the same, not streamed;
* `OpenAIChatStreamingUser`: streamed `/v1/chat/completions` (the prompt as one user message);
* `GrpcStreamingUser`:   `gateway.inference.v1.Inference/GenerateStream`.

Entries in Locust's statistics (Type = the user's kind, Name = what is timed; see docs/load-testing.md):

* `<kind> request`: the whole request, from the call to the end of the stream (failures counted here);
* `<kind> TTFT`:    time to first token: from the call to the first chunk carrying text (streaming only);
* `<kind> ITL`:     inter-token latency: one entry per gap between successive chunks carrying text
                    (streaming only), so its percentiles are over all gaps of all requests and show
                    stalls; a request of n text chunks adds n - 1 entries.

with kinds `openai-stream`, `openai`, `openai-chat-stream` and `grpc-stream`. Locust rounds times to integer milliseconds
below 100 ms (2 significant digits above) before it computes percentiles.

Each request picks its model at random: with probability LOADTEST_BASE_MODEL_FRACTION the base model,
otherwise an adapter with Zipf popularity (the adapter of rank r is picked with weight 1 / r**s). The
adapters come from `GET {host}/v1/models` at the first user's start (entries whose `parent` is set),
ranked by name, unless LOADTEST_ADAPTERS lists them in rank order. Every user has its own seeded
random generator (LOADTEST_SEED + the user's number in this process).

Environment variables (all optional):

    LOADTEST_API_KEY               "unused"          sent as `Authorization: Bearer ...` (HTTP and gRPC)
    LOADTEST_GRPC_TARGET           127.0.0.1:9000    gRPC address of the gateway
    LOADTEST_MAX_TOKENS            32                max_tokens of every request
    LOADTEST_TEMPERATURE           0                 sampling temperature
    LOADTEST_IGNORE_EOS            1                 1: generate exactly max_tokens (steady work per request)
    LOADTEST_ZIPF_EXPONENT         1.0               s of the Zipf popularity over adapters (0: uniform)
    LOADTEST_BASE_MODEL_FRACTION   0.0               share of requests sent to the base model, in [0, 1]
    LOADTEST_ADAPTERS              (all registered)  comma-separated adapter names, most popular first
    LOADTEST_SEED                  0                 seed of the per-user random generators
    LOADTEST_THINK_SECONDS         0.5               each user waits uniformly 0..this between requests
    LOADTEST_TIMEOUT_SECONDS       120               per-request timeout (HTTP and gRPC)
    LOADTEST_WEIGHT_OPENAI_STREAM  1                 weight of OpenAIStreamingUser (0 leaves it out)
    LOADTEST_WEIGHT_OPENAI         1                 weight of OpenAIUser
    LOADTEST_WEIGHT_OPENAI_CHAT_STREAM 1             weight of OpenAIChatStreamingUser
    LOADTEST_WEIGHT_GRPC_STREAM    1                 weight of GrpcStreamingUser

The HTTP host is Locust's `--host` (default http://127.0.0.1:8000, `make up`'s address). The ramp
(LOADTEST_PEAK_USERS, ...) is in loadtests/ramp_shape.py.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# locust first: importing it monkey-patches the standard library with gevent, which gRPC's gevent mode expects
from locust import User, between, events, task
from locust.env import Environment
from locust.exception import StopUser

import grpc
import grpc.experimental.gevent

grpc.experimental.gevent.init_gevent()  # before any channel: gRPC's I/O must yield to gevent, not block

import httpx  # noqa: E402
import openai  # noqa: E402

from wire.inference.v1 import inference_pb2 as pb, inference_pb2_grpc as pb_grpc  # noqa: E402

log = logging.getLogger("loadtest")
for _chatty in ("httpx", "httpx2"):  # the openai SDK's HTTP clients log every request at INFO
    logging.getLogger(_chatty).setLevel(logging.WARNING)

DEFAULT_HOST = "http://127.0.0.1:8000"
PROMPTS = (
    "A list keeps its items in the order you add them, and",
    "The quick brown fox",
    "Once upon a time",
    "In Python, a dictionary maps",
    "Open science means that",
    "The gateway serves many adapters on",
    "Tell me about the weather in",
    "def fibonacci(n):",
)
# Entry names (Locust's "Name" column); the "Type" column is the user's kind.
REQUEST, TTFT, ITL = "request", "TTFT", "ITL"


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


def env_number(name: str, default: float, kind: Callable[[str], float], low: float,
               high: float = float("inf")) -> Any:
    raw = env_str(name, "")
    try:
        value = kind(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
    if not low <= value <= high:
        raise ValueError(f"{name}={value} is outside [{low}, {high}]")
    return value


@dataclass(frozen=True)
class Settings:
    """The run's configuration, read once from LOADTEST_* variables (see the module docstring)."""

    api_key: str
    grpc_target: str
    max_tokens: int
    temperature: float
    ignore_eos: bool
    zipf_exponent: float
    base_model_fraction: float
    adapters: tuple[str, ...]
    seed: int
    think_seconds: float
    timeout_seconds: float
    weight_openai_stream: int
    weight_openai: int
    weight_openai_chat_stream: int
    weight_grpc_stream: int

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(
            api_key=env_str("LOADTEST_API_KEY", "unused"),
            grpc_target=env_str("LOADTEST_GRPC_TARGET", "127.0.0.1:9000"),
            max_tokens=env_number("LOADTEST_MAX_TOKENS", 32, int, 1),
            temperature=env_number("LOADTEST_TEMPERATURE", 0.0, float, 0.0, 2.0),
            ignore_eos=env_number("LOADTEST_IGNORE_EOS", 1, int, 0, 1) == 1,
            zipf_exponent=env_number("LOADTEST_ZIPF_EXPONENT", 1.0, float, 0.0),
            base_model_fraction=env_number("LOADTEST_BASE_MODEL_FRACTION", 0.0, float, 0.0, 1.0),
            adapters=tuple(name.strip() for name in env_str("LOADTEST_ADAPTERS", "").split(",") if name.strip()),
            seed=env_number("LOADTEST_SEED", 0, int, 0),
            think_seconds=env_number("LOADTEST_THINK_SECONDS", 0.5, float, 0.0),
            timeout_seconds=env_number("LOADTEST_TIMEOUT_SECONDS", 120.0, float, 0.001),
            weight_openai_stream=env_number("LOADTEST_WEIGHT_OPENAI_STREAM", 1, int, 0),
            weight_openai=env_number("LOADTEST_WEIGHT_OPENAI", 1, int, 0),
            weight_openai_chat_stream=env_number("LOADTEST_WEIGHT_OPENAI_CHAT_STREAM", 1, int, 0),
            weight_grpc_stream=env_number("LOADTEST_WEIGHT_GRPC_STREAM", 1, int, 0),
        )


SETTINGS = Settings.from_env()


class EmptyStream(Exception):
    """The stream ended without any text."""


class IncompleteStream(Exception):
    """The stream ended without a final message (no finish reason), or the server aborted it."""


class GrpcError(Exception):
    """A failed RPC, named by its status code and details (`grpc.RpcError`'s own text varies per call)."""

    @classmethod
    def of(cls, error: grpc.RpcError) -> "GrpcError":
        if isinstance(error, grpc.Call):
            return cls(f"{error.code().name}: {error.details()}")
        return cls(str(error))


# --- models and their popularity ------------------------------------------------------------------

@dataclass(frozen=True)
class Catalogue:
    """The base model and the adapters in popularity rank order (rank 1 first)."""

    base: str
    adapters: tuple[str, ...]


class ModelPicker:
    """Per-user seeded choice: the base model with `base_fraction`, else a Zipf(`exponent`) adapter."""

    def __init__(self, catalogue: Catalogue, exponent: float, base_fraction: float, seed: int) -> None:
        self.catalogue = catalogue
        self.base_fraction = base_fraction if catalogue.adapters else 1.0
        self.rng = random.Random(seed)
        self.cum_weights = list(itertools.accumulate(1.0 / rank**exponent
                                                     for rank in range(1, len(catalogue.adapters) + 1)))

    def pick(self) -> str:
        if self.rng.random() < self.base_fraction:
            return self.catalogue.base
        return self.rng.choices(self.catalogue.adapters, cum_weights=self.cum_weights)[0]


def fetch_catalogue(host: str, settings: Settings) -> Catalogue:
    """`GET {host}/v1/models`: the entry without a parent is the base model, the others are adapters."""
    response = httpx.get(f"{host.rstrip('/')}/v1/models", timeout=settings.timeout_seconds,
                         headers={"Authorization": f"Bearer {settings.api_key}"})
    response.raise_for_status()
    entries = response.json()["data"]
    bases = [entry["id"] for entry in entries if not entry.get("parent")]
    if len(bases) != 1:
        raise ValueError(f"expected exactly one base model (parent null) in /v1/models, got {bases}")
    registered = sorted(entry["id"] for entry in entries if entry.get("parent"))
    unknown = sorted(set(settings.adapters) - set(registered))
    if unknown:
        raise ValueError(f"LOADTEST_ADAPTERS names adapters the gateway does not list: {unknown}")
    return Catalogue(base=bases[0], adapters=settings.adapters or tuple(registered))


_catalogues: dict[str, Catalogue] = {}
_catalogues_lock = threading.Lock()  # gevent-patched: users starting together fetch once


def catalogue_for(host: str) -> Catalogue:
    with _catalogues_lock:
        if host not in _catalogues:
            catalogue = fetch_catalogue(host, SETTINGS)
            log.info("models at %s: base %s, %d adapters (Zipf s=%g, base fraction %g)", host, catalogue.base,
                     len(catalogue.adapters), SETTINGS.zipf_exponent, SETTINGS.base_model_fraction)
            _catalogues[host] = catalogue
        return _catalogues[host]


@events.test_start.add_listener
def fetch_models_at_start(environment: Environment, **_: Any) -> None:
    """Fetch the models once when the test starts, so a wrong host shows up before any user runs."""
    try:
        catalogue_for(environment.host or DEFAULT_HOST)
    except Exception:  # the users retry and report the failure as an entry
        log.exception("could not list the models at %s", environment.host or DEFAULT_HOST)


# --- timing ---------------------------------------------------------------------------------------

class StreamTimer:
    """Times one streamed request: a TTFT entry, one ITL entry per gap, then the request entry."""

    def __init__(self, environment: Environment, kind: str) -> None:
        self.environment = environment
        self.kind = kind
        self.start = time.perf_counter()
        self.last: float | None = None
        self.text_chunks = 0
        self.text_length = 0

    def fire(self, name: str, seconds: float, length: int = 0, exception: BaseException | None = None) -> None:
        self.environment.events.request.fire(request_type=self.kind, name=name, response_time=seconds * 1000.0,
                                             response_length=length, exception=exception, context={})

    def text(self, text: str) -> None:
        """A chunk arrived; only chunks carrying text count as tokens for TTFT and ITL."""
        if not text:
            return
        now = time.perf_counter()
        if self.last is None:
            self.fire(TTFT, now - self.start)
        else:
            self.fire(ITL, now - self.last)
        self.last = now
        self.text_chunks += 1
        self.text_length += len(text)

    def done(self, exception: BaseException | None = None) -> None:
        if exception is None and self.text_chunks == 0:
            exception = EmptyStream("the stream ended without text")
        self.fire(REQUEST, time.perf_counter() - self.start, self.text_length, exception)


# --- users ----------------------------------------------------------------------------------------

_user_numbers = itertools.count()


class GatewayUser(User):
    """What every user shares: the host, the think time, a seeded model picker and prompt choice."""

    abstract = True
    host = DEFAULT_HOST
    wait_time = between(0.0, SETTINGS.think_seconds)

    def on_start(self) -> None:
        try:
            catalogue = catalogue_for(self.host or DEFAULT_HOST)
        except Exception as exc:
            self.environment.events.request.fire(request_type="setup", name="GET /v1/models", response_time=0.0,
                                                 response_length=0, exception=exc, context={})
            raise StopUser(f"{type(self).__name__} cannot start: {exc}") from exc
        seed = SETTINGS.seed + next(_user_numbers)
        self.models = ModelPicker(catalogue, SETTINGS.zipf_exponent, SETTINGS.base_model_fraction, seed)
        self.prompts = random.Random(seed)

    def next_request(self) -> tuple[str, str]:
        return self.models.pick(), self.prompts.choice(PROMPTS)


def finished(finish_reason: str | None) -> None:
    """Raise unless the stream ended with a final message (a finish reason other than `abort`)."""
    if finish_reason is None or finish_reason == "abort":
        raise IncompleteStream(f"the stream ended with finish_reason {finish_reason}")


class OpenAIUserBase(GatewayUser):
    abstract = True

    def on_start(self) -> None:
        super().on_start()
        self.client = openai.OpenAI(base_url=f"{self.host.rstrip('/')}/v1", api_key=SETTINGS.api_key,
                                    max_retries=0, timeout=SETTINGS.timeout_seconds)

    def on_stop(self) -> None:
        if hasattr(self, "client"):
            self.client.close()

    def completion_args(self) -> dict[str, Any]:
        model, prompt = self.next_request()
        return {"model": model, "prompt": prompt, "max_tokens": SETTINGS.max_tokens,
                "temperature": SETTINGS.temperature, "extra_body": {"ignore_eos": SETTINGS.ignore_eos}}

    def timed_stream(self, open_stream: Callable[[], Any], text_of: Callable[[Any], str]) -> None:
        """One streamed request through the SDK: TTFT and ITL from the text of its chunks' choices,
        then the request entry (failed on an error or a stream without a final finish reason)."""
        timer = StreamTimer(self.environment, self.kind)
        try:
            finish_reason = None
            with open_stream() as stream:
                for chunk in stream:
                    for choice in chunk.choices:
                        timer.text(text_of(choice))
                        finish_reason = choice.finish_reason or finish_reason
            finished(finish_reason)
        except Exception as exc:
            timer.done(exc)
        else:
            timer.done()


class OpenAIStreamingUser(OpenAIUserBase):
    """Streamed `/v1/completions`: entries `openai-stream` request, TTFT and ITL."""

    weight = SETTINGS.weight_openai_stream
    kind = "openai-stream"

    @task
    def stream_completion(self) -> None:
        self.timed_stream(lambda: self.client.completions.create(stream=True, **self.completion_args()),
                          lambda choice: choice.text)


class OpenAIChatStreamingUser(OpenAIUserBase):
    """Streamed `/v1/chat/completions`: entries `openai-chat-stream` request, TTFT and ITL."""

    weight = SETTINGS.weight_openai_chat_stream
    kind = "openai-chat-stream"

    def chat_args(self) -> dict[str, Any]:
        args = self.completion_args()
        args["messages"] = [{"role": "user", "content": args.pop("prompt")}]
        return args

    @task
    def stream_chat(self) -> None:
        self.timed_stream(lambda: self.client.chat.completions.create(stream=True, **self.chat_args()),
                          lambda choice: choice.delta.content or "")


class OpenAIUser(OpenAIUserBase):
    """Non-streamed `/v1/completions`: entry `openai` request."""

    weight = SETTINGS.weight_openai
    kind = "openai"

    @task
    def completion(self) -> None:
        start = time.perf_counter()
        length, exception = 0, None
        try:
            completion = self.client.completions.create(**self.completion_args())
            length = sum(len(choice.text) for choice in completion.choices)
            if length == 0:
                raise EmptyStream("the completion has no text")
        except Exception as exc:
            exception = exc
        self.environment.events.request.fire(request_type=self.kind, name=REQUEST,
                                             response_time=(time.perf_counter() - start) * 1000.0,
                                             response_length=length, exception=exception, context={})


class GrpcStreamingUser(GatewayUser):
    """gRPC `Inference/GenerateStream` on LOADTEST_GRPC_TARGET: entries `grpc-stream` request, TTFT and ITL."""

    weight = SETTINGS.weight_grpc_stream
    kind = "grpc-stream"

    def on_start(self) -> None:
        super().on_start()
        self.channel = grpc.insecure_channel(SETTINGS.grpc_target)
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {SETTINGS.api_key}"),)

    def on_stop(self) -> None:
        if hasattr(self, "channel"):
            self.channel.close()

    @task
    def generate_stream(self) -> None:
        model, prompt = self.next_request()
        request = pb.GenerateRequest(model=model, prompt=prompt, max_tokens=SETTINGS.max_tokens,
                                     temperature=SETTINGS.temperature, ignore_eos=SETTINGS.ignore_eos)
        timer = StreamTimer(self.environment, self.kind)
        try:
            finish_reason = pb.FINISH_REASON_UNSPECIFIED
            for response in self.stub.GenerateStream(request, timeout=SETTINGS.timeout_seconds,
                                                     metadata=self.metadata):
                timer.text(response.text)
                finish_reason = response.finish_reason or finish_reason
            if finish_reason in (pb.FINISH_REASON_UNSPECIFIED, pb.FINISH_REASON_ABORT):
                raise IncompleteStream(f"the stream ended with {pb.FinishReason.Name(finish_reason)}")
        except grpc.RpcError as exc:
            timer.done(GrpcError.of(exc))
        except Exception as exc:
            timer.done(exc)
        else:
            timer.done()
