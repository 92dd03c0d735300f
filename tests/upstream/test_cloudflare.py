"""The Cloudflare Images client against the emulator over real HTTP: every endpoint, typed
errors, retries only where safe, Retry-After, timeouts, the budget, and a token never shown."""

from __future__ import annotations

import base64
import http.client
import io
import logging
import os
import ssl
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from PIL import Image as PILImage

from broker.upstream.budget import BudgetExhausted
from broker.upstream.cloudflare import (
    CloudflareAuthError,
    CloudflareBadRequest,
    CloudflareConflict,
    CloudflareImages,
    CloudflareNotFound,
    CloudflareRateLimited,
    CloudflareTimeout,
    CloudflareUnavailable,
    Priority,
    parse_retry_after,
    rfc3339,
)
from tests.support.guide import run


class RecordingBudget:
    """A budget stand-in that records what the client asks of it."""

    def __init__(self, refuse: bool = False) -> None:
        self.acquired: list[Priority] = []
        self.paused: list[float] = []
        self.refuse = refuse

    def acquire(self, priority: Priority) -> None:
        if self.refuse:
            raise BudgetExhausted(42)
        self.acquired.append(priority)

    def pause(self, seconds: float) -> None:
        self.paused.append(seconds)


@pytest.fixture
def sleeps() -> list[float]:
    """The backoff delays the client asked for (it never really sleeps in tests)."""
    return []


@pytest.fixture
def cf(emulator: Any, sleeps: list[float]) -> CloudflareImages:
    """A client for the session's emulator, with counters and faults reset."""
    emulator.reset()
    return CloudflareImages(
        emulator.api_base,
        emulator.account_id,
        emulator.api_token,
        timeout=5,
        sleep=sleeps.append,
        account_hash=emulator.account_hash,
        delivery_base=emulator.url,
    )


def _png() -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (16, 16), "red").save(buffer, "PNG")
    return buffer.getvalue()


def _in(minutes: int) -> datetime:
    return datetime.now(UTC) + timedelta(minutes=minutes)


def test_direct_upload_then_details_list_blob_edit_delete(cf: CloudflareImages) -> None:
    draft = cf.direct_upload(
        creator="u_1", expiry=_in(30), metadata={"a": {"b": 1}}, require_signed_urls=True
    )
    image = cf.get_image(draft.id)
    assert image.draft and image.creator == "u_1" and image.meta == {"a": {"b": 1}}
    assert image.require_signed_urls
    assert draft.id not in {i.id for i in cf.iter_images_v2(creator="u_1")}

    sent = requests.post(
        draft.upload_url, files={"file": ("a.png", _png(), "image/png")}, timeout=5
    )
    assert sent.status_code == 200
    image = cf.get_image(draft.id, priority=Priority.BACKGROUND)
    assert not image.draft and image.filename == "a.png"
    assert image.uploaded is not None and image.uploaded.tzinfo is not None
    assert image.variants and all(v.startswith(cf.delivery_base) for v in image.variants)
    assert cf.get_blob(draft.id) == _png()

    page = cf.list_images_v2(per_page=10, creator="u_1")
    assert draft.id in {i.id for i in page.images}
    edited = cf.update_image(draft.id, metadata={"x": "y"}, require_signed_urls=False)
    assert edited.meta == {"x": "y"} and not edited.require_signed_urls

    cf.delete_image(draft.id)
    with pytest.raises(CloudflareNotFound) as exc:
        cf.get_image(draft.id)
    assert exc.value.status == 404 and exc.value.code == 5404


def test_v1_upload_keys_variants_stats(cf: CloudflareImages) -> None:
    image = cf.upload_image(file=_png(), filename="b.png", creator="u_2", custom_id="cf/b")
    assert image.id == "cf/b" and not image.draft
    with pytest.raises(ValueError):
        cf.upload_image()
    assert cf.stats().current >= 1 and cf.stats().allowed > 0

    names = {k.name for k in cf.create_signing_key("rotated")}
    assert {"rotated"} <= names
    keys = cf.list_signing_keys()
    assert all(k.value for k in keys)
    assert keys[0].value not in repr(keys[0])  # secrets stay out of logs and tracebacks
    assert "rotated" not in {k.name for k in cf.delete_signing_key("rotated")}

    created = cf.create_variant("thumbx", "cover", 64, 32, never_require_signed_urls=True)
    assert (created.fit, created.width, created.height) == ("cover", 64, 32)
    assert created.never_require_signed_urls
    assert cf.get_variant("thumbx") == created
    assert cf.update_variant("thumbx", "contain", 10, 10).fit == "contain"
    assert "thumbx" in {v.id for v in cf.list_variants()}
    cf.delete_variant("thumbx")
    with pytest.raises(CloudflareNotFound):
        cf.get_variant("thumbx")
    assert cf.delivery_url("cf/b", "public").endswith("/cf/b/public")
    cf.delete_image("cf/b")


