"""A request body the server cannot read gets a 400 in OpenAI's error shape that says what was wrong and where.

Before: a malformed body was answered "31: JSON decode error" (FastAPI's error position and nothing else), an
empty body ": Field required", a JSON array or a body sent as text/plain ": Input should be a valid dictionary
or object to extract fields from", and invalid UTF-8 "There was an error parsing the body".
"""

from __future__ import annotations

import httpx
import pytest

from router.api_config import ApiConfig
from router.http_app import create_app
from router.metrics import RouterMetrics
from router.openai_service import OpenAIService
from tests.fake_generation_backend import FakeBackend


@pytest.fixture
async def http():
    metrics = RouterMetrics("afd-demo")
    service = OpenAIService(ApiConfig("afd-demo", 64, 100), None, FakeBackend(100, metrics), metrics, dict)
    transport = httpx.ASGITransport(app=create_app(service, ready=lambda: True))
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
        yield client
    service.close()


async def _error(http, body: bytes, content_type: str | None = "application/json", path="/v1/completions") -> str:
    headers = {"content-type": content_type} if content_type else {}
    response = await http.post(path, content=body, headers=headers)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "BadRequestError" and error["code"] == 400
    return error["message"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"])
async def test_malformed_json_says_what_and_where(http, path):
    body = b'{"model": "afd-demo",\n "prompt": ,\n "max_tokens": 4}'
    message = await _error(http, body, path=path)
    assert message == (
        "invalid JSON in the request body at line 2, column 12 (char 33): Expecting value, near '\"prompt\": ,'"
    )


async def test_truncated_and_trailing_json(http):
    assert "(char 13): Expecting ',' delimiter" in await _error(http, b'{"prompt":[1]')
    assert "line 1, column 15 (char 14): Extra data" in await _error(http, b'{"prompt":[1]}garbage')


async def test_empty_body(http):
    assert await _error(http, b"") == "the request body is empty; send a JSON object"


async def test_body_that_is_not_an_object(http):
    assert await _error(http, b"[1, 2]") == "the request body must be a JSON object, not an array"
    assert await _error(http, b'"text"') == "the request body must be a JSON object, not a string"


async def test_body_sent_with_another_content_type(http):
    message = await _error(http, b'{"prompt": [1]}', "application/x-www-form-urlencoded")
    assert message == (
        "the request body must be JSON sent with Content-Type: application/json "
        "(got 'application/x-www-form-urlencoded')"
    )
    assert "(got none)" in await _error(http, b'{"prompt": [1]}', None)


async def test_body_that_is_not_utf8(http):
    message = await _error(http, b'{"prompt": "\xff\xfe"}')
    assert message.startswith("the request body is not valid UTF-8: ")
    assert "position 12" in message


async def test_field_errors_still_name_the_field(http):
    message = await _error(http, b'{"prompt": [1], "max_tokens": "many"}')
    assert message.startswith("max_tokens: ")
