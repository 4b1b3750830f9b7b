"""Request bodies shaped like Klaviyo's documentation examples."""

from __future__ import annotations

from typing import Any


def profile_import(**attributes: Any) -> dict[str, Any]:
    """``POST /api/profile-import`` body."""
    return {"data": {"type": "profile", "attributes": attributes}}


def event(
    metric: str = "Pass Installed",
    *,
    unique_id: str | None = None,
    time: str | None = None,
    properties: dict[str, Any] | None = None,
    **profile: Any,
) -> dict[str, Any]:
    """``POST /api/events`` body; ``profile`` are the profile attributes (default external_id only)."""
    attrs: dict[str, Any] = {
        "properties": properties or {"pass_id": "p-1"},
        "metric": {"data": {"type": "metric", "attributes": {"name": metric}}},
        "profile": {"data": {"type": "profile", "attributes": profile or {"external_id": "serial-1"}}},
    }
    if unique_id is not None:
        attrs["unique_id"] = unique_id
    if time is not None:
        attrs["time"] = time
    return {"data": {"type": "event", "attributes": attrs}}


def data_source(title: str = "wallet-passes") -> dict[str, Any]:
    """``POST /api/data-sources`` body."""
    return {"data": {"type": "data-source", "attributes": {"title": title}}}


def wallet_pass_type(
    data_source_id: str, *, status: str = "active", title: str = "WalletPass"
) -> dict[str, Any]:
    """``POST /api/object-types`` with an inline schema (pass_id, status, points, updated_at) and mapping."""

    def simple(prop_id: int, path: str) -> dict[str, Any]:
        return {
            "id": prop_id,
            "type": "simple",
            "source": {"source_id": data_source_id, "id_path": "$['pass_id']", "data_path": path},
        }

    return {
        "data": {
            "type": "object-type",
            "attributes": {
                "title": title,
                "object-schema": {
                    "data": {
                        "type": "object-schema",
                        "attributes": {
                            "properties": [
                                {"id": 1, "name": "pass_id", "type": "string"},
                                {"id": 2, "name": "status", "type": "string"},
                                {"id": 3, "name": "points", "type": "int"},
                                {"id": 4, "name": "updated_at", "type": "timestamp"},
                            ],
                            "required": ["pass_id", "status"],
                            "status": status,
                            "source-mapping": {
                                "data": {
                                    "type": "source-mapping",
                                    "attributes": {
                                        "property_mappings": [
                                            simple(1, "$['pass_id']"),
                                            simple(2, "$['status']"),
                                            simple(3, "$['points']"),
                                            simple(4, "$['updated_at']"),
                                        ]
                                    },
                                }
                            },
                        },
                    }
                },
            },
        }
    }


def record_job(data_source_id: str, record: dict[str, Any]) -> dict[str, Any]:
    """``POST /api/data-source-record-create-jobs`` body."""
    return {
        "data": {
            "type": "data-source-record-create-job",
            "attributes": {
                "data-source-record": {
                    "data": {"type": "data-source-record", "attributes": {"record": record}}
                }
            },
            "relationships": {"data-source": {"data": {"type": "data-source", "id": data_source_id}}},
        }
    }


def bulk_record_job(data_source_id: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """``POST /api/data-source-record-bulk-create-jobs`` body."""
    return {
        "data": {
            "type": "data-source-record-bulk-create-job",
            "attributes": {
                "data-source-records": {
                    "data": [{"type": "data-source-record", "attributes": {"record": r}} for r in records]
                }
            },
            "relationships": {"data-source": {"data": {"type": "data-source", "id": data_source_id}}},
        }
    }
