"""Fixtures of the upstream tests: a user who uploads, a Redis of the test's own."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from broker.auth.models import User
from tests.support.redis_server import redis_server


@pytest.fixture
def alice(make_user: Callable[..., User]) -> User:
    """A user who uploads."""
    return make_user("alice")


@pytest.fixture
def redis_uri(tmp_path: Path) -> Iterator[str]:
    """A redis-server of this test's own, on a unix socket (no TCP port at all)."""
    with redis_server(tmp_path) as server:
        yield server.uri
