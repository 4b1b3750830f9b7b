"""What every handler receives (``Call``) and returns (``Reply``), and small shared helpers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from klaviyo_sandbox.errors import invalid
from klaviyo_sandbox.filters import Condition, parse_filter
from klaviyo_sandbox.store import AccountState

if TYPE_CHECKING:
    from klaviyo_sandbox.config import AccountConfig
    from klaviyo_sandbox.runtime import Runtime


@dataclass
class Call:
    """One authenticated, validated /api request."""

    runtime: Runtime
    account: AccountConfig
    state: AccountState
    operation: str
    params: dict[str, str]
    query: dict[str, Any]
    body: Any
    base_url: str
    now: float
    revision: str
    path: str
    #: What the operation's check (``handlers.CHECKS``) found, when the sandbox ran it off the event loop.
    checked: Any = None

    @property
    def self_url(self) -> str:
        """The request's own URL without the query (``links.self``)."""
        return f"{self.base_url}{self.path}"

    def filters(self) -> list[Condition]:
        """The parsed ``filter`` parameter (empty when absent)."""
        text = self.query.get("filter")
        if not text:
            return []
        return parse_filter(text, self.runtime.spec.operations[self.operation].get("filters"))

    def page_size(self, default: int) -> int:
        """``page[size]`` or the operation's default."""
        size = self.query.get("page[size]", default)
        return int(size)

    def later(self, delay_s: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` after ``delay_s`` (asynchronous processing, as Klaviyo does it)."""
        self.runtime.later(delay_s, fn)


@dataclass
class Reply:
    """A handler's answer: status, JSON body (None = empty), extra headers."""

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Call], Reply]


def data(call: Call) -> dict[str, Any]:
    """``body["data"]`` (the schema has checked it is there)."""
    value: dict[str, Any] = call.body["data"]
    return value


def check_path_id(call: Call, name: str = "id") -> None:
    """JSON:API: the body's ``data.id`` must equal the id in the URL."""
    body_id = data(call).get("id")
    if body_id is not None and body_id != call.params[name]:
        raise invalid(
            f"The id in the body ({body_id}) does not match the id in the URL ({call.params[name]}).",
            pointer="/data/id",
        )


def refuse_rejected(call: Call, identity: Any, pointer: str) -> None:
    """The injected ``reject_external_ids`` fault: refuse the item of ``identity`` as Klaviyo refuses a bad
    item, a 400 ``invalid`` pointing at it."""
    if call.runtime.faults.rejects(call.operation, identity):
        raise invalid(f"'{identity}' is not a valid value (refused by the sandbox's fault).", pointer=pointer)


def record_identity(record: Any) -> Any:
    """What ``reject_external_ids`` matches a data-source record by: its ``external_id`` or ``serial_number``."""
    if not isinstance(record, dict):
        return None
    return record.get("external_id", record.get("serial_number"))


def document(resource: Any, self_url: str) -> dict[str, Any]:
    """A single-resource document."""
    return {"data": resource, "links": {"self": self_url}}
