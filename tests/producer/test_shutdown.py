"""A rolling deploy: ``passbridge producer`` (a real process, 1 or 2 uvicorn workers) gets SIGTERM while senders
post. Nothing answered 2xx is lost, every request in flight is answered or fails as a connection error, an NDJSON
upload in progress is answered at once with where to resume, and the process exits within its grace period."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
from redis.asyncio import Redis

from passbridge.cli.uvicorn_workers import DUMP_WAIT_S, STOP_MARGIN_S
from passbridge.keys import account_keys
from passbridge.redis_server import free_port, start_redis
from passbridge.settings import Settings
from tests.factories import event, make_account
from tests.producer.conftest import cipher
from tests.producer.test_webhooks import payload, signed

PASSBRIDGE = str(Path(sys.executable).parent / "passbridge")
AUTH = {"Authorization": "Bearer tok-acme"}
GRACE_S = 3


@dataclass
class Producer:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-12000:]

    def assert_no_worker_killed(self) -> None:
        """No worker process had to be killed at the stop's deadline: the stop stayed within its bound even then,
        but a stuck worker is a bug; the log holds its stacks and tasks (passbridge/cli/uvicorn_workers.py)."""
        text = self.log.read_text(errors="replace")
        assert "producer_worker_killed" not in text, text

    def terminate(self) -> float:
        """SIGTERM (to the process only, as ``docker stop`` sends it to PID 1); the time it took to exit."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.wait_exit(GRACE_S + 20)
        return time.monotonic() - started

    def wait_exit(self, timeout: float) -> None:
        """Wait for the producer to exit; if it does not, fail with where each of its processes is stuck."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # Where each of its processes is stuck: faulthandler (PYTHONFAULTHANDLER) prints every thread's stack
            # on SIGABRT into the log.
            ps = subprocess.run(
                ["ps", "-o", "pid,ppid,stat,etime,args", "-g", str(self.proc.pid)],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
            os.killpg(self.proc.pid, signal.SIGABRT)
            time.sleep(2)
            pytest.fail(f"the producer did not exit within {timeout} s\n{ps}\n{self.logs()}")


def spawn_producer(
    settings: Settings, redis_url: str, tmp_path: Path, workers: int, grace_s: float = GRACE_S
) -> Producer:
    """``passbridge producer --workers N`` with a short grace period, in a session of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PASSBRIDGE_") and k != "REDIS_URL"}
    assert settings.secret_key is not None
    env.update(
        REDIS_URL=redis_url,
        PASSBRIDGE_STATE_DIR=str(settings.state_dir),
        PASSBRIDGE_SECRET_KEY=settings.secret_key.get_secret_value(),
        PASSBRIDGE_LOG_FORMAT="console",
        PASSBRIDGE_RETRY_AFTER_S="3",
        PASSBRIDGE_PRODUCER_SHUTDOWN_GRACE_S=str(grace_s),
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom"),
        PYTHONFAULTHANDLER="1",  # see Producer.wait_exit
    )
    port = free_port()
    log = tmp_path / "producer.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [PASSBRIDGE, "producer", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Producer(proc, port, log)


async def start_producer(
    settings: Settings, redis_url: str, tmp_path: Path, workers: int, grace_s: float = GRACE_S
) -> Producer:
    """:func:`spawn_producer`, then wait until it answers."""
    producer = spawn_producer(settings, redis_url, tmp_path, workers, grace_s)
    proc = producer.proc
    deadline = time.monotonic() + 30
    # Every worker process has started (each logs producer_ready once its lifespan has): probes over one
    # connection hear from one worker only, and one still starting at SIGTERM holds its copy of the listening
    # socket, so a new connection was accepted and reset instead of refused.
    while producer.log.read_text(errors="replace").count("producer_ready") < workers:
        assert proc.poll() is None, producer.logs()
        assert time.monotonic() < deadline, producer.logs()
        await asyncio.sleep(0.05)
    async with httpx.AsyncClient(timeout=1) as http:
        while True:
            assert time.monotonic() < deadline, producer.logs()
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"{producer.url}/readyz")).status_code == 200:
                    break
            await asyncio.sleep(0.1)
    return producer


@pytest.fixture
async def secret(redis: Redis, settings: Settings) -> str:
    """Registers the account; its webhook secret."""
    account = await make_account(redis, cipher(settings))
    return account.secrets.webhook_secrets[0].get_secret_value()


def kill(producer: Producer) -> None:
    """Whatever is left of the producer's process group (after a failed test)."""
    if producer.proc.poll() is None:
        os.killpg(producer.proc.pid, signal.SIGKILL)
        producer.proc.wait(timeout=10)


