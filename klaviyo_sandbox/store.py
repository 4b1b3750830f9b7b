"""In-memory state of one sandbox account: profiles (with identifier indexes), metrics, events (with the dedup
keys), Custom Objects, bulk import jobs.

Plain data; the rules that change it live in ``profiles``, ``events``, ``objects`` and ``jobs``. The app is
single-threaded asyncio and no handler awaits while it mutates, so no locks are needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Identifiers a profile can be matched on, in matching precedence (id first, handled separately).
IDENTIFIERS = ("external_id", "email", "phone_number", "anonymous_id")
PROFILE_FIELDS = (
    "email",
    "phone_number",
    "external_id",
    "anonymous_id",
    "_kx",
    "first_name",
    "last_name",
    "organization",
    "locale",
    "title",
    "image",
)
LOCATION_FIELDS = (
    "address1",
    "address2",
    "city",
    "country",
    "latitude",
    "longitude",
    "region",
    "zip",
    "timezone",
    "ip",
)


@dataclass(slots=True)
class Profile:
    """A Klaviyo profile."""

    id: str
    attrs: dict[str, Any]
    location: dict[str, Any]
    properties: dict[str, Any]
    created: float
    updated: float
    last_event: float | None = None


@dataclass(slots=True)
class Metric:
    """A metric (event name)."""

    id: str
    name: str
    created: float
    service: str | None = None


@dataclass(slots=True)
class Event:
    """A stored metric event."""

    id: str
    profile_id: str
    metric_id: str
    timestamp: int
    received: float
    seq: int
    uuid: str
    properties: dict[str, Any]
    unique_id: str | None
    value: float | None = None
    value_currency: str | None = None
    backfill: bool = False


@dataclass
class DataSource:
    """A Custom Objects data source."""

    id: str
    title: str
    visibility: str
    description: str
    namespace: str
    created: float


@dataclass
class SourceMapping:
    """JSONPath mappings from data-source records into a schema's properties and relationships."""

    id: str
    schema_id: str
    property_mappings: list[dict[str, Any]] = field(default_factory=list)
    relationship_mappings: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ObjectSchema:
    """An object type's schema (draft or active)."""

    id: str
    object_type_id: str
    status: str
    properties: list[dict[str, Any]]
    required: list[str]
    mapping_id: str
    created: float
    updated: float
    #: profile relationships: relationship id → {"name", "description"}
    profile_relationships: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class ObjectType:
    """A Custom Objects type (e.g. WalletPass)."""

    id: str
    title: str
    description: str
    visibility: str
    namespace: str
    created: float
    updated: float
    draft_schema_id: str | None = None
    current_schema_id: str | None = None


@dataclass(slots=True)
class ObjectRecord:
    """An ingested object record: ``<type id>:::<record id>``."""

    object_type_id: str
    record_id: str
    properties: dict[str, Any]
    relationships: dict[str, Any]
    created: float
    updated: float
    seq: int
    #: How many times the record was ingested (a replacement counts): for inspection, not in Klaviyo's API.
    writes: int = 1

    @property
    def full_id(self) -> str:
        """The id Klaviyo uses in URLs."""
        return f"{self.object_type_id}:::{self.record_id}"


@dataclass
class IngestionLog:
    """A failed ingestion, as ``object-ingestion-logs`` lists it."""

    id: str
    object_type_id: str
    timestamp: float
    summary: str
    errors: list[dict[str, Any]]
    record: Any
    data_source_id: str
    seq: int


@dataclass
class ImportJob:
    """A profile bulk-import job."""

    id: str
    status: str
    created: float
    profiles: list[dict[str, Any]]
    list_ids: list[str]
    started: float | None = None
    completed: float | None = None
    completed_count: int = 0
    failed_count: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    profile_ids: list[str] = field(default_factory=list)
    #: Items the injected ``reject_external_ids`` fault refuses (decided when the job was created).
    rejected: frozenset[int] = frozenset()
    #: How its import errors are worded (``FaultConfig.import_error_shape`` when the job was created).
    error_shape: str = "absolute"


@dataclass
class AccountState:
    """Everything one account holds."""

    account_id: str
    profiles: dict[str, Profile] = field(default_factory=dict)
    #: identifier name → value → profile id
    index: dict[str, dict[str, str]] = field(default_factory=lambda: {k: {} for k in IDENTIFIERS})
    metrics: dict[str, Metric] = field(default_factory=dict)
    metric_by_name: dict[str, str] = field(default_factory=dict)
    events: dict[str, Event] = field(default_factory=dict)
    events_by_profile: dict[str, list[Event]] = field(default_factory=dict)
    event_keys: set[tuple[str, str, str]] = field(default_factory=set)
    data_sources: dict[str, DataSource] = field(default_factory=dict)
    object_types: dict[str, ObjectType] = field(default_factory=dict)
    schemas: dict[str, ObjectSchema] = field(default_factory=dict)
    mappings: dict[str, SourceMapping] = field(default_factory=dict)
    records: dict[str, dict[str, ObjectRecord]] = field(default_factory=dict)
    ingestion_logs: dict[str, list[IngestionLog]] = field(default_factory=dict)
    import_jobs: dict[str, ImportJob] = field(default_factory=dict)
    seq: int = 0
    #: Events accepted (2xx) but dropped as duplicates of stored ones: for inspection, not in Klaviyo's API.
    duplicate_events: int = 0

    def next_seq(self) -> int:
        """A per-account arrival counter (stable tie-breaks)."""
        self.seq += 1
        return self.seq
