"""The system suite: the whole topology as real processes (`make test-system`, not `make test`).

Needs PostgreSQL (`BROKER_TEST_POSTGRES_URL`) and Debian's `redis-server`; without them the
tests skip with the reason, and fail under CI=true. Each run's table is printed at the end of
the pytest output (CI shows it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

TABLES = pytest.StashKey[list[tuple[str, list[str]]]]()


@pytest.fixture(scope="session")
def report(pytestconfig: pytest.Config) -> Callable[[str, list[str]], None]:
    """`report(title, lines)`: keep a table to print after the test results."""
    tables = pytestconfig.stash.setdefault(TABLES, [])
    return lambda title, lines: tables.append((title, lines))


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """Print every reported table, after the test results."""
    for title, lines in config.stash.get(TABLES, []):
        terminalreporter.section(title)
        for line in lines:
            terminalreporter.write_line(line)
