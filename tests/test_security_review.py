"""Security review regressions: each test pins a defect that was found and fixed."""

from __future__ import annotations

import http.server
import re
import shutil
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

from broker.platform.db import db, utcnow
from broker.uploads.models import Upload
from broker.webhooks import ssrf

PASSWORD = "correct horse battery"


def _ready_upload(app: Flask, user_id: int) -> str:
    """Record a ready, public upload of `user_id` (no upstream call needed to redirect to it)."""
    with app.app_context():
        upload = Upload(
            user_id=user_id,
            image_id="img-security-review",
            status="ready",
            require_signed_urls=False,
            expires_at=utcnow() + timedelta(minutes=30),
        )
        db.session.add(upload)
        db.session.commit()
        return upload.id


# --- 1. the /i/ redirect's session fast path --------------------------------------------------


def test_redirect_fast_path_honours_strong_session_protection_from_config(
    make_app: Callable[..., Flask], make_user: Callable[..., Any], login: Callable[..., Any]
) -> None:
    """SESSION_PROTECTION=strong in the app config: a session replayed from another client is
    refused by the /i/ redirect exactly as flask-login refuses it everywhere else."""
    app = make_app(SESSION_PROTECTION="strong")
    user = make_user()
    client = app.test_client()
    client.environ_base["HTTP_USER_AGENT"] = "victim-browser"
    login(client, "alice", PASSWORD)
    upload_id = _ready_upload(app, user.id)
    assert client.get(f"/i/{upload_id}/thumb").status_code == 302

    stolen = app.test_client()
    stolen.environ_base["HTTP_USER_AGENT"] = "attacker-browser"
    stolen.set_cookie("session", client.get_cookie("session").value)
    assert stolen.get("/api/v1/me").status_code == 401  # flask-login's own verdict
    stolen.set_cookie("session", client.get_cookie("session").value)
    assert stolen.get(f"/i/{upload_id}/thumb").status_code == 401


# --- 2. CSRF on every cookie-authenticated write; 5. anonymous API calls --------------------

# Writes that need no session: credentials in the body, or a shared secret (no cookie rides).
NO_SESSION_WRITES = {
    "api.create_token",
    "auth.login",
    "auth.register",
    "hooks.cloudflare_notification",
}
# API reads documented as public.
PUBLIC_API = {"api.openapi_json", "api.docs_page", "api.create_token"}
WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")


_VARIABLE = re.compile(r"<(?:(\w+)(?:\([^)]*\))?:)?\w+>")


def _routes(app: Flask) -> list[tuple[str, str, str]]:
    """Return (endpoint, method, concrete path) for every rule, path variables filled in."""
    out = []
    for rule in app.url_map.iter_rules():
        path = _VARIABLE.sub(lambda m: "1" if m.group(1) == "int" else "x1", rule.rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            out.append((rule.endpoint, method, path))
    return out


def test_every_cookie_authenticated_write_needs_a_csrf_token(
    make_app: Callable[..., Flask], make_user: Callable[..., Any], login: Callable[..., Any]
) -> None:
    """A logged-in admin browser (session or remember cookie only) gets 403 csrf_failed on every
    state-changing route when the request carries no CSRF token."""
    app = make_app()
    make_user("root", PASSWORD, is_admin=True)
    writes = [r for r in _routes(app) if r[1] in WRITE_METHODS and r[0] not in NO_SESSION_WRITES]
    assert len(writes) >= 13, writes
    client = app.test_client()
    login(client, "root", PASSWORD)
    remembered = app.test_client()
    page = remembered.get("/auth/login").get_data(as_text=True)
    csrf = page.split('name="csrf-token" content="', 1)[1].split('"', 1)[0]
    remembered.post(
        "/auth/login",
        data={"username": "root", "password": PASSWORD, "remember": "y", "csrf_token": csrf},
    )
    remembered.delete_cookie("session")
    assert remembered.get("/api/v1/me").status_code == 200
    for who in (client, remembered):
        for endpoint, method, path in writes:
            response = who.open(path, method=method, json={})
            assert response.status_code == 403, (endpoint, method, response.status_code)
            if path.startswith("/api/"):
                assert response.get_json()["error"]["code"] == "csrf_failed", endpoint
        remembered.delete_cookie("session")
    assert client.get("/api/v1/me").status_code == 200  # the logout above was refused


def test_every_api_route_answers_anonymous_callers_with_json_401(
    make_app: Callable[..., Flask],
) -> None:
    """No credentials (or a bad bearer token): JSON 401 on every API route but the public ones."""
    app = make_app()
    client = app.test_client()
    api = [r for r in _routes(app) if r[2].startswith("/api/") and r[0] not in PUBLIC_API]
    assert len(api) >= 20, api
    for headers in (
        {},
        {"Authorization": "Bearer brk_not-a-token"},
        {"Authorization": "Basic eDp5"},
    ):
        for endpoint, method, path in api:
            response = client.open(path, method=method, json={}, headers=headers)
            assert response.status_code == 401, (endpoint, method, headers, response.status_code)
            assert response.get_json()["error"]["code"] == "unauthorized", endpoint
    for endpoint, method, path in [
        r for r in _routes(app) if r[0] in PUBLIC_API - {"api.create_token"}
    ]:
        assert client.open(path, method=method).status_code == 200, endpoint


# --- 3. SSRF guard ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://ä..example.com/hook",  # an empty IDNA label
        "https://" + "ä" * 70 + ".example.com/hook",  # an IDNA label over 63 characters
        "https://\udcff.example.com/hook",  # a lone surrogate
    ],
)
def test_urls_the_idna_codec_cannot_encode_are_refused_not_crashed(url: str) -> None:
    """check_url answers BlockedAddress (a clean 422 upstream), never a raw UnicodeError."""
    with pytest.raises(ssrf.BlockedAddress):
        ssrf.check_url(url)


