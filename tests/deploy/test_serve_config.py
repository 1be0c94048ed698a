"""The Serve configs of deploy/ (the file and the RayService's embedded one) are valid for Ray's own schema,
and their application builds through Ray's own builder call from typed, checked args."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from pydantic import ValidationError
from ray._common.utils import import_attr
from ray.serve import Application
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve.config import ProxyLocation
from ray.serve.schema import ServeDeploySchema

from serving.serve_app import IMPORT_PATH, GatewayAppArgs, app_builder
from tests.deploy.manifests import SERVE_CONFIG, documents, serve_configs

CONFIGS = serve_configs()


def test_deploy_holds_the_serve_config_file_and_the_rayservice_embedded_one() -> None:
    assert SERVE_CONFIG.name in CONFIGS
    assert any(name.startswith("rayservice.yaml:") for name in CONFIGS), sorted(CONFIGS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_each_serve_config_validates_with_rays_schema_and_builds_through_rays_builder_call(name: str) -> None:
    schema = ServeDeploySchema.model_validate(CONFIGS[name])
    assert [app.import_path for app in schema.applications] == [IMPORT_PATH]
    app = schema.applications[0]
    builder = import_attr(app.import_path)
    assert builder is app_builder
    # Serve hands the builder a validated model only when the annotation is the class itself
    (parameter,) = inspect.signature(builder).parameters.values()
    assert parameter.annotation is GatewayAppArgs
    args = GatewayAppArgs.model_validate(app.args)
    built = call_user_app_builder_with_args_if_necessary(builder, app.args)
    assert isinstance(built, Application)
    engine = _engine_deployment(built)
    assert engine.ray_actor_options["num_gpus"] == args.replica.num_gpus
    assert engine.ray_actor_options.get("resources", {}) == args.replica.resources
    # one replica answers HTTP itself (Serve's proxy off); several sit behind Serve's proxy on the HTTP port
    if args.replica.serves_http_in_replica:
        assert schema.proxy_location == ProxyLocation.Disabled
        assert built._bound_deployment.name == "engine"
    else:
        assert schema.proxy_location != ProxyLocation.Disabled
        assert schema.http_options.port == args.serving.http_port
        assert built._bound_deployment.name == "ingress"


def test_the_serve_config_file_runs_one_replica_on_loopback_with_the_token_by_reference() -> None:
    app = documents(SERVE_CONFIG)[0]["applications"][0]
    args = GatewayAppArgs.model_validate(app["args"])
    assert args.serving.host == "127.0.0.1" and args.ledger.target.startswith("127.0.0.1:")
    assert ServeDeploySchema.model_validate(documents(SERVE_CONFIG)[0]).http_options.host == "127.0.0.1"
    assert args.replica.serves_http_in_replica
    assert args.ledger.token_file is not None and "token" not in app["args"]["ledger"]


def _engine_deployment(app: Application) -> Any:
    """The `engine` deployment of a built application (the root, or bound into the ingress)."""
    root = app._bound_deployment
    if root.name == "engine":
        return root
    return next(arg._bound_deployment for arg in root.init_args if isinstance(arg, Application))


@pytest.mark.parametrize(("section", "bad", "refusal"), [
    ("engine", {"max_lora": 4}, "max_lora is not a setting of EngineConfig"),
    ("serving", {"http_prot": 8001}, "http_prot is not a setting of ServingConfig"),
    ("replica", {"num_gpus": -1}, "greater than or equal to 0"),
    ("engine", {"max_loras": 64, "max_cpu_loras": 8}, "max_cpu_loras must be >= max_loras"),
    ("ledger", {"token": "inline-token-0123456789"}, "never holds the ledger token"),
    ("ingress", {}, "Extra inputs are not permitted"),
])
def test_rays_builder_call_refuses_args_no_setting_allows(section: str, bad: dict[str, Any], refusal: str) -> None:
    args = {**documents(SERVE_CONFIG)[0]["applications"][0]["args"], section: bad}
    with pytest.raises(ValidationError, match=refusal):
        call_user_app_builder_with_args_if_necessary(app_builder, args)


def test_args_left_out_come_from_the_environment_and_written_ones_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ENGINE_MAX_MODEL_LEN", "512")
    monkeypatch.setenv("GATEWAY_HTTP_PORT", "8123")
    args = GatewayAppArgs.model_validate({"serving": {"http_port": 8001}})
    assert (args.engine.max_model_len, args.serving.http_port) == (512, 8001)
