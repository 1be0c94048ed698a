"""The OpenAI-compatible HTTP API, driven with the official `openai` SDK against the real stack."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.launcher import GatewayProcess

BASE = "datanet-tiny-llama"
PROMPT = "The function returns a value when"


@pytest.fixture(scope="module")
def aclient(gateway: GatewayProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gateway.base_url}/v1", api_key=gateway.api_key, max_retries=0, timeout=300)


def greedy(client: openai.OpenAI, model: str, prompt: str = PROMPT, max_tokens: int = 12) -> str:
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0).choices[0].text


def stats(gateway: GatewayProcess) -> dict:
    return httpx.get(headers=gateway.headers, url=f"{gateway.base_url}/stats").json()


# ---- models ---------------------------------------------------------------------------------
def test_model_list_has_base_and_every_adapter_with_parent(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert BASE in models
    adapters = [m for name, m in models.items() if name.startswith("demo-adapter-")]
    assert len(adapters) >= 50
    assert all(m.model_extra["parent"] == BASE for m in adapters)
    assert models[BASE].model_extra["parent"] is None


def test_health(gateway: GatewayProcess) -> None:
    assert httpx.get(headers=gateway.headers, url=f"{gateway.base_url}/health").status_code == 200


# ---- generation -----------------------------------------------------------------------------
def test_completion_fills_usage_and_trace_header(client: openai.OpenAI) -> None:
    raw = client.completions.with_raw_response.create(model=BASE, prompt=PROMPT, max_tokens=8, temperature=0)
    completion = raw.parse()
    assert raw.headers["x-attribution-trace-id"] == completion.id
    assert completion.choices[0].text
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 8
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 8


def test_adapter_changes_greedy_output_and_is_deterministic(client: openai.OpenAI) -> None:
    base = greedy(client, BASE)
    adapted = greedy(client, "demo-adapter-001")
    assert adapted != base
    assert greedy(client, "demo-adapter-001") == adapted
    assert greedy(client, "demo-adapter-002") != adapted


def test_chat_completion_uses_chat_template(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model="demo-adapter-004", messages=[{"role": "user", "content": "What does a function return?"}],
        max_tokens=6, temperature=0,
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content
    # the prompt is the rendered template: role markers add tokens beyond the bare message
    plain = client.completions.create(model="demo-adapter-004", prompt="What does a function return?", max_tokens=1)
    assert chat.usage.prompt_tokens > plain.usage.prompt_tokens


def test_streaming_completion_matches_non_streaming(client: openai.OpenAI) -> None:
    expected = greedy(client, "demo-adapter-005", max_tokens=10)
    stream = client.completions.create(
        model="demo-adapter-005", prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected
    assert chunks[-1].usage.completion_tokens == 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_streaming_chat_has_role_then_content_then_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=BASE, messages=[{"role": "user", "content": "hello"}], max_tokens=5, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5


def test_streaming_without_usage_option_sends_no_usage_chunk(gateway: GatewayProcess) -> None:
    body = {"model": BASE, "prompt": PROMPT, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", headers=gateway.headers, url=f"{gateway.base_url}/v1/completions", json=body) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(line[6:]) for line in lines[:-1])


async def test_requests_spread_over_all_adapters(
    aclient: openai.AsyncOpenAI, client: openai.OpenAI, gateway: GatewayProcess
) -> None:
    names = [m.id for m in (await aclient.models.list()).data if m.id.startswith("demo-adapter-")]
    assert len(names) >= 50
    semaphore = asyncio.Semaphore(16)

    async def one(name: str) -> tuple[str, str]:
        async with semaphore:
            result = await aclient.completions.create(model=name, prompt=PROMPT, max_tokens=6, temperature=0)
            return name, result.choices[0].text

    results = dict(await asyncio.gather(*(one(n) for n in names)))
    assert set(results) == set(names)
    assert len(set(results.values())) > len(names) // 2, "adapters should give distinct greedy outputs"
    counters = stats(gateway)
    assert len(counters["adapters_loaded"]) <= 40, "the replica's adapter LRU holds at most its capacity"
    assert counters["adapter_evictions_total"] >= len(names) - 40
    # an evicted adapter is loaded again just in time and answers as before
    first = names[0]
    assert greedy(client, first, max_tokens=6) == results[first]


async def test_concurrent_streams_mixing_base_and_adapters(aclient: openai.AsyncOpenAI) -> None:
    async def one(i: int) -> int:
        model = BASE if i % 3 == 0 else f"demo-adapter-{i:03d}"
        stream = await aclient.completions.create(model=model, prompt=PROMPT, max_tokens=16, stream=True,
                                                  extra_body={"ignore_eos": True})
        return len([chunk async for chunk in stream if chunk.choices and chunk.choices[0].text])

    counts = await asyncio.gather(*(one(i) for i in range(24)))
    assert all(count >= 1 for count in counts)


# ---- sampling parameters --------------------------------------------------------------------
def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        return client.completions.create(model=BASE, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=seed,
                                         top_p=0.95).choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(s) for s in (1, 2, 3, 4)}) > 1


def test_n_returns_several_choices(client: openai.OpenAI) -> None:
    result = client.completions.create(model="demo-adapter-006", prompt=PROMPT, max_tokens=5, n=3, temperature=1.0,
                                       seed=3)
    assert sorted(c.index for c in result.choices) == [0, 1, 2]
    assert result.usage.completion_tokens == 15


def test_stop_sequence_ends_the_text(client: openai.OpenAI) -> None:
    full = greedy(client, BASE, max_tokens=20)
    word = full.split()[2]
    stopped = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=20, temperature=0, stop=[word])
    assert stopped.choices[0].finish_reason == "stop"
    assert word not in stopped.choices[0].text
    assert full.startswith(stopped.choices[0].text)


def test_vllm_extra_parameters_in_body(client: openai.OpenAI) -> None:
    result = client.completions.create(
        model=BASE, prompt=PROMPT, max_tokens=30, temperature=0.8, seed=1,
        extra_body={"ignore_eos": True, "min_tokens": 30, "top_k": 5, "repetition_penalty": 1.3},
    )
    assert result.usage.completion_tokens == 30
    plain = greedy(client, BASE, max_tokens=30)
    penalized = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=30, temperature=0,
                                          extra_body={"repetition_penalty": 2.0}).choices[0].text
    assert penalized != plain


def test_top_k_one_is_greedy(client: openai.OpenAI) -> None:
    sampled = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=11,
                                        extra_body={"top_k": 1})
    assert sampled.choices[0].text == greedy(client, BASE, max_tokens=10)


# ---- bad input ------------------------------------------------------------------------------
def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as error:
        client.completions.create(model="no-such-adapter", prompt=PROMPT, max_tokens=4)
    assert error.value.body["code"] == "model_not_found"
    assert error.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-adapter", messages=[{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": BASE, "prompt": PROMPT, "max_tokens": -5}, "max_tokens"),
        ({"model": BASE, "prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
        ({"model": BASE, "prompt": PROMPT, "max_tokens": 10**9}, "max_tokens"),
        ({"model": BASE, "prompt": PROMPT, "max_tokens": 5000}, "max_tokens"),
        ({"model": BASE, "prompt": PROMPT, "max_tokens": "ten"}, "max_tokens"),
        ({"model": BASE, "prompt": PROMPT, "temperature": 3.5}, "temperature"),
        ({"model": BASE, "prompt": PROMPT, "temperature": "hot"}, "temperature"),
        ({"model": BASE, "prompt": PROMPT, "top_p": 0}, "top_p"),
        ({"model": BASE, "prompt": PROMPT, "n": 0}, "n"),
        ({"model": BASE, "prompt": PROMPT, "n": 1000}, "n"),
        ({"model": BASE, "prompt": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": BASE, "prompt": PROMPT, "stream": "yes"}, "stream"),
        ({"model": BASE, "prompt": PROMPT, "logprobs": 3}, "logprobs"),
        ({"model": BASE, "prompt": PROMPT, "top_k": -7}, "top_k"),
        ({"model": BASE, "prompt": PROMPT, "repetition_penalty": 0}, "repetition_penalty"),
        ({"model": BASE, "prompt": PROMPT, "min_tokens": 50, "max_tokens": 5}, "min_tokens"),
        ({"model": BASE, "prompt": ["one", "two"]}, "prompt"),
        ({"model": BASE, "prompt": ""}, "prompt"),
        ({"model": BASE, "prompt": [1, 2, 10**7]}, "prompt"),
        ({"model": BASE}, "prompt"),
        ({"prompt": PROMPT}, "model"),
        ({"model": 42, "prompt": PROMPT}, "model"),
        ({"model": BASE, "prompt": "word " * 1100}, "prompt"),
    ],
)
def test_bad_completion_parameters_are_400_naming_the_field(gateway: GatewayProcess, body: dict, param: str) -> None:
    response = httpx.post(headers=gateway.headers, url=f"{gateway.base_url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": BASE, "messages": []}, "messages"),
        ({"model": BASE, "messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        ({"model": BASE, "messages": "hello"}, "messages"),
        ({"model": BASE, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1},
         "max_completion_tokens"),
        ({"model": BASE, "messages": [{"role": "user", "content": "word " * 1100}]}, "messages"),
    ],
)
def test_bad_chat_parameters_are_400_naming_the_field(gateway: GatewayProcess, body: dict, param: str) -> None:
    response = httpx.post(headers=gateway.headers, url=f"{gateway.base_url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b"\xff\xfe", b"null"])
def test_malformed_body_is_400(gateway: GatewayProcess, raw: bytes) -> None:
    for route in ("/v1/completions", "/v1/chat/completions"):
        response = httpx.post(f"{gateway.base_url}{route}", content=raw,
                              headers={**gateway.headers, "content-type": "application/json"})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["type"] == "invalid_request_error"


def test_sdk_sees_bad_request_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=BASE, prompt=PROMPT, max_tokens=-1)
    assert error.value.status_code == 400


def test_unknown_route_gets_openai_error_body(gateway: GatewayProcess) -> None:
    response = httpx.get(headers=gateway.headers, url=f"{gateway.base_url}/v1/nothing-here")
    assert response.status_code == 404
    assert "message" in response.json()["error"]


# ---- adapters: broken, missing, registered after start ---------------------------------------
def register(gateway: GatewayProcess, name: str, path: Path) -> subprocess.CompletedProcess:
    gateway_cli = Path(sys.executable).with_name("gateway")
    return subprocess.run(
        [str(gateway_cli), "--state-dir", str(gateway.state_dir), "adapter", "register", name, "--path", str(path),
         "--owner", "0x" + "ab" * 20],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "GATEWAY_LEDGER_PORT": gateway.env["GATEWAY_LEDGER_PORT"]},  # the admin check asks it
    )


def test_adapter_registered_after_start_is_served(gateway: GatewayProcess, client: openai.OpenAI,
                                                  scratch_adapter: Path) -> None:
    result = register(gateway, "late-adapter", scratch_adapter)
    assert result.returncode == 0, result.stderr
    deadline = time.monotonic() + 10
    while "late-adapter" not in {m.id for m in client.models.list().data}:
        assert time.monotonic() < deadline, "registered adapter never listed"
        time.sleep(0.5)
    # same weights as demo-adapter-000, so the same greedy text
    assert greedy(client, "late-adapter") == greedy(client, "demo-adapter-000")


def test_register_rejects_a_broken_adapter_and_keeps_the_store(gateway: GatewayProcess, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{oops")
    (broken / "adapter_model.safetensors").write_bytes(b"junk")
    result = register(gateway, "broken-one", broken)
    assert result.returncode == 2
    assert "not valid JSON" in result.stderr
    assert not (gateway.state_dir / "adapters" / "broken-one").exists()
    taken = register(gateway, "demo-adapter-010", broken)
    assert taken.returncode == 2 and "already exists" in taken.stderr
    assert (gateway.state_dir / "adapters" / "demo-adapter-010" / "adapter_model.safetensors").stat().st_size > 1000


@pytest.mark.parametrize(
    ("damage", "phrase"),
    [
        ("bad_json", "not valid JSON"),
        ("no_weights", "has no adapter_model.safetensors"),
        ("truncated_weights", "unreadable weights"),
        ("wrong_shape", "the base model needs"),
        ("rank_too_high", "max_lora_rank"),
        ("empty_dir", "has no adapter_config.json"),
    ],
)
def test_broken_adapter_gets_a_clear_error_and_the_replica_keeps_serving(
    gateway: GatewayProcess, client: openai.OpenAI, damage: str, phrase: str
) -> None:
    name = f"broken-{damage.replace('_', '-')}"
    target = gateway.state_dir / "adapters" / name
    shutil.copytree(gateway.state_dir / "adapters" / "demo-adapter-020", target)
    weights, config = target / "adapter_model.safetensors", target / "adapter_config.json"
    if damage == "bad_json":
        config.write_text("{this is not json")
    elif damage == "no_weights":
        weights.unlink()
    elif damage == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "wrong_shape":
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(weights))
        key = next(iter(tensors))
        tensors[key] = tensors[key][:, :7].contiguous()
        save_file(tensors, str(weights))
    elif damage == "rank_too_high":
        config.write_text(json.dumps({**json.loads(config.read_text()), "r": 512}))
    elif damage == "empty_dir":
        shutil.rmtree(target)
        target.mkdir()
    try:
        with pytest.raises(openai.UnprocessableEntityError) as error:
            client.completions.create(model=name, prompt=PROMPT, max_tokens=4)
        assert phrase in error.value.body["message"]
        assert error.value.body["code"] == "adapter_unavailable"
        assert greedy(client, "demo-adapter-020") == greedy(client, "demo-adapter-020")
        assert greedy(client, BASE)
    finally:
        shutil.rmtree(target, ignore_errors=True)


def test_adapter_removed_from_store_is_404(gateway: GatewayProcess, client: openai.OpenAI,
                                           scratch_adapter: Path) -> None:
    assert register(gateway, "short-lived", scratch_adapter).returncode == 0
    assert greedy(client, "short-lived")
    shutil.rmtree(gateway.state_dir / "adapters" / "short-lived")
    time.sleep(2.5)  # the store listing is cached for 2 s
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="short-lived", prompt=PROMPT, max_tokens=4)


# ---- disconnects ----------------------------------------------------------------------------
def test_client_disconnect_mid_stream_frees_the_engine_slot(gateway: GatewayProcess) -> None:
    body = {"model": "demo-adapter-030", "prompt": PROMPT, "max_tokens": 1000, "stream": True,
            "ignore_eos": True}
    # A small receive buffer makes the server wait for this slow reader, as a real one would. The tiny
    # model can still finish a stream before /stats is read; such a try shows nothing and is repeated.
    slow_reader = httpx.HTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)])
    seen_in_flight = False
    with httpx.Client(transport=slow_reader, timeout=60) as reader:
        for _ in range(5):
            with reader.stream("POST", headers=gateway.headers, url=f"{gateway.base_url}/v1/completions",
                               json=body) as response:
                lines = response.iter_lines()
                received = [next(lines) for _ in range(6)]
                assert any(line.startswith("data: ") for line in received)
                seen_in_flight = stats(gateway)["engine_unfinished_requests"] >= 1
            if seen_in_flight:
                break
    assert seen_in_flight, "no try caught its stream in the engine before reading /stats"
    deadline = time.monotonic() + 10
    while stats(gateway)["engine_unfinished_requests"] or stats(gateway)["ongoing_requests"]:
        assert time.monotonic() < deadline, "aborted stream still holds an engine slot"
        time.sleep(0.2)