def test_refusals_are_typed(cf: CloudflareImages, emulator: Any) -> None:
    with pytest.raises(CloudflareBadRequest) as exc:
        cf.direct_upload(creator="u", expiry=_in(30), custom_id="mine", require_signed_urls=True)
    assert exc.value.code == 5411
    cf.direct_upload(creator="u", expiry=_in(30), custom_id="taken", require_signed_urls=False)
    with pytest.raises(CloudflareConflict):
        cf.direct_upload(creator="u", expiry=_in(30), custom_id="taken", require_signed_urls=False)

    wrong = CloudflareImages(cf.api_base, emulator.account_id, "not-the-token", timeout=5)
    with pytest.raises(CloudflareAuthError) as auth:
        wrong.stats()
    assert auth.value.status == 401
    other = CloudflareImages(cf.api_base, "another-account", emulator.api_token, timeout=5)
    with pytest.raises(CloudflareAuthError):
        other.stats()


def test_idempotent_calls_retry_5xx_with_capped_jittered_backoff(
    cf: CloudflareImages, emulator: Any, sleeps: list[float]
) -> None:
    emulator.inject_fault("stats", status=503, count=2)
    assert cf.stats().allowed > 0
    assert emulator.counters()["stats"] == 3
    assert len(sleeps) == 2 and all(0 <= s <= cf.backoff_cap for s in sleeps)


def test_retries_give_up_after_max_retries(
    cf: CloudflareImages, emulator: Any, sleeps: list[float]
) -> None:
    emulator.inject_fault("image_details", status=500)
    with pytest.raises(CloudflareUnavailable) as exc:
        cf.get_image("anything")
    assert exc.value.status == 500
    assert emulator.counters()["image_details"] == cf.max_retries + 1
    assert len(sleeps) == cf.max_retries


def test_a_post_is_never_resent_once_it_may_have_arrived(
    cf: CloudflareImages, emulator: Any, sleeps: list[float]
) -> None:
    emulator.inject_fault("direct_upload", status=500, count=1)
    with pytest.raises(CloudflareUnavailable):
        cf.direct_upload(creator="u", expiry=_in(30))
    emulator.inject_fault("direct_upload", drop=True, count=1)
    with pytest.raises(CloudflareUnavailable):
        cf.direct_upload(creator="u", expiry=_in(30))
    assert emulator.counters()["direct_upload"] == 2
    assert sleeps == []


