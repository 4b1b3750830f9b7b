"""``passbridge klaviyo setup`` against the sandbox: provisions, is idempotent, repairs, explains a 403."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from passbridge.accounts import Account, AccountStore
from passbridge.settings import Settings
from tests.cli.test_cli import PASSBRIDGE
from tests.conftest import Answer, InProcessCli
from tests.sync.conftest import (
    KLAVIYO_ACCOUNT,
    NOCO_ACCOUNT,
    NOCO_KEY,
    RATE_SCALE,
    REVISION,
    RequestRecorder,
    make_client,
    put_account,
    sandbox_accounts,
)
from worker.klaviyo.client import KlaviyoClient
from worker.klaviyo.endpoints import (
    CREATE_DATA_SOURCE,
    CREATE_DATA_SOURCE_RECORD,
    CREATE_OBJECT_TYPE,
    CREATE_OR_UPDATE_PROFILE,
    GET_DATA_SOURCES,
    GET_OBJECT_SCHEMA,
    GET_OBJECT_TYPES,
)
from worker.plan import record_job_body
from worker.setup import (
    DATA_SOURCE_TITLE,
    OBJECT_TYPE_TITLE,
    SCHEMA_PROPERTIES,
    SetupError,
    load_provisioned,
    property_mappings,
    provision,
    schema_properties,
)

WRITES = (
    "create_data_source",
    "create_object_type",
    "create_object_schema",
    "update_object_schema",
    "update_source_mapping",
    "create_profile_schema_relationship",
)


def writes(sandbox: Any) -> dict[str, int]:
    return {op: sandbox.count(op) for op in WRITES if sandbox.count(op)}


async def check_working_setup(client: KlaviyoClient, redis: Redis, account: Account, sandbox: Any) -> None:
    """What setup promises, observed: a record pushed into the data source becomes a WalletPass object record
    with every schema property, linked to the profile whose external_id is the serial."""
    provisioned = await load_provisioned(redis, account.account_id)
    assert provisioned is not None
    assert provisioned.revision == REVISION
    await client.call(
        account,
        CREATE_OR_UPDATE_PROFILE,
        body={"data": {"type": "profile", "attributes": {"external_id": "SER-1"}}},
    )
    record = {
        "serial_number": "SER-1",
        "pass_url": "https://passninja.com/p/SER-1",
        "pass_type": "ptk_0x216",
        "platform": "apple",
        "status": "active",
        "created_at": "2026-11-25T10:00:00Z",
        "updated_at": "2026-11-25T10:05:00Z",
    }
    await client.call(
        account, CREATE_DATA_SOURCE_RECORD, body=record_job_body(record, provisioned.data_source_id)
    )
    sandbox.wait_idle()
    assert sandbox.ingestion_logs() == []
    records = sandbox.object_records(object_type=OBJECT_TYPE_TITLE)
    assert len(records) == 1
    assert records[0]["id"] == f"{provisioned.object_type_id}:::SER-1"
    assert records[0]["attributes"]["record_properties"] == record
    profile = sandbox.profile("SER-1")
    assert records[0]["relationships"] == {
        provisioned.relationship_id: {
            "identifier_type": "external-id",
            "value": "SER-1",
            "profile_id": profile["id"],
        }
    }


async def test_setup_provisions_the_walletpass_object(
    client: KlaviyoClient, redis: Redis, account: Account, sandbox: Any
) -> None:
    report = await provision(client, redis, account)
    assert report.changed
    outcomes = dict(report.steps)
    assert outcomes["data source"] == "created"
    assert outcomes["object type WalletPass"] == "created"
    assert outcomes["schema"] == "published"
    types = (await client.call(account, GET_OBJECT_TYPES)).body["data"]
    assert [t["attributes"]["title"] for t in types] == [OBJECT_TYPE_TITLE]
    assert types[0]["attributes"]["status"] == "active"
    await check_working_setup(client, redis, account, sandbox)


@pytest.fixture
def own_sandbox() -> Iterator[Callable[..., tuple[str, Any]]]:
    """Start a sandbox of its own with ``SandboxConfig`` options (e.g. a publishing delay); its URL and an
    inspection client on the main account. Stopped after the test."""
    from klaviyo_sandbox.client import SandboxClient
    from klaviyo_sandbox.config import SandboxConfig
    from klaviyo_sandbox.testing import start_sandbox

    started: list[tuple[Any, Any]] = []

    def start(**options: Any) -> tuple[str, Any]:
        server = start_sandbox(SandboxConfig(accounts=sandbox_accounts(), rate_scale=RATE_SCALE, **options))
        inspect = SandboxClient(server.url, account=KLAVIYO_ACCOUNT)
        started.append((server, inspect))
        return server.url, inspect

    yield start
    for server, inspect in started:
        inspect.close()
        server.stop()


@pytest.fixture
def slow_publishing(own_sandbox: Callable[..., tuple[str, Any]]) -> tuple[str, Any]:
    """Published schemas read ``publishing`` for 1 s before they are active (what Klaviyo's spec allows)."""
    return own_sandbox(publish_delay_s=1.0)


async def test_setup_stores_the_ids_only_once_the_published_schema_is_active(
    redis: Redis, store: AccountStore, account: Account, slow_publishing: tuple[str, Any]
) -> None:
    url, sandbox = slow_publishing
    async with make_client(redis, store, url) as client:
        report = await provision(client, redis, account)
        assert dict(report.steps)["schema"] == "published"
        assert report.provisioned is not None
        schema = await client.call(
            account, GET_OBJECT_SCHEMA, path_params={"id": report.provisioned.schema_id}
        )
        assert schema.body["data"]["attributes"]["status"] == "active"
        # It asked until the schema read active (the PATCH answered while it was still publishing).
        assert sandbox.count("get_object_schema") >= 3
        # So a record pushed as soon as setup returns (an initial backfill) becomes an object record.
        await check_working_setup(client, redis, account, sandbox)


async def test_setup_that_times_out_while_publishing_stores_nothing_and_a_rerun_completes_it(
    redis: Redis, store: AccountStore, account: Account, slow_publishing: tuple[str, Any]
) -> None:
    url, sandbox = slow_publishing
    async with make_client(redis, store, url) as client:
        with pytest.raises(SetupError, match=r"still reads 'publishing' 0.3 s after it was published"):
            await provision(client, redis, account, publish_timeout_s=0.3)
        assert await load_provisioned(redis, account.account_id) is None
        # Run again while Klaviyo is still activating it: the schema can no longer be edited, so the rerun
        # only waits for it (no second publish), then stores the ids.
        report = await provision(client, redis, account)
        assert dict(report.steps)["schema"] == "publishing"
        assert sandbox.count("update_object_schema", 400) == 0
        await check_working_setup(client, redis, account, sandbox)


async def test_setup_reads_the_relationship_id_where_the_spec_documents_it(
    redis: Redis,
    store: AccountStore,
    account: Account,
    own_sandbox: Callable[..., tuple[str, Any]],
    recorder: RequestRecorder,
) -> None:
    """The relationship linkage lists each item as ``{type, id}`` only (the spec's shape): the id comes from
    ``GET /api/object-schemas/{id}?include=profile-object-schemas``, and a rerun finds the relationship."""
    url, sandbox = own_sandbox(relationship_linkage_meta=False)
    async with make_client(redis, store, url, recorder) as client:
        first = await provision(client, redis, account)
        assert dict(first.steps)["profile relationship"] == "created"
        assert first.provisioned is not None
        before = writes(sandbox)
        second = await provision(client, redis, account)
        assert all(outcome == "ok" for _, outcome in second.steps)
        assert writes(sandbox) == before  # no second relationship
        assert second.provisioned == first.provisioned
        await check_working_setup(client, redis, account, sandbox)
    includes = [r.url for r in recorder.api_requests() if "include=" in r.url]
    assert includes
    assert all("include=profile-object-schemas" in u for u in includes)


async def test_setup_twice_changes_nothing(
    client: KlaviyoClient, redis: Redis, account: Account, sandbox: Any
) -> None:
    first = await provision(client, redis, account)
    before = writes(sandbox)
    second = await provision(client, redis, account)
    assert not second.changed
    assert all(outcome == "ok" for _, outcome in second.steps)
    assert writes(sandbox) == before  # the second run only read
    assert second.provisioned == first.provisioned
    sources = (await client.call(account, GET_DATA_SOURCES)).body["data"]
    assert [s["attributes"]["title"] for s in sources] == [DATA_SOURCE_TITLE]


async def test_setup_completes_a_half_finished_run(
    client: KlaviyoClient, redis: Redis, account: Account, sandbox: Any
) -> None:
    """A run that died after creating the data source and the object type (draft schema, no relationship)."""
    ds = await client.call(
        account,
        CREATE_DATA_SOURCE,
        body={"data": {"type": "data-source", "attributes": {"title": DATA_SOURCE_TITLE}}},
    )
    ds_id = ds.body["data"]["id"]
    await client.call(
        account,
        CREATE_OBJECT_TYPE,
        body={
            "data": {
                "type": "object-type",
                "attributes": {
                    "title": OBJECT_TYPE_TITLE,
                    "object-schema": {
                        "data": {
                            "type": "object-schema",
                            "attributes": {
                                "properties": schema_properties()[:3],  # an older, shorter schema
                                "status": "draft",
                                "source-mapping": {
                                    "data": {
                                        "type": "source-mapping",
                                        "attributes": {"property_mappings": property_mappings(ds_id)[:3]},
                                    }
                                },
                            },
                        }
                    },
                },
            }
        },
    )
    report = await provision(client, redis, account)
    outcomes = dict(report.steps)
    assert outcomes["data source"] == "ok"
    assert outcomes["object type WalletPass"] == "ok"
    assert outcomes["schema properties"] == "updated"
    assert outcomes["profile relationship"] == "created"
    assert outcomes["source mapping"] == "updated"
    assert outcomes["schema"] == "published"
    assert sandbox.count("create_data_source") == 1
    assert sandbox.count("create_object_type") == 1
    await check_working_setup(client, redis, account, sandbox)


async def test_setup_replaces_an_active_schema_that_is_wrong(
    client: KlaviyoClient, redis: Redis, account: Account, sandbox: Any
) -> None:
    """A WalletPass type someone published by hand (no relationship): a new schema version is completed."""
    ds = await client.call(
        account,
        CREATE_DATA_SOURCE,
        body={"data": {"type": "data-source", "attributes": {"title": DATA_SOURCE_TITLE}}},
    )
    await client.call(
        account,
        CREATE_OBJECT_TYPE,
        body={
            "data": {
                "type": "object-type",
                "attributes": {
                    "title": OBJECT_TYPE_TITLE,
                    "object-schema": {
                        "data": {
                            "type": "object-schema",
                            "attributes": {
                                "properties": schema_properties(),
                                "status": "active",
                                "source-mapping": {
                                    "data": {
                                        "type": "source-mapping",
                                        "attributes": {
                                            "property_mappings": property_mappings(ds.body["data"]["id"])
                                        },
                                    }
                                },
                            },
                        }
                    },
                },
            }
        },
    )
    report = await provision(client, redis, account)
    outcomes = dict(report.steps)
    assert outcomes["schema draft"] == "created"
    assert outcomes["schema"] == "published"
    await check_working_setup(client, redis, account, sandbox)
    assert not (await provision(client, redis, account)).changed


async def test_missing_custom_objects_entitlement_is_explained(
    client: KlaviyoClient, redis: Redis, store: AccountStore, sandbox: Any
) -> None:
    noco = await put_account(store, "noco", klaviyo_api_key=NOCO_KEY)
    with pytest.raises(SetupError) as info:
        await provision(client, redis, noco)
    message = str(info.value)
    assert "does not have Custom Objects" in message
    assert "paid Klaviyo feature" in message
    assert "Entitlement to create object type not found." in message
    assert await load_provisioned(redis, "noco") is None
    assert sandbox.count("create_object_type", 403) == 1


def test_schema_has_the_right_types() -> None:
    types = {name: kind for _, name, kind, _ in SCHEMA_PROPERTIES}
    assert types == {
        "serial_number": "string",
        "pass_url": "string",
        "pass_type": "string",
        "platform": "string",
        "status": "string",
        "created_at": "timestamp",
        "updated_at": "timestamp",
    }


async def _cli(cli: InProcessCli, settings: Settings, base_url: str, *args: str) -> Answer:
    """``passbridge ARGS`` in this process, with the environment a process would get."""
    assert settings.secret_key is not None
    env = {
        **os.environ,
        "REDIS_URL": str(settings.redis_url),
        "PASSBRIDGE_SECRET_KEY": settings.secret_key.get_secret_value(),
        "PASSBRIDGE_STATE_DIR": str(settings.state_dir),
        "PASSBRIDGE_KLAVIYO_BASE_URL": base_url,
        "PASSBRIDGE_KLAVIYO_REVISION": REVISION,
        "PASSBRIDGE_KLAVIYO_RATE_SCALE": str(RATE_SCALE),
        "PASSBRIDGE_LOG_FORMAT": "json",
    }
    return await cli(list(args), env)


async def test_cli_setup(
    cli_in_process: InProcessCli, settings: Settings, store: AccountStore, account: Account, sandbox: Any
) -> None:
    await put_account(store, "noco", klaviyo_api_key=NOCO_KEY)
    first = await _cli(
        cli_in_process, settings, sandbox.base_url, "klaviyo", "setup", "--account", "acme", "--json"
    )
    assert first.returncode == 0, first.stderr
    doc = orjson.loads(first.stdout)
    assert doc["changed"] is True
    assert doc["provisioned"]["data_source_id"]
    second = await _cli(cli_in_process, settings, sandbox.base_url, "klaviyo", "setup", "--account", "acme")
    assert second.returncode == 0, second.stderr
    assert "WalletPass ready for acme" in second.stdout
    status = await _cli(
        cli_in_process, settings, sandbox.base_url, "klaviyo", "status", "--account", "acme", "--json"
    )
    assert orjson.loads(status.stdout)["provisioned"] == doc["provisioned"]
    refused = await _cli(cli_in_process, settings, sandbox.base_url, "klaviyo", "setup", "--account", "noco")
    assert refused.returncode == 1
    assert "does not have Custom Objects" in refused.stderr
    assert NOCO_KEY not in refused.stderr + refused.stdout
    missing = await _cli(
        cli_in_process, settings, sandbox.base_url, "klaviyo", "setup", "--account", "nobody"
    )
    assert missing.returncode == 1
    assert "no account 'nobody'" in missing.stderr
    unset = await _cli(cli_in_process, settings, sandbox.base_url, "klaviyo", "status", "--account", "noco")
    assert unset.returncode == 1
    assert "not set up" in unset.stderr
    scopes = await _cli(cli_in_process, settings, sandbox.base_url, "klaviyo", "scopes")
    assert scopes.stdout.split() == [
        "custom-objects:read",
        "custom-objects:write",
        "events:write",
        "lists:read",
        "lists:write",
        "profiles:read",
        "profiles:write",
    ]
    assert NOCO_ACCOUNT  # the sandbox account behind NOCO_KEY has no Custom Objects


async def test_setup_shows_the_operator_warnings_only_unless_a_log_level_is_set(
    settings: Settings, account: Account, sandbox: Any, tmp_path: Path
) -> None:
    """`passbridge klaviyo setup` as a real process: its table on stdout and nothing on stderr (the set-up's
    info lines, JSON off a terminal, are a server's record, not an operator's answer); with
    PASSBRIDGE_LOG_LEVEL set explicitly, info included, the steps are logged as well."""
    assert settings.secret_key is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("PASSBRIDGE_") and k != "REDIS_URL"} | {
        "REDIS_URL": str(settings.redis_url),
        "PASSBRIDGE_SECRET_KEY": settings.secret_key.get_secret_value(),
        "PASSBRIDGE_STATE_DIR": str(settings.state_dir),
        "PASSBRIDGE_KLAVIYO_BASE_URL": sandbox.base_url,
        "PASSBRIDGE_KLAVIYO_REVISION": REVISION,
        "PASSBRIDGE_KLAVIYO_RATE_SCALE": str(RATE_SCALE),
    }

    def setup(**extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PASSBRIDGE, "klaviyo", "setup", "--account", "acme"],
            env=env | extra,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    quiet = setup()
    assert quiet.returncode == 0, quiet.stderr
    assert "WalletPass provisioned for acme" in quiet.stdout
    assert quiet.stderr == ""
    verbose = setup(PASSBRIDGE_LOG_LEVEL="info")
    assert verbose.returncode == 0, verbose.stderr
    assert "WalletPass ready for acme" in verbose.stdout
    logged = [orjson.loads(line) for line in verbose.stderr.splitlines()]
    assert ("klaviyo_setup_step", "ids stored in Redis") in {(d["event"], d.get("step")) for d in logged}


