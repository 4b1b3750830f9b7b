"""The publisher's prepared requests, against a real Redis: built together, answered one by one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import pytest
from redis.asyncio import Redis

from passbridge.event import EventIn, PassEvent, build_event
from passbridge.keys import account_keys
from passbridge.queue import BacklogFull
from producer.publisher import Publisher
from tests.factories import event


def make(i: int) -> PassEvent:
    return build_event(
        EventIn.model_validate(event(i)),
        account_id="acme",
        source="webhook",
        received_at=datetime(2026, 11, 25, tzinfo=UTC),
        default_region="US",
        pass_url_template="https://passninja.com/p/{serial_number}",
    )


@pytest.fixture
async def publisher(redis: Redis) -> AsyncIterator[Publisher]:
    publisher = Publisher(redis, high_water=1000, dedup_window_s=60)
    await publisher.start()
    yield publisher
    await publisher.close()


async def evalsha_calls(redis: Redis) -> int:
    return int((await redis.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0))


async def in_mailbox(redis: Redis, i: int) -> list[bytes]:
    return await redis.zrange(account_keys("acme").mailbox(f"SER{i:08d}"), 0, -1)


async def test_requests_queued_together_are_built_back_to_back_and_share_one_call(
    publisher: Publisher, redis: Redis
) -> None:
    await publisher.publish("acme", [make(0)])  # the script is loaded; its first call is done
    built: list[int] = []

    def prepare(i: int) -> Callable[[], list[PassEvent]]:
        def build() -> list[PassEvent]:
            built.append(i)
            return [make(i)]

        return build

    before = await evalsha_calls(redis)
    calls = [asyncio.ensure_future(publisher.publish_prepared("acme", prepare(i))) for i in (1, 2, 3)]
    await asyncio.sleep(0)
    assert built == []  # queued, not built: the flusher builds them
    assert await asyncio.gather(*calls) == [[True], [True], [True]]
    assert built == [1, 2, 3]
    assert await evalsha_calls(redis) - before == 1
    for i in (1, 2, 3):
        assert len(await in_mailbox(redis, i)) == 1


async def test_a_failing_or_empty_build_answers_only_its_own_request(
    publisher: Publisher, redis: Redis
) -> None:
    def fails() -> list[PassEvent]:
        raise ValueError("bad signature")

    answers = await asyncio.gather(
        publisher.publish_prepared("acme", lambda: [make(1)]),
        publisher.publish_prepared("acme", fails),
        publisher.publish_prepared("acme", list),  # nothing to enqueue (a skipped pass type, say)
        publisher.publish_prepared("acme", lambda: [make(1)]),  # the same event again: a duplicate
        publisher.publish("acme", [make(2)]),
        return_exceptions=True,
    )
    assert answers[0] == [True]
    assert isinstance(answers[1], ValueError)
    assert answers[2:] == [[], [False], [True]]
    assert int(await redis.get(account_keys("acme").depth) or 0) == 2


async def test_a_request_that_goes_away_does_not_break_the_others(publisher: Publisher, redis: Redis) -> None:
    gone = asyncio.ensure_future(publisher.publish_prepared("acme", lambda: [make(1)]))
    stays = asyncio.ensure_future(publisher.publish_prepared("acme", lambda: [make(2)]))
    await asyncio.sleep(0)  # both are queued
    gone.cancel()
    assert await stays == [True]
    assert gone.cancelled()
    # Already handed over, the cancelled request's event is still enqueued, as with publish(): its sender
    # retries, and the retry is answered as a duplicate.
    assert len(await in_mailbox(redis, 1)) == 1


async def test_a_full_backlog_refuses_only_the_requests_with_new_events(redis: Redis) -> None:
    """Requests that share a call are refused together when their new events do not fit; asked again one by
    one, a request of duplicates only (which needs no room) and one that fits alone are answered as such."""
    publisher = Publisher(redis, high_water=3, dedup_window_s=60)
    await publisher.start()
    try:
        assert await publisher.publish("acme", [make(0), make(1)]) == [True, True]  # depth 2 of 3
        calls = [
            asyncio.ensure_future(publisher.publish("acme", [make(0)])),  # a duplicate: needs no room
            asyncio.ensure_future(publisher.publish("acme", [make(2), make(3)])),  # does not fit
            asyncio.ensure_future(publisher.publish("acme", [make(4)])),  # fits alone
        ]
        answers = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        await publisher.close()
    assert answers[0] == [False]
    assert isinstance(answers[1], BacklogFull)
    assert answers[2] == [True]
    assert int(await redis.get(account_keys("acme").depth)) == 3
    assert await in_mailbox(redis, 2) == []
    assert len(await in_mailbox(redis, 4)) == 1