def test_admin_api_refuses_a_bad_idna_webhook_url_with_422(
    make_app: Callable[..., Flask], make_user: Callable[..., Any], bearer: Callable[..., Any]
) -> None:
    """The API's SSRF check turns an unencodable host into 422 url_not_allowed, not a 500."""
    app = make_app()
    root = make_user("root", PASSWORD, is_admin=True)
    headers = bearer(app, root)
    client = app.test_client()
    for url in ("https://ä..example.com/hook", "https://" + "ä" * 70 + ".example.com/"):
        response = client.post(
            "/api/v1/webhooks/endpoints", json={"url": url, "events": ["*"]}, headers=headers
        )
        assert response.status_code == 422, response.get_data(as_text=True)
        assert response.get_json()["error"]["code"] == "url_not_allowed"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture
def tls_receiver(tmp_path: Path) -> Iterator[tuple[int, Path, list[str]]]:
    """An HTTPS server on 127.0.0.1 with a certificate for `hook.test` from a private CA.

    Yields (port, CA file, server names the clients sent via SNI)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test CA")
    ca_key, ca, key, csr, cert = (tmp_path / n for n in ("ca.key", "ca.pem", "k", "csr", "crt"))
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key),
             "-out", str(ca), "-days", "2", "-subj", "/CN=review test CA")  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
             "-subj", "/CN=hook.test")  # fmt: skip
    ext = tmp_path / "ext"
    ext.write_text("subjectAltName=DNS:hook.test\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
             "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))  # fmt: skip
    names: list[str] = []
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    context.sni_callback = lambda sock, name, ctx: names.append(name or "")  # type: ignore[assignment,misc,return-value]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], ca, names
    finally:
        server.shutdown()
        server.server_close()


def test_pinned_https_checks_the_certificate_against_the_original_host_name(
    tls_receiver: tuple[int, Path, list[str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Connecting to the checked IP still sends SNI and verifies the certificate for the name."""
    port, ca, names = tls_receiver
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))

    def pinned(host: str) -> ssrf.Target:
        return ssrf.Target(scheme="https", host=host, port=port, address="127.0.0.1", path="/h")

    ok = ssrf.post_pinned(pinned("hook.test"), b"{}", {}, timeout=5)
    assert (ok.status, ok.body) == (200, b"ok")
    assert names == ["hook.test"]
    with pytest.raises(Exception, match=r"(?i)hostname|match"):
        ssrf.post_pinned(pinned("other.test"), b"{}", {}, timeout=5)
    assert names[-1] == "other.test"
    untrusted = tmp_path / "empty.pem"
    untrusted.write_text("")
    monkeypatch.setenv("SSL_CERT_FILE", str(untrusted))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    with pytest.raises(Exception, match=r"(?i)certificate verify failed"):
        ssrf.post_pinned(pinned("hook.test"), b"{}", {}, timeout=5)


# --- the inbound Cloudflare hook -------------------------------------------------------------


@pytest.mark.parametrize("image", ["x", ["id"], 7, True])
def test_cloudflare_hook_ignores_a_non_object_image_field(
    make_app: Callable[..., Flask], image: Any
) -> None:
    """`{"image": "x"}` with the right secret is junk to ignore (202), not a 500."""
    app = make_app(CLOUDFLARE_WEBHOOK_SECRET="hook-secret-for-tests")
    response = app.test_client().post(
        "/hooks/cloudflare",
        json={"image": image},
        headers={"cf-webhook-auth": "hook-secret-for-tests"},
    )
    assert response.status_code == 202
    assert response.get_json() == {"status": "ignored"}


@pytest.mark.parametrize("sent", [None, "", "anything"])
def test_cloudflare_hook_refuses_everything_when_no_secret_is_configured(
    make_app: Callable[..., Flask], sent: str | None
) -> None:
    """No BROKER_CLOUDFLARE_WEBHOOK_SECRET: every call is 401 (an empty header matches nothing)."""
    app = make_app(CLOUDFLARE_WEBHOOK_SECRET=None)
    headers = {} if sent is None else {"cf-webhook-auth": sent}
    response = app.test_client().post("/hooks/cloudflare", json={"imageId": "x"}, headers=headers)
    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == "unauthorized"


