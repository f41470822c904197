"""The router's OpenAI-compatible HTTP app (FastAPI): its routes, their OpenAPI schema and error mapping.

/v1/completions and /v1/chat/completions (served by OpenAIService), /v1/models[/{id}], vLLM's /tokenize,
/detokenize and /version (router.tokenize_api), /health, /metrics, /afd/v1/cluster. Errors use OpenAI's
error body so official clients raise the matching exception class; the outermost layer (HttpGuard) checks
the API key, limits the request body and answers what escapes as a 500 in the same shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

import afd
from afd.errors import AfdError, RequestError
from router.api_errors import ERROR_KINDS, ApiError, ErrorResponse, error_response, json_response
from router.generation import NoCapacity, Overloaded
from router.http_guard import HttpGuard
from router.openai_service import OpenAIService
from router.prompt_checks import check_model
from router.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    HealthStatus,
    ModelCard,
    ModelList,
)
from router.tokenize_api import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
    detokenize,
    tokenize,
)


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses an endpoint can answer (all with the OpenAI error body)."""
    why = {
        400: "The request is invalid (schema, context length, vocabulary, unsupported feature).",
        401: "The API key is missing or wrong (only when the router has one).",
        404: "The model named in the request is not served here.",
        413: "The request body is larger than the router's limit.",
        429: "The router's queue is full; retry later.",
        500: "The request failed inside the cluster.",
        503: "No attention node could take the request in time.",
    }
    return {code: {"model": ErrorResponse, "description": why[code]} for code in codes}


