"""Every Klaviyo operation passbridge calls: method, path, rate tier and required scopes.

The figures are copied from the official OpenAPI spec (revision 2026-07-15): ``x-klaviyo-ratelimit`` gives the
tier, ``x-klaviyo-scopes`` the scopes. ``tests/sync/test_endpoints.py`` checks this table against the spec file
whenever ``../shared/klaviyo`` is present, so a drift fails the build. The OAuth scopes passbridge asks for are
derived from the table (:data:`OAUTH_SCOPES`): adding an operation here is the one way to start calling it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Tier:
    """A rate tier: at most ``burst`` requests per second and ``steady`` per minute (both enforced)."""

    burst: int
    steady: int


XS = Tier(1, 15)
#: The record bulk endpoint's own tier (3/s but only 15/m): it is what caps a backlog of distinct serials.
S_15 = Tier(3, 15)
S = Tier(3, 60)
M = Tier(10, 150)
L = Tier(75, 750)
XL = Tier(350, 3500)


@dataclass(frozen=True, slots=True)
class Operation:
    """One Klaviyo operation. ``name`` is Klaviyo's operationId; it names the limiter's bucket too."""

    name: str
    method: str
    path: str
    tier: Tier
    scopes: tuple[str, ...]

    def url_path(self, **params: str) -> str:
        """The path with ``{id}``-style parameters filled in (already URL-safe ids only)."""
        from urllib.parse import quote

        return self.path.format(**{k: quote(v, safe=":") for k, v in params.items()})


_CO_R = ("custom-objects:read",)
_CO_W = ("custom-objects:write",)

# The write path, once per event.
CREATE_OR_UPDATE_PROFILE = Operation(
    "create_or_update_profile", "POST", "/api/profile-import", L, ("profiles:write",)
)
CREATE_EVENT = Operation("create_event", "POST", "/api/events", XL, ("events:write",))
CREATE_DATA_SOURCE_RECORD = Operation(
    "create_data_source_record", "POST", "/api/data-source-record-create-jobs", L, _CO_W
)

# The bulk write path (worker/bulk.py), for backlogs: one request carries many operations.
BULK_CREATE_EVENTS = Operation(
    "bulk_create_events", "POST", "/api/event-bulk-create-jobs", M, ("events:write",)
)
BULK_IMPORT_PROFILES = Operation(
    "bulk_import_profiles", "POST", "/api/profile-bulk-import-jobs", M, ("lists:write", "profiles:write")
)
GET_BULK_IMPORT_PROFILES_JOB = Operation(
    "get_bulk_import_profiles_job",
    "GET",
    "/api/profile-bulk-import-jobs/{job_id}",
    M,
    ("lists:read", "profiles:read"),
)
GET_BULK_IMPORT_PROFILES_JOBS = Operation(
    "get_bulk_import_profiles_jobs",
    "GET",
    "/api/profile-bulk-import-jobs",
    M,
    ("lists:read", "profiles:read"),
)
GET_ERRORS_FOR_BULK_IMPORT_PROFILES_JOB = Operation(
    "get_errors_for_bulk_import_profiles_job",
    "GET",
    "/api/profile-bulk-import-jobs/{id}/import-errors",
    M,
    ("profiles:read",),
)
BULK_CREATE_DATA_SOURCE_RECORDS = Operation(
    "bulk_create_data_source_records", "POST", "/api/data-source-record-bulk-create-jobs", S_15, _CO_W
)

# Account set-up (``passbridge klaviyo setup``).
GET_DATA_SOURCES = Operation("get_data_sources", "GET", "/api/data-sources", S, _CO_R)
#: Also the paused-account probe: it answers only while the credentials, the revision and the data source work.
GET_DATA_SOURCE = Operation("get_data_source", "GET", "/api/data-sources/{id}", S, _CO_R)
CREATE_DATA_SOURCE = Operation("create_data_source", "POST", "/api/data-sources", S, _CO_W)
GET_OBJECT_TYPES = Operation("get_object_types", "GET", "/api/object-types", S, _CO_R)
CREATE_OBJECT_TYPE = Operation("create_object_type", "POST", "/api/object-types", S, _CO_W)
CREATE_OBJECT_SCHEMA = Operation("create_object_schema", "POST", "/api/object-schemas", S, _CO_W)
GET_OBJECT_SCHEMA = Operation("get_object_schema", "GET", "/api/object-schemas/{id}", S, _CO_R)
UPDATE_OBJECT_SCHEMA = Operation("update_object_schema", "PATCH", "/api/object-schemas/{id}", S, _CO_W)
GET_SOURCE_MAPPING_FOR_OBJECT_SCHEMA = Operation(
    "get_source_mapping_for_object_schema", "GET", "/api/object-schemas/{id}/source-mapping", S, _CO_R
)
UPDATE_SOURCE_MAPPING = Operation("update_source_mapping", "PATCH", "/api/source-mappings/{id}", S, _CO_W)
GET_PROFILE_SCHEMA_RELATIONSHIPS = Operation(
    "get_profile_schema_relationships",
    "GET",
    "/api/object-schemas/{id}/relationships/profile-object-schemas",
    S,
    _CO_R,
)
CREATE_PROFILE_SCHEMA_RELATIONSHIP = Operation(
    "create_profile_schema_relationship",
    "POST",
    "/api/object-schemas/{id}/relationships/profile-object-schemas",
    S,
    _CO_W,
)

# Operators: records that failed ingestion only show up here (record jobs answer 204 regardless).
GET_INGESTION_LOGS_FOR_OBJECT_TYPE = Operation(
    "get_ingestion_logs_for_object_type", "GET", "/api/object-types/{id}/object-ingestion-logs", XS, _CO_R
)

OPERATIONS: tuple[Operation, ...] = (
    CREATE_OR_UPDATE_PROFILE,
    CREATE_EVENT,
    CREATE_DATA_SOURCE_RECORD,
    BULK_CREATE_EVENTS,
    BULK_IMPORT_PROFILES,
    GET_BULK_IMPORT_PROFILES_JOB,
    GET_BULK_IMPORT_PROFILES_JOBS,
    GET_ERRORS_FOR_BULK_IMPORT_PROFILES_JOB,
    BULK_CREATE_DATA_SOURCE_RECORDS,
    GET_DATA_SOURCES,
    GET_DATA_SOURCE,
    CREATE_DATA_SOURCE,
    GET_OBJECT_TYPES,
    CREATE_OBJECT_TYPE,
    CREATE_OBJECT_SCHEMA,
    GET_OBJECT_SCHEMA,
    UPDATE_OBJECT_SCHEMA,
    GET_SOURCE_MAPPING_FOR_OBJECT_SCHEMA,
    UPDATE_SOURCE_MAPPING,
    GET_PROFILE_SCHEMA_RELATIONSHIPS,
    CREATE_PROFILE_SCHEMA_RELATIONSHIP,
    GET_INGESTION_LOGS_FOR_OBJECT_TYPE,
)

#: Exactly the scopes the operations above require, sorted: what the OAuth authorize URL asks for.
OAUTH_SCOPES: tuple[str, ...] = tuple(sorted({s for op in OPERATIONS for s in op.scopes}))

#: The token endpoint (not rate-limited by our limiter; it is not an ``/api`` operation).
OAUTH_TOKEN_PATH = "/oauth/token"  # noqa: S105 - a URL path, not a secret