async def stored_ids(redis: Redis) -> set[str]:
    """The event ids in the account's mailboxes."""
    keys = account_keys("acme")
    out: set[str] = set()
    async for key in redis.scan_iter(match=keys.mailbox("*")):
        for member in await redis.zrange(key, 0, -1):
            out.add(orjson.loads(member[12:])["id"])  # after the 12-hex-digit sequence
    return out


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_under_load_loses_nothing_answered_and_exits_within_the_grace(
    redis: Redis, redis_url: str, settings: Settings, tmp_path: Path, secret: str, workers: int
) -> None:
    """Every request ends as a 2xx whose events are in Redis, a 503, or a connection error; the senders' last
    attempts are refused connections, and the process is gone long before the grace runs out."""
    producer = await start_producer(settings, redis_url, tmp_path, workers)
    acknowledged: set[str] = set()
    outcomes: Counter[str] = Counter()
    enough = asyncio.Event()
    try:
        # 16 senders on connections of their own (kept alive, as a sender's pool does), half of them webhooks.
        async def send(n: int) -> None:
            async with httpx.AsyncClient(base_url=producer.url, timeout=GRACE_S + 15) as http:
                for i in range(n, 1_000_000, 16):
                    try:
                        if n % 2:
                            raw, headers = signed(secret, f"evt-{i}", payload(f"W{i}"))
                            r = await http.post("/webhooks/acme", content=raw, headers=headers)
                        else:
                            r = await http.post("/v1/accounts/acme/events", json=event(i), headers=AUTH)
                    except httpx.ConnectError:
                        outcomes["refused"] += 1  # the listener is closed: the sender retries elsewhere
                        return
                    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                        # A kept-alive connection closed by the server as the request went out: not answered,
                        # so the sender retries it (safely: the event_id deduplicates).
                        outcomes[type(exc).__name__] += 1
                        continue
                    outcomes[str(r.status_code)] += 1
                    if r.status_code == 202:
                        acknowledged.add(f"evt-{i}")
                        if len(acknowledged) >= 400:
                            enough.set()
                    else:
                        assert r.status_code == 503, r.text  # nothing but "retry later" may be refused

        senders = [asyncio.create_task(send(n)) for n in range(16)]
        await asyncio.wait_for(enough.wait(), 60)
        took = await asyncio.to_thread(producer.terminate)
        await asyncio.wait_for(asyncio.gather(*senders), 30)
    finally:
        kill(producer)
    assert took < GRACE_S + 3, (took, producer.logs())
    # uvicorn raises the signal again once it has shut down: a clean stop by SIGTERM, as docker expects.
    assert producer.proc.returncode in (0, -signal.SIGTERM), producer.logs()
    assert "Traceback" not in producer.logs(), producer.logs()
    producer.assert_no_worker_killed()
    stored = await stored_ids(redis)
    assert acknowledged <= stored, f"{len(acknowledged - stored)} acknowledged events lost; {outcomes}"
    assert outcomes["refused"] == 16, outcomes  # every sender ended on a refused connection, none hung
    print(f"workers={workers}: exit after {took:.2f} s; outcomes {dict(outcomes)}")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines if line)}
    body = await reader.readexactly(int(headers["content-length"]))
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_answers_an_ndjson_upload_in_progress_at_once_with_where_to_resume(
    redis: Redis, redis_url: str, settings: Settings, tmp_path: Path, secret: str, workers: int
) -> None:
    """A backfill trickling in at SIGTERM is not left to be cut off when the grace runs out: the producer stops
    reading it, enqueues the complete lines it has, and answers 503 with ``resume_after_line`` at once."""
    producer = await start_producer(settings, redis_url, tmp_path, workers)
    lines = [orjson.dumps(event(i)) + b"\n" for i in range(100_000)]
    sent = 0
    trickling = asyncio.Event()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", producer.port)
        writer.write(
            b"POST /v1/accounts/acme/events/ndjson HTTP/1.1\r\nHost: producer\r\n"
            b"Authorization: Bearer tok-acme\r\nContent-Type: application/x-ndjson\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )

        async def upload() -> None:
            # Two full batches and part of a third at once, then a slow sender's pace: a line every 50 ms,
            # each in two halves (so the producer may hold an unfinished line when the signal comes).
            nonlocal sent
            writer.write(_chunk(b"".join(lines[:1200])))
            sent = 1200
            while True:
                await writer.drain()
                await asyncio.sleep(0.025)
                line = lines[sent]
                writer.write(_chunk(line[:20]))
                await writer.drain()
                await asyncio.sleep(0.025)
                writer.write(_chunk(line[20:]))
                sent += 1
                if sent >= 1220:
                    trickling.set()

        uploading = asyncio.create_task(upload())
        response = asyncio.create_task(_read_response(reader))
        await asyncio.wait_for(trickling.wait(), 30)
        signalled = time.monotonic()
        producer.proc.send_signal(signal.SIGTERM)
        status, headers, body = await asyncio.wait_for(response, GRACE_S + 15)
        answered_after = time.monotonic() - signalled
        uploading.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await uploading
        writer.close()
        await asyncio.to_thread(producer.wait_exit, GRACE_S + 15)
        exited_after = time.monotonic() - signalled
    finally:
        kill(producer)
    assert status == 503, body
    assert headers["content-type"] == "application/problem+json"
    assert headers["retry-after"] == "3"
    doc = orjson.loads(body)
    resume = doc["resume_after_line"]
    # Every complete line the producer read was taken; nothing after it was.
    assert 1200 <= resume <= sent, (doc, sent)
    assert doc["lines_read"] == doc["accepted"] == resume, doc
    assert doc["rejected"] == [], doc
    assert doc["duplicates"] == 0, doc
    assert await stored_ids(redis) == {f"evt-{i}" for i in range(resume)}
    # Answered well before the grace ran out, and the process then had nothing left to wait for.
    assert answered_after < 1.5, answered_after
    assert exited_after < GRACE_S + 3, (exited_after, producer.logs())
    assert "Traceback" not in producer.logs(), producer.logs()
    producer.assert_no_worker_killed()


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_request_still_unfinished_when_the_grace_runs_out_is_cut_off_and_new_connections_are_refused(
    redis: Redis, redis_url: str, settings: Settings, tmp_path: Path, secret: str, workers: int
) -> None:
    """A webhook whose body never finishes arriving holds the producer only for the grace period; meanwhile a
    new connection is refused at once (so the sender's retry goes elsewhere), not left waiting."""
    producer = await start_producer(settings, redis_url, tmp_path, workers)
    raw, headers = signed(secret, "evt-slow", payload("SLOW"))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", producer.port)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(
            f"POST /webhooks/acme HTTP/1.1\r\nHost: producer\r\n{head}Content-Length: {len(raw)}\r\n\r\n".encode()
            + raw[:10]
        )
        await writer.drain()
        await asyncio.sleep(0.3)  # the request has started: its handler waits for the rest of the body
        signalled = time.monotonic()
        producer.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(1.0)  # every worker process has had the signal
        assert producer.proc.poll() is None  # still waiting for the slow request
        try:
            async with httpx.AsyncClient(timeout=GRACE_S + 15) as http:
                new_connection = str((await http.get(f"{producer.url}/healthz")).status_code)
        except httpx.TransportError as exc:
            new_connection = type(exc).__name__
        refused_after = time.monotonic() - signalled
        answer = await asyncio.wait_for(reader.read(), GRACE_S + 15)
        cut_after = time.monotonic() - signalled
        writer.close()
        await asyncio.to_thread(producer.wait_exit, GRACE_S + 15)
        exited_after = time.monotonic() - signalled
    finally:
        kill(producer)
    assert new_connection == "ConnectError", new_connection
    assert refused_after < 1.5, refused_after
    assert GRACE_S - 0.5 < cut_after < GRACE_S + 2, cut_after
    assert exited_after < GRACE_S + 3, (exited_after, producer.logs())
    # Told to retry (nothing was taken), as any other "not now", rather than a plain 500.
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 "), answer
    assert b"retry-after: 3" in head.lower(), answer
    assert orjson.loads(body)["type"].endswith("/shutting-down"), answer
    assert "Traceback" not in producer.logs(), producer.logs()
    producer.assert_no_worker_killed()
    assert "evt-slow" not in await stored_ids(redis)


