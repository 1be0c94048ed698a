"""Request parsing: every rejection is an InvalidRequest naming the parameter."""

from __future__ import annotations

import json

import pytest

from serving.errors import InvalidRequest
from serving.openai_protocol import ChatCompletionRequest, CompletionRequest, parse_request


def parse(kind: type, **body: object) -> object:
    return parse_request(kind, json.dumps(body).encode())


def test_defaults_match_openai() -> None:
    request = parse(CompletionRequest, model="m", prompt="hi")
    assert request.max_tokens == 16 and request.n == 1 and not request.stream
    params = request.to_sampling_params(16)
    assert params.max_tokens == 16 and params.n == 1
    chat = parse(ChatCompletionRequest, model="m", messages=[{"role": "user", "content": "hi"}])
    assert chat.output_limit is None


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    chat = parse(ChatCompletionRequest, model="m", messages=[{"role": "user", "content": "x"}], max_tokens=5,
                 max_completion_tokens=9)
    assert chat.output_limit == 9


def test_content_parts_and_developer_role() -> None:
    chat = parse(ChatCompletionRequest, model="m", messages=[
        {"role": "developer", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
        {"role": "user", "content": "hi"},
    ])
    assert chat.rendered_messages() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def test_vllm_extras_reach_sampling_params() -> None:
    request = parse(CompletionRequest, model="m", prompt="x", top_k=3, min_tokens=2, ignore_eos=True,
                    repetition_penalty=1.2, seed=5, stop="\n")
    params = request.to_sampling_params(10)
    assert (params.top_k, params.min_tokens, params.ignore_eos, params.repetition_penalty, params.seed) == (
        3, 2, True, 1.2, 5)
    assert params.stop == ["\n"]


def test_integer_temperature_is_accepted() -> None:
    assert parse(CompletionRequest, model="m", prompt="x", temperature=1).temperature == 1.0


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "prompt": "x", "max_tokens": 1.5}, "max_tokens"),
        ({"model": "m", "prompt": "x", "seed": "1"}, "seed"),
        ({"model": "m", "prompt": "x", "stop": ""}, "stop"),
        ({"model": "m", "prompt": "x", "stream_options": {"include_usage": "yes"}}, "stream_options"),
        ({"model": "", "prompt": "x"}, "model"),
        ({"model": "m", "prompt": {"a": 1}}, "prompt"),
    ],
)
def test_rejections_name_the_parameter(body: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as error:
        parse_request(CompletionRequest, json.dumps(body).encode())
    assert error.value.param == param
    assert error.value.status == 400


@pytest.mark.parametrize(("field", "value"), [("echo", True), ("best_of", 3), ("suffix", "end")])
def test_unsupported_options_are_rejected_not_ignored(field: str, value: object) -> None:
    request = parse(CompletionRequest, model="m", prompt="x", **{field: value})
    with pytest.raises(InvalidRequest) as error:
        request.single_prompt()
    assert error.value.param == field


def test_single_prompt_forms() -> None:
    assert parse(CompletionRequest, model="m", prompt=["only"]).single_prompt() == "only"
    assert parse(CompletionRequest, model="m", prompt=[5, 6]).single_prompt() == [5, 6]
    assert parse(CompletionRequest, model="m", prompt=[[5, 6]]).single_prompt() == [5, 6]