def test_a_post_that_never_left_is_retried(sleeps: list[float]) -> None:
    """Connection refused: nothing reached Cloudflare, so trying again is safe."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cf = CloudflareImages(f"http://127.0.0.1:{port}/client/v4", "a", "t", sleep=sleeps.append)
    with pytest.raises(CloudflareUnavailable) as exc:
        cf.direct_upload(creator="u", expiry=_in(30))
    assert exc.value.status == 0
    assert len(sleeps) == cf.max_retries


def test_429_honours_retry_after(cf: CloudflareImages, emulator: Any, sleeps: list[float]) -> None:
    emulator.inject_fault("keys_list", status=429, count=1)
    assert cf.list_signing_keys()
    assert sleeps == [1.0]  # the emulator's Retry-After, not the smaller jittered backoff


def test_429_with_a_budget_pauses_it_and_raises(cf: CloudflareImages, emulator: Any) -> None:
    budget = RecordingBudget()
    cf.budget = budget
    emulator.inject_fault("stats", status=429, count=1)
    with pytest.raises(CloudflareRateLimited) as exc:
        cf.stats(priority=Priority.BACKGROUND)
    assert exc.value.retry_after == 1.0
    assert budget.paused == [1.0]
    assert budget.acquired == [Priority.BACKGROUND]
    assert emulator.counters()["stats"] == 1


def test_every_attempt_spends_the_budget_and_a_refusal_calls_nobody(
    cf: CloudflareImages, emulator: Any
) -> None:
    budget = RecordingBudget()
    cf.budget = budget
    emulator.inject_fault("stats", status=500, count=1)
    cf.stats()
    assert budget.acquired == [Priority.INTERACTIVE, Priority.INTERACTIVE]
    cf.budget = RecordingBudget(refuse=True)
    with pytest.raises(BudgetExhausted) as exc:
        cf.stats()
    assert exc.value.retry_after == 42
    assert emulator.counters()["stats"] == 2


def test_slow_answers_time_out(emulator: Any) -> None:
    emulator.reset()
    cf = CloudflareImages(emulator.api_base, emulator.account_id, emulator.api_token, timeout=0.2)
    emulator.inject_fault("stats", latency_ms=800, count=1)
    with pytest.raises(CloudflareTimeout):
        cf.stats()
    assert emulator.counters()["stats"] == 1  # a read timeout is not retried


def test_the_token_never_shows(cf: CloudflareImages, emulator: Any, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="broker")
    emulator.inject_fault("stats", status=500, count=1)
    cf.stats()
    with pytest.raises(CloudflareNotFound):
        cf.get_image("missing")
    assert emulator.api_token not in repr(cf)
    assert emulator.api_token not in caplog.text
    assert caplog.text  # something was logged, just not the token


def test_non_json_failures_still_become_typed_errors(cf: CloudflareImages, emulator: Any) -> None:
    emulator.inject_fault("stats", drop=True)
    with pytest.raises(CloudflareUnavailable):
        cf.stats()


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, None), ("", None), ("7", 7.0), ("-3", 0.0), ("soon", None)],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header) == expected


def test_parse_retry_after_http_date() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now=lambda: 1445412480.0) == 30.0


def test_rfc3339_is_utc_whole_seconds() -> None:
    moment = datetime(2024, 1, 2, 4, 4, 5, 999, tzinfo=UTC)
    assert rfc3339(moment) == "2024-01-02T04:04:05Z"
    with pytest.raises(ValueError):
        rfc3339(datetime(2024, 1, 2))


@contextmanager
def _serving(handle: Any) -> Iterator[tuple[str, list[tuple[str, str, dict[str, str]]]]]:
    """Serve HTTP on a free port with `handle(handler)`; yield its URL and the requests seen
    (method, path as sent, headers by lower-case name)."""
    seen: list[tuple[str, str, dict[str, str]]] = []

    class Handler(BaseHTTPRequestHandler):
        def answer(self) -> None:
            seen.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
            handle(self)

        do_GET = do_POST = answer

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _forward(handler: BaseHTTPRequestHandler) -> None:
    """A plain HTTP proxy: send the absolute-form request on to its origin, answer with its
    answer."""
    target = urlsplit(handler.path)
    length = int(handler.headers.get("Content-Length") or 0)
    body = handler.rfile.read(length) if length else None
    headers = {k: v for k, v in handler.headers.items() if not k.lower().startswith("proxy-")}
    upstream = http.client.HTTPConnection(target.hostname or "", target.port, timeout=5)
    try:
        upstream.request(handler.command, target.path, body=body, headers=headers)
        answer = upstream.getresponse()
        data = answer.read()
    finally:
        upstream.close()
    handler.send_response(answer.status)
    handler.send_header("Content-Type", answer.getheader("Content-Type") or "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


@pytest.fixture
def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """An environment naming no proxy (a test then names its own)."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


def test_the_environments_proxy_carries_the_calls_unless_no_proxy_names_the_host(
    emulator: Any, no_proxy_environment: pytest.MonkeyPatch
) -> None:
    emulator.reset()
    with _serving(_forward) as (proxy, seen):
        host = proxy.removeprefix("http://")
        no_proxy_environment.setenv("HTTP_PROXY", f"http://user:p%40ss@{host}")
        cf = CloudflareImages(emulator.api_base, emulator.account_id, emulator.api_token)
        try:
            assert cf.stats().allowed > 0
            draft = cf.direct_upload(creator="u", expiry=_in(30), metadata={"k": "v"})
            assert cf.get_image(draft.id, priority=Priority.BACKGROUND).meta == {"k": "v"}
        finally:
            cf.close()
        assert [(method, path.startswith(emulator.api_base)) for method, path, _ in seen] == [
            ("GET", True),
            ("POST", True),
            ("GET", True),
        ]
        credentials = base64.b64encode(b"user:p@ss").decode()
        assert all(h.get("proxy-authorization") == f"Basic {credentials}" for *_, h in seen)
        assert emulator.counters()["stats"] == 1

        for no_proxy in ("127.0.0.1", "example.com, 10.0.0.0/8,127.0.0.0/8", "*"):
            no_proxy_environment.setenv("NO_PROXY", no_proxy)
            direct = CloudflareImages(emulator.api_base, emulator.account_id, emulator.api_token)
            try:
                assert direct.stats().allowed > 0
            finally:
                direct.close()
        assert len(seen) == 3 and emulator.counters()["stats"] == 4


