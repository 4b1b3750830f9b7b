"""Profiles: import upsert semantics, contact validation with Klaviyo's messages, identity conflicts,
create, list with filters and cursor paging, get, patch."""

from __future__ import annotations

from typing import Any

import httpx

from tests.sandbox import payloads
from tests.sandbox.conftest import assert_klaviyo_error, check_response


def _import(api: httpx.Client, **attrs: Any) -> httpx.Response:
    return api.post("/api/profile-import", json=payloads.profile_import(**attrs))


def test_import_merges_location_and_properties_and_patches(api: httpx.Client) -> None:
    _import(api, external_id="s1", location={"city": "Boston", "zip": "02110"}, properties={"a": 1, "b": 2})
    body = {
        "data": {
            "type": "profile",
            "attributes": {
                "external_id": "s1",
                "location": {"city": "Paris"},
                "properties": {"b": 3, "c": 4},
            },
            "meta": {"patch_properties": {"append": {"tags": "gold"}, "unset": "a"}},
        }
    }
    attrs = check_response("create_or_update_profile", api.post("/api/profile-import", json=body))["data"][
        "attributes"
    ]
    assert attrs["location"]["city"] == "Paris"
    assert attrs["location"]["zip"] == "02110"
    assert attrs["properties"] == {"b": 3, "c": 4, "tags": ["gold"]}
    cleared = _import(api, external_id="s1", location=None, properties=None).json()["data"]["attributes"]
    assert cleared["location"]["city"] is None
    assert cleared["properties"] == {}


def test_import_by_id_updates_that_profile(api: httpx.Client) -> None:
    pid = _import(api, email="a@example.com").json()["data"]["id"]
    body = {"data": {"type": "profile", "id": pid, "attributes": {"first_name": "A"}}}
    response = api.post("/api/profile-import", json=body)
    assert response.status_code == 200
    assert response.json()["data"]["id"] == pid
    unknown = {"data": {"type": "profile", "id": "01J0000000000000000000000X", "attributes": {}}}
    assert_klaviyo_error(api.post("/api/profile-import", json=unknown), 404, "not_found")


def test_invalid_phone_and_email_use_klaviyo_messages(api: httpx.Client) -> None:
    phone = assert_klaviyo_error(
        _import(api, external_id="s", phone_number="555-0100"),
        400,
        "invalid",
        "/data/attributes/phone_number",
    )
    assert phone["detail"] == "Invalid phone number format (Example of a valid format: +12345678901)"
    not_e164 = _import(api, external_id="s", phone_number="+1 415 555 0123")
    assert_klaviyo_error(not_e164, 400, "invalid", "/data/attributes/phone_number")
    for not_ascii in ("+1415555012\u0660", "+14155550120\n"):  # Unicode digits, a trailing newline
        response = _import(api, external_id="s", phone_number=not_ascii)
        assert_klaviyo_error(response, 400, "invalid", "/data/attributes/phone_number")
    email = assert_klaviyo_error(
        _import(api, external_id="s", email="not-an-email"), 400, "invalid", "/data/attributes/email"
    )
    assert email["detail"] == "Invalid email address"
    assert (
        _import(
            api, external_id="s", email="o'neil+tag@sub.example.co.uk", phone_number="+447911123456"
        ).status_code
        == 201
    )


def test_a_profile_needs_an_identifier(api: httpx.Client) -> None:
    assert_klaviyo_error(_import(api, first_name="Nobody"), 400, "invalid", "/data/attributes")


def test_email_of_another_external_id_is_duplicate_profile(api: httpx.Client) -> None:
    owner = _import(api, external_id="serial-A", email="shared@example.com").json()["data"]["id"]
    response = _import(api, external_id="serial-B", email="shared@example.com")
    error = assert_klaviyo_error(response, 409, "duplicate_profile", "/data/attributes")
    assert error["meta"] == {"duplicate_profile_id": owner}
    assert error["title"] == "Conflict."
    # Without the conflicting identifier the write goes through.
    assert _import(api, external_id="serial-B").status_code == 201


def test_identifiers_on_two_profiles_are_duplicate_profile(api: httpx.Client) -> None:
    first = _import(api, email="one@example.com").json()["data"]["id"]
    second = _import(api, phone_number="+14155550123").json()["data"]["id"]
    error = assert_klaviyo_error(
        _import(api, email="one@example.com", phone_number="+14155550123"), 409, "duplicate_profile"
    )
    assert error["meta"]["duplicate_profile_id"] in {first, second} - {None}


def test_email_on_a_profile_without_external_id_is_merged(api: httpx.Client) -> None:
    pid = _import(api, email="lead@example.com").json()["data"]["id"]
    response = _import(api, external_id="serial-9", email="lead@example.com")
    assert response.status_code == 200
    assert response.json()["data"]["id"] == pid
    assert response.json()["data"]["attributes"]["external_id"] == "serial-9"