# --- 4. secrets never logged -----------------------------------------------------------------


def test_database_errors_do_not_carry_bound_values(app: Flask) -> None:
    """A failing statement's message (logged with the traceback of a 500) hides its parameters,
    so a webhook secret or signing key being written never reaches the log."""
    secret = "whsec_c2VjcmV0LXRoYXQtbXVzdC1ub3QtbGVhaw=="
    with app.app_context():
        with pytest.raises(sa.exc.DBAPIError) as caught:
            db.session.execute(sa.text("INSERT INTO no_such_table VALUES (:v)"), {"v": secret})
        db.session.rollback()
    assert secret not in str(caught.value)
    assert secret not in repr(caught.value)


def test_issued_token_repr_hides_the_secret(app: Flask, make_user: Callable[..., Any]) -> None:
    """`repr(IssuedToken)` (e.g. in a log line or a traceback) never shows the bearer secret."""
    from broker.auth import tokens
    from broker.auth.models import User

    user = make_user()
    with app.app_context():
        issued = tokens.issue(db.session, db.session.get(User, user.id), "repr")
        assert issued.secret.startswith("brk_")
        assert issued.secret not in repr(issued) and issued.secret not in str(issued)
        db.session.rollback()


# --- 5. no 500 for odd input -------------------------------------------------------------------

JSON_BODIES = [1, "s", [1], None, {"username": 5, "password": [1], "csrf_token": 7}]


@pytest.mark.parametrize("body", JSON_BODIES)
def test_browser_forms_treat_a_json_body_as_an_empty_form(
    make_app: Callable[..., Flask],
    make_user: Callable[..., Any],
    login: Callable[..., Any],
    csrf_headers: Callable[..., dict[str, str]],
    body: Any,
) -> None:
    """Flask-WTF fed JSON values of any type to the form fields (500); now it is an empty form:
    the usual 400/422 refusal, and nothing changes."""
    app = make_app(RATELIMIT_ENABLED=False)
    make_user()
    anonymous = app.test_client()
    for path in ("/auth/login", "/auth/register"):
        response = anonymous.post(path, json=body)
        assert response.status_code in (400, 422), (path, response.status_code)
    client = app.test_client()
    login(client, "alice", PASSWORD)
    headers = csrf_headers(client)
    for path in ("/auth/account/password", "/auth/account/tokens/x1/revoke", "/auth/logout"):
        response = client.post(path, json=body, headers=headers)
        assert response.status_code < 500, (path, response.status_code)
    assert client.get("/api/v1/me").status_code == 401  # the logout went through


# --- 6. production configuration ---------------------------------------------------------------


def _production(**overrides: Any) -> dict[str, Any]:
    from broker.platform.config import DEFAULTS
    from tests.conftest import PRODUCTION_SETTINGS

    return {**DEFAULTS, **PRODUCTION_SETTINGS, **overrides}


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"DEBUG": True}, "DEBUG"),
        ({"TESTING": True}, "TESTING"),
        ({"WTF_CSRF_ENABLED": False}, "CSRF"),
        ({"WEBHOOK_ALLOW_PRIVATE": True}, "WEBHOOK_ALLOW_PRIVATE"),
        ({"CLOUDFLARE_API_BASE": "http://127.0.0.1:8788/client/v4"}, "CLOUDFLARE_API_BASE"),
        ({"CLOUDFLARE_DELIVERY_BASE": "http://127.0.0.1:8788"}, "CLOUDFLARE_DELIVERY_BASE"),
        ({"CLOUDFLARE_UPLOAD_ORIGIN": "http://127.0.0.1:8788"}, "CLOUDFLARE_UPLOAD_ORIGIN"),
    ],
)
def test_production_refuses_unsafe_settings(overrides: dict[str, Any], named: str) -> None:
    """Debug/testing mode, CSRF off, private webhooks and plain-http (emulator) Cloudflare URLs
    are refused in production, naming the setting."""
    from broker.platform.config import ConfigError, finalize

    finalize(_production(), "/tmp")  # the baseline is accepted
    with pytest.raises(ConfigError, match=named):
        finalize(_production(**overrides), "/tmp")


def test_request_bodies_are_capped(make_app: Callable[..., Flask]) -> None:
    """An anonymous caller cannot make the broker buffer an unbounded JSON body: 413 JSON."""
    app = make_app()
    assert app.config["MAX_CONTENT_LENGTH"] == 1024 * 1024
    big = b'{"username": "' + b"a" * (2 * 1024 * 1024) + b'"}'
    response = app.test_client().post(
        "/api/v1/auth/tokens", data=big, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert response.get_json()["error"]["code"] == "request_entity_too_large"
