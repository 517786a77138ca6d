"""The served OpenAPI document against the live answers: schemathesis generates requests for every operation.

Generated bodies are schema-valid and schema-invalid; the service must never answer 5xx (its store is up)
and every answer must match the documented status, content type, headers and schema.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from attest_service.web import create_app
from attest_service.web.openapi import openapi_document
from tests.web.conftest import Clock, GeneratedPki, settings_for

#: Generated examples per operation and mode: enough to cover the shapes, few enough to stay fast.
EXAMPLES_PER_OPERATION = 40

CHECKS = [status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]

_PATHS = openapi_document()["paths"]
OPERATIONS = [(method.upper(), path) for path, item in _PATHS.items() for method in item]  # type: ignore[union-attr]
#: Operations with a request body: the only ones negative generation has something to make invalid in.
WITH_BODY = {(method.upper(), path) for path, item in _PATHS.items()  # type: ignore[union-attr]
             for method, operation in item.items() if "requestBody" in operation}


#: Every operation with schema-valid input; the operations with a body also with schema-invalid input.
CASES = [(method, path, schemathesis.GenerationMode.POSITIVE) for method, path in OPERATIONS] + [
    (method, path, schemathesis.GenerationMode.NEGATIVE) for method, path in OPERATIONS if (method, path) in WITH_BODY]


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_answers_match_the_openapi_document(method: str, path: str, mode: schemathesis.GenerationMode,
                                            test_pki: GeneratedPki, tmp_path: Path) -> None:
    settings_ = settings_for(test_pki, f"sqlite:///{tmp_path / 'nonces.sqlite3'}",
                             ATTEST_RATE_LIMIT_PER_MINUTE="1000000")
    schema = schemathesis.openapi.from_wsgi("/openapi.json", create_app(settings_, clock=Clock()))
    operation = schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    def check(case: schemathesis.Case) -> None:
        response = case.call()
        assert response.status_code < 500, response.text
        case.validate_response(response, checks=CHECKS)

    check()


def test_real_success_matches_the_document(test_pki: GeneratedPki, tmp_path: Path) -> None:
    settings_ = settings_for(test_pki, f"sqlite:///{tmp_path / 'nonces.sqlite3'}", ATTEST_ALLOW_OPEN="1")
    schema = schemathesis.openapi.from_wsgi("/openapi.json", create_app(settings_, clock=Clock()))
    for body, status in (({"signature": test_pki.signature(nonce="openapi-ok")}, 200),
                         ({"signature": test_pki.signature(nonce="openapi-ok")}, 409)):
        case = schema["/v1/verify"]["POST"].Case(body=body, media_type="application/json")
        response = case.call()
        assert response.status_code == status
        case.validate_response(response, checks=CHECKS)
    case = schema["/v1/challenges"]["POST"].Case()
    response = case.call()
    assert response.status_code == 201
    case.validate_response(response, checks=CHECKS)