def _openapi_without_422(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """FastAPI documents a 422 for every body; this server answers a schema violation with a 400 instead."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


def _body_problem(error: dict[str, Any], body: Any, content_type: str | None) -> str | None:
    """What is wrong with the body as a whole (not JSON, empty, not an object), or None for field errors.

    FastAPI reports these as a bare position ("31: JSON decode error") or a field-less pydantic message; say
    what and where instead, with the line, column and character offset Python's JSON decoder gives.
    """
    loc = tuple(error.get("loc", ()))
    if error.get("type") == "json_invalid" and isinstance(body, str) and len(loc) == 2 and isinstance(loc[1], int):
        pos = loc[1]
        line = body.count("\n", 0, pos) + 1
        line_start = body.rfind("\n", 0, pos) + 1
        column = pos - line_start + 1  # 1-based, as json.JSONDecodeError counts
        line_end = body.find("\n", pos)
        near = body[max(line_start, pos - 20) : min(pos + 20, len(body) if line_end < 0 else line_end)].strip()
        reason = error.get("ctx", {}).get("error", "malformed JSON")
        return f"invalid JSON in the request body at line {line}, column {column} (char {pos}): {reason}, near {near!r}"
    if loc != ("body",):
        return None
    if error.get("type") == "missing":
        return "the request body is empty; send a JSON object"
    if isinstance(body, bytes):  # FastAPI parses JSON only when the Content-Type says JSON
        got = repr(content_type) if content_type else "none"
        return f"the request body must be JSON sent with Content-Type: application/json (got {got})"
    if not isinstance(body, dict):
        return f"the request body must be a JSON object, not {_JSON_TYPES.get(type(body), 'null')}"
    return None


def create_app(service: OpenAIService, ready: Callable[[], bool]) -> FastAPI:
    app = FastAPI(title="AFD router", docs_url=None, redoc_url=None)
    app.add_middleware(HttpGuard, config=service.config)
    app.openapi = _openapi_without_422(app)  # type: ignore[method-assign]
    keyed = (401,) if service.config.api_key else ()
    generation = _responses(400, *keyed, 404, 413, 429, 500, 503)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        def where(loc: tuple[Any, ...]) -> str:  # without pydantic's union-member tags like "list[str]"
            return ".".join(str(p) for p in loc[1:] if not (isinstance(p, str) and "[" in p))

        errors = exc.errors()
        problem = _body_problem(errors[0], exc.body, request.headers.get("content-type")) if errors else None
        if problem is not None:
            return error_response(400, problem, "BadRequestError")
        reasons = dict.fromkeys(f"{where(e['loc'])}: {e['msg'].removeprefix('Value error, ')}" for e in errors)
        details = "; ".join(reasons)
        return error_response(400, details or "invalid request body", "BadRequestError")

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> Response:
        kind = ERROR_KINDS.get(exc.status_code, "APIError")
        message = str(exc.detail)
        if isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI says only "There was an error parsing the body"
            message = f"the request body is not valid UTF-8: {exc.__cause__}"
        return error_response(exc.status_code, message, kind, headers=dict(exc.headers or {}))

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> Response:
        return error_response(exc.status, exc.message, exc.kind, exc.param)

    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError) -> Response:
        return error_response(400, str(exc), "BadRequestError")

    @app.exception_handler(Overloaded)
    async def overloaded(_: Request, exc: Overloaded) -> Response:
        service.metrics.requests_rejected.labels(service.config.model_name, "queue_full").inc()
        return error_response(429, str(exc), "RateLimitError")

    @app.exception_handler(NoCapacity)
    async def no_capacity(_: Request, exc: NoCapacity) -> Response:
        service.metrics.requests_rejected.labels(service.config.model_name, "no_capacity").inc()
        return error_response(503, str(exc), "ServiceUnavailableError")

    @app.exception_handler(AfdError)
    async def failed(_: Request, exc: AfdError) -> Response:
        return error_response(500, str(exc), "InternalServerError")

    # Before OpenAPI 3.2 (FastAPI writes 3.1) the schema of an event stream describes one event.
    sse_event = {
        "type": "object",
        "description": "One server-sent event: `data` is a JSON chunk (text_completion / chat.completion.chunk, "
        "an error object on failure), the last event's `data` is `[DONE]`",
        "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
        "required": ["data"],
    }
    stream_doc = {"text/event-stream": {"schema": sse_event}}

    @app.post(
        "/v1/completions",
        responses={200: {"model": CompletionResponse, "content": stream_doc}, **generation},
    )
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await service.completions(body, request)

    @app.post(
        "/v1/chat/completions",
        responses={200: {"model": ChatCompletionResponse, "content": stream_doc}, **generation},
    )
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        return await service.chat(body, request)

    def card() -> ModelCard:
        return ModelCard(id=service.config.model_name, max_model_len=service.config.max_model_len)

    @app.get("/v1/models", response_model=ModelList, responses=_responses(*keyed))
    async def models() -> ModelList:
        return ModelList(data=[card()])

    # `:path`: served names often hold a slash ("Qwen/Qwen3-30B-A3B"), which clients send unescaped.
    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_responses(*keyed, 404))
    async def model(model_id: str) -> ModelCard:
        check_model(service.config, model_id)
        return card()

    body_errors = _responses(400, *keyed, 404, 413)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=body_errors)
    async def tokenize_endpoint(body: TokenizeRequest) -> Response:
        answer = await service._off_loop(lambda: tokenize(service.config, service.tokenizer, body))
        return json_response(answer.model_dump())

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=body_errors)
    async def detokenize_endpoint(body: DetokenizeRequest) -> Response:
        answer = await service._off_loop(lambda: detokenize(service.config, service.tokenizer, body))
        return json_response(answer.model_dump())

    @app.get("/version", response_model=VersionResponse)
    async def version() -> VersionResponse:
        return VersionResponse(version=afd.__version__)

    @app.get(
        "/health",
        response_model=HealthStatus,
        responses={503: {"model": HealthStatus, "description": "No request could be served now."}},
    )
    async def health() -> Response:
        ok = ready()
        return json_response({"status": "ok" if ok else "unavailable"}, 200 if ok else 503)

    metrics_doc = {"text/plain": {"schema": {"type": "string", "description": "Prometheus text format"}}}

    @app.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {"content": metrics_doc, "description": "Prometheus metrics"},
            **(_responses(*keyed) if service.config.protect_metrics else {}),
        },
    )
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/afd/v1/cluster", responses=_responses(*keyed))
    async def cluster() -> dict[str, Any]:
        return service.cluster_info()

    return app
