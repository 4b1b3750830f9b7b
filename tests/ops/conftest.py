"""Fixtures of the operations tests: one scenario (see ``scenario.py``) shared by the read-only tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .harness import Stack, new_stack
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
