"""What the deploy tests read: every YAML document in deploy/, the Serve configs in it (the file and the
RayService's embedded `serveConfigV2`), and the GATEWAY_* names the project's settings classes define."""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic_settings import BaseSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SERVE_CONFIG = DEPLOY / "serve-config.yaml"
RAYSERVICE = DEPLOY / "kuberay" / "rayservice.yaml"
PACKAGES = ("gateway", "serving", "attribution", "ledger", "training", "registry", "storage", "statedir")


def yaml_files() -> list[Path]:
    return sorted(DEPLOY.rglob("*.yaml"))


def documents(path: Path) -> list[dict[str, Any]]:
    """The YAML documents of one file (empty ones dropped)."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kubernetes_objects() -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every Kubernetes object in deploy/ (documents with `kind`), with its file."""
    for path in yaml_files():
        for doc in documents(path):
            if "kind" in doc:
                yield path, doc


def serve_configs() -> dict[str, dict[str, Any]]:
    """Each Serve config in deploy/, by where it is: the file itself and every RayService's serveConfigV2."""
    configs = {SERVE_CONFIG.name: documents(SERVE_CONFIG)[0]}
    for path, doc in kubernetes_objects():
        if doc["kind"] == "RayService":
            configs[f"{path.name}:{doc['metadata']['name']}"] = yaml.safe_load(doc["spec"]["serveConfigV2"])
    return configs


def settings_classes() -> list[type[BaseSettings]]:
    """Every pydantic-settings class of the project: the modules that define one are imported, then
    BaseSettings' subclasses that live in the project's packages are collected."""
    for package in PACKAGES:
        for source in (ROOT / package).rglob("*.py"):
            if "SettingsConfigDict(" in source.read_text():
                importlib.import_module(".".join(source.relative_to(ROOT).with_suffix("").parts))
    found: list[type[BaseSettings]] = []
    pending = list(BaseSettings.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.__module__.split(".")[0] in PACKAGES and cls not in found:
            found.append(cls)
    return found


def setting_env_names() -> set[str]:
    """GATEWAY_* variable names of every setting: env prefix + field name, upper case."""
    return {(cls.model_config.get("env_prefix", "") + name).upper()
            for cls in settings_classes() for name in cls.model_fields}


GATEWAY_NAME = re.compile(r"\bGATEWAY_[A-Z0-9_]*[A-Z0-9]\b")


def walk(node: Any) -> Iterator[Any]:
    """Every dict, list and scalar inside a parsed YAML document."""
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)