async def test_a_worker_process_still_stopping_past_the_grace_and_margin_is_killed_with_its_stacks_logged(
    settings: Settings, tmp_path: Path
) -> None:
    """With Redis stalled (stopped, its connections open) a worker's last flush of its counts at shutdown waits
    for Redis's 5 s socket timeout: the supervisor does not wait that long past the grace, but has the worker
    write its stacks into the log and kills it."""
    server = start_redis(tmp_path / "stalled-redis", appendonly=False)
    grace_s = 1
    producer = await start_producer(settings, server.url, tmp_path, 2, grace_s)
    try:
        os.kill(server.pid, signal.SIGSTOP)
        signalled = time.monotonic()
        producer.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(producer.wait_exit, grace_s + 15)
        exited_after = time.monotonic() - signalled
    finally:
        os.kill(server.pid, signal.SIGCONT)
        kill(producer)
        server.stop()
    # Without the bound the stop waits for the socket timeout: over 5.2 s after the signal (5 s, and 0.2 s of
    # uvicorn's shutdown before it). With it, at most the grace and margin, the stacks' half second, the
    # supervisor's own half-second tick, and some leeway for a busy machine.
    bound = grace_s + STOP_MARGIN_S + DUMP_WAIT_S + 1.3
    assert exited_after < bound, (exited_after, producer.logs())
    assert producer.proc.returncode == 0, producer.logs()
    logs = producer.log.read_text(errors="replace")  # all of it: the stacks are longer than logs() keeps
    # The worker that answered the readiness checks waits on Redis for its last flush of counts. The other may have
    # been anywhere in its start-up at the signal (readiness hears from one worker only): waiting on Redis too, or
    # ended at once by a signal that came before uvicorn handles it.
    killed = logs.count("producer_worker_killed")
    assert killed >= 1, logs
    # A killed worker's threads' stacks (faulthandler's) and its tasks' awaits: where it waits for Redis's answer.
    assert logs.count("Current thread") >= 1, logs
    assert logs.count("asyncio tasks (innermost await last)") >= 1, logs
    assert "in read_response" in logs, logs
