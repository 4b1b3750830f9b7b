"""Status → error class mapping (pure); the same over real HTTP is in test_client_http.py."""

from __future__ import annotations

import orjson
import pytest

from worker.klaviyo.errors import (
    AccountFault,
    AuthError,
    KlaviyoError,
    PermanentError,
    ThrottledError,
    TransientError,
    error_from_response,
    parse_retry_after,
)


def _body(
    status: int, code: str = "invalid", detail: str = "Invalid input.", pointer: str = "/data", **meta: object
) -> bytes:
    return orjson.dumps(
        {
            "errors": [
                {
                    "id": "x",
                    "status": status,
                    "code": code,
                    "title": "t",
                    "detail": detail,
                    "source": {"pointer": pointer},
                    "meta": meta,
                }
            ]
        }
    )


@pytest.mark.parametrize("status", [500, 502, 503, 504, 520, 524, 599])
def test_5xx_but_501_is_transient(status: int) -> None:
    err = error_from_response("create_event", status, b"", {})
    assert type(err) is TransientError
    assert err.status == status
    assert err.endpoint == "create_event"


@pytest.mark.parametrize("status", [400, 404, 405, 409, 413, 415, 422, 501])
def test_other_4xx_and_501_are_permanent(status: int) -> None:
    err = error_from_response(
        "create_or_update_profile",
        status,
        _body(status, "invalid", "Invalid email address", "/data/attributes/email"),
        {},
    )
    assert type(err) is PermanentError
    assert (err.status, err.code, err.detail, err.pointer) == (
        status,
        "invalid",
        "Invalid email address",
        "/data/attributes/email",
    )
    assert "Invalid email address" in str(err)
    assert "/data/attributes/email" in str(err)


@pytest.mark.parametrize("status", [401, 403])
def test_401_403_are_auth(status: int) -> None:
    err = error_from_response(
        "create_event",
        status,
        _body(status, "authentication_failed", "Incorrect authentication credentials."),
        {},
    )
    assert type(err) is AuthError
    assert err.status == status
    assert err.code == "authentication_failed"


@pytest.mark.parametrize(
    ("endpoint", "status", "detail", "code"),
    [
        ("create_or_update_profile", 410, "This revision is no longer supported.", "revision_retired"),
        ("create_event", 410, "", "revision_retired"),
        ("get_bulk_import_profiles_job", 404, "No valid revisions found for method", "revision_not_served"),
        ("create_data_source_record", 404, "data-source 'XYZ' not found.", "data_source_missing"),
        ("bulk_create_data_source_records", 404, "Not found.", "data_source_missing"),
    ],
)
def test_account_wide_refusals_pause_the_account(endpoint: str, status: int, detail: str, code: str) -> None:
    """A retired or unserved revision, or a deleted data source, fails every event of the account alike: an
    AuthError (the account is paused), never a PermanentError (which dead-letters each event)."""
    err = error_from_response(endpoint, status, _body(status, "x", detail) if detail else b"", {})
    assert type(err) is AccountFault
    assert isinstance(err, AuthError)
    assert (err.status, err.code, err.endpoint) == (status, code, endpoint)
    assert detail in str(err)
    assert ("PASSBRIDGE_KLAVIYO_REVISION" in str(err)) is code.startswith("revision")
    assert ("passbridge klaviyo setup" in str(err)) is (code == "data_source_missing")


def test_other_404s_stay_permanent() -> None:
    err = error_from_response("get_object_schema", 404, _body(404, "not_found", "Not found."), {})
    assert type(err) is PermanentError


def test_429_is_throttled_with_retry_after() -> None:
    err = error_from_response("create_event", 429, _body(429, "throttled"), {"retry-after": "7"})
    assert isinstance(err, ThrottledError)
    assert err.retry_after_s == 7
    assert err.endpoint == "create_event"
    assert err.status == 429
    fractional = error_from_response("create_event", 429, b"", {"retry-after": "0.25"})
    assert isinstance(fractional, ThrottledError)
    assert fractional.retry_after_s == 0.25


def test_409_keeps_meta() -> None:
    err = error_from_response(
        "create_or_update_profile",
        409,
        _body(
            409,
            "duplicate_profile",
            "A profile already exists with one of these identifiers.",
            "/data/attributes",
            duplicate_profile_id="01ABC",
        ),
        {},
    )
    assert isinstance(err, PermanentError)
    assert err.code == "duplicate_profile"
    assert err.meta == {"duplicate_profile_id": "01ABC"}


def test_non_json_bodies_still_classify() -> None:
    assert isinstance(error_from_response("e", 400, b"<html>bad</html>", {}), PermanentError)
    assert isinstance(error_from_response("e", 502, b"<html>gateway</html>", {}), TransientError)


def test_retry_after_forms() -> None:
    assert parse_retry_after(None) == 1.0
    assert parse_retry_after("garbage") == 1.0
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("-2") == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert parse_retry_after("999999") == 3600.0


def test_hierarchy_and_records_are_loggable() -> None:
    errs: list[KlaviyoError] = [
        TransientError("create_event", "timed out"),
        ThrottledError(1.5, "create_event"),
        AuthError(
            401, "create_event", code="authentication_failed", detail="Incorrect authentication credentials."
        ),
        PermanentError(400, "invalid", "bad", "/data", endpoint="create_event"),
    ]
    for err in errs:
        assert isinstance(err, KlaviyoError)
        record = orjson.loads(orjson.dumps(err.as_record()))
        assert record["endpoint"] == "create_event"
        assert record["kind"] == err.kind
        assert "create_event" in repr(err)


def test_detail_is_bounded() -> None:
    err = error_from_response("e", 400, _body(400, detail="x" * 10_000), {})
    assert isinstance(err, PermanentError)
    assert len(err.detail) == 500
