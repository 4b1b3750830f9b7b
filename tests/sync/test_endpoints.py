"""The endpoint table (tiers, scopes, paths) agrees with Klaviyo's official spec; OAuth asks for exactly its scopes."""

from __future__ import annotations

from tests.sync.spec import require_spec
from worker.klaviyo.endpoints import OAUTH_SCOPES, OPERATIONS, Operation


def _per(value: str) -> tuple[int, str]:
    count, unit = value.split("/")
    return int(count), unit


def test_every_operation_matches_the_spec() -> None:
    spec = require_spec()
    for op in OPERATIONS:
        found = spec.operations.get(op.name)
        assert found is not None, f"{op.name} is not an operationId of the spec"
        assert (found.method, found.path) == (op.method, op.path), op.name
        assert _per(found.ratelimit["burst"]) == (op.tier.burst, "s"), op.name
        assert _per(found.ratelimit["steady"]) == (op.tier.steady, "m"), op.name
        assert set(found.scopes) == set(op.scopes), op.name


def test_oauth_scopes_are_exactly_what_the_operations_need() -> None:
    spec = require_spec()
    needed = {s for op in OPERATIONS for s in spec.operations[op.name].scopes}
    assert set(OAUTH_SCOPES) == needed
    assert list(OAUTH_SCOPES) == sorted(OAUTH_SCOPES)
    assert set(OAUTH_SCOPES) == {
        "custom-objects:read",
        "custom-objects:write",
        "events:write",
        "profiles:write",
    }


def test_url_path_fills_and_quotes_ids() -> None:
    op = Operation("x", "GET", "/api/object-records/{id}", OPERATIONS[0].tier, ())
    assert op.url_path(id="01ABC:::serial/1") == "/api/object-records/01ABC:::serial%2F1"


def test_request_checker_flags_what_klaviyo_would_refuse() -> None:
    """The per-request spec check used on every recorded request can fail, for each reason it checks."""
    spec = require_spec()
    good = b'{"data":{"type":"data-source","attributes":{"title":"t"}}}'
    headers = {"revision": "2026-10-15", "content-type": "application/vnd.api+json"}
    assert spec.check_request("POST", "http://k/api/data-sources", headers, good) == []
    assert spec.check_request("POST", "http://k/api/data-sources/", headers, good) == []
    assert (
        spec.check_request(
            "GET", "http://k/api/data-sources?page%5Bcursor%5D=x", {"revision": "2026-07-15"}, None
        )
        == []
    )
    problems = [
        spec.check_request("POST", "http://k/api/nope", headers, good),
        spec.check_request("POST", "http://k/api/data-sources", {"content-type": "application/json"}, good),
        spec.check_request("GET", "http://k/api/data-sources?bogus=1", {"revision": "2026-07-15"}, None),
        spec.check_request("POST", "http://k/api/data-sources", headers, b'{"data":{"type":"data-source"}}'),
        spec.check_request(
            "POST", "http://k/api/data-sources", {**headers, "content-type": "text/plain"}, good
        ),
        spec.check_request("POST", "http://k/api/data-sources", headers, None),
    ]
    assert all(p for p in problems), problems
    assert "no such operation" in problems[0][0]
    assert "revision" in problems[1][0]
    assert "bogus" in problems[2][0]
    assert "attributes" in problems[3][0]
    assert "content-type" in problems[4][0]
    assert "body required" in problems[5][0]
