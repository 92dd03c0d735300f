"""A real local webhook receiver for tests: a threaded werkzeug server on 127.0.0.1:0.

It records every request, verifies each with the `standardwebhooks` library when given the
endpoint's secret, and answers what the test scripted (status, headers), or blocks until released.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response


@dataclass
class Received:
    """One request the receiver got."""

    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool | None
    error: str | None = None

    @property
    def json(self) -> Any:
        """Return the body parsed as JSON."""
        return json.loads(self.body)

    @property
    def msg_id(self) -> str:
        """Return the `webhook-id` header."""
        return self.headers.get("webhook-id", "")


@dataclass
class Receiver:
    """The server's state and controls."""

    url: str = ""
    secret: str | None = None
    requests: list[Received] = field(default_factory=list)
    # Scripted answers, used first to last; afterwards `default`.
    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    default: tuple[int, dict[str, str]] = (204, {})
    block: threading.Event | None = None  # when set by a test, requests wait on `release`
    release: threading.Event = field(default_factory=threading.Event)
    arrived: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    changed: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)

    def respond(self, *answers: int | tuple[int, dict[str, str]]) -> None:
        """Script the next answers (status, or (status, headers))."""
        for a in answers:
            self.script.append(a if isinstance(a, tuple) else (a, {}))

    def wait_for(self, count: int, timeout: float = 5) -> list[Received]:
        """Wait until `count` requests have arrived (fail after `timeout`); return them all."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while len(self.requests) < count:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"{len(self.requests)} of {count} requests arrived"
                self.changed.wait(remaining)
            return list(self.requests)

    def app(self, environ: dict[str, Any], start_response: Any) -> Any:
        """Record the request, verify it, answer the scripted response."""
        request = Request(environ)
        body = request.get_data()
        headers = {k.lower(): v for k, v in request.headers.items()}
        verified: bool | None = None
        error = None
        if self.secret is not None:
            try:
                Webhook(self.secret).verify(body, headers)
                verified = True
            except WebhookVerificationError as exc:
                verified, error = False, str(exc)
        with self.lock:
            self.requests.append(Received(request.path, headers, body, verified, error))
            status, extra = self.script.pop(0) if self.script else self.default
            self.changed.notify_all()
        self.arrived.set()
        if self.block is not None and self.block.is_set():
            self.release.wait(60)
        return Response(b"ok", status=status, headers=extra)(environ, start_response)


@pytest.fixture(name="receiver")
def receiver_fixture() -> Iterator[Receiver]:
    """Serve a recording webhook receiver on a free loopback port."""
    with serve_receiver() as state:
        yield state


@contextlib.contextmanager
def serve_receiver() -> Iterator[Receiver]:
    """Serve a recording webhook receiver on a free loopback port (one more than the fixture's)."""
    state = Receiver()
    server = make_server("127.0.0.1", 0, state.app, threaded=True)
    state.url = f"http://127.0.0.1:{server.server_port}/hook"
    # shutdown() waits for the serve loop's next poll: the default 0.5 s, paid by every test.
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()
        thread.join(10)
