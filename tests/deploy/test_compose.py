"""The compose stack and the image, checked without a Docker engine: the file against the Compose
Specification's own schema, every service's command against the real CLI, the Dockerfile against the package."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from cryptography.fernet import Fernet

from passbridge.crypto import load_cipher
from passbridge.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT.parent / "shared" / "compose" / "compose-spec.json"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return doc


def _seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m)", value)
    assert m, value
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[m.group(2)]


def test_compose_file_is_valid_per_the_compose_specification(compose: dict[str, Any]) -> None:
    if not SPEC.exists():
        pytest.skip(
            f"{SPEC} is absent: the Compose Specification schema lives in ../shared (not in the repo)"
        )
    jsonschema.Draft7Validator(json.loads(SPEC.read_text())).validate(compose)


def test_the_validation_catches_a_broken_file(compose: dict[str, Any]) -> None:
    if not SPEC.exists():
        pytest.skip(f"{SPEC} is absent")
    broken = json.loads(json.dumps(compose))
    broken["services"]["worker"]["stop_grace_period"] = {"not": "a duration"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(json.loads(SPEC.read_text())).validate(broken)


@pytest.mark.parametrize("service", ["producer", "worker", "klaviyo-sandbox"])
def test_every_service_command_is_a_real_passbridge_command(compose: dict[str, Any], service: str) -> None:
    command = compose["services"][service]["command"]
    # Click parses every option before it acts on --help: an unknown option fails here.
    run = subprocess.run(
        [sys.executable, "-m", "passbridge", *command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr


def test_services_are_shaped_for_production(compose: dict[str, Any]) -> None:
    s = compose["services"]
    redis = s["redis"]
    assert re.fullmatch(r"redis:7\.\d+\.\d+(-alpine)?", redis["image"])
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    fsync = redis["command"][redis["command"].index("--appendfsync") + 1]
    assert _interpolate(fsync, {}) == "everysec"
    assert _interpolate(fsync, {"PASSBRIDGE_REDIS_APPENDFSYNC": "always"}) == "always"
    assert any(v.startswith("redis-data:") for v in redis["volumes"])
    assert "redis-data" in compose["volumes"]
    assert redis["healthcheck"]["test"][-1] == "ping"

    producer = s["producer"]
    assert "/readyz" in " ".join(producer["healthcheck"]["test"])
    assert producer["depends_on"]["redis"]["condition"] == "service_healthy"

    worker = s["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker
    assert _seconds(worker["stop_grace_period"]) > Settings().worker_grace_s

    sandbox = s["klaviyo-sandbox"]
    assert sandbox["profiles"] == ["dev"]
    for name in ("producer", "worker", "klaviyo-sandbox"):
        assert s[name]["image"] == "passbridge:latest"
        assert s[name]["environment"]["REDIS_URL"] == "redis://redis:6379/0"


def _option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_prometheus_can_scrape_every_process_of_the_stack(compose: dict[str, Any]) -> None:
    """The worker-only counters (deliveries, DLQ, Klaviyo answers, takeovers) reach Prometheus: each worker
    serves /metrics on the compose network (not published), and the shipped scrape config finds it there."""
    worker = compose["services"]["worker"]
    port = int(_option(worker["command"], "--metrics-port"))
    # Bound on every interface of the container (127.0.0.1, the default, is unreachable from Prometheus'),
    # exposed to the compose network, never published on the host.
    assert worker["environment"]["PASSBRIDGE_METRICS_HOST"] == "0.0.0.0"  # noqa: S104
    assert [str(p) for p in worker["expose"]] == [str(port)]
    assert "ports" not in worker
    # The worker's own environment still carries the shared one (YAML merge), secret key included.
    assert (
        worker["environment"]["PASSBRIDGE_SECRET_KEY"]
        == compose["services"]["producer"]["environment"]["PASSBRIDGE_SECRET_KEY"]
    )
    producer_port = int(_option(compose["services"]["producer"]["command"], "--port"))

    prom = yaml.safe_load((ROOT / "docs" / "prometheus.yml").read_text())
    assert prom["rule_files"] == ["alerts.yml"]
    assert (ROOT / "docs" / "alerts.yml").exists()
    jobs = {job["job_name"]: job for job in prom["scrape_configs"]}
    assert set(jobs) == {"passbridge-producer", "passbridge-worker"}
    assert jobs["passbridge-producer"]["static_configs"] == [{"targets": [f"producer:{producer_port}"]}]
    [sd] = jobs["passbridge-worker"]["dns_sd_configs"]
    # The service name resolves to every replica (--scale worker=N) on the compose network.
    assert (sd["names"], sd["type"], sd["port"]) == (["worker"], "A", port)
    for job in jobs.values():
        assert job["metrics_path"] == "/metrics"

    readme = (ROOT / "README.md").read_text()
    assert "[`docs/prometheus.yml`](docs/prometheus.yml)" in readme
    assert f"every worker serves port {port} on the compose network" in " ".join(readme.split())


def test_dockerfile_matches_the_package() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert 'ENTRYPOINT ["passbridge"]' in dockerfile
    assert project["project"]["scripts"]["passbridge"] == "passbridge.cli:main"
    # The image installs the runtime package only: no dev extras.
    assert "[dev]" not in dockerfile
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.M)
    assert dockerfile.count("FROM ") == 2  # multi-stage
    for package in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        name = package.rstrip("*")
        assert f"COPY {name} ./{name}" in dockerfile, f"the image lacks the {name} package"


@pytest.mark.slow
def test_the_wheel_carries_lua_scripts_and_the_sandbox_schema(tmp_path: Path) -> None:
    """What the image installs: the wheel must hold every Lua script and the derived Klaviyo schema (a Docker
    build cannot reach ../shared)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("passbridge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for lua in [*ROOT.glob("passbridge/lua/*.lua"), *ROOT.glob("worker/lua/*.lua")]:
        assert str(lua.relative_to(ROOT)) in names
    assert any(n.startswith("klaviyo_sandbox/schema/klaviyo-") and n.endswith(".json") for n in names)


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${NAME}``, ``${NAME:-default}`` and ``${NAME:?error}`` (the forms this file uses)."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise ValueError(f"required variable {name} is missing a value: {arg}")
        return arg if op == ":-" else ""

    return re.sub(r"\$\{([A-Z_][A-Z0-9_]*)(?:(:[-?])([^}]*))?\}", one, value)


def test_every_service_gets_one_required_shared_secret_key(compose: dict[str, Any]) -> None:
    """Without PASSBRIDGE_SECRET_KEY each container would generate a key of its own: compose refuses to start,
    and its message says how to make one."""
    key = Fernet.generate_key().decode()
    for name in ("producer", "worker"):
        value = compose["services"][name]["environment"]["PASSBRIDGE_SECRET_KEY"]
        assert _interpolate(value, {"PASSBRIDGE_SECRET_KEY": key}) == key
        with pytest.raises(ValueError, match=r"set PASSBRIDGE_SECRET_KEY in \.env") as refused:
            _interpolate(value, {})
        with pytest.raises(ValueError, match=r"set PASSBRIDGE_SECRET_KEY in \.env"):
            _interpolate(value, {"PASSBRIDGE_SECRET_KEY": ""})
    # The command the message gives makes a key passbridge accepts.
    command = str(refused.value).split("generate one with: ", 1)[1].rstrip(")")
    if shutil.which("openssl") is None:
        pytest.skip("no openssl here to run the suggested command")
    made = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=10, check=True)
    load_cipher(made.stdout.strip(), ROOT)  # raises SecretKeyError for a malformed key
    # .env.example and the README's compose section say so too.
    assert "Required by docker-compose" in (ROOT / ".env.example").read_text()
    assert "`PASSBRIDGE_SECRET_KEY` is required" in (ROOT / "README.md").read_text()
