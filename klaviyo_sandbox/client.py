"""``SandboxClient``: read back what reached the sandbox, and control it (reset, faults, outages).

It talks to the ``/_sandbox`` routes over HTTP, so it works against an in-process sandbox
(``klaviyo_sandbox.testing``) and against ``passbridge sandbox`` running elsewhere alike.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

import httpx


class SandboxError(RuntimeError):
    """The control API refused a request."""


class SandboxClient:
    """Inspection and control of one sandbox. ``account`` defaults to the sandbox's only account."""

    def __init__(self, base_url: str, account: str | None = None, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout)
        self._account = account

    def __enter__(self) -> SandboxClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._http.close()

    def _get(self, path: str, **params: Any) -> Any:
        response = self._http.get(path, params={k: v for k, v in params.items() if v is not None})
        if response.status_code >= 400:
            raise SandboxError(f"GET {path}: {response.status_code} {response.text}")
        return response.json()

    def _send(self, method: str, path: str, json: Any = None) -> Any:
        response = self._http.request(method, path, json=json)
        if response.status_code >= 400:
            raise SandboxError(f"{method} {path}: {response.status_code} {response.text}")
        return response.json()

    # -- accounts -----------------------------------------------------------------------------------------------

    def accounts(self) -> list[dict[str, Any]]:
        """Every account (ids, entitlement, OAuth client ids; never keys)."""
        accounts: list[dict[str, Any]] = self._get("/_sandbox/accounts")["accounts"]
        return accounts

    def account(self, account: str | None = None) -> str:
        """The account id to use: the given one, the client's default, or the only account."""
        if account or self._account:
            return str(account or self._account)
        ids = [a["account_id"] for a in self.accounts()]
        if len(ids) != 1:
            raise SandboxError(f"the sandbox has {len(ids)} accounts; pass account=")
        self._account = ids[0]
        return str(ids[0])

    def add_account(
        self,
        account_id: str,
        api_keys: list[str] | None = None,
        *,
        custom_objects: bool = True,
        oauth_clients: list[dict[str, Any]] | None = None,
    ) -> str:
        """Create an account at runtime (keys as given; clients as ``{"client_id", "client_secret", ...}``)."""
        doc = {
            "account_id": account_id,
            "api_keys": api_keys or [],
            "custom_objects": custom_objects,
            "oauth_clients": oauth_clients or [],
        }
        return str(self._send("POST", "/_sandbox/accounts", doc)["account_id"])

    # -- data -------------------------------------------------------------------------------------------------

    def profiles(
        self,
        account: str | None = None,
        *,
        external_id: str | None = None,
        email: str | None = None,
        phone_number: str | None = None,
    ) -> list[dict[str, Any]]:
        """Profiles (JSON:API resources), optionally only those with the given identifier."""
        acct = self.account(account)
        doc = self._get(
            f"/_sandbox/accounts/{acct}/profiles",
            external_id=external_id,
            email=email,
            phone_number=phone_number,
        )
        data: list[dict[str, Any]] = doc["data"]
        return data

    def profile(self, external_id: str, account: str | None = None) -> dict[str, Any] | None:
        """The profile with that external_id, or None."""
        found = self.profiles(account, external_id=external_id)
        return found[0] if found else None

    def events(self, profile_id: str, account: str | None = None) -> list[dict[str, Any]]:
        """A profile's events in Klaviyo's time order (each with ``metric_name``)."""
        acct = self.account(account)
        data: list[dict[str, Any]] = self._get(f"/_sandbox/accounts/{acct}/profiles/{profile_id}/events")[
            "data"
        ]
        return data

    def all_events(self, account: str | None = None, *, metric: str | None = None) -> list[dict[str, Any]]:
        """Every event of the account in time order, optionally of one metric name."""
        acct = self.account(account)
        data: list[dict[str, Any]] = self._get(f"/_sandbox/accounts/{acct}/events", metric=metric)["data"]
        return data

    def object_records(
        self, account: str | None = None, *, object_type: str | None = None
    ) -> list[dict[str, Any]]:
        """Object records (``object_type`` is a type id or title), with ``relationships`` to profiles."""
        acct = self.account(account)
        data: list[dict[str, Any]] = self._get(f"/_sandbox/accounts/{acct}/object-records", type=object_type)[
            "data"
        ]
        return data

    def ingestion_logs(self, account: str | None = None) -> list[dict[str, Any]]:
        """Records that failed ingestion (with the raw ``record``)."""
        acct = self.account(account)
        data: list[dict[str, Any]] = self._get(f"/_sandbox/accounts/{acct}/ingestion-logs")["data"]
        return data

    # -- requests, reset, idle ------------------------------------------------------------------------------

    def requests(self, limit: int = 100) -> dict[str, Any]:
        """``{"total", "counts": {operation: {status: n}}, "recent": [...]}``."""
        doc: dict[str, Any] = self._get("/_sandbox/requests", limit=limit)
        return doc

    def count(self, operation: str, status: int | None = None) -> int:
        """How many requests to ``operation`` (an operationId) were answered (with ``status``, if given)."""
        counts = self.requests(limit=0)["counts"].get(operation, {})
        if status is None:
            return sum(int(n) for n in counts.values())
        return int(counts.get(str(status), 0))

    def reset(self) -> None:
        """Forget all data, rate-limit history, the request log and runtime faults."""
        self._send("POST", "/_sandbox/reset")

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until asynchronous work (record ingestion, import jobs) has finished."""
        deadline = time.monotonic() + timeout
        while self._get("/_sandbox/health")["pending"]:
            if time.monotonic() > deadline:
                raise SandboxError("sandbox still busy")
            time.sleep(0.02)

    # -- faults ---------------------------------------------------------------------------------------------

    def set_faults(self, **config: Any) -> dict[str, Any]:
        """Replace the fault configuration: ``error_rates={503: 0.1}``, ``latency_ms``, ``jitter_ms``,
        ``hang_rate``, ``hang_s``, ``drop_rate``, ``drop_after_processing``, ``operations``, ``seed``,
        ``reject_external_ids=["serial-1"]`` (those identities' writes are refused as bad items) and
        ``reject_operations`` (where; default: ``operations``), ``import_error_shape`` (``absolute``,
        ``relative`` or ``unnamed``: how profile bulk-import jobs word their import errors) and
        ``retired_revisions={"2026-10-15": 410}`` (requests with that revision answer 410, or 404 "No valid
        revisions found for method")."""
        for name in ("reject_external_ids", "reject_operations"):
            if name in config:
                config[name] = sorted(config[name])
        if "error_rates" in config:
            config["error_rates"] = {str(k): v for k, v in config["error_rates"].items()}
        if "operations" in config:
            config["operations"] = sorted(config["operations"])
        doc: dict[str, Any] = self._send("PUT", "/_sandbox/faults", config)
        return doc

    def clear_faults(self) -> None:
        """No faults."""
        self._send("DELETE", "/_sandbox/faults")

    def add_outage(self, duration_s: float, start_in_s: float = 0.0, status: int = 503) -> None:
        """Every /api request fails with ``status`` (0 = dropped connection) for ``duration_s`` from
        ``start_in_s`` seconds from now."""
        self._send(
            "POST",
            "/_sandbox/outages",
            {"start_in_s": start_in_s, "duration_s": duration_s, "status": status},
        )

    def expire_access_tokens(self) -> int:
        """Expire every OAuth access token now (to exercise refresh-on-401)."""
        return int(self._send("POST", "/_sandbox/oauth/expire-access-tokens")["expired"])
