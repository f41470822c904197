"""OpenAI's error shape: the exception the service raises, the body every non-2xx answer carries, and the
status -> error class names that official clients map to their exception classes."""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import Response
from pydantic import BaseModel


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


class ErrorInfo(BaseModel):
    message: str
    type: str
    """OpenAI's error class name: BadRequestError, AuthenticationError, NotFoundError, ..."""
    param: str | None = None
    code: int
    """The HTTP status."""


class ErrorResponse(BaseModel):
    """Body of every non-2xx answer (OpenAI's shape)."""

    error: ErrorInfo


ERROR_KINDS = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    # ASCII JSON: text the client sent (a model name, say) may hold lone surrogates, which UTF-8 cannot carry.
    return Response(json.dumps(content).encode("ascii"), status, headers, media_type="application/json")


def error_response(
    status: int, message: str, kind: str, param: str | None = None, headers: dict[str, str] | None = None
) -> Response:
    return json_response({"error": {"message": message, "type": kind, "param": param, "code": status}}, status, headers)