def test_create_profile_201_and_409_with_duplicate_id(api: httpx.Client) -> None:
    created = api.post("/api/profiles", json=payloads.profile_import(email="new@example.com"))
    pid = check_response("create_profile", created)["data"]["id"]
    assert created.status_code == 201
    again = api.post("/api/profiles", json=payloads.profile_import(email="new@example.com", first_name="x"))
    error = assert_klaviyo_error(again, 409, "duplicate_profile")
    assert error["detail"] == "A profile already exists with one of these identifiers."
    assert error["meta"]["duplicate_profile_id"] == pid


def test_get_profiles_filters(api: httpx.Client) -> None:
    ids = {
        ext: _import(api, external_id=ext, email=f"{ext}@example.com", phone_number=phone).json()["data"][
            "id"
        ]
        for ext, phone in (("a", "+14155550101"), ("b", "+14155550102"), ("c", "+14155550103"))
    }
    for flt, expected in (
        ('equals(external_id,"b")', ["b"]),
        ('equals(email,"c@example.com")', ["c"]),
        ('equals(phone_number,"+14155550101")', ["a"]),
        ('any(external_id,["a","c","zzz"])', ["a", "c"]),
        ('equals(external_id,"nobody")', []),
        (f'equals(id,"{ids["a"]}")', ["a"]),
    ):
        body = check_response("get_profiles", api.get("/api/profiles", params={"filter": flt}))
        assert sorted(p["attributes"]["external_id"] for p in body["data"]) == expected, flt
    bad_field = api.get("/api/profiles", params={"filter": 'equals(first_name,"x")'})
    assert assert_klaviyo_error(bad_field, 400, "invalid")["source"] == {"parameter": "filter"}
    bad_op = api.get("/api/profiles", params={"filter": 'greater-than(external_id,"x")'})
    assert_klaviyo_error(bad_op, 400, "invalid")
    garbage = api.get("/api/profiles", params={"filter": "equals(external_id"})
    assert_klaviyo_error(garbage, 400, "invalid")


def test_get_profiles_cursor_paging(api: httpx.Client) -> None:
    for i in range(45):
        _import(api, external_id=f"p{i:02d}")
    seen: list[str] = []
    url: str | None = "/api/profiles?page[size]=20"
    pages = 0
    while url:
        body = check_response("get_profiles", api.get(url))
        seen += [p["attributes"]["external_id"] for p in body["data"]]
        url = body["links"]["next"]
        assert body["links"]["prev"] is None
        pages += 1
    assert pages == 3
    assert sorted(seen) == [f"p{i:02d}" for i in range(45)]
    assert len(set(seen)) == 45
    assert_klaviyo_error(api.get("/api/profiles", params={"page[cursor]": "%%%"}), 400, "invalid")


def test_sparse_fieldsets(api: httpx.Client) -> None:
    _import(api, external_id="s", email="s@example.com", first_name="S")
    body = api.get("/api/profiles", params={"fields[profile]": "email,location.city"}).json()
    assert body["data"][0]["attributes"] == {"email": "s@example.com", "location": {"city": None}}


def test_get_and_patch_profile(api: httpx.Client) -> None:
    pid = _import(api, external_id="s", first_name="A").json()["data"]["id"]
    got = check_response("get_profile", api.get(f"/api/profiles/{pid}/"))
    assert got["data"]["attributes"]["first_name"] == "A"
    patch = {"data": {"type": "profile", "id": pid, "attributes": {"first_name": None, "title": "T"}}}
    patched = check_response("update_profile", api.patch(f"/api/profiles/{pid}", json=patch))
    assert patched["data"]["attributes"]["first_name"] is None
    assert patched["data"]["attributes"]["title"] == "T"
    assert_klaviyo_error(api.get("/api/profiles/01J0000000000000000000000X"), 404, "not_found")
    mismatch = {"data": {"type": "profile", "id": "other", "attributes": {}}}
    assert_klaviyo_error(api.patch(f"/api/profiles/{pid}", json=mismatch), 400, "invalid", "/data/id")


def test_patch_to_an_identifier_of_another_profile_is_409(api: httpx.Client) -> None:
    other = _import(api, external_id="other", email="taken@example.com").json()["data"]["id"]
    pid = _import(api, external_id="mine").json()["data"]["id"]
    patch = {"data": {"type": "profile", "id": pid, "attributes": {"email": "taken@example.com"}}}
    error = assert_klaviyo_error(api.patch(f"/api/profiles/{pid}", json=patch), 409, "duplicate_profile")
    assert error["meta"]["duplicate_profile_id"] == other
