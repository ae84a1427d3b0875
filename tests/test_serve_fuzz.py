"""redrafter-serve fuzzed from its own OpenAPI document with schemathesis (127.0.0.1 only).

Schema-conforming and schema-violating requests to both generation endpoints, a bounded number
of each: every answer is a completion that matches the published response schema, or a 4xx whose
body is the OpenAI error object; never a 5xx, a hang (a 30 s limit per request) or a traceback in
the server's log.
"""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from test_serve import engine_dir, start_server, stop_server  # noqa: F401 - the fixture

pytestmark = pytest.mark.full

#: examples per endpoint and generation mode, and seconds a request may take
EXAMPLES = 80
REQUEST_TIMEOUT = 30


@pytest.fixture(scope="module")
def fuzzed_server(engine_dir):  # noqa: F811 - the imported fixture
    proc, url = start_server(engine_dir, "--max_queue", 4)
    yield proc, url
    stop_server(proc)  # a no-op after the last test stopped it


@pytest.fixture(scope="module")
def api_schema(fuzzed_server):
    return schemathesis.openapi.from_url(fuzzed_server[1] + "/openapi.json")


@schemathesis.check
def openai_error_object(ctx, response, case):
    """A 4xx answer's body is ``{"error": {"message", "type", "param", "code"}}``."""
    if 400 <= response.status_code < 500:
        body = json.loads(response.content)
        assert set(body) == {"error"}, body
        err = body["error"]
        assert isinstance(err.get("message"), str) and err["message"], err
        assert isinstance(err.get("type"), str) and "param" in err and "code" in err, err


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
    openai_error_object,
]


# schemathesis's own pytest plugin (``from_fixture``) does not run under the pinned pytest, so
# hypothesis drives its strategies directly: one test per endpoint and generation mode
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_fuzzed_requests_get_a_completion_or_an_openai_4xx(api_schema, path, mode):
    op = api_schema[path]["POST"]

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def run(case):
        case.call_and_validate(timeout=REQUEST_TIMEOUT, checks=CHECKS)

    run()


def test_the_fuzzed_server_logged_no_traceback(fuzzed_server):
    proc, url = fuzzed_server  # runs after the fuzz test (file order)
    stop_server(proc)  # the log is complete once the process has exited
    assert proc.returncode == 0
    text = proc.stdout.read()
    assert "Traceback" not in text and "Exception" not in text, text[-4000:]