def test_a_redirect_is_never_followed(emulator: Any, sleeps: list[float]) -> None:
    """An answer is Cloudflare's own: a 3xx pointing elsewhere is refused, not followed."""
    emulator.reset()

    def redirect(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(302)
        handler.send_header("Location", f"{emulator.api_base}/accounts/x/images/v1/stats")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    with _serving(redirect) as (url, seen):
        cf = CloudflareImages(f"{url}/client/v4", "a", "t", sleep=sleeps.append)
        try:
            with pytest.raises(CloudflareUnavailable) as exc:
                cf.stats()
        finally:
            cf.close()
    assert exc.value.status == 502
    assert emulator.counters().get("stats", 0) == 0
    assert len(seen) == cf.max_retries + 1  # a 502 of an idempotent call is retried, in place


def test_form_fields_arrive_as_sent(cf: CloudflareImages) -> None:
    """Text with quotes, line breaks and non-ASCII letters reaches Cloudflare unchanged."""
    creator = 'Zoë "q"\r\nContent-Disposition: x'
    metadata = {"note": "a\r\n--b", "name": "名前"}
    draft = cf.direct_upload(creator=creator, expiry=_in(30), metadata=metadata)
    image = cf.get_image(draft.id)
    assert (image.creator, image.meta) == (creator, metadata)
    uploaded = cf.upload_image(file=_png(), filename="c.png", creator=creator)
    assert (uploaded.filename, uploaded.creator) == ("c.png", creator)
    assert cf.get_blob(uploaded.id) == _png()


def test_a_ca_bundle_that_is_not_there_stops_the_start_in_one_line(tmp_path: Path) -> None:
    """REQUESTS_CA_BUNDLE naming a missing file: the app refuses to start, saying which
    variable and path, not with a traceback (every call would fail later)."""
    missing = tmp_path / "no-such-ca.pem"
    env = {
        key: value for key, value in os.environ.items() if not key.startswith(("BROKER_", "FLASK_"))
    }
    env.pop("CURL_CA_BUNDLE", None)
    env.update(
        BROKER_ENV="testing",
        BROKER_INSTANCE_PATH=str(tmp_path),
        BROKER_DATABASE_URL=f"sqlite:///{tmp_path / 'broker.db'}",
        BROKER_CLOUDFLARE_API_BASE="https://api.cloudflare.com/client/v4",
        BROKER_CLOUDFLARE_ACCOUNT_ID="account",
        BROKER_CLOUDFLARE_API_TOKEN="token",
        REQUESTS_CA_BUNDLE=str(missing),
    )
    done = run(
        [str(Path(sys.executable).parent / "flask"), "--app", "broker", "db", "current"], env
    )
    assert done.returncode == 1, done.stderr
    assert f"Error: REQUESTS_CA_BUNDLE={missing}: cannot read this CA bundle" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_https_proxys_own_certificate_is_checked_against_the_bundle(
    tmp_path: Path, no_proxy_environment: pytest.MonkeyPatch
) -> None:
    """An https:// proxy is verified with the configured CA bundle, not only the origin."""
    import certifi

    bundle = tmp_path / "ca.pem"
    bundle.write_text(Path(certifi.where()).read_text())
    no_proxy_environment.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    no_proxy_environment.setenv("HTTPS_PROXY", "https://proxy.example.test:3129")
    cf = CloudflareImages("https://api.cloudflare.com/client/v4", "account", "token")
    try:
        opener, _, _ = cf._origins.opener(cf.api_base)
        manager = opener.__self__
        assert manager.proxy.scheme == "https"
        assert manager.proxy_ssl_context is manager.connection_pool_kw["ssl_context"]
        assert manager.proxy_ssl_context.verify_mode == ssl.CERT_REQUIRED
    finally:
        cf.close()


def test_params_that_are_all_none_leave_no_bare_question_mark(
    emulator: Any, no_proxy_environment: pytest.MonkeyPatch
) -> None:
    """A None param is left out; with every one None the URL has no query at all."""
    emulator.reset()
    with _serving(_forward) as (proxy, seen):
        no_proxy_environment.setenv("HTTP_PROXY", proxy)
        cf = CloudflareImages(emulator.api_base, emulator.account_id, emulator.api_token)
        try:
            cf.request("GET", "/v1/stats", params={"page": None})
            cf.request("GET", "/v1/stats", params={"page": None, "x": 2})
        finally:
            cf.close()
    assert [path.rsplit("/", 1)[1] for _, path, _ in seen] == ["stats", "stats?x=2"]


FORKED_JITTER = """
import os, sys
from broker.upstream.cloudflare import CloudflareImages

client = CloudflareImages("http://127.0.0.1:9/client/v4", "a", "t", backoff_cap=1e9)
readers = []
for _ in range(2):  # two web processes forked from the master that built the client
    read, write = os.pipe()
    if os.fork() == 0:
        os.write(write, repr([client._backoff(30, None) for _ in range(4)]).encode())
        os._exit(0)
    os.close(write)
    readers.append(read)
for read in readers:
    print(os.read(read, 4096).decode())
    os.close(read)
    os.wait()
"""


def test_forked_processes_draw_their_own_backoff_jitter(tmp_path: Path) -> None:
    """The client is built in the gunicorn master: its forked web processes must not all
    retry after the same delays."""
    script = tmp_path / "forked_jitter.py"
    script.write_text(FORKED_JITTER)
    done = run([sys.executable, str(script)])
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()
    assert first != second
