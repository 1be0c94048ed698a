"""Ray Serve application: the engine deployment and, with several replicas, a thin ingress.

* One fixed replica (the default): the replica owns the vLLM engine and answers HTTP and gRPC
  itself on the gateway ports, so a token crosses no process boundary between the engine and the
  socket. Ray Serve still owns its life cycle (start, health checks, restart on failure).
* Several replicas or autoscaling: Ray Serve's proxy hands each HTTP request to `Ingress`, which
  reads only the `model` field and forwards the raw body to an engine replica with the adapter as
  the multiplexed model id, so requests for an adapter go to a replica that already holds it;
  `GrpcIngress` does the same for gRPC.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
import uvloop
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import REGISTRY
from ray import serve

from attribution.metrics import ShippingCollector
from attribution.outbox import Outbox
from attribution.shipper import TraceShipper
from attribution.service import AttributionService, LedgerLineages
from attribution.usage_log import UsageLog
from ledger.client.access import LedgerAccessClient
from ledger.client.config import LedgerClientConfig
from ledger.client.traces import LedgerTraces
from ledger.client.token import read_ledger_token
from serving.access import AccessControl
from serving.config import AccessConfig, EngineConfig, ReplicaConfig, ServingConfig
from serving.engine import Engine
from serving.errors import ApiError, InvalidRequest, ModelNotFound
from serving.grpc_service import API as GRPC_API
from serving.grpc_service import LocalBackend, serialized_stream_error, start_grpc_server
from serving.metrics_endpoint import serve_metrics
from serving.openai_protocol import ChatCompletionRequest, CompletionRequest, parse_request
from serving.openai_router import TRACE_HEADER, build_app
from serving.openai_service import OpenAIService
from wire.inference.v1 import inference_pb2 as pb

log = logging.getLogger(__name__)

HTTP_START_TIMEOUT_SECONDS = 30.0
REPLICA_HEADER = "x-gateway-replica"
ROUTES = {"/v1/completions": (CompletionRequest, False), "/v1/chat/completions": (ChatCompletionRequest, True)}


class DedicatedLoop:
    """A uvloop event loop on its own thread. With direct HTTP, the engine and its server live here:
    uvloop is cheaper per streamed chunk than the plain asyncio loop Ray gives user code, and Ray's
    own loops stay out of the token path."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="gateway-engine-loop", daemon=True)
        self.thread.start()

    async def run(self, coroutine: Any) -> Any:
        """Await `coroutine` on the dedicated loop from any other loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self.loop))

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


class EngineReplica:
    """Owns one vLLM engine. Serves HTTP directly when it is the only replica."""

    async def __init__(self, config: dict, engine: dict, replica: dict, ledger: dict | None = None) -> None:
        self.config = ServingConfig(**config)
        # The ledger's address and token file as built into the app (serving/serve_app.py), else GATEWAY_LEDGER_*.
        self.ledger_config = LedgerClientConfig(**ledger) if ledger is not None else LedgerClientConfig()
        self.replica = ReplicaConfig(**replica)
        self.engine_config = EngineConfig(**engine)
        self._server = None
        self._loop: DedicatedLoop | None = None
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        if self.replica.serves_http_in_replica:
            self._loop = DedicatedLoop()
            await self._loop.run(self._build())
        else:
            await self._build()
        # Servers (and gRPC threads) start once the engine has started its processes (they must not inherit them).
        self._shipper = self._ship_node_outbox()
        self._metrics = serve_metrics(self.config.host, 0, state_dir=self.config.state_dir,
                                      target_name=f"engine-{self.replica_id}", labels={"replica": self.replica_id})
        if self._loop is not None:
            await self._loop.run(self._start_grpc())  # before HTTP: a 200 on /health means both listen
            await self._loop.run(self._start_http())

    async def _build(self) -> None:
        """Create the engine on the loop that will drive it (vLLM binds its output task to it)."""
        self.engine = Engine(self.config, self.engine_config, self.replica.adapters_per_replica)
        ledger = self.ledger_config
        # Keys, terms, lineage, credit and rate come from the ledger's Access API: the replica opens no database.
        self.ledger = LedgerAccessClient.for_state_dir(self.config.state_dir, ledger)
        outbox = Outbox(self.config.outbox_dir, ledger.outbox_max_traces) if ledger.ship else None
        usage_log = UsageLog(self.config.usage_dir) if outbox is not None and ledger.usage_records else None
        attribution = (
            AttributionService.from_config(LedgerLineages(self.ledger, adapter_dirs=self.engine.store.local_path),
                                           trace_dir=self.config.trace_dir, outbox=outbox, usage_log=usage_log,
                                           delay_seconds=self.config.attribution_delay_seconds,
                                           base_model_dir=self.config.model_path)
            if self.config.attribution else None
        )
        access = AccessConfig()
        control = AccessControl(self.ledger, access, owner=self.replica_id) if access.auth else None
        self.stored_traces = LedgerTraces(ledger.target, read_ledger_token(self.config.state_dir, ledger))
        self.service = OpenAIService(self.engine, self.replica.max_ongoing_requests, attribution, access=control,
                                     stored_traces=self.stored_traces)

    def _ship_node_outbox(self) -> TraceShipper | None:
        """Ship this node's outbox to the ledger: every node ships its own, so no trace waits for the head.
        Replicas of one node (and `gateway up`'s supervisor there) share the outbox; one of them ships it at
        a time (attribution/shipper.py), the others stand by."""
        ledger, state_dir = self.ledger_config, self.config.state_dir
        if not ledger.ship:
            return None
        shipper = TraceShipper(Outbox(self.config.outbox_dir, ledger.outbox_max_traces), ledger.target,
                               token=lambda: read_ledger_token(state_dir, ledger), batch_size=ledger.ship_batch)
        shipper.start()
        self._shipping_collector = ShippingCollector(shipper)
        REGISTRY.register(self._shipping_collector)
        return shipper

    async def _start_http(self) -> None:
        app = build_app(self.service)
        server = uvicorn.Server(
            uvicorn.Config(
                app, host=self.config.host, port=self.config.http_port, log_level="warning",
                access_log=False, timeout_keep_alive=30,
            )
        )
        self._server_task = asyncio.create_task(_serve_until_exit(server))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HTTP_START_TIMEOUT_SECONDS
        while not server.started:
            if self._server_task.done():
                raise RuntimeError(f"HTTP server could not listen on {self.config.host}:{self.config.http_port}")
            if loop.time() > deadline:
                raise RuntimeError("HTTP server did not start in time")
            await asyncio.sleep(0.05)
        self._server = server
        log.info("engine replica serving HTTP on %s:%d", self.config.host, self.config.http_port)

    async def _start_grpc(self) -> None:
        self._grpc_server = await start_grpc_server(LocalBackend(self.service), self.config.host, self.config.grpc_port)
        log.info("engine replica serving gRPC on %s:%d", self.config.host, self.config.grpc_port)

    # Serve's own per-replica list only steers routing; the adapter LRU that loads and evicts is
    # self.engine.adapters (sized by adapters_per_replica, default 128 like this).
    @serve.multiplexed(max_num_models_per_replica=128)
    async def _adapter(self, name: str) -> str:
        await self.engine.adapters.get(name)
        return name

    async def _hold_routed_adapter(self) -> None:
        """Load the adapter this request was routed for; Serve then routes its next requests here."""
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            if not self.engine.is_known(model_id):
                raise ModelNotFound(model_id)
            await self._adapter(model_id)

    async def models(self, authorization: str | None = None) -> dict[str, Any]:
        """The models this caller may see, or an error body (`{"error": …, "status": …}`)."""
        try:
            return self.service.list_models(self.service.authenticate(authorization))
        except ApiError as exc:
            return {**exc.to_body(), "status": exc.status}

    async def trace(self, trace_id: str, authorization: str | None = None) -> dict[str, Any]:
        """A whole trace for a key that may read it (this node's copy, else the ledger's), or an error body."""
        try:
            return await self.service.trace(trace_id, self.service.authenticate(authorization))
        except ApiError as exc:
            return {**exc.to_body(), "status": exc.status}

    async def stats(self, authorization: str | None = None) -> dict[str, Any]:
        """This replica's counters for an admin key, or an error body (`{"error": …, "status": …}`)."""
        try:
            return {"replica": self.replica_id, **self.service.stats(self.service.authenticate(authorization))}
        except ApiError as exc:
            return {**exc.to_body(), "status": exc.status}

    async def handle(self, route: str, body: bytes, authorization: str | None = None) -> AsyncIterator[Any]:
        """Forwarded request: yields (status, headers) first, then response bytes."""
        kind, chat = ROUTES[route]
        try:
            caller = self.service.authenticate(authorization)
            model = serve.get_multiplexed_model_id()
            if model and not self.service.visible(caller, model):
                raise ModelNotFound(model)
            await self._hold_routed_adapter()
            request = parse_request(kind, body)
            job = await (self.service.prepare_chat(request, caller=caller) if chat
                         else self.service.prepare_completion(request, caller=caller))
        except ApiError as exc:
            self.service.count_rejection("chat_completions" if chat else "completions",
                                         serve.get_multiplexed_model_id() or None, exc)
            yield (exc.status, {REPLICA_HEADER: self.replica_id, **exc.headers})
            yield json.dumps(exc.to_body()).encode()
            return
        headers = {TRACE_HEADER: job.request_id, REPLICA_HEADER: self.replica_id}
        if job.stream:
            yield (200, {**headers, "content-type": "text/event-stream"})
            async for chunk in self.service.stream(job, chat):
                yield chunk
        else:
            yield (200, {**headers, "content-type": "application/json"})
            yield json.dumps(await self.service.run(job, chat)).encode()

    async def generate_pb(self, request: bytes, authorization: str | None = None) -> AsyncIterator[Any]:
        """Forwarded gRPC generation: serialized GenerateResponse messages, or an error dict."""
        try:
            caller = self.service.authenticate(authorization)
            model = serve.get_multiplexed_model_id()
            if model and not self.service.visible(caller, model):
                raise ModelNotFound(model)
            await self._hold_routed_adapter()
        except ApiError as exc:
            self.service.count_rejection(GRPC_API, serve.get_multiplexed_model_id() or None, exc)
            yield serialized_stream_error(exc)
            return
        try:
            async for message in LocalBackend(self.service).generate(pb.GenerateRequest.FromString(request),
                                                                     authorization):
                yield message.SerializeToString()
        except ApiError as exc:
            yield serialized_stream_error(exc)

    async def models_pb(self, authorization: str | None = None) -> bytes | dict[str, Any]:
        try:
            return (await LocalBackend(self.service).list_models(authorization)).SerializeToString()
        except ApiError as exc:
            return serialized_stream_error(exc)

    async def check_health(self) -> None:
        if self._loop is None:
            await self.engine.check_health()
            return
        await self._loop.run(self.engine.check_health())
        if self._server_task.done():
            raise RuntimeError("HTTP server stopped")

    async def __del__(self) -> None:
        self._metrics.close()
        if self._shipper is not None:
            self._shipper.stop()  # what it did not ship waits in the outbox for the node's next shipper
            REGISTRY.unregister(self._shipping_collector)
        if self._server is not None:
            self._server.should_exit = True
            await self._loop.run(self._grpc_server.stop(grace=1))
        self.engine.shutdown()
        if self.service.attribution is not None:
            self.service.attribution.close()
        if self.service.access is not None:
            self.service.access.close()
        self.ledger.close()
        self.stored_traces.close()
        if self._loop is not None:
            self._loop.stop()


async def _serve_until_exit(server: Any) -> None:
    """uvicorn's `serve`, whose `sys.exit` on a failed bind would take the replica's event loop down
    with it (the replica would then hang in its start); it ends this task with an error instead."""
    try:
        await server.serve()
    except SystemExit as exited:
        raise RuntimeError(f"the HTTP server stopped (exit {exited.code}); is its port in use?") from None


def model_field(body: bytes) -> str:
    """The `model` of a JSON body, for routing; full validation happens on the engine replica."""
    try:
        value = json.loads(body).get("model")
    except (ValueError, AttributeError):
        raise InvalidRequest("request body must be a JSON object") from None
    return value if isinstance(value, str) else ""


ingress_app = FastAPI(docs_url=None, redoc_url=None)


@serve.ingress(ingress_app)
class Ingress:
    """Routes OpenAI requests to engine replicas by adapter (multi-replica mode only)."""

    def __init__(self, engine_handle: Any, base_model: str, grpc_ingress: Any) -> None:
        self.engine = engine_handle
        self.base_model = base_model
        self.grpc_ingress = grpc_ingress  # bound here so Serve deploys it with the application

    @ingress_app.get("/health")
    async def health(self) -> Response:
        return Response(status_code=200)

    @ingress_app.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        answer = await self.engine.models.remote(request.headers.get("authorization"))
        return JSONResponse(answer, status_code=answer.pop("status", 200))

    @ingress_app.get("/v1/attributions/{trace_id}")
    async def attribution(self, trace_id: str, request: Request) -> JSONResponse:
        # Any engine replica answers: its node's copy of the trace, else the ledger's (every node's traces).
        answer = await self.engine.trace.remote(trace_id, request.headers.get("authorization"))
        return JSONResponse(answer, status_code=answer.pop("status", 200))

    @ingress_app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._forward(request)

    @ingress_app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._forward(request)

    async def _forward(self, request: Request) -> Response:
        body = await request.body()
        try:
            model = model_field(body)
        except ApiError as exc:
            return JSONResponse(exc.to_body(), status_code=exc.status)
        adapter = "" if model == self.base_model else model
        handle = self.engine.options(stream=True, multiplexed_model_id=adapter)
        stream = handle.handle.remote(request.url.path, body, request.headers.get("authorization"))
        status, headers = await stream.__anext__()
        media = headers.pop("content-type", "application/json")
        if media == "text/event-stream":
            return StreamingResponse(stream, media_type=media, headers=headers, status_code=status)
        payload = b"".join([chunk async for chunk in stream])
        return Response(payload, media_type=media, headers=headers, status_code=status)


class RemoteBackend:
    """gRPC generation on engine replicas, routed by adapter like the HTTP ingress."""

    def __init__(self, engine_handle: Any, base_model: str) -> None:
        self.engine = engine_handle
        self.base_model = base_model

    async def generate(self, request: Any, authorization: str | None = None) -> AsyncIterator[Any]:
        adapter = "" if request.model == self.base_model else request.model
        handle = self.engine.options(stream=True, multiplexed_model_id=adapter)
        async for item in handle.generate_pb.remote(request.SerializeToString(), authorization):
            if isinstance(item, dict):
                raise error_from(item)
            yield pb.GenerateResponse.FromString(item)

    async def list_models(self, authorization: str | None = None) -> Any:
        answer = await self.engine.models_pb.remote(authorization)
        if isinstance(answer, dict):
            raise error_from(answer)
        return pb.ListModelsResponse.FromString(answer)


def error_from(item: dict[str, Any]) -> ApiError:
    """The ApiError a replica sent as `serialized_stream_error` (status and retry-after kept)."""
    error = ApiError(item["error"]["message"], param=item["error"]["param"], code=item["error"]["code"],
                     headers=item.get("headers"))
    error.status = item["error"]["status"]
    return error


class GrpcIngress:
    """The gRPC front door in multi-replica mode: one zero-CPU replica running the gRPC server."""

    async def __init__(self, engine_handle: Any, base_model: str, host: str, port: int) -> None:
        self.server = await start_grpc_server(RemoteBackend(engine_handle, base_model), host, port)

    async def check_health(self) -> None:
        return None

    async def __del__(self) -> None:
        await self.server.stop(grace=1)


def build_application(config: ServingConfig, engine: EngineConfig, replica: ReplicaConfig,
                      ledger: LedgerClientConfig | None = None, *, node_state_dirs: bool = False) -> Any:
    """The Serve application for these settings (see the module docstring for the two shapes). Without
    `ledger`, replicas read GATEWAY_LEDGER_* themselves; its token, if any, is never passed (see serve_app.py).
    With `node_state_dirs` (a cluster), `config.state_dir` is not passed either: each replica uses its own
    node's GATEWAY_STATE_DIR (nodes share no disk)."""
    actor: dict[str, Any] = {"num_cpus": replica.num_cpus, "num_gpus": replica.num_gpus}
    if replica.resources:
        actor["resources"] = replica.resources
    options: dict[str, Any] = {
        "ray_actor_options": actor,
        "max_ongoing_requests": replica.max_ongoing_requests,
        "health_check_period_s": 10,
        "health_check_timeout_s": 30,
        "graceful_shutdown_timeout_s": 5,
    }
    if replica.autoscaling:
        options["autoscaling_config"] = replica.autoscaling
    else:
        options["num_replicas"] = replica.num_replicas
    serving = config.model_dump(mode="json", exclude={"state_dir"} if node_state_dirs else None)
    args = (serving, engine.model_dump(mode="json"), replica.model_dump(mode="json"),
            None if ledger is None else ledger.model_dump(mode="json", exclude={"token"}))
    engine_app = serve.deployment(EngineReplica, name="engine").options(**options).bind(*args)
    if replica.serves_http_in_replica:
        return engine_app
    ingress = serve.deployment(Ingress, name="ingress").options(
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4 * replica.max_ongoing_requests
    )
    grpc_ingress = serve.deployment(GrpcIngress, name="grpc-ingress").options(
        ray_actor_options={"num_cpus": 0}, num_replicas=1
    )
    grpc_app = grpc_ingress.bind(engine_app, config.served_model_name, config.host, config.grpc_port)
    return ingress.bind(engine_app, config.served_model_name, grpc_app)
