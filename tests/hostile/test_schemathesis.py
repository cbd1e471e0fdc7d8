"""Schemathesis against the live server's own OpenAPI schema: positive and negative cases for every
operation, the coverage phase's boundary values and unexpected methods included. No 5xx, every error in the
one JSON shape, no traceback, and the server alive at the end. Bounded: a fixed seed, a few dozen examples per
operation, and generation budgets clamped so the tiny model never runs for long."""

from __future__ import annotations

import collections
import json
import time
import warnings

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error

from hostile_checks import check_alive, error_keys, no_leaks

MAX_EXAMPLES = 25
SEEN: collections.Counter = collections.Counter()


def app_schema() -> dict:
    """The OpenAPI document the server's app serves, built without starting anything (no engines load).
    Schemathesis needs it when tests are collected, before any server runs; `test_the_schema_is_the_live_one`
    checks it is exactly what the live server serves. (Its fixture-based loader, which could wait for the
    server, does not run under pytest 9: it sets `request.node._nodeid`.)"""
    from shoal.server.app import create_app
    from shoal.settings import Settings

    with warnings.catch_warnings():  # FastAPI's "Duplicate Operation ID" for /v1/health: see below
        warnings.simplefilter("ignore", UserWarning)
        return create_app(Settings(ui=False, api_key=None)).openapi()


CONFIG = schemathesis.Config.from_dict({
    "seed": 20261202,
    "generation": {"mode": "all", "max-examples": MAX_EXAMPLES},
    "phases": {"stateful": {"enabled": False}},
})
schema = schemathesis.openapi.from_dict(app_schema(), config=CONFIG)


def without_health_operation_ids(doc: dict) -> dict:
    """/v1/health takes GET and POST through one route (so that a wrong method's 405 lists both in Allow), and
    FastAPI then names both operations after whichever method its set yields first: that differs between
    processes."""
    doc = json.loads(json.dumps(doc))
    for operation in doc["paths"]["/v1/health"].values():
        operation.pop("operationId", None)
    return doc


def test_the_schema_is_the_live_one(open_server):
    live = open_server.http.get("/openapi.json").json()
    assert without_health_operation_ids(live) == without_health_operation_ids(app_schema())


def bounded(case) -> None:
    """Keep generation short on the tiny model: a few tokens per segment, a few segments per request. Text
    and tokens are where a tts request spends its time; the rest of the body is left as generated."""
    body = case.body
    if isinstance(body, dict):
        tokens = body.get("max_new_tokens")
        if isinstance(tokens, int) and not isinstance(tokens, bool) and (tokens == 0 or tokens > 8):
            body["max_new_tokens"] = 8
        text = body.get("input")
        if isinstance(text, str) and len(text) > 120 and len(text) <= 5000:
            body["input"] = text[:120]


@schema.parametrize()
@hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
def test_no_server_errors_and_one_error_shape(case, open_server):
    bounded(case)
    t0 = time.monotonic()
    response = case.call(base_url=open_server.url, timeout=60)
    SEEN[(case.method, case.path, response.status_code)] += 1
    case.validate_response(response, checks=[not_a_server_error])
    assert response.status_code < 500, response.text[:500]
    assert time.monotonic() - t0 < 30, f"{case.method} {case.path} took {time.monotonic() - t0:.1f} s"
    ctype = (response.headers.get("content-type") or [""])[0]
    no_leaks(open_server, response.content.decode("latin-1") if not ctype.startswith("audio/") else "")
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == error_keys(case.path) and set(body["error"]) == {"message", "type", "code"}, (
            case.as_curl_command(), body)
        assert all(isinstance(v, str) and v for v in body["error"].values()), body
    check_alive(open_server)


def test_schemathesis_ran_and_the_server_lives(open_server):
    """Runs after the generated test in this module: it sent a few hundred requests, of many kinds."""
    if not SEEN:
        pytest.skip("the generated test was not selected in this run")
    total = sum(SEEN.values())
    print(f"schemathesis: {total} requests, {dict(SEEN)}")
    assert total >= 100, SEEN
    check_alive(open_server)
