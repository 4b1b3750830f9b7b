"""operationId → handler, for every emulated operation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from klaviyo_sandbox.handlers import accounts, events, jobs, objects, profiles
from klaviyo_sandbox.handlers.common import Call, Handler, Reply

HANDLERS: dict[str, Handler] = {
    "get_accounts": accounts.get_accounts,
    "get_account": accounts.get_account,
    "create_or_update_profile": profiles.create_or_update_profile,
    "create_profile": profiles.create_profile,
    "get_profiles": profiles.get_profiles,
    "get_profile": profiles.get_profile,
    "update_profile": profiles.update_profile,
    "bulk_import_profiles": jobs.bulk_import_profiles,
    "get_bulk_import_profiles_jobs": jobs.get_bulk_import_profiles_jobs,
    "get_bulk_import_profiles_job": jobs.get_bulk_import_profiles_job,
    "get_errors_for_bulk_import_profiles_job": jobs.get_errors_for_bulk_import_profiles_job,
    "get_profiles_for_bulk_import_profiles_job": jobs.get_profiles_for_bulk_import_profiles_job,
    "create_event": events.create_event,
    "bulk_create_events": events.bulk_create_events,
    "get_events": events.get_events,
    "get_event": events.get_event,
    "get_metrics": events.get_metrics,
    "get_metric": events.get_metric,
    "create_data_source": objects.create_data_source,
    "get_data_sources": objects.get_data_sources,
    "get_data_source": objects.get_data_source,
    "delete_data_source": objects.delete_data_source,
    "create_data_source_record": objects.create_data_source_record,
    "bulk_create_data_source_records": objects.bulk_create_data_source_records,
    "create_object_type": objects.create_object_type,
    "get_object_types": objects.get_object_types,
    "get_object_type": objects.get_object_type,
    "delete_object_type": objects.delete_object_type,
    "create_object_schema": objects.create_object_schema,
    "get_object_schema": objects.get_object_schema,
    "update_object_schema": objects.update_object_schema,
    "get_current_schema_for_object_type": objects.get_current_schema_for_object_type,
    "get_draft_schema_for_object_type": objects.get_draft_schema_for_object_type,
    "create_profile_schema_relationship": objects.create_profile_schema_relationship,
    "get_profile_schema_relationships": objects.get_profile_schema_relationships,
    "update_profile_schema_relationship": objects.update_profile_schema_relationship,
    "delete_profile_schema_relationship": objects.delete_profile_schema_relationship,
    "get_source_mapping_for_object_schema": objects.get_source_mapping_for_object_schema,
    "get_source_mapping": objects.get_source_mapping,
    "update_source_mapping": objects.update_source_mapping,
    "get_records_for_object_type": objects.get_records_for_object_type,
    "get_object_record": objects.get_object_record,
    "bulk_delete_object_records": objects.bulk_delete_object_records,
    "get_ingestion_logs_for_object_type": objects.get_ingestion_logs_for_object_type,
}

#: operationId → the handler's checks, for operations whose checks of a big body take long (a 1,000-event bulk
#: job: 15-20 ms). The sandbox runs them in its bulk-body thread, off the event loop, and hands the handler
#: their result in ``Call.checked``.
CHECKS: dict[str, Callable[[Call], Any]] = {
    "bulk_create_events": events.check_bulk_events,
}

__all__ = ["CHECKS", "HANDLERS", "Call", "Handler", "Reply"]
