"""Fixtures of the operations tests: one scenario (see ``scenario.py``) shared by the read-only tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydantic import SecretStr

from passbridge.settings import Settings
from producer.app import create_app
from tests.conftest import serve

from .harness import ADMIN_TOKEN, Stack, new_stack
from .scenario import Known, build


@pytest.fixture(scope="package")
def known(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Known]:
    """The scenario's final state, with its producer and worker still running. Tests must not change it."""
    stack = new_stack(tmp_path_factory.mktemp("ops"))
    try:
        yield build(stack)
    finally:
        stack.stop()


@pytest.fixture
def fresh_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack of its own (not started) for tests that change what they look at."""
    stack = new_stack(tmp_path_factory.mktemp("ops-own"))
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def dashboard_url(settings: Settings, redis_url: str) -> Iterator[str]:
    """The producer app (with the admin token set) served from this process on the test's Redis."""
    server = serve(create_app(settings.model_copy(update={"admin_token": SecretStr(ADMIN_TOKEN)}), redis_url))
    try:
        yield server.url
    finally:
        server.stop()
