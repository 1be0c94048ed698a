"""The Serve application for Ray's own tooling: `serve run` / `serve deploy` of a Serve config file whose
`import_path` is `serving.serve_app:app_builder` (deploy/serve-config.yaml; the RayService of deploy/kuberay/).

Ray Serve validates the application's `args:` against `GatewayAppArgs`, the builder's annotated pydantic
model, then calls the builder, which returns `serving.deployment.build_application`'s application, the
one `gateway up` runs. Each section of the args is one of the project's settings classes, and a key is
the name of the setting without its prefix (`engine.max_loras` is GATEWAY_ENGINE_MAX_LORAS). What a
section leaves out comes from the `GATEWAY_*` environment of the process in which Serve builds the app,
then from the setting's default. Paths are used as written: give absolute ones (Ray's workers do not
run in the directory of your shell).

The ledger token is never an argument: `ledger.token_file` names a file holding it (a mounted secret);
without it the replicas use GATEWAY_LEDGER_TOKEN or `<state>/ledger-token`.

Only the Serve application is built here. What `gateway up` runs beside it (demo assets, the ledger
service, the local chain, trace shipping) is started separately (docs/deployment.md).
"""

# No `from __future__ import annotations` here: Serve calls the builder with a validated model only when
# its parameter's annotation is the class itself (ray.serve._private.api, the application builder).

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings
from ray.serve import Application

from ledger.client.config import LedgerClientConfig
from serving.config import EngineConfig, ReplicaConfig, ServingConfig
from serving.deployment import build_application

IMPORT_PATH = "serving.serve_app:app_builder"


class GatewayAppArgs(BaseModel):
    """The `args:` of the application in a Serve config file: one section per settings class."""

    model_config = ConfigDict(extra="forbid")

    serving: ServingConfig = Field(default_factory=ServingConfig, description="State directory, adapter store, "
                                   "base model, front doors (GATEWAY_*).")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="vLLM engine (GATEWAY_ENGINE_*).")
    replica: ReplicaConfig = Field(default_factory=ReplicaConfig, description="Replicas and their placement "
                                   "(GATEWAY_REPLICA_*).")
    ledger: LedgerClientConfig = Field(default_factory=LedgerClientConfig, description="Where the ledger is and "
                                       "the file of its token (GATEWAY_LEDGER_*).")

    @model_validator(mode="before")
    @classmethod
    def _named_settings_only(cls, data: Any) -> Any:
        """Refuse a key no setting has (ServingConfig alone would ignore it) and an inline ledger token."""
        if not isinstance(data, dict):
            return data
        for section, settings in SECTIONS.items():
            given = data.get(section)
            if isinstance(given, dict):
                unknown = sorted(set(given) - set(settings.model_fields))
                if unknown:
                    raise ValueError(f"args.{section}: {', '.join(unknown)} is not a setting of {settings.__name__}")
        ledger = data.get("ledger")
        if isinstance(ledger, dict) and "token" in ledger:
            raise ValueError("args.ledger.token: a Serve config never holds the ledger token; name a file that "
                             "holds it with ledger.token_file (a mounted secret)")
        return data


SECTIONS: dict[str, type[BaseSettings]] = {
    "serving": ServingConfig, "engine": EngineConfig, "replica": ReplicaConfig, "ledger": LedgerClientConfig,
}
"""Each section of `GatewayAppArgs` and the settings class it holds (its env prefix names the variables)."""


def app_builder(args: GatewayAppArgs) -> Application:
    """Ray Serve's application builder: the gateway's application for these settings."""
    return build_application(args.serving, args.engine, args.replica, args.ledger)
