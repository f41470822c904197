"""schemathesis against the router's /openapi.json (issue 15 item 12): the spec must describe the server.

Generated requests, schema-valid (positive) and schema-violating (negative), go to the router app (ASGI, in
this process) with a fake generation backend. Checked on every answer: no 5xx, the status is documented for
the operation, the content type and body match the documented response, and a request that violates the
schema is refused (not answered 200 — `n: 1.0` and `prompt: [[false]]` were). Not checked: that every
schema-valid request is accepted; a prompt longer than the context, an unknown model name or n > 1 are
schema-valid and refused with a documented 400/404.

Every operation of the spec is fuzzed, vLLM's /tokenize, /detokenize and /version and /v1/models/{id}
included (issue 13; `test_every_endpoint_is_fuzzed` fails if one drops out of the spec). Checked by hand that
the pass can fail: a /detokenize that raised on more than three ids and a /tokenize that answered a body
of the wrong shape for chat messages each failed it (Server error, Undocumented status code).
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from afd.builtin_model import builtin_model_dir  # noqa: E402
from afd.tokenizer import Tokenizer  # noqa: E402
from router.api_config import ApiConfig  # noqa: E402
from router.http_app import create_app  # noqa: E402
from router.metrics import RouterMetrics  # noqa: E402
from router.openai_service import OpenAIService  # noqa: E402
from tests.fake_generation_backend import FakeBackend  # noqa: E402

EXAMPLES_PER_OPERATION = 400
"""Per operation (the GETs without parameters have nothing to vary); all ten took 34 s on the 2-core dev
machine, 87 s while other jobs shared its cores."""

FUZZED = {
    "POST /v1/completions",
    "POST /v1/chat/completions",
    "GET /v1/models",
    "GET /v1/models/{model_id}",
    "POST /tokenize",
    "POST /detokenize",
    "GET /version",
    "GET /health",
    "GET /metrics",
    "GET /afd/v1/cluster",
}
"""The router's whole HTTP surface."""

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


# The spec does not depend on the tokenizer, so the app is built at import (schemathesis needs the schema
# to parametrize); the tokenizer (which writes the built-in model) is loaded by the fixture before any call.
METRICS = RouterMetrics("afd-demo")
BACKEND = FakeBackend(1, METRICS)
SERVICE = OpenAIService(
    ApiConfig("afd-demo", 256, 1, max_request_body_bytes=256 * 1024), None, BACKEND, METRICS, lambda: {"nodes": []}
)
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(SERVICE, ready=lambda: True))


@pytest.fixture(scope="module", autouse=True)
def _tokenizer(tmp_path_factory):
    tokenizer = Tokenizer.from_pretrained(builtin_model_dir(tmp_path_factory.mktemp("cache")))
    assert tokenizer is not None
    SERVICE.tokenizer = tokenizer
    SERVICE.config.vocab_size = BACKEND.vocab = tokenizer.vocab_size
    yield
    SERVICE.close()


@pytest.mark.slow
@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_the_server_answers_as_its_openapi_spec_says(case):
    case.call_and_validate(checks=CHECKS)


def test_every_endpoint_is_fuzzed():
    operations = {f"{r.ok().method.upper()} {r.ok().path}" for r in schema.get_all_operations()}
    assert operations == FUZZED
