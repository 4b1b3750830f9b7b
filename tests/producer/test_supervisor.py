"""``passbridge producer --workers N``'s supervisor (passbridge/cli/uvicorn_workers.py) with real worker
processes: a worker that does not finish stopping does not hold the stop past the grace period and margin."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from passbridge.cli.uvicorn_workers import DUMP_WAIT_S, STOP_MARGIN_S
from passbridge.redis_server import free_port
from tests.conftest import pid_alive

ROOT = Path(__file__).resolve().parents[2]

#: The supervisor as ``passbridge producer --workers 2`` runs it, serving tests/producer/stuck_worker_app.py.
SERVE = """
import sys
import uvicorn
from passbridge.cli.uvicorn_workers import serve
from passbridge.logging import configure_logging

configure_logging("info", "console")
serve(uvicorn.Config(
    "tests.producer.stuck_worker_app:app", host="127.0.0.1", port=int(sys.argv[1]), workers=2,
    timeout_graceful_shutdown=float(sys.argv[2]), log_config=None, log_level="warning",
), announce=lambda port: None)
"""


def _plain(text: str) -> str:
    """``text`` without the console log format's colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_a_worker_that_never_finishes_stopping_is_killed_once_the_grace_and_margin_have_run_out(
    tmp_path: Path,
) -> None:
    """SIGTERM to the supervisor: the worker that stops normally exits by itself, the stuck one is killed (and
    logged) at the deadline, and the supervisor exits 0 then rather than waiting for it forever."""
    grace_s = 1.0
    marks = tmp_path / "marks"
    marks.mkdir()
    log = tmp_path / "supervisor.log"
    env = {**os.environ, "STUCK_APP_DIR": str(marks)}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, str(free_port()), str(grace_s)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while len(list(marks.glob("started-*"))) < 2:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        workers = {int(p.name.split("-")[1]) for p in marks.glob("started-*")}
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s + STOP_MARGIN_S + 15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the supervisor did not exit: it waits for a stuck worker\n{log.read_text()}")
        exited_after = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    text = log.read_text()
    [stuck] = [int(p.name.split("-")[1]) for p in marks.glob("stuck-*")]
    [stopped] = [int(p.name.split("-")[1]) for p in marks.glob("stopped-*")]
    assert {stuck, stopped} == workers
    # The grace and margin, the stacks' half second, and the supervisor's half-second tick before it acts.
    assert exited_after < grace_s + STOP_MARGIN_S + DUMP_WAIT_S + 1, (exited_after, text)
    assert proc.returncode == 0, text
    [killed] = [line for line in _plain(text).splitlines() if "producer_worker_killed" in line]
    assert f"pid={stuck} " in killed, text
    assert not pid_alive(stuck)
    assert not pid_alive(stopped)
