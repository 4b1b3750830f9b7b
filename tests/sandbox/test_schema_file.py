"""The shipped compact schema equals a fresh derivation from ../shared/klaviyo/stable.json."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from klaviyo_sandbox.operations import EMULATED_OPERATIONS
from klaviyo_sandbox.schema.derive import SPEC_SOURCE, derive_file, find_shared_spec

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "klaviyo_sandbox" / "schema" / "klaviyo-2026-07-15.json"


def test_shipped_schema_matches_derivation_from_shared_spec() -> None:
    spec = find_shared_spec(ROOT)
    if spec is None:
        pytest.skip("../shared/klaviyo/stable.json is absent: cannot re-derive the shipped schema here")
    revision, text = derive_file(spec, SPEC_SOURCE)
    assert revision == "2026-07-15"
    assert SHIPPED.read_text(encoding="utf-8") == text, "run: python scripts/derive_klaviyo_schema.py"
    assert json.loads(text)["provenance"]["sha256"] == hashlib.sha256(spec.read_bytes()).hexdigest()


def test_shipped_schema_is_compact_and_self_describing() -> None:
    doc = json.loads(SHIPPED.read_text(encoding="utf-8"))
    prov = doc["provenance"]
    assert prov["source"] == "../shared/klaviyo/stable.json"
    assert prov["revision"] == "2026-07-15"
    assert len(prov["sha256"]) == 64
    assert set(doc["operations"]) == set(EMULATED_OPERATIONS)
    assert '"description"' not in json.dumps(doc["schemas"]["ProfileUpsertQuery"])
    assert '"example"' not in SHIPPED.read_text(encoding="utf-8")
