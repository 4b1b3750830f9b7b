"""Every setting is documented: in .env.example and in the README's configuration table, and nothing is
documented that the code does not read."""

from __future__ import annotations

import re
from pathlib import Path

from passbridge.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def _variables() -> set[str]:
    out = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        out.add(alias if isinstance(alias, str) else f"PASSBRIDGE_{name.upper()}")
    return out


def test_env_example_lists_every_setting() -> None:
    text = (ROOT / ".env.example").read_text()
    listed = set(re.findall(r"^#?\s*((?:PASSBRIDGE_[A-Z0-9_]+)|REDIS_URL)=", text, re.M))
    assert _variables() - listed == set()


def test_readme_table_matches_the_settings() -> None:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", section, re.M))
    assert rows == _variables()
