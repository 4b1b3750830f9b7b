"""The ``revision`` header rules (issue 3).

- missing or malformed (not ``YYYY-MM-DD[.suffix]`` with a real date) → 400;
- a published revision from 2026-07-15 through the newest (2026-10-15) → served;
- a well-formed revision older than the operation's first revision → 404 "No valid revisions found for
  method" (what Klaviyo answers for a method a revision does not serve);
- any other well-formed revision (older ones the sandbox does not emulate, unpublished or future dates) → 400
  saying what the sandbox serves.
"""

from __future__ import annotations

import functools
import re
from datetime import date

from klaviyo_sandbox.errors import ApiError
from klaviyo_sandbox.operations import NEWEST_SERVED, OLDEST_SERVED, SERVED_REVISIONS

_FORMAT = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(?:\.([A-Za-z0-9]+))?$")


def _bad(detail: str) -> ApiError:
    return ApiError(400, "invalid", detail, pointer=None, parameter="revision")


@functools.lru_cache(maxsize=256)
def check_revision(header: str | None, since: str) -> str:
    """The served revision named by ``header`` for an operation that exists since ``since``, or an ApiError."""
    if header is None or header == "":
        raise _bad("Missing `revision` header. Send `revision: YYYY-MM-DD`, e.g. `revision: 2026-07-15`.")
    m = _FORMAT.match(header)
    if not m:
        raise _bad(f"Invalid revision `{header}`: the format is YYYY-MM-DD[.suffix].")
    try:
        date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError:
        raise _bad(f"Invalid revision `{header}`: not a real date.") from None
    day = header[:10]
    suffix = m.group(4)
    if day < since:
        raise ApiError(
            404, "not_found", "No valid revisions found for method", pointer=None, parameter="revision"
        )
    if suffix is None and day in SERVED_REVISIONS:
        return day
    if day < OLDEST_SERVED:
        raise _bad(
            f"Revision `{header}` is older than the sandbox emulates: it serves {', '.join(SERVED_REVISIONS)}."
        )
    raise _bad(
        f"Revision `{header}` is not a published revision the sandbox serves "
        f"({OLDEST_SERVED} through {NEWEST_SERVED}: {', '.join(SERVED_REVISIONS)})."
    )


def retired_revision(retired: tuple[tuple[str, int], ...], revision: str) -> None:
    """Raise what Klaviyo answers once it no longer serves ``revision``, if the ``retired_revisions`` fault
    (revision → 410 or 404) names it."""
    for name, status in retired:
        if name != revision:
            continue
        if status == 410:
            raise ApiError(
                410,
                "gone",
                f"API revision {revision} has been retired. Upgrade to a current revision.",
                pointer=None,
                parameter="revision",
            )
        raise ApiError(
            404, "not_found", "No valid revisions found for method", pointer=None, parameter="revision"
        )
