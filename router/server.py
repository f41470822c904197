"""The router process: OpenAI HTTP API (uvicorn) and the Router gRPC service in one event loop.

Lifecycle start() -> serve() -> shutdown(); shutdown is idempotent and safe after a failed start. The
router never touches activations and never imports torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from afd.errors import ConfigError
from afd.model_spec import ModelSpec, model_fingerprint
from afd.node_lifecycle import StopOnce, run_until_signal
from afd.tokenizer import Tokenizer
from afd.wire.auth import ClusterAuth
from afd.wire.generated import afd_cluster_pb2 as pb
from afd.wire.generated import afd_cluster_pb2_grpc as pb_grpc
from router.api_config import DEFAULT_MAX_REQUEST_BODY_BYTES, ApiConfig
from router.attention_pool import AdmissionConfig, AttentionPoolBackend
from router.controller import Controller, ControllerConfig
from router.http_app import create_app
from router.metrics import RouterMetrics
from router.openai_service import OpenAIService

log = logging.getLogger("afd.router")


@dataclass(frozen=True)
class RouterConfig:
    """Everything the router process is started with."""

    model: Path
    """HF checkpoint directory (only config.json and the tokenizer are read)."""
    host: str = "127.0.0.1"
    """Interface for both servers."""
    http_port: int = 8000
    """OpenAI API port (0 = any free port)."""
    grpc_port: int = 50051
    """Control-plane port nodes register on (0 = any free port)."""
    served_model_name: str | None = None
    """Name in the API; the model directory's name when None."""
    api_key: str | None = field(default=None, repr=False)
    """Bearer key required of API clients; None = open API."""
    auth: ClusterAuth = field(default_factory=ClusterAuth)
    """Cluster token / TLS between router and nodes."""
    max_model_len: int | None = None
    """Context limit; the model's when None."""
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    """Membership and placement settings."""
    backend: AdmissionConfig = field(default_factory=AdmissionConfig)
    """Admission and migration settings."""
    ready_file: Path | None = None
    """Written with {"http_port", "grpc_port"} once both servers listen."""
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    """HTTP request bodies above this get a 413 before they are read in full."""
    protect_metrics: bool = False
    """Require the API key on /metrics as well (vLLM leaves it open for Prometheus; so do we by default)."""
    chat_template: Path | None = None
    """A Jinja file replacing the checkpoint's chat template (vLLM's --chat-template)."""

    def __post_init__(self) -> None:
        if not (Path(self.model) / "config.json").is_file():
            raise ConfigError(f"no config.json in model directory {self.model}")
        if self.max_request_body_bytes < 1:
            raise ConfigError(f"--max-request-body-bytes must be >= 1, got {self.max_request_body_bytes}")


def describe_chat_template(tokenizer: Tokenizer | None) -> None:
    """Say at start which chat template /v1/chat/completions renders with, as vLLM does."""
    if tokenizer is None:
        log.info("router: no tokenizer.json; prompts must be token ids and /v1/chat/completions is refused")
    elif tokenizer.chat_template is None:
        log.info("router: no chat template in the checkpoint; /v1/chat/completions is refused (see --chat-template)")
    else:
        log.info("router: chat template: %s", tokenizer.chat_template_source)


class _RouterServicer(pb_grpc.RouterServicer):
    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    async def Register(self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext) -> pb.RegisterResponse:
        try:
            return await self.controller.register(request)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext) -> pb.HeartbeatResponse:
        try:
            return await self.controller.heartbeat(request)
        except LookupError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
            raise

    async def Leave(self, request: pb.LeaveRequest, context: grpc.aio.ServicerContext) -> pb.LeaveResponse:
        return await self.controller.leave(request)

    async def ReportPeerFailure(
        self, request: pb.PeerFailureReport, context: grpc.aio.ServicerContext
    ) -> pb.PeerFailureResponse:
        return await self.controller.report_peer_failure(request)


class RouterServer(StopOnce):
    def __init__(self, config: RouterConfig) -> None:
        super().__init__()
        self.config = config
        self.http_port: int | None = None
        self.grpc_port: int | None = None
        self._grpc: grpc.aio.Server | None = None
        self._http: uvicorn.Server | None = None
        self._http_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None
        self.controller: Controller | None = None
        self.backend: AttentionPoolBackend | None = None
        self._service: OpenAIService | None = None

    async def start(self) -> None:
        config = self.config
        spec = ModelSpec.from_pretrained(config.model)
        tokenizer = Tokenizer.from_pretrained(config.model, chat_template=config.chat_template)
        if tokenizer is None and config.chat_template is not None:
            raise ConfigError(f"--chat-template given, but {config.model} has no tokenizer.json to render it with")
        describe_chat_template(tokenizer)
        name = config.served_model_name or Path(config.model).resolve().name
        max_len = min(config.max_model_len or spec.max_position_embeddings, spec.max_position_embeddings)
        metrics = RouterMetrics(name)
        self.controller = Controller(
            spec, config.auth, metrics, config.controller, model_fingerprint=model_fingerprint(config.model)
        )
        self.backend = AttentionPoolBackend(self.controller, config.backend)
        api = ApiConfig(
            name,
            max_len,
            spec.vocab_size,
            config.api_key,
            max_request_body_bytes=config.max_request_body_bytes,
            protect_metrics=config.protect_metrics,
        )
        self._service = service = OpenAIService(api, tokenizer, self.backend, metrics, self._status)
        self._grpc = grpc.aio.server(interceptors=config.auth.server_interceptors())
        pb_grpc.add_RouterServicer_to_server(_RouterServicer(self.controller), self._grpc)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self._grpc)
        self.grpc_port = config.auth.add_port(self._grpc, f"{config.host}:{config.grpc_port}")
        await self._grpc.start()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        app = create_app(service, ready=self._ready)
        uv_config = uvicorn.Config(app, host=config.host, port=config.http_port, log_level="warning", lifespan="off")
        self._http = uvicorn.Server(uv_config)
        self._http.install_signal_handlers = lambda: None  # type: ignore[attr-defined]  # we own the signals
        self._http_task = asyncio.ensure_future(self._http.serve())
        while not self._http.started:
            if self._http_task.done():
                raise ConfigError(f"the HTTP server did not start on {config.host}:{config.http_port}")
            await asyncio.sleep(0.02)
        self.http_port = self._http.servers[0].sockets[0].getsockname()[1]
        self._watch_task = asyncio.ensure_future(self.controller.watch(self._stop))
        log.info(
            "router: OpenAI API on http://%s:%s/v1, control plane on %s:%s",
            config.host,
            self.http_port,
            config.host,
            self.grpc_port,
        )

    def _ready(self) -> bool:
        """Ready when a request could be served now: an attention node on a complete placement."""
        return self.controller is not None and self.controller.pick_attention_node() is not None

    def _status(self) -> dict[str, Any]:
        assert self.controller is not None and self.backend is not None
        status = self.controller.status()
        status["router_waiting"] = self.backend.num_waiting
        status["vocab_size"] = self.controller.spec.vocab_size
        return status

    async def _close(self) -> None:
        if self._http is not None:
            self._http.should_exit = True
        if self._http_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._http_task, 10)
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(BaseException):
                await self._watch_task
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        if self.controller is not None:
            await self.controller.close()
        if self._service is not None:
            self._service.close()


async def run_router(config: RouterConfig) -> None:
    """The `afd node router` process: serve until SIGTERM/SIGINT."""
    server = RouterServer(config)

    def ports() -> dict[str, int]:
        return {"http_port": server.http_port or 0, "grpc_port": server.grpc_port or 0}

    await run_until_signal(server, ports, config.ready_file)
