"""The README and docs/architecture.md against the code: names they cite, keys, scopes and dependencies."""

from __future__ import annotations

import importlib
import inspect
import re
import tomllib
from pathlib import Path
from typing import Any

from passbridge import keys
from passbridge.keys import AccountKeys
from passbridge.oauth import DEFAULT_SCOPES
from worker.klaviyo.endpoints import OAUTH_SCOPES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
ARCHITECTURE = (ROOT / "docs" / "architecture.md").read_text()


def _section(text: str, heading: str) -> str:
    return text.split(heading, 1)[1].split("\n#", 1)[0]


def _resolve(dotted: str) -> Any:
    """The object a dotted name such as ``passbridge.oauth.authorize_url`` names (its longest module prefix,
    then attributes); raises when there is none."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_cited_python_names_exist() -> None:
    """Every fully qualified name the docs cite (`pkg.module.function`) exists, so a reader finds it."""
    cited = set()
    for text in (README, *(p.read_text() for p in (ROOT / "docs").glob("*.md"))):
        cited |= set(
            re.findall(
                r"`((?:passbridge|producer|worker|klaviyo_sandbox)(?:\.[A-Za-z_]\w*)+)(?:\([^`]*\))?`", text
            )
        )
    assert len(cited) > 10  # the pattern still finds the citations
    missing = []
    for name in sorted(cited):
        try:
            _resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert missing == []


def _account_key_prefixes() -> set[str]:
    """The fixed part of every per-account key `AccountKeys` builds, for account `<a>`: the whole key of a
    property, the part before the first argument of a method (``pb:a:<a>:mb:`` for a mailbox)."""
    ak = AccountKeys("<a>")
    out = set()
    for name, member in vars(AccountKeys).items():
        if name.startswith("_") or name in ("base", "prefix", "account_id"):
            continue
        if isinstance(member, property):
            out.add(str(getattr(ak, name)).rstrip("*"))
        elif inspect.isfunction(member):
            args = ["\0"] * (len(inspect.signature(member).parameters) - 1)
            out.add(getattr(ak, name)(*args).split("\0", 1)[0])
    return out


def test_every_key_is_in_the_architecture_doc() -> None:
    """docs/architecture.md says it lists every key keys.py builds; each one appears there."""
    prefixes = _account_key_prefixes()
    assert {"pb:a:<a>:defer", "pb:a:<a>:mb:", "pb:a:<a>:rl:"} <= prefixes
    globals_ = {
        value
        for name, value in vars(keys).items()
        if name.isupper() and isinstance(value, str) and value.startswith(keys.PREFIX + ":")
    }
    globals_ -= {keys.ACCOUNT_BASE_PREFIX}  # the prefix itself, not a key
    undocumented = sorted(k for k in prefixes | globals_ if f"`{k}" not in ARCHITECTURE)
    assert undocumented == []


def test_scope_table_lists_what_oauth_asks_for() -> None:
    """The README's scope table lists every scope `accounts connect` asks for and `klaviyo scopes` prints."""
    table = _section(README, "### Connection, scopes and limits").split("| scope | for |", 1)[1]
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    listed = {s for row in rows for s in re.findall(r"`([a-z-]+:[a-z]+)`", row)}
    assert listed == set(OAUTH_SCOPES) | set(DEFAULT_SCOPES)


def test_every_dependency_is_explained() -> None:
    """Each runtime and dev dependency in pyproject.toml is named in "Why each dependency is there"."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["dev"]
    names = {re.split(r"[\[<>=~!; ]", r, maxsplit=1)[0] for r in requirements}
    section = _section(README, "## Why each dependency is there")
    unexplained = sorted(n for n in names if not re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", section))
    assert unexplained == []
