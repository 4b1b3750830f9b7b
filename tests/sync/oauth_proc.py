"""A worker-like process for test_oauth.py: one KlaviyoClient sending metric events for an OAuth account until
told to stop, then a JSON line with what it saw (refreshes it performed, 401s it met, calls that failed).

    python -m tests.sync.oauth_proc NAME BASE_URL REDIS_URL SECRET_KEY ACCOUNT DIR
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import orjson
from redis.asyncio import Redis

from passbridge.accounts import AccountStore
from passbridge.crypto import load_cipher
from worker.klaviyo.client import ClientOptions, KlaviyoClient
from worker.klaviyo.endpoints import CREATE_EVENT
from worker.klaviyo.errors import KlaviyoError


async def main(
    name: str, base_url: str, redis_url: str, secret_key: str, account_id: str, folder: Path
) -> None:
    redis = Redis.from_url(redis_url)
    store = AccountStore(redis, load_cipher(secret_key, folder))
    account = await store.get(account_id)  # read once, as a worker caches it: the tokens in it go stale
    ok, errors = 0, []
    client = KlaviyoClient(
        redis,
        store,
        base_url=base_url,
        revision="2026-10-15",
        rate_scale=60,
        options=ClientOptions(oauth_refresh_skew_s=0),
    )
    async with client:
        i = 0
        while not (folder / "stop").exists():
            i += 1
            body = {
                "data": {
                    "type": "event",
                    "attributes": {
                        "properties": {"n": i},
                        "unique_id": f"{name}-{i}",
                        "metric": {"data": {"type": "metric", "attributes": {"name": "Pass Updated"}}},
                        "profile": {
                            "data": {"type": "profile", "attributes": {"external_id": f"{name}-serial"}}
                        },
                    },
                }
            }
            try:
                await client.call(account, CREATE_EVENT, body=body)
                ok += 1
            except KlaviyoError as exc:
                errors.append(repr(exc))
            if ok == 1:
                (folder / f"started-{name}").touch()
            await asyncio.sleep(0.005)
        doc = {
            "name": name,
            "ok": ok,
            "errors": errors,
            "refreshes": client.oauth.refreshes,
            "got_401": client.calls[("create_event", "401")],
        }
    await redis.aclose()
    sys.stdout.write(orjson.dumps(doc).decode() + "\n")


if __name__ == "__main__":
    n, url, rurl, key, acct, folder = sys.argv[1:7]
    asyncio.run(main(n, url, rurl, key, acct, Path(folder)))
