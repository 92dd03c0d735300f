"""The browsers' live server closes every static file it serves, even to a browser that drops
the connection mid-answer (werkzeug's dev server alone leaves the file to the collector)."""

from __future__ import annotations

import gc
import socket
import struct
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from flask import Flask
from werkzeug.serving import make_server

from tests.browser.conftest import whole_answers

HANDLERS = "(process_request_thread)"  # the name werkzeug's threaded server gives its handlers


def _handlers() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.endswith(HANDLERS)}


def test_a_dropped_connection_leaves_no_static_file_open(make_app: Callable[..., Flask]) -> None:
    """A browser that resets the connection once the answer is written: the file is closed."""
    app = make_app()
    read, gone = threading.Event(), threading.Event()

    class Dropped:
        """The app's answer, read to its end while the browser resets the connection."""

        def __init__(self, answer: Any) -> None:
            self.answer = answer

        def __iter__(self) -> Iterator[bytes]:
            yield from self.answer
            read.set()
            assert gone.wait(10)

        def close(self) -> None:
            self.answer.close()

    def once_the_browser_is_gone(environ: dict[str, Any], start_response: Any) -> Any:
        return Dropped(app(environ, start_response))

    server = make_server("127.0.0.1", 0, whole_answers(once_the_browser_is_gone), threaded=True)
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02})
    serving.start()
    before = _handlers()
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            browser = socket.create_connection(("127.0.0.1", server.server_port), timeout=10)
            browser.sendall(b"GET /static/js/upload.js HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read.wait(10)
            [handler] = _handlers() - before
            browser.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            browser.close()
            gone.set()
            handler.join(10)
            assert not handler.is_alive()
            gc.collect()
    finally:
        server.shutdown()
        server.server_close()
        serving.join(10)
    leaks = [str(w.message) for w in seen if issubclass(w.category, ResourceWarning)]
    assert leaks == []
