"""Start and stop the local stack as real processes: embedded Redis, Klaviyo sandbox, producer, workers.

Used by ``passbridge up`` (keep it running), ``passbridge demo`` and the end-to-end tests. Every process is a
``passbridge`` CLI subprocess, so what runs here is exactly what runs in the compose stack.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from passbridge.redis_server import RedisServer, free_port, start_redis


class StackError(RuntimeError):
    """A process of the stack did not start."""


@dataclass
class StackConfig:
    """What to start."""

    state_dir: Path
    workers: int = 2
    rate_scale: float = 1.0
    sandbox: bool = True
    sandbox_api_keys: list[str] = field(default_factory=list)
    sandbox_args: list[str] = field(default_factory=list)
    klaviyo_base_url: str | None = None
    producer_port: int = 0
    sandbox_port: int = 0
    redis_url: str | None = None
    redis_appendfsync: str = "everysec"  # for the embedded Redis (README, "Durability")
    secret_key: str | None = None
    admin_token: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)


@dataclass
class Stack:
    """The running stack's URLs and processes."""

    redis_url: str
    producer_url: str
    klaviyo_url: str
    env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]]
    redis: RedisServer | None
    logs: Path

    def worker_pids(self) -> list[int]:
        return [p.pid for name, p in self.procs.items() if name.startswith("worker")]

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) each running process of the stack has used so far (Linux ``/proc``;
        empty elsewhere). The demo reports it to show where its time goes."""
        tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        out: dict[str, float] = {}
        for name, proc in self.procs.items():
            try:
                fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            out[name] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14 and 15)
        if self.redis is not None:
            try:
                fields = Path(f"/proc/{self.redis.pid}/stat").read_text().rsplit(")", 1)[1].split()
                out["redis"] = (int(fields[11]) + int(fields[12])) / tick
            except (OSError, IndexError, AttributeError):
                pass
        return out

    def start_worker(self, name: str) -> subprocess.Popen[bytes]:
        """Start one more worker process (for scale-out and kill tests)."""
        proc = spawn_cli(["worker"], self.env, self.logs / f"{name}.log")
        self.procs[name] = proc
        return proc


def _cli() -> list[str]:
    return [sys.executable, "-m", "passbridge"]


def spawn_cli(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``passbridge ARGS`` with exactly ``env``, in its own session, stdin closed, stdout and stderr
    appended to ``log``. Stop it with ``stop_process``.

    The stack's launcher, shared with the benchmarks (``bench/harness.py``) so that both run the CLI the
    same way."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as fh:
        return subprocess.Popen(  # noqa: S603 - our own CLI
            [*_cli(), *args],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def _wait_http(url: str, proc: subprocess.Popen[bytes], name: str, log: Path, timeout: float = 30.0) -> None:
    # One plain-HTTP client for the whole wait: ``httpx.get`` builds a TLS context (loading the CA bundle,
    # about 0.15 s of CPU) on every call, which made start-up polls slower than the processes they wait for.
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=1.0, verify=False) as http:  # noqa: S501 - loopback http only
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise StackError(f"{name} exited with {proc.returncode}:\n{tail}")
            try:
                if http.get(url).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    raise StackError(f"{name} did not answer {url} within {timeout:.0f} s (log: {log})")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def stop_processes(procs: dict[str, subprocess.Popen[bytes]], timeout: float = 30.0) -> None:
    """:func:`stop_process` each of ``procs`` (name → process), workers first: a stopping worker may still finish
    an in-flight call to the sandbox or write through the producer. The others follow in name order."""
    for name in sorted(procs, key=lambda n: (not n.startswith("worker"), n)):
        stop_process(procs[name], timeout)


@contextmanager
def run_stack(cfg: StackConfig) -> Iterator[Stack]:
    """Start the stack, yield it, and stop every process on exit (workers first, Redis last)."""
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    logs = cfg.state_dir / "logs"
    redis = None
    if cfg.redis_url:
        redis_url = cfg.redis_url
    else:
        redis = start_redis(cfg.state_dir / "redis", appendfsync=cfg.redis_appendfsync)
        redis_url = redis.url
    env = {
        **os.environ,
        **cfg.extra_env,
        "REDIS_URL": redis_url,
        "PASSBRIDGE_STATE_DIR": str(cfg.state_dir),
        "PASSBRIDGE_KLAVIYO_RATE_SCALE": str(cfg.rate_scale),
        "PASSBRIDGE_LOG_FORMAT": "json",
    }
    if cfg.secret_key:
        env["PASSBRIDGE_SECRET_KEY"] = cfg.secret_key
    if cfg.admin_token:
        env["PASSBRIDGE_ADMIN_TOKEN"] = cfg.admin_token
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        # Every process is started before any is waited for: their imports (most of start-up) overlap.
        if cfg.sandbox:
            port = cfg.sandbox_port or free_port()
            args = ["sandbox", "--port", str(port), "--rate-scale", str(cfg.rate_scale), *cfg.sandbox_args]
            for key in cfg.sandbox_api_keys:
                args += ["--api-key", key]
            procs["sandbox"] = spawn_cli(args, env, logs / "sandbox.log")
            klaviyo_url = f"http://127.0.0.1:{port}"
        else:
            klaviyo_url = cfg.klaviyo_base_url or "https://a.klaviyo.com"
        env["PASSBRIDGE_KLAVIYO_BASE_URL"] = klaviyo_url
        pport = cfg.producer_port or free_port()
        procs["producer"] = spawn_cli(
            ["producer", "--host", "127.0.0.1", "--port", str(pport)], env, logs / "producer.log"
        )
        producer_url = f"http://127.0.0.1:{pport}"
        stack = Stack(redis_url, producer_url, klaviyo_url, env, procs, redis, logs)
        for i in range(cfg.workers):
            stack.start_worker(f"worker-{i + 1}")
        if cfg.sandbox:
            _wait_http(klaviyo_url + "/_sandbox/health", procs["sandbox"], "sandbox", logs / "sandbox.log")
        _wait_http(producer_url + "/readyz", procs["producer"], "producer", logs / "producer.log")
        yield stack
    finally:
        stop_processes(procs)
        if redis:
            redis.stop()
