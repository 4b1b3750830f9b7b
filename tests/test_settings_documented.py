"""Every setting is documented: in .env.example and in the README's configuration table, and nothing is
documented that the code does not read."""

from __future__ import annotations

import re
from pathlib import Path

from passbridge.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


#: Set by passbridge for its own child processes, never by an operator.
INTERNAL = {"PASSBRIDGE_EXPRESS_PARENT_PID"}

#: Reads of the environment outside Settings: a CLI option's envvar, os.environ / os.getenv, compose's ${...}.
_READS = re.compile(
    r"""envvar\s*=\s*["'](PASSBRIDGE_[A-Z0-9_]+)["']"""
    r"""|os\.environ\.get\(\s*["'](PASSBRIDGE_[A-Z0-9_]+)["']"""
    r"""|os\.getenv\(\s*["'](PASSBRIDGE_[A-Z0-9_]+)["']"""
    r"""|os\.environ\[\s*["'](PASSBRIDGE_[A-Z0-9_]+)["']\s*\](?!\s*=[^=])"""
    r"""|\$\{(PASSBRIDGE_[A-Z0-9_]+)"""
)


def _read_outside_settings(text: str) -> set[str]:
    return {next(g for g in m.groups() if g) for m in _READS.finditer(text)} - INTERNAL


def _code_variables() -> set[str]:
    out = set()
    for package in ("passbridge", "producer", "worker", "klaviyo_sandbox"):
        for path in (ROOT / package).rglob("*.py"):
            out |= _read_outside_settings(path.read_text())
    return out | _read_outside_settings((ROOT / "docker-compose.yml").read_text())


def _variables() -> set[str]:
    out = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        out.add(alias if isinstance(alias, str) else f"PASSBRIDGE_{name.upper()}")
    return out | _code_variables()


def test_reads_outside_settings_are_found() -> None:
    """The scan sees each way the code reads a variable, and not a variable it only sets for a child."""
    code = """
        typer.Option(envvar="PASSBRIDGE_A")
        os.environ.get("PASSBRIDGE_B", "x")
        os.getenv('PASSBRIDGE_C')
        x = os.environ["PASSBRIDGE_D"]
        os.environ["PASSBRIDGE_SET_ONLY"] = "1"
        if os.environ["PASSBRIDGE_E"] == "1": pass
        port: "${PASSBRIDGE_F:-8000}"
        os.environ.get("PASSBRIDGE_EXPRESS_PARENT_PID")
    """
    assert _read_outside_settings(code) == {f"PASSBRIDGE_{c}" for c in "ABCDEF"}
    assert {"PASSBRIDGE_REDIS_SERVER", "PASSBRIDGE_KLAVIYO_CLIENT_SECRET"} <= _code_variables()


def test_env_example_lists_every_setting() -> None:
    text = (ROOT / ".env.example").read_text()
    listed = set(re.findall(r"^#?\s*((?:PASSBRIDGE_[A-Z0-9_]+)|REDIS_URL)=", text, re.M))
    assert _variables() - listed == set()


def test_readme_table_matches_the_settings() -> None:
    """Every variable an operator may set has its row, those read only from the process environment too
    (PROMETHEUS_MULTIPROC_DIR is in .env.example; it was missing from the table)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", section, re.M))
    assert rows == _variables() | _read_only_from_process_env()


#: Reads of any environment variable straight from the process environment (a CLI option's envvar, os.environ,
#: os.getenv), not through Settings, which is the only reader of `.env`.
_PROCESS_READS = re.compile(
    r"""envvar\s*=\s*["']([A-Z][A-Z0-9_]*)["']"""
    r"""|os\.environ\.get\(\s*["']([A-Z][A-Z0-9_]*)["']"""
    r"""|os\.getenv\(\s*["']([A-Z][A-Z0-9_]*)["']"""
    r"""|os\.environ\[\s*["']([A-Z][A-Z0-9_]*)["']\s*\](?!\s*=[^=])"""
)


def _read_only_from_process_env() -> set[str]:
    settings = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        settings.add(alias if isinstance(alias, str) else f"PASSBRIDGE_{name.upper()}")
    out = set()
    for package in ("passbridge", "producer", "worker", "klaviyo_sandbox"):
        for path in (ROOT / package).rglob("*.py"):
            out |= {next(g for g in m.groups() if g) for m in _PROCESS_READS.finditer(path.read_text())}
    return out - settings - INTERNAL


def test_variables_not_read_from_dotenv_are_named() -> None:
    """A variable the code reads only from the process environment is silently ignored as a line of `.env`: the
    README's configuration intro and .env.example's header name each such variable."""
    found = _read_only_from_process_env()
    assert {
        "PASSBRIDGE_REDIS_SERVER",
        "PASSBRIDGE_KLAVIYO_CLIENT_SECRET",
        "PROMETHEUS_MULTIPROC_DIR",
    } <= found
    readme = (ROOT / "README.md").read_text()
    intro = readme.split("## Configuration", 1)[1].split("\n|", 1)[0]
    header = (ROOT / ".env.example").read_text().split("\n\n", 1)[0]
    for name in sorted(found):
        assert f"`{name}`" in intro, f"README's configuration intro does not say {name} is not read from .env"
        assert name in header, f".env.example's header does not say {name} is not read from .env"