async def test_ingestion_failures_are_visible(
    client: KlaviyoClient, redis: Redis, account: Account, sandbox: Any
) -> None:
    """A record job answers 204 even for a bad record; the failure is read back from the ingestion log."""
    from worker.ingestion import ingestion_failures

    await provision(client, redis, account)
    provisioned = await load_provisioned(redis, "acme")
    assert provisioned is not None
    assert await ingestion_failures(client, redis, account) == []
    bad = {"serial_number": "SER-BAD", "status": "active", "created_at": "not a time"}
    reply = await client.call(
        account, CREATE_DATA_SOURCE_RECORD, body=record_job_body(bad, provisioned.data_source_id)
    )
    assert reply.status == 204
    sandbox.wait_idle()
    failures = await ingestion_failures(client, redis, account)
    assert len(failures) == 1
    assert [e["property"] for e in failures[0].errors] == ["created_at"]


async def test_cli_shows_ingestion_failures(
    cli_in_process: InProcessCli,
    client: KlaviyoClient,
    redis: Redis,
    settings: Settings,
    account: Account,
    sandbox: Any,
) -> None:
    """Operators see record failures with ``passbridge klaviyo ingestion-failures`` (exit 1 while any)."""
    await provision(client, redis, account)
    clean = await _cli(
        cli_in_process, settings, sandbox.base_url, "klaviyo", "ingestion-failures", "--account", "acme"
    )
    assert clean.returncode == 0, clean.stderr
    assert "no WalletPass ingestion failures for acme" in clean.stdout
    provisioned = await load_provisioned(redis, "acme")
    assert provisioned is not None
    bad = {"serial_number": "SER-BAD", "status": "active", "created_at": "not a time"}
    await client.call(
        account, CREATE_DATA_SOURCE_RECORD, body=record_job_body(bad, provisioned.data_source_id)
    )
    sandbox.wait_idle()
    shown = await _cli(
        cli_in_process, settings, sandbox.base_url, "klaviyo", "ingestion-failures", "--account", "acme"
    )
    assert shown.returncode == 1
    assert "created_at" in shown.stdout
    doc = orjson.loads(
        (
            await _cli(
                cli_in_process,
                settings,
                sandbox.base_url,
                "klaviyo",
                "ingestion-failures",
                "--account",
                "acme",
                "--json",
            )
        ).stdout
    )
    assert [e["property"] for f in doc["failures"] for e in f["errors"]] == ["created_at"]
    missing = await _cli(
        cli_in_process, settings, sandbox.base_url, "klaviyo", "ingestion-failures", "--account", "nobody"
    )
    assert missing.returncode == 1
    assert "no account 'nobody'" in missing.stderr
