"""The deployment artifacts of deploy/, checked as far as a machine without Kubernetes allows: they parse,
the objects the deployment needs are there and agree with each other (placement, addresses, mounted
paths), every GATEWAY_* name they use is a setting of the project, and secrets appear only by reference.
(The embedded Serve config is checked with Ray's schema in test_serve_config.py.)"""

from __future__ import annotations

import json
import re
from importlib.metadata import version
from typing import Any

import yaml

from serving.serve_app import GatewayAppArgs, app_builder
from tests.deploy.manifests import (DEPLOY, GATEWAY_NAME, ROOT, kubernetes_objects, serve_configs,
                                    setting_env_names, walk, yaml_files)

OBJECTS = list(kubernetes_objects())
DOCS = ROOT / "docs" / "deployment.md"


def named(kind: str, name: str) -> dict[str, Any]:
    matches = [doc for _, doc in OBJECTS if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def rayservice() -> tuple[dict[str, Any], GatewayAppArgs, dict[str, Any]]:
    """The RayService, its application's validated args and the application's config."""
    service = named("RayService", "gateway")
    app = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    return service, GatewayAppArgs.model_validate(app["args"]), app


def ray_resources(start_params: dict[str, str]) -> dict[str, float]:
    """Custom resources of a KubeRay group: rayStartParams.resources, KubeRay's quoted JSON string."""
    raw = start_params.get("resources")
    return json.loads(json.loads(raw)) if raw else {}


def pod_specs() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(owner, pod template metadata, pod spec) of every workload, the Ray groups included."""
    pods = []
    for _, doc in OBJECTS:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            pods.append((doc["metadata"]["name"], doc["spec"]["template"]["metadata"], doc["spec"]["template"]["spec"]))
        elif doc["kind"] == "RayService":
            cluster = doc["spec"]["rayClusterConfig"]
            for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
                template = group["template"]
                pods.append((group.get("groupName", "head"), template["metadata"], template["spec"]))
    return pods


def test_every_yaml_file_parses_and_every_object_is_named() -> None:
    assert [path.relative_to(DEPLOY).as_posix() for path in yaml_files()] == [
        "kuberay/rayservice.yaml", "kubernetes/chain-rpc.yaml", "kubernetes/ledger.yaml", "kubernetes/postgres.yaml",
        "serve-config.yaml"]
    for path, doc in OBJECTS:
        assert doc.get("apiVersion") and doc["metadata"].get("name"), f"{path}: {doc.get('kind')} unnamed"
    kinds = {(doc["kind"], doc["metadata"]["name"]) for _, doc in OBJECTS}
    assert {("RayService", "gateway"), ("Deployment", "gateway-ledger"), ("Service", "gateway-ledger"),
            ("StatefulSet", "gateway-postgres"), ("Service", "gateway-postgres"),
            ("Deployment", "gateway-chain-rpc"), ("Service", "gateway-chain-rpc")} <= kinds


def test_the_head_has_no_accelerator_and_the_engine_goes_where_gpus_and_its_resource_are() -> None:
    service, args, app = rayservice()
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == version("ray"), "the cluster runs the Ray the project pins"
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus") == "0"
    for container in head["template"]["spec"]["containers"]:
        for amounts in container.get("resources", {}).values():
            assert not any("gpu" in name for name in amounts), container["name"]
    gpu_groups = [group for group in cluster["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                         for c in group["template"]["spec"]["containers"])]
    assert len(gpu_groups) == 1
    (group,) = gpu_groups
    limit = max(c["resources"]["limits"]["nvidia.com/gpu"] for c in group["template"]["spec"]["containers"])
    assert 0 < args.replica.num_gpus <= limit
    assert args.replica.resources, "the engine asks for the GPU group's own resource"
    offered, on_head = ray_resources(group["rayStartParams"]), ray_resources(head["rayStartParams"])
    for name, amount in args.replica.resources.items():
        assert offered.get(name, 0) >= amount and name not in on_head
    # each deployment override names a deployment the builder makes, and its resources are offered somewhere
    built = {deployment.name for deployment in _deployments(app_builder(args))}
    for override in app.get("deployments", []):
        assert override["name"] in built, (override["name"], built)
        offered_anywhere = [on_head, *(ray_resources(g["rayStartParams"]) for g in cluster["workerGroupSpecs"])]
        for name in override.get("ray_actor_options", {}).get("resources", {}):
            assert any(name in group for group in offered_anywhere), (override["name"], name)


def _deployments(app: Any) -> list[Any]:
    found, pending = [], [app]
    while pending:
        deployment = pending.pop()._bound_deployment
        found.append(deployment)
        pending.extend(arg for arg in deployment.init_args if type(arg).__name__ == "Application")
    return found


def test_addresses_and_mounted_paths_agree_between_the_serve_config_and_the_other_objects() -> None:
    service, args, _ = rayservice()
    host, port = args.ledger.target.rsplit(":", 1)
    ledger_service = named("Service", host)
    assert int(port) in [p["port"] for p in ledger_service["spec"]["ports"]]
    ledger_env = {e["name"]: e for c in named("Deployment", "gateway-ledger")["spec"]["template"]["spec"]["containers"]
                  for e in c["env"]}
    assert ledger_env["GATEWAY_LEDGER_PORT"]["value"] == port
    assert ledger_env["GATEWAY_LEDGER_TOKEN_FILE"]["value"] == str(args.ledger.token_file)
    assert re.search(r"@gateway-postgres:5432/", ledger_env["DATABASE_URL"]["value"])
    assert named("Service", "gateway-postgres") and ledger_env["GATEWAY_CHAIN_RPC_URL"]["value"].startswith(
        "http://gateway-chain-rpc:")
    assert named("Service", "gateway-chain-rpc")
    # every Ray pod (engine replicas run on the workers) mounts the token file the args name
    cluster = service["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        spec = group["template"]["spec"]
        assert any(args.ledger.token_file.is_relative_to(mount["mountPath"])
                   for c in spec["containers"] for mount in c.get("volumeMounts", [])), group.get("groupName", "head")


def test_every_service_selects_the_pods_of_a_workload_in_deploy() -> None:
    labels = [metadata.get("labels", {}) for _, metadata, _ in pod_specs()]
    for _, doc in OBJECTS:
        if doc["kind"] == "Service":
            selector = doc["spec"]["selector"]
            assert any(selector.items() <= pod.items() for pod in labels), doc["metadata"]["name"]


def test_every_gateway_setting_named_in_deploy_exists_in_the_projects_settings() -> None:
    known = setting_env_names()
    assert {"GATEWAY_LEDGER_TOKEN_FILE", "GATEWAY_ENGINE_MAX_LORAS", "GATEWAY_CHAIN_RPC_URL"} <= known
    used = {name: path.relative_to(ROOT).as_posix() for path in sorted(DEPLOY.rglob("*")) if path.is_file()
            for name in GATEWAY_NAME.findall(path.read_text())}
    assert len(used) >= 10, used
    unknown = {name: where for name, where in used.items() if name not in known}
    assert not unknown, f"not a setting of the project: {unknown}"
    # and every setting a Serve config's args name (the schema test validates them against the classes)
    for name, config in serve_configs().items():
        GatewayAppArgs.model_validate(config["applications"][0]["args"])


SECRET_LIKE = re.compile(r"(TOKEN|PASSWORD|SECRET|PRIVATE|_KEY)$")


def secret_references() -> list[tuple[str, str | None]]:
    """(Secret name, key) of every reference in deploy/: env secretKeyRef, envFrom, secret volumes."""
    refs: list[tuple[str, str | None]] = []
    for _, doc in OBJECTS:
        for node in walk(doc):
            if not isinstance(node, dict):
                continue
            if "secretKeyRef" in node:
                refs.append((node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]))
            if "secretRef" in node:
                refs.append((node["secretRef"]["name"], None))
            if isinstance(node.get("secret"), dict):
                refs.append((node["secret"]["secretName"], None))
    return refs


def test_secrets_appear_only_by_reference_and_each_is_documented() -> None:
    for path, doc in OBJECTS:
        if doc["kind"] == "Secret":
            assert not doc.get("data") and not doc.get("stringData"), f"{path}: Secret {doc['metadata']['name']}"
        for node in walk(doc):
            if isinstance(node, dict) and isinstance(node.get("name"), str) and "value" in node:
                assert not SECRET_LIKE.search(node["name"]), f"{path}: {node['name']} has an inline value"
    refs = secret_references()
    names = {name for name, _ in refs}
    assert names == {"gateway-ledger-token", "gateway-postgres", "gateway-chain-operator"}, names
    assert all(name and (key is None or key) for name, key in refs)
    docs = DOCS.read_text()
    for name in names:
        assert re.search(rf"kubectl create secret generic {name} ", docs), f"{name} is not in {DOCS.name}"
    # no value of a secret is in any file: the Serve configs name files, never the token
    for name, config in serve_configs().items():
        assert "token" not in config["applications"][0]["args"].get("ledger", {}), name


def dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def test_the_image_installs_the_project_as_the_makefile_does_and_runs_as_a_user() -> None:
    text, makefile = dockerfile(), (ROOT / "Makefile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.M)
    pip = re.search(r"install --quiet --upgrade (pip==\S+)", makefile).group(1)
    torch = re.search(r"-c constraints\.txt (torch==\S+)", makefile).group(1)
    assert pip in text and f"-c constraints.txt {torch}" in text and "-c constraints.txt -e \".[$ENGINE]\"" in text
    for package in re.search(r"^BROKEN_EXTRAS := (.+)$", makefile, re.M).group(1).split():
        assert package in text
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1] not in ("0", "root")
    # every package the project installs is copied into the image, and the context lets it through
    include = re.search(r'include = \[(.*?)\]', (ROOT / "pyproject.toml").read_text()).group(1)
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    for package in re.findall(r'"(\w+)\*"', include):
        assert package == "wire" or f"COPY {package}/ {package}/" in text, package
        assert package == "wire" or f"!{package}/" in ignore, package
    assert "grpc_tools.protoc" in text, "the stubs (wire/) are generated in the image, as by `make stubs`"


def test_every_pod_runs_as_a_non_root_user() -> None:
    pods = pod_specs()
    assert len(pods) == 5, [owner for owner, _, _ in pods]
    for owner, _, spec in pods:
        assert spec.get("securityContext", {}).get("runAsNonRoot") is True, owner
