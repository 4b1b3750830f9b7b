"""The express lane with a real ``passbridge worker``: a small account's events are worked by the worker's
express-lane child, a big account's by the worker itself, and the child dies with its worker."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import httpx
import orjson
import pytest

from passbridge.keys import EXPRESS_BUSY, EXPRESS_ON, WORKERS_INFO
from passbridge.queue import enqueue
from passbridge.redis_server import free_port
from tests.conftest import async_wait_for
from worker import history

from .e2e import Pipeline, Workers
from .helpers import pass_event

pytestmark = pytest.mark.slow


async def lanes(pipeline: Pipeline) -> dict[str, dict[str, object]]:
    """Worker id → heartbeat info of every registered worker."""
    raw = await pipeline.redis.hgetall(WORKERS_INFO)
    return {k.decode(): orjson.loads(v) for k, v in raw.items()}


async def written_by(pipeline: Pipeline, account_id: str, serials: list[str]) -> dict[str, str]:
    """Serial → id of the worker that wrote its (only) event."""
    out = {}
    for serial in serials:
        for h in await history.timeline(pipeline.redis, account_id, serial):
            if h.kind == "written":
                out[serial] = str(h.detail["worker"])
    return out


def nice(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def autogroup(pid: int) -> tuple[str, int] | None:
    """The process's autogroup (Linux: the CPU-sharing group of its session) and that group's nice, or
    ``None`` on a kernel without autogroups."""
    try:
        name, _, value = Path(f"/proc/{pid}/autogroup").read_text().split()
    except FileNotFoundError:
        return None
    return name, int(value)


def gone(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    if not stat.exists():
        return True
    return stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


async def test_small_account_goes_to_the_express_lane_big_to_the_worker(
    pipeline: Pipeline, workers: Workers
) -> None:
    await pipeline.add_account("small")
    await pipeline.add_account("big")
    # Every worker counts as busy: small accounts always go to the express lanes (the default leaves them to
    # an idle worker, which takes them as fast).
    workers.env["PASSBRIDGE_WORKER_EXPRESS_BUSY_SERIALS"] = "0"
    (proc,) = workers.start(1)

    async def both_lanes_up() -> bool:
        kinds = {str(info.get("lane")) for info in (await lanes(pipeline)).values()}
        return kinds == {"main", "express"} and await _diverting(pipeline)

    await async_wait_for(both_lanes_up, timeout=30)
    info = await lanes(pipeline)
    express_id = next(w for w, i in info.items() if i["lane"] == "express")
    main_id = next(w for w, i in info.items() if i["lane"] == "main")
    assert info[main_id]["pid"] == proc.pid

    # One enqueue of 40 events: the account's backlog is over the small bound (32) from the start.
    big = [pass_event("big", f"B{i}", 0) for i in range(40)]
    result = await enqueue(pipeline.redis, "big", big, high_water=10_000_000, dedup_window_s=3600)
    assert all(result.accepted)
    small = [pass_event("small", f"S{i}", 0) for i in range(4)]
    for ev in small:
        await pipeline.put([ev])
        await asyncio.sleep(0.05)
    await async_wait_for(pipeline.drained, timeout=60)

    small_writers = await written_by(pipeline, "small", [e.serial_number for e in small])
    big_writers = await written_by(pipeline, "big", [e.serial_number for e in big])
    assert set(small_writers.values()) == {express_id}, workers.logs()
    assert len(small_writers) == len(small)
    assert set(big_writers.values()) == {main_id}, workers.logs()
    assert len(big_writers) == len(big)
    pipeline.sandbox.wait_idle()
    assert sorted(pipeline.stored_unique_ids("small")) == sorted(e.event_id for e in small)

    # The worker drains backlogs at a lower CPU priority than its express lane (PASSBRIDGE_WORKER_BACKLOG_NICE).
    express_pid = int(str(info[express_id]["pid"]))
    assert nice(proc.pid) == nice(express_pid) + 10
    # ... and that holds across sessions: the lane has a session of its own, and where Linux shares CPU
    # between sessions first (autogroup), the worker's session is lowered too.
    assert os.getsid(express_pid) == express_pid != os.getsid(proc.pid) == proc.pid
    worker_group, express_group = autogroup(proc.pid), autogroup(express_pid)
    if worker_group is not None and express_group is not None:
        assert worker_group[1] == express_group[1] + 10
        assert worker_group[0] != express_group[0]

    # A SIGKILLed worker takes its express lane along (no orphan keeps working on its own).
    assert not gone(express_pid)
    workers.kill(proc)

    async def express_gone() -> bool:
        return gone(express_pid)

    await async_wait_for(express_gone, timeout=15)


async def test_express_lane_disabled_the_worker_takes_everything(
    pipeline: Pipeline, workers: Workers
) -> None:
    await pipeline.add_account("small")
    workers.env["PASSBRIDGE_WORKER_EXPRESS_LANE"] = "false"
    workers.start(1)
    await async_wait_for(lambda: _one_worker(pipeline), timeout=30)
    small = [pass_event("small", f"S{i}", 0) for i in range(3)]
    await pipeline.put(small)
    await async_wait_for(pipeline.drained, timeout=30)
    info = await lanes(pipeline)
    assert [i["lane"] for i in info.values()] == ["main"]
    assert await pipeline.redis.exists(EXPRESS_ON) == 0
    assert set((await written_by(pipeline, "small", [e.serial_number for e in small])).values()) == set(info)


async def test_worker_metrics_count_what_its_express_lane_delivered(
    pipeline: Pipeline, workers: Workers
) -> None:
    # The express lane serves no /metrics of its own: its counters must show in its worker's scrape.
    await pipeline.add_account("small")
    port = free_port()
    workers.env["PASSBRIDGE_WORKER_METRICS_PORT"] = str(port)
    workers.env["PASSBRIDGE_WORKER_EXPRESS_BUSY_SERIALS"] = "0"
    workers.start(1)

    await async_wait_for(lambda: _diverting(pipeline), timeout=30)
    small = [pass_event("small", f"S{i}", 0) for i in range(5)]
    for ev in small:
        await pipeline.put([ev])
    await async_wait_for(pipeline.drained, timeout=30)
    writers = await written_by(pipeline, "small", [e.serial_number for e in small])
    express = {w for w, i in (await lanes(pipeline)).items() if i["lane"] == "express"}
    assert set(writers.values()) <= express

    async def scraped() -> bool:
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
        return 'passbridge_delivered_events_total{account="small"} 5.0' in text

    await async_wait_for(scraped, timeout=15)


async def _diverting(pipeline: Pipeline) -> bool:
    """Small accounts' events go to the express lane: it is up (its heartbeat) and the worker counts as busy
    (the worker's own heartbeat, which may come later than the lane's)."""
    return await pipeline.redis.exists(EXPRESS_ON, EXPRESS_BUSY) == 2


async def _one_worker(pipeline: Pipeline) -> bool:
    return len(await lanes(pipeline)) == 1


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
async def test_an_express_lane_killed_alone_is_started_again(
    pipeline: Pipeline, workers: Workers, sig: signal.Signals
) -> None:
    """The child killed (an OOM kill, an operator's signal) while its worker lives: the worker notices,
    says so and starts a new one, which delivers; the worker itself goes on."""
    await pipeline.add_account("small")
    [proc] = workers.start(1)
    workers.wait_express()
    [child] = Workers.family(proc) - {proc.pid}
    os.kill(child, sig)

    async def replaced() -> bool:
        return len(Workers.family(proc) - {proc.pid, child}) == 1

    await async_wait_for(replaced, timeout=30)  # within the restart back-off (5 s) of a young child
    workers.wait_express()
    small = [pass_event("small", f"S{i}", 0) for i in range(3)]
    await pipeline.put(small)
    await async_wait_for(pipeline.drained, timeout=30)
    assert proc.poll() is None
    text = workers.text()
    assert '"event": "express_lane_exited"' in text
    assert '"restarts": 1' in text
