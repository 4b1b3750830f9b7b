"""A lean connection for the publisher's one hot command: ``EVALSHA`` of a registered script.

A webhook request shares its Redis round trip with the others that arrived meanwhile, yet redis-py's asyncio
client still spent ~300 µs of Python per call on the producer's loaded event loop (connection pool, retry
wrapper, a timeout context per read, response callbacks), about 5 % of a webhook request's CPU. Here one
``asyncio.Protocol`` writes commands packed by hiredis and hands each reply, parsed by a ``hiredis.Reader``,
to the future of the oldest command in flight (replies come back in order, so concurrent calls pipeline on
one connection).

Behaviour kept from the redis-py path, so callers handle errors the same way: a refused or lost connection
raises ``redis.exceptions.ConnectionError`` (:class:`ReplyLost`, a subclass, for a command that was sent and may
have run), no reply within ``socket_timeout`` raises
``redis.exceptions.TimeoutError`` (and drops the connection, whose replies can no longer be matched), an error
reply raises ``redis.exceptions.ResponseError``; a script missing from the server's cache (``NOSCRIPT``: a
restart, ``SCRIPT FLUSH``) is loaded and the call repeated once. The next call after a failure connects
again. Only plain TCP URLs are served (``redis://`` with optional user, password and db); for anything else
:meth:`LeanScripts.for_client` returns ``None`` and the caller keeps redis-py.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
from typing import Any, cast

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

Arg = str | int | bytes


class ReplyLost(RedisConnectionError):  # type: ignore[misc]  # redis-py ships its exceptions untyped
    """The connection was lost after the command was sent and before its reply: the command may have run."""


class _Protocol(asyncio.Protocol):
    """Pipelined request/reply over one connection: one future per command, in order."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader(protocolError=InvalidResponse, replyError=ResponseError)
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have the same write/close.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if self.waiting:
                future = self.waiting.popleft()
                if not future.done():
                    future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        why = type(exc).__name__ if exc else "closed"
        self.lost = RedisConnectionError(f"connection to Redis lost ({why})")
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                # Sent, unanswered: unlike a refused connection, its outcome is unknown.
                future.set_exception(ReplyLost(f"connection to Redis lost before its reply ({why})"))

    def send(self, *args: Arg) -> asyncio.Future[Any]:
        assert self.transport is not None
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        self.transport.write(hiredis.pack_command(args))  # type: ignore[arg-type]  # the stub takes a 1-tuple
        return future


class LeanScripts:
    """Runs registered Lua scripts over its own connection (see the module docstring)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        socket_timeout: float | None = None,
        socket_connect_timeout: float | None = None,
    ) -> None:
        self.host, self.port, self.db = host, port, db
        self._auth = (username, password)
        self.socket_timeout = socket_timeout
        self.connect_timeout = socket_connect_timeout
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._sha: dict[str, str] = {}

    @classmethod
    def for_client(cls, redis: Redis) -> LeanScripts | None:
        """A lean runner on the same server, database and credentials as ``redis``; None when ``redis`` is
        not a plain TCP connection (unix socket, TLS, a custom connection class)."""
        pool = redis.connection_pool
        kw = pool.connection_kwargs
        if not issubclass(pool.connection_class, Connection) or pool.connection_class.__name__ not in (
            "Connection",
            "FastPackConnection",
        ):
            return None
        if "host" not in kw or kw.get("ssl") or kw.get("credential_provider") is not None:
            return None
        return cls(
            kw["host"],
            int(kw.get("port", 6379)),
            db=int(kw.get("db", 0) or 0),
            username=kw.get("username"),
            password=kw.get("password"),
            socket_timeout=kw.get("socket_timeout"),
            socket_connect_timeout=kw.get("socket_connect_timeout"),
        )

    async def run(self, source: str, args: list[Arg]) -> Any:
        """``EVALSHA`` of ``source`` with no keys and ``args``; the reply as hiredis parses it (bytes, ints,
        lists). Loads the script when the server does not know it."""
        sha = self._sha.get(source)
        if sha is None:
            # SHA-1 is what Redis names scripts by, not a security measure here.
            sha = self._sha[source] = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()
        reply = await self._call("EVALSHA", sha, 0, *args)
        if isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT"):
            self._checked(await self._call("SCRIPT", "LOAD", source))
            reply = await self._call("EVALSHA", sha, 0, *args)
        return self._checked(reply)

    async def close(self) -> None:
        """Close the connection (a later call opens a new one)."""
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None:
            proto.transport.close()

    @staticmethod
    def _checked(reply: Any) -> Any:
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def _call(self, *args: Arg) -> Any:
        proto = self._proto
        if proto is None or proto.lost is not None:
            proto = await self._connect()
        future = proto.send(*args)
        try:
            if self.socket_timeout is None:
                return await future
            async with asyncio.timeout(self.socket_timeout):
                return await future
        except TimeoutError:
            # The reply may still come, but it could no longer be told apart from the next one's.
            await self.close()
            raise RedisTimeoutError(f"Redis did not answer within {self.socket_timeout} s") from None

    async def _connect(self) -> _Protocol:
        # One connect at a time: concurrent callers share it.
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, proto = await loop.create_connection(_Protocol, self.host, self.port)
        except (OSError, TimeoutError) as exc:
            raise RedisConnectionError(
                f"cannot connect to Redis at {self.host}:{self.port} ({type(exc).__name__})"
            ) from None
        username, password = self._auth
        setup: list[tuple[Arg, ...]] = []
        if password:
            setup.append(("AUTH", username, password) if username else ("AUTH", password))
        if self.db:
            setup.append(("SELECT", self.db))
        try:
            for command in setup:
                self._checked(await proto.send(*command))
        except BaseException:
            assert proto.transport is not None
            proto.transport.close()
            raise
        self._proto = proto
        return proto
