"""Every emulated operation has a conformance check of its success response against the spec."""

from __future__ import annotations

import re
from pathlib import Path

from klaviyo_sandbox.handlers import HANDLERS
from klaviyo_sandbox.operations import EMULATED_OPERATIONS
from klaviyo_sandbox.schema import load_spec


def test_every_operation_is_served_and_checked_against_its_response_schema() -> None:
    assert set(HANDLERS) == set(EMULATED_OPERATIONS) == set(load_spec().operations)
    sources = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    checked = set(re.findall(r'check_response\(\s*"(\w+)"', sources))
    assert set(EMULATED_OPERATIONS) - checked == set()
