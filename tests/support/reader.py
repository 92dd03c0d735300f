"""What a reader's shell looks like to the tests that run the README's commands as processes."""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    """Return a port of 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reader_env(**extra: str) -> dict[str, str]:
    """Return this environment without the test run's own settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "PYTEST_"))}
    env.update(extra)
    return env
