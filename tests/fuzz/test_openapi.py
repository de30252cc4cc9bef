"""Fuzz the API from its own OpenAPI document (schemathesis): no 5xx, and answers that match the
documented schemas and content types. Bounded examples per operation."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def api_schema(service):
    return schemathesis.openapi.from_url(f"{service.url}/schema/openapi.json")


def test_no_server_errors_and_documented_answers(api_schema):
    # Driven by hand rather than with schemathesis' pytest plugin, which does not run on pytest 9.
    failures: list[str] = []
    calls = 0
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def exercise(case):
            nonlocal calls
            calls += 1
            case.call_and_validate(
                checks=[not_a_server_error, response_schema_conformance, content_type_conformance], timeout=30
            )

        try:
            exercise()
        except Exception as error:  # collect every operation's first failure, then report them all
            failures.append(f"{operation.label}: {error}")
    assert not failures, "\n\n".join(failures)
    assert calls >= 3 * len(operations)  # Hypothesis may stop early on small input spaces
