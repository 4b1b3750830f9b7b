"""The Klaviyo operations the sandbox emulates, and since which revision each one exists.

The operation ids are the spec's ``operationId`` values; ``scripts/derive_klaviyo_schema.py`` keeps exactly
these operations when it derives the shipped schema file, and the app serves exactly these.
"""

from __future__ import annotations

from typing import Final

#: Revisions the sandbox serves: every published GA revision from 2026-07-15 through the newest.
SERVED_REVISIONS: Final = ("2026-07-15", "2026-10-15")
OLDEST_SERVED: Final = SERVED_REVISIONS[0]
NEWEST_SERVED: Final = SERVED_REVISIONS[-1]

# Operations that have existed since long before the oldest served revision. A well-formed older revision
# on them is outside what the sandbox emulates (400), not "did not exist yet" (404).
_LONG_STANDING: Final = "2023-01-24"

# Since when each Custom Objects operation is GA (klaviyo/openapi branches, see ../shared/notes/klaviyo-api.md
# §1.3): data sources and bulk record jobs since 2025-07-15, single record jobs since 2026-04-15, object
# types/schemas/mappings/records since 2026-07-15. A revision before that answers 404 "No valid revisions
# found for method", as Klaviyo answers for a method a revision does not serve.
_DATA_SOURCES: Final = "2025-07-15"
_RECORD_JOB: Final = "2026-04-15"
_OBJECTS_GA: Final = "2026-07-15"

#: operationId → the first revision that serves it.
EMULATED_OPERATIONS: Final[dict[str, str]] = {
    # accounts
    "get_accounts": _LONG_STANDING,
    "get_account": _LONG_STANDING,
    # profiles
    "create_or_update_profile": _LONG_STANDING,
    "create_profile": _LONG_STANDING,
    "get_profiles": _LONG_STANDING,
    "get_profile": _LONG_STANDING,
    "update_profile": _LONG_STANDING,
    "bulk_import_profiles": _LONG_STANDING,
    "get_bulk_import_profiles_jobs": _LONG_STANDING,
    "get_bulk_import_profiles_job": _LONG_STANDING,
    "get_errors_for_bulk_import_profiles_job": _LONG_STANDING,
    "get_profiles_for_bulk_import_profiles_job": _LONG_STANDING,
    # events and metrics
    "create_event": _LONG_STANDING,
    "bulk_create_events": _LONG_STANDING,
    "get_events": _LONG_STANDING,
    "get_event": _LONG_STANDING,
    "get_metrics": _LONG_STANDING,
    "get_metric": _LONG_STANDING,
    # custom objects: data sources and record ingestion
    "create_data_source": _DATA_SOURCES,
    "get_data_sources": _DATA_SOURCES,
    "get_data_source": _DATA_SOURCES,
    "delete_data_source": _DATA_SOURCES,
    "bulk_create_data_source_records": _DATA_SOURCES,
    "create_data_source_record": _RECORD_JOB,
    # custom objects: types, schemas, mappings, records
    "create_object_type": _OBJECTS_GA,
    "get_object_types": _OBJECTS_GA,
    "get_object_type": _OBJECTS_GA,
    "delete_object_type": _OBJECTS_GA,
    "create_object_schema": _OBJECTS_GA,
    "get_object_schema": _OBJECTS_GA,
    "update_object_schema": _OBJECTS_GA,
    "get_current_schema_for_object_type": _OBJECTS_GA,
    "get_draft_schema_for_object_type": _OBJECTS_GA,
    "create_profile_schema_relationship": _OBJECTS_GA,
    "get_profile_schema_relationships": _OBJECTS_GA,
    "update_profile_schema_relationship": _OBJECTS_GA,
    "delete_profile_schema_relationship": _OBJECTS_GA,
    "get_source_mapping_for_object_schema": _OBJECTS_GA,
    "get_source_mapping": _OBJECTS_GA,
    "update_source_mapping": _OBJECTS_GA,
    "get_records_for_object_type": _OBJECTS_GA,
    "get_object_record": _OBJECTS_GA,
    "bulk_delete_object_records": _OBJECTS_GA,
    "get_ingestion_logs_for_object_type": _OBJECTS_GA,
}
